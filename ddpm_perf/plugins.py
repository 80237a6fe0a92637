"""Plugin discovery (entry points), selection syntax, option parsing, ordering, availability.

Every plugin, ours included, is found through the entry-point group ``ddpm_perf.plugins``::

    [project.entry-points."ddpm_perf.plugins"]
    my_plugin = "my_package.module:MyPlugin"

Selection syntax (``--plugins``): comma-separated names, each with optional options in
parentheses: ``fused_norm,int8(calib_batches=8),compile(mode=max-autotune)``.
"""

from __future__ import annotations

import enum
import importlib.metadata as md
from importlib import resources
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pluggy

from . import hooks
from .errors import UserError

ENTRY_POINT_GROUP = "ddpm_perf.plugins"
CHAINED_HOOKS = {"transform_model": "model", "wrap_denoiser": "fn", "wrap_train_step": "fn"}


class Phase(enum.IntEnum):
    """Order in which plugins transform the model: rewrites first, compilation last."""

    REWRITE = 0
    LAYOUT = 1
    PRECISION = 2
    COMPILE = 3
    RUNTIME = 4


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _format(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Option:
    """A typed plugin option: ``Option(int, 8, "calibration batches")``."""

    type: type
    default: Any
    help: str = ""
    choices: tuple | None = None

    def parse(self, plugin: str, name: str, text: str) -> Any:
        if self.choices:
            expected = "/".join(map(str, self.choices))
        elif self.type is bool:
            expected = "bool (true/false, yes/no, on/off, 1/0)"
        else:
            expected = self.type.__name__
        try:
            if self.type is bool:
                low = text.lower()
                if low not in _TRUE | _FALSE:
                    raise ValueError
                value = low in _TRUE
            else:
                value = self.type(text)
        except ValueError:
            raise UserError(f"plugin {plugin}: option {name}={text!r} is not a valid {expected}") from None
        if self.choices and value not in self.choices:
            raise UserError(f"plugin {plugin}: option {name}={text!r} must be one of {expected}")
        return value

    def describe(self) -> str:
        kind = "|".join(map(str, self.choices)) if self.choices else self.type.__name__
        return f"{kind} = {self.default!r}" + (f"  {self.help}" if self.help else "")


class Plugin:
    """Base class of plugins. Subclasses set the class attributes and implement hooks."""

    name: ClassVar[str]
    description: ClassVar[str]
    phase: ClassVar[Phase] = Phase.RUNTIME
    options: ClassVar[dict[str, Option]] = {}
    conflicts: ClassVar[tuple[str, ...]] = ()
    ops: ClassVar[tuple[str, ...]] = ()  # custom ops it runs: `ddpm-perf plugins` shows their backends
    # weights fine-tuned for the plugin, a file in assets/ of its package: sampled when no checkpoint is given
    shipped_model: ClassVar[str | None] = None

    @classmethod
    def available(cls) -> str | None:
        """None if the plugin can run here, else the reason it cannot."""
        return None

    def __init__(self, **values: Any):
        unknown = sorted(set(values) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise UserError(f"plugin {self.name}: unknown option {unknown[0]!r}; options: {known}")
        self.opts = SimpleNamespace(**{k: values.get(k, o.default) for k, o in self.options.items()})

    @classmethod
    def shipped_model_path(cls) -> Path | None:
        """Where ``shipped_model`` lives, in ``assets/`` of the plugin's package (installed or not)."""
        if cls.shipped_model is None:
            return None
        package = cls.__module__.rpartition(".")[0] or cls.__module__
        return Path(str(resources.files(package) / "assets" / cls.shipped_model))

    def default_checkpoint(self) -> Path | None:
        """A checkpoint to sample when the user gives none: the shipped model if it is installed,
        else None for the core's embedded model."""
        path = self.shipped_model_path()
        return path if path is not None and path.is_file() else None

    @property
    def spec(self) -> str:
        """This plugin and its options in --plugins syntax: ``name(key=value,...)``."""
        values = ",".join(f"{k}={_format(v)}" for k, v in vars(self.opts).items())
        return f"{self.name}({values})" if values else self.name

    @classmethod
    def from_strings(cls, raw: dict[str, str]) -> "Plugin":
        values = {}
        for key, text in raw.items():
            if key not in cls.options:
                known = ", ".join(cls.options) or "none"
                raise UserError(f"plugin {cls.name}: unknown option {key!r}; options: {known}")
            values[key] = cls.options[key].parse(cls.name, key, text)
        return cls(**values)


@dataclass
class PluginInfo:
    """One entry point of the group: what ``ddpm-perf plugins`` lists."""

    name: str
    target: str
    distribution: str
    version: str
    entry_point: md.EntryPoint | None = None
    _cls: type[Plugin] | None = None
    error: str | None = None

    def load(self) -> type[Plugin] | None:
        """Import the plugin class; on failure record why in ``error`` and return None."""
        if self._cls is None and self.error is None:
            try:
                cls = self.entry_point.load()
                if not (isinstance(cls, type) and issubclass(cls, Plugin)):
                    raise TypeError(f"{self.target} is not a ddpm_perf.plugins.Plugin subclass")
                if cls.name != self.name:
                    raise TypeError(f"entry point {self.name!r} names a plugin called {cls.name!r}")
                self._cls = cls
            except Exception as e:  # a third-party module may fail in any way; report, don't crash
                self.error = f"failed to import: {type(e).__name__}: {e}"
        return self._cls


def discover() -> dict[str, PluginInfo]:
    """All plugins registered in the entry-point group, by name (not yet imported)."""
    found: dict[str, PluginInfo] = {}
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        info = PluginInfo(ep.name, ep.value, dist.name if dist else "?", dist.version if dist else "?", ep)
        first = found.setdefault(ep.name, info)
        if first.target != ep.value:  # mark the entry that is kept, listed and selected
            first.error = (f"name clash: {first.target} from {first.distribution} and "
                           f"{ep.value} from {info.distribution}; uninstall one of them")
    return dict(sorted(found.items()))


def parse_spec(spec: str) -> list[tuple[str, dict[str, str]]]:
    """``"a,b(x=1,y=z)"`` -> ``[("a", {}), ("b", {"x": "1", "y": "z"})]``."""
    items: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(spec):
        if ch == "(":
            depth += 1
            if depth > 1:
                raise UserError(f"--plugins {spec!r}: nested parentheses at position {i}")
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise UserError(f"--plugins {spec!r}: unmatched ')' at position {i}")
        elif ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    if depth:
        raise UserError(f"--plugins {spec!r}: missing ')'")
    items.append(spec[start:])

    parsed = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        name, _, rest = item.partition("(")
        name, options = name.strip(), {}
        if rest:
            if not rest.endswith(")") or ")" in rest[:-1]:
                raise UserError(f"--plugins: text after ')' in {item!r}")
            for pair in filter(None, (p.strip() for p in rest[:-1].split(","))):
                key, eq, value = pair.partition("=")
                if not eq or not key.strip():
                    raise UserError(f"--plugins: option {pair!r} of {name} must be written key=value")
                if key.strip() in options:
                    raise UserError(f"--plugins: option {key.strip()} of {name} is given twice")
                options[key.strip()] = value.strip()
        if not name.isidentifier():
            raise UserError(f"--plugins: {name!r} is not a plugin name")
        parsed.append((name, options))
    return parsed


def split_spec(spec: str) -> list[str]:
    """``"a,b(x=1,y=z)"`` -> ``["a", "b(x=1,y=z)"]``: each plugin's part of a spec."""
    return [f"{name}({','.join(f'{k}={v}' for k, v in opts.items())})" if opts else name
            for name, opts in parse_spec(spec)]


def instantiate(spec: str, registry: dict[str, PluginInfo] | None = None) -> list[Plugin]:
    """Parse ``spec``, load, validate and construct the plugins it names, in phase order."""
    registry = discover() if registry is None else registry
    plugins: list[Plugin] = []
    for name, raw in parse_spec(spec):
        info = registry.get(name)
        if info is None:
            raise UserError(f"unknown plugin {name!r}; known plugins: {', '.join(registry) or 'none'}")
        if any(p.name == name for p in plugins):
            raise UserError(f"plugin {name} is given twice; give it once with all its options")
        cls = info.load()
        if cls is None:
            raise UserError(f"plugin {name} ({info.distribution}) {info.error}")
        reason = cls.available()
        if reason:
            raise UserError(f"plugin {name} is not available here: {reason}")
        plugins.append(cls.from_strings(raw))
    for i, a in enumerate(plugins):
        for b in plugins[i + 1:]:
            if b.name in a.conflicts or a.name in b.conflicts:
                raise UserError(f"plugins {a.name} and {b.name} cannot be combined; drop one of them")
    return sorted(plugins, key=lambda p: p.phase)  # stable: command-line order within a phase


class PluginHost:
    """The selected plugins behind a pluggy PluginManager, called in phase order."""

    def __init__(self, plugins: Iterable[Plugin] = ()):
        self.plugins = sorted(plugins, key=lambda p: p.phase)
        self.pm = pluggy.PluginManager(hooks.PROJECT)
        self.pm.add_hookspecs(hooks.HookSpec)
        # pluggy calls the last registered implementation first: register in reverse.
        for plugin in reversed(self.plugins):
            self.pm.register(plugin, name=plugin.name)
        self.hook = self.pm.hook

    @classmethod
    def from_spec(cls, spec: str | None) -> "PluginHost":
        return cls(instantiate(spec) if spec else [])

    def chain(self, hook_name: str, value: Any, **kwargs: Any) -> Any:
        """Call a chained hook: each implementation gets the previous one's result."""
        arg = CHAINED_HOOKS[hook_name]
        # get_hookimpls() is in registration order; pluggy's call order is the reverse.
        for impl in reversed(getattr(self.hook, hook_name).get_hookimpls()):
            args = {arg: value, **kwargs}
            result = impl.function(*(args[a] for a in impl.argnames))
            if result is not None:
                value = result
        return value

    @property
    def spec(self) -> str:
        """The selected plugins with all their options, in --plugins syntax (phase order)."""
        return ",".join(p.spec for p in self.plugins)

    def default_checkpoint(self) -> Path | None:
        """The checkpoint a plugin brings for runs that name none (at most one plugin may)."""
        offers = [(p.name, path) for p in self.plugins if (path := p.default_checkpoint()) is not None]
        if len(offers) > 1:
            raise UserError(f"plugins {' and '.join(n for n, _ in offers)} each bring their own default model; "
                            "give --checkpoint")
        return offers[0][1] if offers else None

    def has(self, hook_name: str) -> bool:
        return bool(getattr(self.hook, hook_name).get_hookimpls())

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.plugins]
