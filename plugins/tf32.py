"""tf32: TensorFloat-32 matmuls and convolutions on NVIDIA tensor cores (Ampere and newer)."""

from __future__ import annotations

import torch

from ddpm_perf.hooks import hookimpl
from ddpm_perf.plugins import Phase, Plugin


class TF32(Plugin):
    name = "tf32"
    description = "TF32 tensor-core matmuls/convolutions on CUDA (10-bit mantissa inputs); no effect on CPU."
    phase = Phase.PRECISION

    @hookimpl
    def configure(self, ctx):
        if ctx.device.type != "cuda":
            ctx.report.append(f"tf32: no effect on {ctx.device.type} (TF32 is a CUDA tensor-core mode)")
            return
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
