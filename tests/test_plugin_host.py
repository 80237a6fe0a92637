"""The plugin host (ddpm_perf/plugins.py): selection syntax, options, validation, discovery
errors, phase order and chained hooks; and the per-step hooks through the sampling engine.

Plugins are classes defined here, put in a registry by hand: no entry points needed.
"""

from __future__ import annotations

import importlib.metadata as md
import json

import pytest
import torch
from click.testing import CliRunner

import ddpm_perf.plugins as plugins_mod
from ddpm_perf.cli import main
from ddpm_perf.diffusion.samplers import make_sampler
from ddpm_perf.engine import SamplingEngine, initial_noise
from ddpm_perf.errors import UserError
from ddpm_perf.hooks import hookimpl
from ddpm_perf.model.checkpoint import Checkpoint
from ddpm_perf.model.config import UNetConfig
from ddpm_perf.model.unet import StepPlan, UNet
from ddpm_perf.plugins import ENTRY_POINT_GROUP, Option, Phase, Plugin, PluginHost, PluginInfo, discover, \
    instantiate, parse_spec

# -- plugins used by the tests --------------------------------------------------------------------


class Knobs(Plugin):
    name = "knobs"
    description = "options of every kind"
    options = {
        "n": Option(int, 1, "an int"),
        "scale": Option(float, 0.5),
        "flag": Option(bool, False),
        "mode": Option(str, "fast", choices=("fast", "exact")),
        "bits": Option(int, 8, choices=(4, 8)),
    }


class Plain(Plugin):
    name = "plain"
    description = "no options"


class NeedsGpu(Plugin):
    name = "needs_gpu"
    description = "never available"

    @classmethod
    def available(cls):
        return "needs a TPU-42 accelerator"


class Exclusive(Plugin):
    name = "exclusive"
    description = "declares a conflict with plain"
    conflicts = ("plain",)


def registry(*classes: type[Plugin]) -> dict[str, PluginInfo]:
    return {c.name: PluginInfo(c.name, f"{__name__}:{c.__name__}", "test-dist", "9.9", _cls=c) for c in classes}


REGISTRY = registry(Knobs, Plain, NeedsGpu, Exclusive)


def recorder(plugin_name: str, plugin_phase: Phase, log: list) -> type[Plugin]:
    """A plugin that logs (hook, name) for every hook; its wrappers log (call, name) when run."""

    class Recorder(Plugin):
        name = plugin_name
        description = "records its hook calls"
        phase = plugin_phase

        @hookimpl
        def configure(self, ctx):
            log.append(("configure", self.name))

        @hookimpl
        def transform_model(self, model, ctx):
            log.append(("transform_model", self.name))

        @hookimpl
        def calibrate(self, engine, ctx):
            log.append(("calibrate", self.name))

        @hookimpl
        def wrap_denoiser(self, fn, ctx):
            log.append(("wrap_denoiser", self.name))

            def denoise(x, t, plan):
                log.append(("denoise", self.name))
                return fn(x, t, plan)

            return denoise

        @hookimpl
        def plan_step(self, step, t, plan, ctx):
            log.append(("plan_step", self.name))

        @hookimpl
        def after_step(self, step, state, ctx):
            log.append(("after_step", self.name))

    return Recorder


TINY = UNetConfig(image_size=8, in_channels=1, out_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                  attn_resolutions=(4,), dropout=0.0, num_groups=4)


@pytest.fixture(scope="module")
def checkpoint() -> Checkpoint:
    torch.manual_seed(0)
    return Checkpoint.from_model(UNet(TINY))


def engine(checkpoint: Checkpoint, host: PluginHost | None = None, steps: int = 3) -> SamplingEngine:
    _, diffusion = checkpoint.build()
    return SamplingEngine(checkpoint, make_sampler("ddim", diffusion, steps), host, "cpu", batch_size=2)


# -- selection syntax -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("", []),
    ("plain", [("plain", {})]),
    ("a,b(x=1,y=z)", [("a", {}), ("b", {"x": "1", "y": "z"})]),
    ("  a ,  b ( x = 1 ,  y=z )  ", [("a", {}), ("b", {"x": "1", "y": "z"})]),
    (",a,,b,", [("a", {}), ("b", {})]),
    ("a()", [("a", {})]),
    ("a(x=1,)", [("a", {"x": "1"})]),
    ("a(x=)", [("a", {"x": ""})]),
    ("a(x=p=q)", [("a", {"x": "p=q"})]),
    ("compile(mode=max-autotune)", [("compile", {"mode": "max-autotune"})]),
])
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("a(x=(1))", "nested parentheses at position 4"),
    ("a(b(c))", "nested parentheses"),
    ("a)", "unmatched ')' at position 1"),
    ("a(x=1))", "unmatched ')'"),
    ("a(x=1", "missing ')'"),
    ("a(x=1)b", "text after ')'"),
    ("a(x=1)(y=2)", "text after ')'"),
    ("a(x)", "option 'x' of a must be written key=value"),
    ("a(=1)", "must be written key=value"),
    ("a(x=1,x=2)", "option x of a is given twice"),
    ("(x=1)", "'' is not a plugin name"),
    ("my-plugin", "'my-plugin' is not a plugin name"),
    ("a b", "'a b' is not a plugin name"),
])
def test_parse_spec_errors(spec, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(spec)


# -- options ------------------------------------------------------------------------------------------


def test_options_default_and_parsed():
    (p,) = instantiate("knobs", REGISTRY)
    assert vars(p.opts) == {"n": 1, "scale": 0.5, "flag": False, "mode": "fast", "bits": 8}
    (p,) = instantiate("knobs(n=-3, scale=1e-2, flag=Yes, mode=exact, bits=4)", REGISTRY)
    assert vars(p.opts) == {"n": -3, "scale": 0.01, "flag": True, "mode": "exact", "bits": 4}
    assert type(p.opts.n) is int and type(p.opts.scale) is float and p.opts.flag is True


@pytest.mark.parametrize("text, value", [(t, True) for t in ("1", "true", "TRUE", "yes", "on")]
                         + [(t, False) for t in ("0", "false", "No", "off")])
def test_bool_option(text, value):
    assert Option(bool, False).parse("p", "flag", text) is value


@pytest.mark.parametrize("spec, message", [
    ("knobs(n=x)", "plugin knobs: option n='x' is not a valid int"),
    ("knobs(n=1.5)", "plugin knobs: option n='1.5' is not a valid int"),
    ("knobs(scale=fast)", "plugin knobs: option scale='fast' is not a valid float"),
    ("knobs(flag=maybe)", "plugin knobs: option flag='maybe' is not a valid bool (true/false, yes/no, on/off, 1/0)"),
    ("knobs(mode=slow)", "plugin knobs: option mode='slow' must be one of fast/exact"),
    ("knobs(bits=16)", "plugin knobs: option bits='16' must be one of 4/8"),
    ("knobs(bits=four)", "plugin knobs: option bits='four' is not a valid 4/8"),
    ("knobs(size=3)", "plugin knobs: unknown option 'size'; options: n, scale, flag, mode, bits"),
    ("plain(x=1)", "plugin plain: unknown option 'x'; options: none"),
])
def test_bad_option_values(spec, message):
    with pytest.raises(UserError) as e:
        instantiate(spec, REGISTRY)
    assert str(e.value) == message


def test_constructor_checks_option_names():
    with pytest.raises(UserError, match="plugin knobs: unknown option 'size'"):
        Knobs(size=3)
    assert Knobs(n=2).opts.n == 2


def test_option_describe():
    assert Option(int, 8, "calibration batches").describe() == "int = 8  calibration batches"
    assert Option(str, "a", choices=("a", "b")).describe() == "a|b = 'a'"


# -- selection errors -------------------------------------------------------------------------------


def test_unknown_plugin_lists_known_ones():
    with pytest.raises(UserError) as e:
        instantiate("plain,nope", REGISTRY)
    assert str(e.value) == "unknown plugin 'nope'; known plugins: knobs, plain, needs_gpu, exclusive"
    with pytest.raises(UserError, match="known plugins: none"):
        instantiate("nope", {})


@pytest.mark.parametrize("spec", ["plain,plain", "knobs(n=1), knobs(n=2)", "knobs,plain,knobs"])
def test_duplicate_plugin(spec):
    with pytest.raises(UserError, match="is given twice; give it once with all its options"):
        instantiate(spec, REGISTRY)


def test_unavailable_plugin_gives_reason():
    with pytest.raises(UserError) as e:
        instantiate("plain,needs_gpu", REGISTRY)
    assert str(e.value) == "plugin needs_gpu is not available here: needs a TPU-42 accelerator"


@pytest.mark.parametrize("spec", ["exclusive,plain", "plain,exclusive", "plain,knobs,exclusive"])
def test_declared_conflict_either_direction(spec):
    with pytest.raises(UserError, match="plugins (exclusive and plain|plain and exclusive) cannot be combined"):
        instantiate(spec, REGISTRY)
    assert [p.name for p in instantiate("exclusive,knobs", REGISTRY)] == ["exclusive", "knobs"]


# -- entry points that do not load ----------------------------------------------------------------


def entry_point_info(name: str, target: str) -> PluginInfo:
    ep = md.EntryPoint(name, target, ENTRY_POINT_GROUP)
    return PluginInfo(name, target, "broken-dist", "0.0.1", ep)


def test_import_failure_is_recorded_not_raised():
    info = entry_point_info("broken", "nonexistent_module_xyz:Cls")
    assert info.load() is None
    assert info.error == "failed to import: ModuleNotFoundError: No module named 'nonexistent_module_xyz'"
    assert info.load() is None  # no second attempt, same error


def test_import_failure_on_selection():
    reg = {**REGISTRY, "broken": entry_point_info("broken", "nonexistent_module_xyz:Cls")}
    with pytest.raises(UserError) as e:
        instantiate("plain,broken", reg)
    assert str(e.value) == ("plugin broken (broken-dist) failed to import: "
                            "ModuleNotFoundError: No module named 'nonexistent_module_xyz'")
    assert [p.name for p in instantiate("plain", reg)] == ["plain"]  # the others still work


@pytest.mark.parametrize("name, target, error", [
    ("odict", "collections:OrderedDict", "failed to import: TypeError: collections:OrderedDict is not a "
                                         "ddpm_perf.plugins.Plugin subclass"),
    ("nothing", "collections:no_such_attribute", "failed to import: AttributeError: "),
    ("renamed", f"{__name__}:Plain", "failed to import: TypeError: entry point 'renamed' names a plugin "
                                     "called 'plain'"),
])
def test_entry_point_not_a_matching_plugin(name, target, error):
    info = entry_point_info(name, target)
    assert info.load() is None
    assert info.error.startswith(error)


def test_plugins_command_reports_broken_entry_points(monkeypatch):
    reg = {"broken": entry_point_info("broken", "nonexistent_module_xyz:Cls"), **registry(Knobs, NeedsGpu)}
    monkeypatch.setattr(plugins_mod, "discover", lambda: reg)
    result = CliRunner().invoke(main, ["plugins"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert ("broken  (broken-dist 0.0.1)  broken: failed to import: ModuleNotFoundError: "
            "No module named 'nonexistent_module_xyz'") in lines
    assert "knobs  (test-dist 9.9)  phase=runtime  available" in lines
    assert "    mode: fast|exact = 'fast'" in lines
    assert "needs_gpu  (test-dist 9.9)  phase=runtime  unavailable: needs a TPU-42 accelerator" in lines

    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(main, ["plugins", "--json"]).output)}
    assert rows["broken"]["status"].startswith("broken: failed to import: ModuleNotFoundError")
    assert rows["knobs"]["options"]["n"] == "int = 1  an int"


def test_discover_finds_our_own_plugins():
    info = discover()["channels_last"]
    assert (info.distribution, info.target) == ("ddpm-perf", "ddpm_perf_plugins.channels_last:ChannelsLast")
    assert info.load().phase is Phase.LAYOUT


def test_discover_marks_a_name_clash(monkeypatch):
    eps = [md.EntryPoint("dup", f"{__name__}:Plain", ENTRY_POINT_GROUP),
           md.EntryPoint("dup", "other_package:Plain", ENTRY_POINT_GROUP),
           md.EntryPoint("plain", f"{__name__}:Plain", ENTRY_POINT_GROUP),
           md.EntryPoint("plain", f"{__name__}:Plain", ENTRY_POINT_GROUP)]  # one dist seen twice: fine
    monkeypatch.setattr(plugins_mod.md, "entry_points", lambda group: [e for e in eps if e.group == group])
    found = discover()
    assert list(found) == ["dup", "plain"]
    assert found["plain"].error is None and found["plain"].load() is Plain
    assert found["dup"].error.startswith(f"name clash: {__name__}:Plain from ? and other_package:Plain from ?")
    with pytest.raises(UserError, match="plugin dup .* name clash"):
        instantiate("dup", found)


# -- order of hooks -----------------------------------------------------------------------------------


def phase_plugins(log: list) -> dict[str, PluginInfo]:
    return registry(recorder("rt", Phase.RUNTIME, log), recorder("rw", Phase.REWRITE, log),
                    recorder("lay", Phase.LAYOUT, log), recorder("rt2", Phase.RUNTIME, log))


def test_instantiate_sorts_by_phase_keeping_command_line_order_within_a_phase():
    reg = phase_plugins([])
    assert [p.name for p in instantiate("rt, rw, lay", reg)] == ["rw", "lay", "rt"]
    assert [p.name for p in instantiate("rt2,lay,rt,rw", reg)] == ["rw", "lay", "rt2", "rt"]


def test_hooks_run_in_phase_order_through_the_engine(checkpoint):
    log: list = []
    host = PluginHost(instantiate("rt,rw,lay", phase_plugins(log)))
    assert host.names == ["rw", "lay", "rt"]
    eng = engine(checkpoint, host, steps=2)
    order = ["rw", "lay", "rt"]
    assert log == [(hook, name) for hook in ("configure", "transform_model", "calibrate", "wrap_denoiser")
                   for name in order]
    log.clear()
    eng.sample(1)
    # Per step: plan_step in phase order; the denoiser wrappers nest, so the last phase's wrapper
    # is the outermost and runs first; after_step in phase order.
    per_step = ([("plan_step", n) for n in order] + [("denoise", n) for n in reversed(order)]
                + [("after_step", n) for n in order])
    assert log == per_step * 2


def test_plain_hooks_follow_host_order_even_if_given_unsorted():
    log: list = []
    reg = phase_plugins(log)
    host = PluginHost([reg[n].load()() for n in ("rt", "rw", "rt2", "lay")])  # not via instantiate
    assert host.names == ["rw", "lay", "rt", "rt2"]
    host.hook.configure(ctx=None)
    assert log == [("configure", n) for n in ("rw", "lay", "rt", "rt2")]


def chained(tag: str, plugin_phase: Phase, seen: list) -> type[Plugin]:
    """transform_model appends ``tag`` to the list it gets; tag None: returns None (keeps it)."""

    class Chained(Plugin):
        name = f"chain_{tag}"
        description = "chained hook test"
        phase = plugin_phase

        @hookimpl
        def transform_model(self, model, ctx):
            seen.append((self.name, list(model), ctx))
            return None if tag.startswith("none") else model + [tag]

        @hookimpl
        def wrap_denoiser(self, fn):  # a hook may omit arguments it does not use
            return None if tag.startswith("none") else (lambda x, t, plan: fn(x, t, plan) + [tag])

    return Chained


def test_chained_hooks_pass_results_on_and_none_keeps_the_value():
    seen: list = []
    reg = registry(chained("c", Phase.RUNTIME, seen), chained("none1", Phase.LAYOUT, seen),
                   chained("a", Phase.REWRITE, seen), chained("none2", Phase.COMPILE, seen))
    host = PluginHost(instantiate("chain_c,chain_none1,chain_a,chain_none2", reg))
    assert host.names == ["chain_a", "chain_none1", "chain_none2", "chain_c"]
    assert host.chain("transform_model", ["start"], ctx="CTX") == ["start", "a", "c"]
    assert seen == [("chain_a", ["start"], "CTX"), ("chain_none1", ["start", "a"], "CTX"),
                    ("chain_none2", ["start", "a"], "CTX"), ("chain_c", ["start", "a"], "CTX")]

    fn = host.chain("wrap_denoiser", lambda x, t, plan: ["model"], ctx="CTX")
    assert fn(None, None, None) == ["model", "a", "c"]  # a wraps the model, c wraps a


def test_chain_without_plugins_returns_the_value():
    host = PluginHost()
    value = object()
    assert host.chain("transform_model", value, ctx=None) is value
    assert not host.has("plan_step") and host.names == []
    assert PluginHost.from_spec("").names == [] and PluginHost.from_spec(None).names == []


# -- plan_step changes what the model runs -------------------------------------------------------


class SkipMidAttn(Plugin):
    name = "skip_mid_attn"
    description = "skips the middle attention block every step"

    @hookimpl
    def plan_step(self, step, t, plan, ctx):
        assert plan == StepPlan()  # a fresh plan every step
        plan.skip = frozenset({"mid_attn"})


def test_plan_step_skip_changes_the_output_as_the_plan_says(checkpoint):
    num, seed, steps = 3, 5, 3
    plain = engine(checkpoint, steps=steps).sample(num, seed=seed)
    skipped = engine(checkpoint, PluginHost(instantiate("skip_mid_attn", registry(SkipMidAttn))),
                     steps=steps).sample(num, seed=seed)
    assert (plain - skipped).abs().max() > 1e-3

    # The same loop by hand, calling the model with the plan directly (DDIM, eta=0: no noise).
    model, diffusion = checkpoint.build()
    sampler = make_sampler("ddim", diffusion, steps)
    x = initial_noise(num, (TINY.in_channels, TINY.image_size, TINY.image_size), seed)
    out = []
    with torch.inference_mode():
        for batch in (x[:2], x[2:]):  # the engine's batch size is 2
            sampler.reset()
            for i, t in enumerate(sampler.timesteps):
                eps = model(batch, torch.full((len(batch),), t), StepPlan(skip=frozenset({"mid_attn"})))
                batch = sampler.step(i, eps, batch)
            out.append(batch)
    expected = torch.cat(out).clamp(-1, 1)
    torch.testing.assert_close(skipped, expected, rtol=1e-5, atol=1e-6)


def test_at_most_one_plugin_brings_a_default_model(tmp_path):
    from pathlib import Path

    from ddpm_perf.plugins import Plugin, PluginHost

    class Brings(Plugin):
        name, description = "brings", "offers a model"

        def default_checkpoint(self):
            return Path("a.safetensors")

    class AlsoBrings(Brings):
        name = "also"

    class Not(Plugin):
        name, description = "not", "offers nothing"

    assert PluginHost([Not()]).default_checkpoint() is None
    assert PluginHost([Brings(), Not()]).default_checkpoint() == Path("a.safetensors")
    with pytest.raises(UserError, match="plugins brings and also each bring their own default model"):
        PluginHost([Brings(), AlsoBrings()]).default_checkpoint()
    assert PluginHost([Brings(), Not()]).spec == "brings,not"
