"""ddpm_perf::dropout (C++ CPU kernel) against the PyTorch reference: the Philox stream (known
answers), masks and values bit for bit in both layouts, the backward, keep rate, opcheck,
torch.compile(fullgraph=True), bad input; and the fused_dropout plugin in a training step."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from ddpm_perf import ops
from ddpm_perf.ops import reference

pytestmark = pytest.mark.skipif(ops.extension_status() != "loaded", reason=f"ddpm_perf._C: {ops.extension_status()}")


def kernel(x, seed, p):
    return torch.ops.ddpm_perf.dropout(x, torch.tensor([seed]), p)


def test_reference_philox_matches_the_published_known_answers():
    """Random123's known answer for philox4x32-10 at counter 0, key 0."""
    assert [int(w) for w in reference.philox4x32(torch.tensor([0]), 0)] == [
        0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    # the high counter word and both key words take part
    base = [int(w) for w in reference.philox4x32(torch.tensor([5]), 3)]
    assert base != [int(w) for w in reference.philox4x32(torch.tensor([2**32 + 5]), 3)]
    assert base != [int(w) for w in reference.philox4x32(torch.tensor([5]), 3 + 2**32)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), c=st.integers(1, 70), h=st.integers(1, 13), w=st.integers(1, 13),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), channels_last=st.booleans(),
       p=st.sampled_from([0.0, 0.1, 0.5, 0.97]), seed=st.integers(0, 2**62))
def test_forward_matches_reference_bit_for_bit(n, c, h, w, dtype, channels_last, p, seed):
    """Odd channel counts (C % 4 != 0, C > 64), H*W not a multiple of 16, batch 1, both layouts."""
    x = torch.randn(n, c, h, w).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = kernel(x, seed, p)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    assert torch.equal(y, reference.dropout(x, seed, p))


def test_the_mask_does_not_depend_on_the_layout():
    x = torch.randn(2, 37, 9, 11)
    nchw = kernel(x, 7, 0.3)
    nhwc = kernel(x.contiguous(memory_format=torch.channels_last), 7, 0.3)
    strided = kernel(x.transpose(2, 3).contiguous().transpose(2, 3), 7, 0.3)  # neither layout
    assert torch.equal(nchw, nhwc) and torch.equal(nchw, strided)


@pytest.mark.parametrize("shape", [(3, 5), (2, 7, 33), (1, 3, 2, 2, 5)])
def test_other_ranks_match_reference(shape):
    x = torch.randn(shape)
    assert torch.equal(kernel(x, 11, 0.4), reference.dropout(x, 11, 0.4))


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_keep_rate_and_scale(p, channels_last):
    """Over 2M elements the kept share is 1 - p within 5 standard errors; kept values are x / (1 - p)."""
    x = torch.ones(16, 128, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = kernel(x, 1, p)
    kept = (y != 0).float().mean().item()
    se = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(kept - (1 - p)) < 5 * se
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - p)))
    # different seeds, different masks; the same seed, the same mask
    assert not torch.equal(y, kernel(x, 2, p)) and torch.equal(y, kernel(x, 1, p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_applies_the_same_mask(dtype, channels_last):
    x = torch.randn(2, 12, 5, 7).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    seed = torch.tensor([99])
    y = ops.dropout(x, 0.3, seed=seed)
    grad = torch.randn(x.shape).to(dtype)  # contiguous even when x is channels_last
    y.backward(grad)
    assert torch.equal(x.grad, reference.dropout(grad, 99, 0.3))
    kept = reference.dropout_draws(x.shape, 99) >= reference.dropout_threshold(0.3)
    assert torch.equal(x.grad == 0, ~kept | (grad == 0))


def test_the_python_entry_draws_seeds_from_torch_generator():
    x = torch.ones(4, 8, 6, 6)
    torch.manual_seed(5)
    a, b = ops.dropout(x, 0.5), ops.dropout(x, 0.5)
    torch.manual_seed(5)
    assert torch.equal(a, ops.dropout(x, 0.5)) and not torch.equal(a, b)
    assert ops.dropout(x, 0.5, training=False) is x and ops.dropout(x, 0.0) is x


def test_the_reference_path_has_the_same_gradient():
    x = torch.randn(2, 6, 3, 3, requires_grad=True)
    from ddpm_perf.ops.dropout import _ReferenceDropout

    _ReferenceDropout.apply(x, 4, 0.5).sum().backward()
    assert torch.equal(x.grad, reference.dropout(torch.ones_like(x), 4, 0.5))


def test_opcheck():
    x = torch.randn(2, 6, 4, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.ddpm_perf.dropout.default, (x, torch.tensor([3]), 0.2))
    torch.library.opcheck(torch.ops.ddpm_perf.dropout.default,
                          (x.detach().contiguous(memory_format=torch.channels_last).bfloat16(), torch.tensor([3]), 0.5))


def test_compile_fullgraph_traces_the_op_without_graph_breaks():
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    seed = torch.tensor([21])

    def f(x):
        return ops.dropout(x, 0.25, seed=seed) * 2

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


@pytest.mark.parametrize("x, seed, p, message", [
    (torch.randn(2, 6, 4, 4).half(), torch.tensor([1]), 0.1, "float32 or bfloat16"),
    (torch.randn(6), torch.tensor([1]), 0.1, "must be \\(N, C, ...\\)"),
    (torch.randn(2, 6, 4, 4), torch.tensor([1]), 1.0, "p must be in \\[0, 1\\)"),
    (torch.randn(2, 6, 4, 4), torch.tensor([1.0]), 0.1, "one-element int64"),
])
def test_bad_input_is_a_clear_error(x, seed, p, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ddpm_perf.dropout(x, seed, p)


def test_the_python_entry_refuses_a_bad_p_and_takes_half_through_the_reference():
    with pytest.raises(ValueError, match="p must be in"):
        ops.dropout(torch.ones(2, 4, 3, 3), 1.5)
    x = torch.randn(2, 4, 3, 3).half()
    seed = torch.tensor([8])
    assert torch.equal(ops.dropout(x, 0.5, seed=seed), reference.dropout(x, 8, 0.5))


# -- the plugin ---------------------------------------------------------------------------------

def test_fused_dropout_plugin_swaps_the_dropouts_and_trains(tmp_path):
    """The plugin replaces every ResBlock dropout; a training step runs; sampling is untouched; with
    dropout off the loss and gradients equal the plain model's (the same weights)."""
    from types import SimpleNamespace

    from ddpm_perf.model.config import UNetConfig
    from ddpm_perf.model.unet import UNet
    from ddpm_perf.plugins import PluginHost
    from ddpm_perf_plugins.fused_dropout import PhiloxDropout

    config = UNetConfig(image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.2,
                        num_groups=4)
    torch.manual_seed(0)
    plain = UNet(config)
    model = UNet(config)
    model.load_state_dict(plain.state_dict())
    host = PluginHost.from_spec("fused_dropout")
    ctx = SimpleNamespace(mode="train", device=torch.device("cpu"), report=[])
    host.hook.configure(ctx=ctx)
    model = host.chain("transform_model", model, ctx=ctx)
    swapped = [m for m in model.modules() if isinstance(m, PhiloxDropout)]
    assert len(swapped) == sum(isinstance(m, torch.nn.Dropout) for m in plain.modules()) > 0
    assert any("fused_dropout: " in line and "backend cpp" in line for line in ctx.report)

    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x, t), plain(x, t), rtol=0, atol=0)
    model.train()
    y1, y2 = model(x, t), model(x, t)
    assert not torch.equal(y1, y2)  # dropout is on, with a new mask each call
    y1.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_training_with_fused_dropout_resumes_bit_exactly(tmp_path):
    """Its seeds come from torch's global generator, which checkpoints carry: a run stopped and
    resumed gives the same losses and weights as one that ran straight through."""
    from ddpm_perf.diffusion.schedule import ScheduleConfig
    from ddpm_perf.model.config import UNetConfig
    from ddpm_perf.plugins import PluginHost
    from ddpm_perf.train import DataSpec, TrainConfig, Trainer

    config = UNetConfig(image_size=16, in_channels=1, out_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                        attn_resolutions=(8,), dropout=0.3, num_groups=4)

    def trainer(out, steps):
        cfg = TrainConfig(steps=steps, batch_size=8, warmup=2, ema_decay=0.9, checkpoint_every=2)
        return Trainer(config, ScheduleConfig(), DataSpec("digits"), cfg, out,
                       plugins=PluginHost.from_spec("fused_dropout"))

    straight = trainer(tmp_path / "a", 4).run(progress=False)
    head = trainer(tmp_path / "b", 2).run(progress=False)
    tail = Trainer.resume(tmp_path / "b" / "checkpoint.safetensors", plugins=PluginHost.from_spec("fused_dropout"),
                          steps=4).run(progress=False)
    assert head + tail == straight
    plain = Trainer(config, ScheduleConfig(), DataSpec("digits"),
                    TrainConfig(steps=4, batch_size=8, warmup=2, ema_decay=0.9, checkpoint_every=2), tmp_path / "c")
    assert plain.run(progress=False) != straight  # the plugin's masks are another stream than nn.Dropout's
