"""What this machine can run, checked when a trainer config is read (one line and exit 2, before anything is
written): ``trainer.accelerator: gpu`` needs a CUDA device, and ``bf16-mixed`` on the CPU needs bf16
instructions. Lightning's ``bf16-mixed`` runs on any CPU, but without native bf16 (AVX512-BF16 or AMX-BF16)
every matmul converts through float32 and runs slower than float32 itself.
"""

from __future__ import annotations

import sys

from adafuse.fusion.backbone import check_dtype_device
from adafuse.fusion.errors import UserError
from adafuse.fusion.widen import BF16_FLAGS, cpu_has_bf16


def check_hardware(accelerator: str, precision: str) -> None:
    """Refuse a GPU accelerator without a CUDA device, and bf16 autocast on a CPU without bf16 instructions."""
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"trainer.accelerator: '{accelerator}' needs a CUDA device; none is visible here")
    if accelerator == "cpu":
        check_bf16_cpu("trainer.precision", precision, instead="32-true")


def check_bf16_cpu(key: str, precision: str, instead: str) -> None:
    """Refuse bf16 autocast (``precision``, given as ``key``) on a CPU without bf16 instructions, naming ``instead``."""
    if str(precision).startswith("bf16") and not cpu_has_bf16():
        raise UserError(
            f"{key}: '{precision}' needs a CPU with bf16 instructions ({' or '.join(BF16_FLAGS)}); "
            f"this CPU has neither: use {instead}"
        )


def check_backbone_dtype(dtype: str, accelerator: str) -> None:
    """Refuse float16 weights off CUDA; say in one line what bfloat16 weights cost on a CPU without bf16 instructions
    (allowed there: they halve the backbone's memory, and their projections multiply in float32, which widens every
    weight for every product: slower steps than float32's; :mod:`adafuse.fusion.widen`)."""
    on_cuda = accelerator in ("gpu", "cuda")
    check_dtype_device(dtype, on_cuda)
    if dtype == "bfloat16" and not on_cuda and not cpu_has_bf16():
        print(
            "warning: backbone.dtype bfloat16 on a CPU without bf16 instructions: half the memory, but each projection "
            "widens its weights to multiply in float32 here, so steps are slower than in float32",
            file=sys.stderr,
        )
