"""NF4 + double quantization of the base projections, through bitsandbytes.

We do not write a quantizer: a projection becomes a `bitsandbytes.nn.Linear4bit` (the module that
transformers' `BitsAndBytesConfig(load_in_4bit=True)` builds), so the stored bits and the matmul
path are the library's — `matmul_4bit` / `gemv_4bit` on CUDA, its CPU backend otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import QuantConfig


def make_base_linear(weight: torch.Tensor, bias: torch.Tensor | None, quant: QuantConfig,
                     device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A frozen `y = x·Wᵀ + b` from a dense [out, in] weight: NF4 (Linear4bit) or, with
    quantization disabled (debugging only), a plain nn.Linear in the compute dtype."""
    out_features, in_features = weight.shape
    if not quant.enabled:
        layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.to(device, dtype), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(device, dtype), requires_grad=False)
        return layer

    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=bias is not None, compute_dtype=dtype,
        compress_statistics=quant.double_quant, quant_type=quant.quant_type, device="meta",
    )
    # Params4bit quantizes when moved to a device; quantize from the compute dtype, as
    # transformers does when it loads with `dtype=compute dtype`.
    layer.weight = bnb.nn.Params4bit(
        weight.to(dtype), requires_grad=False, blocksize=quant.blocksize,
        compress_statistics=quant.double_quant, quant_type=quant.quant_type, module=layer,
    ).to(device)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device, dtype), requires_grad=False)
    layer.eval()
    return layer


def resident_bytes(module: nn.Module) -> int:
    """Bytes the module's weights occupy on their device, quantization statistics included."""
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += _quant_state_bytes(state)
    return total


def _quant_state_bytes(state) -> int:
    tensors = [state.absmax, state.code, getattr(state, "offset", None)]
    if state.state2 is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight the layer actually multiplies by (W0 = doubleDequant(NF4)), for references."""
    state = getattr(layer.weight, "quant_state", None)
    if state is None:
        return layer.weight.detach()
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(layer.weight.data, state)
