import dataclasses

import pytest
import torch

from ddpm_perf.model.config import CONFIGS, UNetConfig
from ddpm_perf.model.unet import StepPlan, UNet, count_parameters
from ddpm_perf.errors import UserError


def test_cifar10_has_the_papers_parameter_count():
    assert count_parameters(UNet(CONFIGS["cifar10"])) == 35_746_307  # Ho et al.: 35.7M


@pytest.mark.parametrize("name", ["cifar10", "celeba64", "celebahq256", "digits"])
def test_named_configs_build_and_run(name):
    # The named layouts at a small width and size, so the test stays fast.
    cfg = CONFIGS[name]
    small = dataclasses.replace(cfg, ch=32, num_groups=8, image_size=2 ** (cfg.num_levels - 1) * 2)
    model = UNet(small).eval()
    x = torch.randn(2, small.in_channels, small.image_size, small.image_size)
    assert model(x, torch.tensor([0, 999])).shape == (2, small.out_channels, small.image_size, small.image_size)


def test_units_are_ordered_and_skips_balance(tiny_model):
    units = tiny_model.units
    assert [u.name for u in units] == list(tiny_model.blocks)
    pushes, pops = sum(u.push for u in units), sum(u.pop for u in units)
    assert pops == pushes + 1  # conv_in's output is the extra skip
    assert units[0].name == "down0_res0" and units[-1].name.startswith("up0_res")


def test_scalar_and_batched_timesteps_agree(tiny_model):
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(tiny_model(x, torch.tensor(500)), tiny_model(x, torch.full((3,), 500)))


def test_batch_elements_are_independent(tiny_model):
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([1, 200, 600, 999])
    full = tiny_model(x, t)
    for i in range(4):
        torch.testing.assert_close(tiny_model(x[i:i + 1], t[i:i + 1]), full[i:i + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("branch", range(9))
def test_cache_branch_partial_forward_matches_full(tiny_model, branch):
    assert tiny_model.num_branches == 9
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 700])
    full = tiny_model(x, t)
    store = StepPlan(cache_branch=branch)
    torch.testing.assert_close(tiny_model(x, t, store), full)
    assert store.captured is not None
    reuse = StepPlan(cache_branch=branch, cached=store.captured)
    torch.testing.assert_close(tiny_model(x, t, reuse), full)


def test_cached_step_skips_deep_units(tiny_model):
    """A cached step runs no unit below the branch: a poisoned deep unit is never called."""
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([10])
    store = StepPlan(cache_branch=1)
    tiny_model(x, t, store)

    class Boom(torch.nn.Module):
        def forward(self, h, emb):
            raise AssertionError("deep unit ran on a cached step")

    tiny_model.blocks["mid_attn"] = Boom()
    tiny_model(x, t, StepPlan(cache_branch=1, cached=store.captured))


def test_skip_keeps_shortcut_and_identity(tiny_model):
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([10])
    skipped = {"mid_attn", "mid_res0", "down1_res0"}  # down1_res0 changes channels: 1x1 shortcut
    out = tiny_model(x, t, StepPlan(skip=frozenset(skipped)))
    assert out.shape == x.shape
    assert not torch.allclose(out, tiny_model(x, t))

    # The same network with those units replaced by their skip paths by hand.
    class Skipped(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, h, emb):
            return self.block.skip(h)

    for name in skipped:
        tiny_model.blocks[name] = Skipped(tiny_model.blocks[name])
    torch.testing.assert_close(tiny_model(x, t), out)


@pytest.mark.parametrize("field,value", [("image_size", 30), ("num_groups", 5), ("ch_mult", ()),
                                         ("dropout", 1.5), ("ch", 0)])
def test_bad_configs_name_the_field(field, value):
    with pytest.raises(UserError, match=field):
        dataclasses.replace(CONFIGS["cifar10"], **{field: value})


def test_config_json_round_trip():
    import json
    cfg = CONFIGS["celebahq256"]
    assert UNetConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(UserError, match="bogus"):
        UNetConfig.from_dict({**json.loads(cfg.to_json()), "bogus": 1})
