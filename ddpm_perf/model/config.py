"""U-Net configurations: the named ones of Ho et al. (2020) and a small one for digits."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from ..errors import UserError, dataclass_from_dict


@dataclass(frozen=True)
class UNetConfig:
    image_size: int
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_groups: int = 32
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        # JSON gives lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        self.validate()

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.num_levels - 1)

    def validate(self) -> None:
        def bad(field: str, why: str) -> UserError:
            return UserError(f"model config: {field} {why}")

        if self.image_size <= 0 or self.image_size % self.downsample_factor:
            raise bad("image_size", f"= {self.image_size} must be a positive multiple of "
                      f"2^(levels-1) = {self.downsample_factor}")
        for name in ("in_channels", "out_channels", "ch", "num_res_blocks", "num_groups"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")
        if self.ch < 4 or self.ch % 2:
            raise bad("ch", f"= {self.ch} must be even and at least 4 (it sizes the sinusoidal time embedding)")
        if not self.ch_mult or min(self.ch_mult) <= 0:
            raise bad("ch_mult", "must be a non-empty list of positive integers")
        for width in {self.ch * m for m in self.ch_mult} | {self.ch}:
            if width % self.num_groups:
                raise bad("num_groups", f"= {self.num_groups} does not divide channel count {width}")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return dataclass_from_dict(cls, d, "model config")


CONFIGS: dict[str, UNetConfig] = {
    # Ho et al. 2020, 35.7M parameters.
    "cifar10": UNetConfig(image_size=32, ch=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), dropout=0.1),
    "celeba64": UNetConfig(image_size=64, ch=128, ch_mult=(1, 2, 2, 2, 4), attn_resolutions=(16,), dropout=0.1),
    "celebahq256": UNetConfig(image_size=256, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,),
                              dropout=0.0),
    # scikit-learn's 8x8 digits upsampled to 16x16: the embedded default model (~1M parameters).
    "digits": UNetConfig(image_size=16, in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2, 2),
                         attn_resolutions=(8,), dropout=0.1, num_groups=8),
}


def get_config(name: str) -> UNetConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise UserError(f"unknown model config {name!r}; choose one of {', '.join(CONFIGS)}") from None
