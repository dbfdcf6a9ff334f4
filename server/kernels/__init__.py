"""GPU kernels for the hot path, each beside the plain-torch reference that defines it.

- nf4.py: y = x·Wᵀ straight from bitsandbytes' packed NF4 + double-quantized absmax.
- lora.py: batched multi-LoRA, one adapter slot per token: BGMV (decode) and SGMV (prefill).

The kernels are Triton. On CUDA they compile; on CPU they run only under Triton's interpreter
(TRITON_INTERPRET=1 in the environment before triton is imported), which is how the tests prove
them without a GPU. Without the triton package the references still work.
"""

from __future__ import annotations


def triton_or_none():
    """(triton, triton.language), or (None, None) when triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None, None
    return triton, tl
