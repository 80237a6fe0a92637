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
def test_fused_norm_compiles_fullgraph_without_recompiles(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
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
