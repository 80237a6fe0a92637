"""The framework-level plugins, each against the plain fp32 eager reference."""

import pytest
import torch

from ddpm_perf.diffusion.samplers import make_sampler
from ddpm_perf.diffusion.schedule import Diffusion, ScheduleConfig
from ddpm_perf.engine import SamplingEngine
from ddpm_perf.errors import UserError
from ddpm_perf.model.checkpoint import load_checkpoint
from ddpm_perf.plugins import PluginHost, instantiate
from ddpm_perf.train import DataSpec, TrainConfig, Trainer

from conftest import TINY


def engine(path, spec="", steps=3, batch_size=4):
    ckpt = load_checkpoint(path)
    return SamplingEngine(ckpt, make_sampler("ddim", Diffusion(ckpt.schedule_config), steps),
                          PluginHost.from_spec(spec), "cpu", batch_size)


def eps_of(eng, seed=0):
    """One denoiser call on fixed input: the plugin's effect on the network itself."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((4, *eng.image_shape), generator=g)
    t = torch.tensor([999, 600, 200, 5])
    from ddpm_perf.model.unet import StepPlan
    with torch.inference_mode():
        return eng.denoise(x, t, StepPlan())


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("spec", ["amp", "amp(weights=true)", "channels_last,amp", "amp,channels_last"])
def test_amp_bf16_is_close_to_fp32(tiny_checkpoint, spec):
    ref = eps_of(engine(tiny_checkpoint))
    out = eps_of(engine(tiny_checkpoint, spec))
    assert out.dtype == torch.float32
    assert 0 < rel_err(out, ref) < 2e-2  # bf16 has an 8-bit mantissa: ~0.4% per rounding


def test_amp_weights_are_stored_in_bf16(tiny_checkpoint):
    eng = engine(tiny_checkpoint, "amp(weights=true)")
    assert eng.model.blocks["down0_res0"].conv1.weight.dtype == torch.bfloat16
    assert eng.model.norm_out.weight.dtype == torch.float32  # norms stay fp32
    # keep_float=first_last (the default): the image in and the noise out keep their fp32 weights
    assert eng.model.conv_in.weight.dtype == eng.model.conv_out.weight.dtype == torch.float32
    eng = engine(tiny_checkpoint, "amp(weights=true,keep_float=none)")
    assert eng.model.conv_in.weight.dtype == eng.model.conv_out.weight.dtype == torch.bfloat16


def test_amp_keeps_the_first_and_last_layers_in_float32(tiny_checkpoint):
    """conv_in computes in fp32 and hands bf16 on; norm_out and conv_out compute and return fp32;
    the state-dict keys do not change; the deviation from fp32 drops against keep_float=none."""
    seen = {}
    eng = engine(tiny_checkpoint, "amp")
    model = eng.model
    for name in ("conv_in", "norm_out", "conv_out"):
        getattr(model, name).register_forward_hook(lambda m, args, out, name=name: seen.update({name: out.dtype}))
    model.blocks["down0_res0"].conv1.register_forward_hook(lambda m, args, out: seen.update(conv1=out.dtype))
    ref = eps_of(engine(tiny_checkpoint))
    out = eps_of(eng)
    assert seen == {"conv_in": torch.bfloat16, "norm_out": torch.float32, "conv_out": torch.float32,
                    "conv1": torch.bfloat16}
    assert set(model.state_dict()) == set(load_checkpoint(tiny_checkpoint).weights)
    assert rel_err(out, ref) < rel_err(eps_of(engine(tiny_checkpoint, "amp(keep_float=none)")), ref)


def test_amp_images_stay_close(tiny_checkpoint):
    ref = engine(tiny_checkpoint).sample(4)
    out = engine(tiny_checkpoint, "amp").sample(4)
    assert rel_err(out, ref) < 0.05  # a random-weight model amplifies rounding; trained ones less


def test_amp_float16_on_cpu_is_refused(tiny_checkpoint):
    with pytest.raises(UserError, match="float16 needs a CUDA device"):
        engine(tiny_checkpoint, "amp(dtype=float16)")


def test_tf32_says_it_does_nothing_on_cpu(tiny_checkpoint):
    eng = engine(tiny_checkpoint, "tf32")
    assert any("tf32: no effect on cpu" in line for line in eng.ctx.report)
    torch.testing.assert_close(eps_of(eng), eps_of(engine(tiny_checkpoint)), rtol=0, atol=0)


def test_cuda_graphs_is_unavailable_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="cuda_graphs is not available here: needs a CUDA device"):
        instantiate("cuda_graphs")


def test_compile_matches_eager_without_recompiling(tiny_checkpoint):
    """Inductor, fullgraph: no graph break in the U-Net or the plan, and one graph for all steps."""
    torch._dynamo.reset()
    # config.patch, not monkeypatch: monkeypatch's undo removes the key from dynamo's config
    with torch._dynamo.config.patch(error_on_recompile=True):
        eng = engine(tiny_checkpoint, "compile(fullgraph=true)", steps=4)
        out = eng.sample(4)
    torch.testing.assert_close(out, engine(tiny_checkpoint, steps=4).sample(4), rtol=1e-4, atol=1e-4)
    assert any(line.startswith("compile: first step") and "ms/step over 3 steps" in line for line in eng.ctx.report)
    torch._dynamo.reset()


def trainer(tmp_path, spec, steps=2):
    cfg = TrainConfig(steps=steps, batch_size=4, warmup=1, checkpoint_every=steps)
    config = TINY.__class__(**{**TINY.__dict__, "dropout": 0.0})
    return Trainer(config, ScheduleConfig(), DataSpec("digits"), cfg, tmp_path / spec.replace(",", "_"),
                   PluginHost.from_spec(spec))


def grads_after_one_step(tr):
    loss = tr.loss_fn(*tr._batch())
    loss.backward()
    # by the plain U-Net's names, fixed before plugins wrapped any unit
    return loss.item(), {k: p.grad.clone() for k, p in tr._state.items()}


@pytest.mark.parametrize("spec", ["checkpoint", "checkpoint(levels=1+mid)"])
def test_checkpointing_keeps_loss_and_gradients(tmp_path, spec):
    ref_loss, ref_grads = grads_after_one_step(trainer(tmp_path, ""))
    tr = trainer(tmp_path, spec)
    assert any(type(u).__name__ == "CheckpointedUnit" for u in tr.model.blocks.values())
    loss, grads = grads_after_one_step(tr)
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g)
    # the saved checkpoint keeps the plain U-Net's parameter names
    tr.run(progress=False)
    ckpt = load_checkpoint(tr.checkpoint_path, with_training=True)
    assert "model.blocks.down0_res0.conv1.weight" in ckpt.train_tensors
    assert "blocks.down0_res0.conv1.weight" in ckpt.weights


def test_checkpoint_levels_are_validated(tmp_path):
    with pytest.raises(UserError, match="levels='7'"):
        trainer(tmp_path, "checkpoint(levels=7)")


def test_amp_training_is_close_to_fp32(tmp_path):
    ref_loss, _ = grads_after_one_step(trainer(tmp_path, ""))
    loss, _ = grads_after_one_step(trainer(tmp_path, "amp"))
    assert abs(loss - ref_loss) / ref_loss < 2e-2
    with pytest.raises(UserError, match="float16 needs a CUDA device"):
        trainer(tmp_path, "amp(dtype=float16)")


# ---- prepack ----

@pytest.mark.parametrize("spec", ["prepack", "channels_last,prepack"])
def test_prepack_matches_fp32_and_packs_each_layer_once(tiny_checkpoint, spec):
    from ddpm_perf_plugins.prepack import PrepackedConv2d, PrepackedLinear

    eng = engine(tiny_checkpoint, spec)
    convs = [m for m in eng.model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in eng.model.modules() if isinstance(m, torch.nn.Linear)]
    assert convs and all(type(m) is PrepackedConv2d for m in convs)
    assert linears and all(type(m) is PrepackedLinear for m in linears)  # time embedding, attention
    assert f"prepack: {len(convs)} convolutions and {len(linears)} linear layers run on weights packed once " \
           "for oneDNN" in eng.ctx.report
    assert "blocks.down0_res0.conv1.weight" in eng.model.state_dict()  # keys unchanged
    ref = eps_of(engine(tiny_checkpoint))
    assert rel_err(eps_of(eng), ref) < 1e-5
    layers = convs + linears
    packed = {id(m): m._packed for m in layers}
    assert rel_err(eps_of(eng, seed=1), eps_of(engine(tiny_checkpoint), seed=1)) < 1e-5
    assert all(m._packed is packed[id(m)] for m in layers)  # same shape: no second packing


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_linear_matches_linear(bias, dtype):
    """Against F.linear on 2-D and 3-D input, non-contiguous input, and another row count than the
    one it packed for (which packs again)."""
    from ddpm_perf_plugins.prepack import PrepackedLinear

    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40, bias=bias).to(dtype)
    ref = torch.nn.Linear(48, 40, bias=bias).to(dtype)
    ref.load_state_dict(layer.state_dict())
    layer.__class__ = PrepackedLinear
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    with torch.inference_mode():
        for x in (torch.randn(6, 48), torch.randn(2, 9, 48), torch.randn(9, 2, 48).transpose(0, 1)):
            x = x.to(dtype)
            assert rel_err(layer(x).float(), ref(x).float()) < tol
        assert layer._packed_key == (18, dtype)


def test_prepack_packs_again_for_another_shape_and_stacks_with_amp(tiny_checkpoint):
    eng = engine(tiny_checkpoint, "prepack")
    eps_of(eng)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn((2, *eng.image_shape), generator=g), torch.tensor([800, 30])
    from ddpm_perf.model.unet import StepPlan
    with torch.inference_mode():
        got, want = eng.denoise(x, t, StepPlan()), engine(tiny_checkpoint).denoise(x, t, StepPlan())
    assert rel_err(got, want) < 1e-5
    for spec in ("amp,prepack", "channels_last,amp(weights=true,keep_float=none),prepack"):
        bf16 = eps_of(engine(tiny_checkpoint, spec))
        assert bf16.dtype == torch.float32
        assert rel_err(bf16, eps_of(engine(tiny_checkpoint, spec.replace(",prepack", "")))) < 1e-2
        assert 0 < rel_err(bf16, eps_of(engine(tiny_checkpoint))) < 2e-2


def test_prepack_is_for_sampling_and_does_not_stack_with_compile(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="prepack: sampling only"):
        trainer(tmp_path, "prepack")
    with pytest.raises(UserError, match="prepack and compile cannot be combined|compile and prepack cannot be combined"):
        engine(tiny_checkpoint, "prepack,compile")
