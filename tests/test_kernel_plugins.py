"""The kernel plugins (fused_norm, fused_attention, int8) in the engine and trainer, against fp32 eager."""

import sys

import pytest
import torch

from ddpm_perf import ops
from ddpm_perf.model.unet import NormAct

from test_framework_plugins import engine, eps_of, grads_after_one_step, rel_err, trainer

needs_extension = pytest.mark.skipif(ops.extension_status() != "loaded",
                                     reason=f"ddpm_perf._C: {ops.extension_status()}")


@needs_extension
@pytest.mark.parametrize("spec", ["fused_norm", "fused_norm,channels_last"])
def test_fused_norm_matches_fp32(tiny_checkpoint, spec):
    eng = engine(tiny_checkpoint, spec)
    norms = [m for m in eng.model.modules() if isinstance(m, NormAct)]
    assert norms and all(type(m).__name__ == "FusedNormAct" for m in norms)
    assert rel_err(eps_of(eng), eps_of(engine(tiny_checkpoint))) < 1e-5
    assert any("group_norm_silu backend cpp" in line for line in eng.ctx.report)


@needs_extension
def test_fused_norm_composes_with_amp(tiny_checkpoint):
    ref = eps_of(engine(tiny_checkpoint, "amp"))
    out = eps_of(engine(tiny_checkpoint, "fused_norm,amp(weights=true)"))
    assert rel_err(out, ref) < 2e-2
    assert rel_err(out, eps_of(engine(tiny_checkpoint))) < 2e-2


@needs_extension
def test_fused_norm_compiles_fullgraph_without_recompiles(tiny_checkpoint):
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = engine(tiny_checkpoint, "fused_norm,compile(fullgraph=true)", steps=3).sample(4)
    torch.testing.assert_close(out, engine(tiny_checkpoint, steps=3).sample(4), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


@needs_extension
def test_fused_norm_training_matches_fp32(tmp_path):
    ref_loss, ref_grads = grads_after_one_step(trainer(tmp_path, ""))
    loss, grads = grads_after_one_step(trainer(tmp_path, "fused_norm"))
    assert abs(loss - ref_loss) < 1e-5 * ref_loss
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_fused_norm_runs_on_the_reference_without_extension(tiny_checkpoint, monkeypatch):
    """No compiler, no extension: the plugin still runs, on the PyTorch reference, and says so."""
    gn_module = sys.modules["ddpm_perf.ops.group_norm_silu"]  # the package exports the function by that name
    monkeypatch.setattr(gn_module, "_backend", lambda device_type: "reference (not built)")
    monkeypatch.setattr(gn_module, "backend", lambda device: "reference (not built)")
    eng = engine(tiny_checkpoint, "fused_norm")
    assert any("backend reference (not built)" in line for line in eng.ctx.report)
    assert rel_err(eps_of(eng), eps_of(engine(tiny_checkpoint))) < 1e-5


# ---- int8 ----

def calibration_file(path):
    return path.with_name(path.name + ".int8.json")


@needs_extension
def test_int8_calibrates_saves_and_reuses(tiny_checkpoint):
    eng = engine(tiny_checkpoint, "int8(steps=2,batch=2)")
    layers = [m for m in eng.model.modules() if type(m).__name__ == "Int8Conv2d"]
    assert layers and all(m.x_scale > 0 and 0 <= m.x_zero_point <= 255 for m in layers)
    assert type(eng.model.conv_in).__name__ == "Conv2d" and type(eng.model.conv_out).__name__ == "Conv2d"
    saved = calibration_file(tiny_checkpoint)
    assert saved.exists() and any("calibrated (no calibration yet)" in line for line in eng.ctx.report)
    again = engine(tiny_checkpoint, "int8(steps=2,batch=2)")
    assert any("calibration loaded from" in line for line in again.ctx.report)
    torch.testing.assert_close(eps_of(again), eps_of(eng), rtol=0, atol=0)  # same ranges, same kernel
    changed = engine(tiny_checkpoint, "int8(steps=3,batch=2)")
    assert any("calibrated (settings changed)" in line for line in changed.ctx.report)


@needs_extension
@pytest.mark.parametrize("spec, bound", [("int8", 0.05), ("int8(method=minmax)", 0.05), ("fused_norm,int8", 0.05),
                                         ("int8(keep_float=none)", 0.15)])  # the first and last convs matter most
def test_int8_stays_close_to_fp32(tiny_checkpoint, spec, bound):
    ref = eps_of(engine(tiny_checkpoint))
    eng = engine(tiny_checkpoint, spec)
    assert 0 < rel_err(eps_of(eng), ref) < bound
    if "keep_float=none" in spec:
        assert type(eng.model.conv_in).__name__ == "Int8Conv2d"


@needs_extension
def test_fused_norms_hand_their_int8_consumers_codes(tiny_checkpoint):
    """With fused_norm and int8 each norm whose consumers are all int8 layers of one input range
    (ResBlock: conv1, conv2; AttnBlock: q, k, v) writes their uint8 codes; norm_out feeds the float
    conv_out and stays float. The network moves as little from fp32 as with float norms (the codes
    differ by one only next to a rounding boundary); norm_codes=false and int8 alone pair nothing."""
    from ddpm_perf.model.unet import AttnBlock, ResBlock

    ref = eps_of(engine(tiny_checkpoint))
    eng = engine(tiny_checkpoint, "fused_norm,int8(steps=2,batch=2)")
    blocks = [m for m in eng.model.modules() if isinstance(m, (ResBlock, AttnBlock))]
    pairs = [(getattr(b, norm), [getattr(b, c) for c in consumers])
             for b in blocks for norm, consumers in b.norm_consumers.items()]
    assert pairs and all(norm.quantize_output == (cs[0].x_scale, cs[0].x_zero_point) for norm, cs in pairs)
    assert eng.model.norm_out.quantize_output is None
    assert f"int8: {len(pairs)} norms hand their consumers uint8 codes (for fp32 activations)" in eng.ctx.report
    floats = engine(tiny_checkpoint, "fused_norm,int8(steps=2,batch=2,norm_codes=false)")
    assert all(m.quantize_output is None for m in floats.model.modules() if isinstance(m, NormAct))
    paired, unpaired = eps_of(eng), eps_of(floats)
    assert rel_err(paired, unpaired) < 0.02 and rel_err(paired, ref) < 0.05 and rel_err(unpaired, ref) < 0.05
    alone = engine(tiny_checkpoint, "int8(steps=2,batch=2)")
    assert not any("uint8 codes" in line for line in alone.ctx.report)


@needs_extension
def test_codes_pass_for_fp32_activations_only(tiny_checkpoint):
    """The paired convolutions are given codes (and return fp32) when the activations are fp32;
    under amp(weights=true) the norms keep their bf16 output (codes measured no faster there), and
    that stack still compiles with fullgraph=true."""
    def inputs_seen(spec):
        eng = engine(tiny_checkpoint, spec)
        seen = set()
        for m in eng.model.modules():
            if type(m).__name__ == "Int8Conv2d":
                m.register_forward_hook(lambda m, args, out: seen.add((args[0].dtype, out.dtype)))
        return eps_of(eng), seen

    _, fp32 = inputs_seen("fused_norm,int8(steps=2,batch=2)")
    assert fp32 == {(torch.uint8, torch.float32), (torch.float32, torch.float32)}
    mixed, bf16 = inputs_seen("fused_norm,int8(steps=2,batch=2),amp(weights=true)")
    assert bf16 == {(torch.bfloat16, torch.bfloat16)}
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = eps_of(engine(tiny_checkpoint, "fused_norm,int8(steps=2,batch=2),amp(weights=true),"
                                                  "compile(fullgraph=true)"))
    ref = eps_of(engine(tiny_checkpoint))
    assert rel_err(compiled, ref) < 0.06 and rel_err(mixed, ref) < 0.06
    torch._dynamo.reset()


@needs_extension
def test_int8_refuses_a_calibration_of_other_weights(tmp_path, tiny_checkpoint):
    from ddpm_perf.errors import UserError
    from ddpm_perf.model.checkpoint import load_checkpoint, save_checkpoint

    engine(tiny_checkpoint, "int8(steps=1,batch=1)")
    other = load_checkpoint(tiny_checkpoint)
    weights = {k: v + 0.01 if k.endswith("conv1.weight") else v for k, v in other.weights.items()}
    other_path = save_checkpoint(tmp_path / "other.safetensors", other.model_config, other.schedule_config, weights)
    with pytest.raises(UserError, match="calibrated for other weights.*recalibrate=true"):
        engine(other_path, f"int8(steps=1,batch=1,calibration={calibration_file(tiny_checkpoint)})")
    calibration_file(tiny_checkpoint).write_text("not json")
    with pytest.raises(UserError, match="is not a calibration file"):
        engine(tiny_checkpoint, "int8(steps=1,batch=1)")
    assert engine(tiny_checkpoint, "int8(steps=1,batch=1,recalibrate=true)")  # the way out it names


@needs_extension
def test_int8_composes_with_compile_and_amp(tiny_checkpoint):
    torch._dynamo.reset()
    ref = eps_of(engine(tiny_checkpoint, "fused_norm,int8(steps=2,batch=2)"))
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = eps_of(engine(tiny_checkpoint, "fused_norm,int8(steps=2,batch=2),compile(fullgraph=true)"))
    # inductor's float ops round differently in the last bits, and a few activations then land
    # in the next int8 step: close, not bit-identical
    assert rel_err(out, ref) < 5e-3
    torch._dynamo.reset()
    mixed = eps_of(engine(tiny_checkpoint, "fused_norm,int8(steps=2,batch=2,recalibrate=true),amp(weights=true)"))
    assert rel_err(mixed, eps_of(engine(tiny_checkpoint))) < 0.06


def test_int8_is_for_sampling_only(tmp_path):
    from ddpm_perf.errors import UserError

    with pytest.raises(UserError, match="sampling only"):
        trainer(tmp_path, "int8")


def test_int8_cli_reports_and_rejects_bad_options(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from conftest import assert_user_error
    from ddpm_perf.cli import main

    runner = CliRunner()
    out = tmp_path / "x.png"
    assert_user_error(runner.invoke(main, ["sample", "--checkpoint", str(tiny_checkpoint), "--plugins",
                                           "int8(percentile=20)", "--out", str(out)]), "percentile=20.0")
    assert not out.exists()
    if ops.extension_status() == "loaded":
        result = runner.invoke(main, ["sample", "--checkpoint", str(tiny_checkpoint), "--plugins",
                                      "int8(steps=1,batch=1)", "-n", "2", "--steps", "2", "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert "int8: calibrated" in result.output + result.stderr and out.exists()


# ---- fused_attention ----

@pytest.mark.parametrize("spec", ["fused_attention", "fused_attention,channels_last", "fused_norm,fused_attention"])
def test_fused_attention_matches_fp32(tiny_checkpoint, spec):
    eng = engine(tiny_checkpoint, spec)
    assert any(type(m).__name__ == "FusedAttnBlock" for m in eng.model.modules())
    assert rel_err(eps_of(eng), eps_of(engine(tiny_checkpoint))) < 1e-5


def test_fused_attention_training_matches_fp32(tmp_path):
    ref_loss, ref_grads = grads_after_one_step(trainer(tmp_path, ""))
    loss, grads = grads_after_one_step(trainer(tmp_path, "fused_attention"))
    assert abs(loss - ref_loss) < 1e-5 * ref_loss
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@needs_extension
def test_int8_attention_projections(tiny_checkpoint):
    """The attention blocks' q/k/v/out projections run the int8 op too (attention=true, the
    default), also under fused_attention; attention=false leaves them in float."""
    ref = eps_of(engine(tiny_checkpoint))
    for spec in ("int8(steps=2,batch=2,recalibrate=true)", "fused_attention,int8(steps=2,batch=2,recalibrate=true)"):
        eng = engine(tiny_checkpoint, spec)
        assert type(eng.model.blocks["mid_attn"].q).__name__ == "Int8Linear"
        assert rel_err(eps_of(eng), ref) < 0.05
    eng = engine(tiny_checkpoint, "int8(steps=2,batch=2,attention=false,recalibrate=true)")
    assert type(eng.model.blocks["mid_attn"].q) is torch.nn.Linear


@needs_extension
def test_int8_hands_the_attention_bf16_unless_told_otherwise(tiny_checkpoint, monkeypatch):
    """q, k and v leave their int8 projections as bf16 (so the CPU attention takes the bf16
    matmuls, seen by their arguments), proj_out keeps its input's dtype; attention_dtype=input
    keeps fp32 throughout. Both stay as close to fp32 as int8 does."""
    from ddpm_perf.model import attention as attention_module

    ref = eps_of(engine(tiny_checkpoint))
    for spec, want in (("int8(steps=2,batch=2,recalibrate=true)", torch.bfloat16),
                       ("int8(steps=2,batch=2,attention_dtype=input,recalibrate=true)", torch.float32)):
        eng = engine(tiny_checkpoint, spec)
        seen = []
        with monkeypatch.context() as m:
            real = attention_module.native_attention
            m.setattr(attention_module, "native_attention", lambda q, k, v: seen.append(q.dtype) or real(q, k, v))
            m.setattr(sys.modules["ddpm_perf.model.unet"], "native_attention", attention_module.native_attention)
            eps = eps_of(eng)
        assert seen and set(seen) == {want}, spec
        assert eps.dtype == torch.float32 and rel_err(eps, ref) < 0.05
        assert eng.model.blocks["mid_attn"].proj_out.out_dtype is None


@needs_extension
def test_calibrate_command(tiny_checkpoint):
    from click.testing import CliRunner

    from conftest import assert_user_error
    from ddpm_perf.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["calibrate", "--checkpoint", str(tiny_checkpoint), "--plugins",
                                  "int8(steps=1,batch=1)"])
    assert result.exit_code == 0, result.output
    assert "saved to" in result.output and calibration_file(tiny_checkpoint).exists()
    result = runner.invoke(main, ["calibrate", "--checkpoint", str(tiny_checkpoint), "--plugins", "int8(steps=1,batch=1)"])
    assert "calibration loaded from" in result.output  # recalibrate=true is only the default
    assert_user_error(runner.invoke(main, ["calibrate", "--checkpoint", str(tiny_checkpoint), "--plugins", "amp"]),
                      "none of these plugins calibrates")


@needs_extension
def test_int8_calibration_that_cannot_be_saved_is_said(tiny_checkpoint, tmp_path):
    eng = engine(tiny_checkpoint, f"int8(steps=1,batch=1,calibration={tmp_path / 'missing' / 'c.json'})")
    assert any("could not save the calibration" in line for line in eng.ctx.report)
    assert not any("saved to" in line for line in eng.ctx.report)
    assert not (tmp_path / "missing").exists()


def test_without_the_extension_every_op_runs_its_reference(tiny_checkpoint, tmp_path):
    """As on a machine without a compiler: ddpm_perf._C missing, the kernel plugins still sample,
    on the PyTorch references, and say why."""
    import subprocess

    code = (
        "import sys; sys.modules['ddpm_perf._C'] = None\n"  # the import fails as if it were never built
        "from ddpm_perf.cli import main\n"
        f"sys.argv = ['ddpm-perf', 'sample', '--checkpoint', {str(tiny_checkpoint)!r}, '--plugins',\n"
        "            'fused_norm,int8(steps=1,batch=1)', '-n', '2', '--steps', '2', '--no-progress',\n"
        f"            '--out', {str(tmp_path / 'out.png')!r}]\n"
        "main()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "group_norm_silu backend reference (ddpm_perf._C does not load" in result.stdout
    assert "kernel reference (" in result.stdout and (tmp_path / "out.png").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_takes_matmuls_in_training_or_bf16_and_sdpa_otherwise(monkeypatch, dtype):
    """Values and gradients of both CPU paths against the reference; which path runs is checked by
    making the other one fail."""
    from ddpm_perf.model import attention as attention_module
    from ddpm_perf.ops import reference

    q, k, v = (torch.randn(2, 37, 24).to(dtype).requires_grad_() for _ in range(3))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    ref_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*ref_leaves)
    grad = torch.randn_like(ref)
    ref.backward(grad)

    def refuse(*args, **kwargs):
        raise AssertionError("the other path was called")

    with monkeypatch.context() as m:  # training, 37 tokens <= MATH_MAX_TOKENS: the matmuls
        m.setattr(attention_module.F, "scaled_dot_product_attention", refuse)
        out = ops.attention(q, k, v)
        out.backward(grad)
    torch.testing.assert_close(out, ref, **tol)
    for got, want in zip((q, k, v), ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, **tol)

    with monkeypatch.context() as m:  # no backward: SDPA in fp32, the matmuls in bf16
        if dtype == torch.float32:
            m.setattr(attention_module, "_math_attention", refuse)
        else:
            m.setattr(attention_module.F, "scaled_dot_product_attention", refuse)
        with torch.no_grad():
            torch.testing.assert_close(ops.attention(q, k, v), ref.detach(), **tol)

    with monkeypatch.context() as m:  # more tokens than MATH_MAX_TOKENS: SDPA, whatever the dtype or phase
        m.setattr(attention_module, "_math_attention", refuse)
        m.setattr(attention_module, "MATH_MAX_TOKENS", 36)
        torch.testing.assert_close(ops.attention(q, k, v), ref, **tol)
