"""Kernels for the hot path, each beside the plain-torch reference that defines it.

- nf4.py: y = x·Wᵀ straight from bitsandbytes' packed NF4 + double-quantized absmax.
- lora.py: batched multi-LoRA, one adapter slot per token: BGMV (decode) and SGMV (prefill).
- attention.py: decode attention over the paged KV cache, in place.
- cpu_kernels.c/.py: the CPU's own (EngineConfig.kernels="cpu"): NF4 matmul, float32 matmul for
  the LM head, decode attention, in C, built on first use with the system's compiler.

The kernels are Triton. On CUDA they compile; on CPU they run only under Triton's interpreter
(TRITON_INTERPRET=1 in the environment before triton is imported), which is how the tests prove
them without a GPU. Without the triton package the references still work.
"""

from __future__ import annotations

import torch


def resolve(requested: str, device: torch.device) -> str:
    """EngineConfig.kernels → "triton", "cpu" or "torch" on `device`, refusing what cannot run
    there rather than silently computing another way. "auto": Triton on CUDA when it is installed."""
    if requested == "cpu":
        if device.type != "cpu":
            raise ValueError(f"kernels='cpu' (server/kernels/cpu_kernels.c) runs on CPU, not {device.type}")
        return "cpu"
    triton, _ = triton_or_none()
    if requested == "torch" or (requested == "auto" and (device.type != "cuda" or triton is None)):
        return "torch"
    if requested not in ("auto", "triton"):
        raise ValueError(f"unknown kernels {requested!r}; one of auto, triton, cpu, torch")
    if triton is None:
        raise ValueError("kernels='triton' needs the triton package (pip install triton)")
    if device.type != "cuda" and not _interpreting(triton):
        raise ValueError("kernels='triton' runs on CPU only under Triton's interpreter (slowly; for tests): "
                         "set TRITON_INTERPRET=1 in the environment before starting")
    return "triton"


def _interpreting(triton) -> bool:
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_or_none():
    """(triton, triton.language), or (None, None) when triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None, None
    return triton, tl
