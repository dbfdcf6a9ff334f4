"""NF4 + double quantization of the base projections: bitsandbytes stores the bits, the engine
chooses how they are multiplied.

We do not write a quantizer: a projection's weight becomes a `bitsandbytes.nn.Params4bit` (what
transformers' `BitsAndBytesConfig(load_in_4bit=True)` builds), so the stored bits are the
library's. The multiplication is an `NF4Matmul` picked once per engine by `choose_nf4_matmul`,
never by bitsandbytes' own CPU feature sniffing: its `Linear4bit.forward`, in eval mode on a CPU
with AVX512-BF16, repacks the weight in place and computes in bfloat16, so the same code gave
different numbers (and crashed on shapes its repacking does not support) depending on the CPU.

- "dequantize-once" (the CPU default with the torch kernels): bitsandbytes
  dequantizes W0 in the compute dtype once, at load, and each call is torch's `linear` on that
  copy. bitsandbytes' own path (`matmul_4bit`, below) runs the same `linear` on the same
  dequantized bits every call, so the numbers are the trained QLoRA model's, bit for bit, without
  re-reading and re-expanding every weight per token. Costs the dense copy's memory (4 bytes per
  weight in float32: 424 MB for SmolLM2-135M), beside the NF4 bits, which stay the source.
- "dequantize": the same numbers with no dense copy: `bitsandbytes.matmul_4bit` dequantizes on
  every call (a weight that is never repacked). The default on a GPU without the Triton kernels,
  where the dense copy would undo what NF4 saves, and for hosts that cannot spare the memory.
- "cpu-bf16-packed" (CPU opt-in): bitsandbytes' fused AVX512-BF16 kernel on a weight repacked
  once at load. Faster on such CPUs, with bfloat16 error (~3e-3 relative per layer).
- "cpu-fused" (CPU opt-in): server/kernels/cpu_kernels.c reads the NF4 codes in place (half a
  byte per weight instead of four) and forms each weight exactly as bitsandbytes dequantizes it
  (auto's choice with EngineConfig.kernels="cpu"). Only the order of the float32 sums
  differs from "dequantize-once" (~1e-7 relative, as torch's own linear differs between batch
  sizes); costs a repacked copy of the codes (about the NF4 bits again), no dense copy.
- "triton" (CUDA; the CPU interpreter for tests): server/kernels/nf4.py reads the packed bits
  and the double-quantized absmax in the matmul itself, for decode batches; projections that
  share an input are stacked into one weight, one launch.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import NF4_PATHS, QuantConfig


class _QuietKernelsHub(logging.Filter):
    """bitsandbytes says on import, on every AVX512-BF16 CPU, that it could not fetch an optional
    kernel from the Hugging Face hub; we never use that kernel and a server has no hub access."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def quiet_bitsandbytes() -> None:
    """Filter bitsandbytes' import-time noise that a user cannot act on. Idempotent; the entry
    points call it first thing, since transformers may import bitsandbytes before we do."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _QuietKernelsHub) for f in logger.filters):
        logger.addFilter(_QuietKernelsHub())


def import_bitsandbytes():
    """`import bitsandbytes`, quietly (see quiet_bitsandbytes)."""
    quiet_bitsandbytes()
    import bitsandbytes

    return bitsandbytes


@dataclass(frozen=True)
class NF4Matmul:
    """One way to compute y = x·W0ᵀ + b from Params4bit weights stacked by rows (projections
    that share an input, or just one). `prepare` runs once per NF4Linear at load (a repacking,
    a stacked view for a kernel) and returns what `forward`, the hot path, needs."""

    name: str
    prepare: Callable[[list[nn.Parameter]], object]
    forward: Callable[[torch.Tensor, list[nn.Parameter], object, torch.Tensor | None], torch.Tensor]


def _side_by_side(outputs: list[torch.Tensor]) -> torch.Tensor:
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


def _split_bias(weights: list[nn.Parameter], bias: torch.Tensor | None) -> list[torch.Tensor | None]:
    if bias is None:
        return [None] * len(weights)
    return list(bias.split([w.quant_state.shape[0] for w in weights]))


def _dequantize_forward(x: torch.Tensor, weights: list[nn.Parameter], prepared, bias: torch.Tensor | None) -> torch.Tensor:
    import bitsandbytes as bnb

    return _side_by_side([bnb.matmul_4bit(x, w, quant_state=w.quant_state, bias=b)
                          for w, b in zip(weights, _split_bias(weights, bias))])


def _dequantize_once(weights: list[nn.Parameter]) -> list[torch.Tensor]:
    import bitsandbytes.functional as bnbf

    return [bnbf.dequantize_4bit(w.data, w.quant_state).to(w.quant_state.dtype) for w in weights]


def _dense_forward(x: torch.Tensor, weights: list[nn.Parameter], dense: list[torch.Tensor],
                   bias: torch.Tensor | None) -> torch.Tensor:
    # One linear per projection, as matmul_4bit computes each: the same call on the same bits.
    return _side_by_side([torch.nn.functional.linear(x, w, b) for w, b in zip(dense, _split_bias(weights, bias))])


# Up to this many tokens (decode batches) the Triton kernel reads the packed weight directly; a
# prefill dequantizes once and multiplies with a dense GEMM, where compute, not bytes, dominates.
TRITON_GEMV_MAX_TOKENS = 64


def _triton_forward(x: torch.Tensor, weights: list[nn.Parameter], nf4_weight, bias: torch.Tensor | None) -> torch.Tensor:
    from ..kernels import nf4

    if x.numel() // x.shape[-1] <= TRITON_GEMV_MAX_TOKENS:
        return nf4.nf4_linear(x, nf4_weight, bias)
    return torch.nn.functional.linear(x, nf4.nf4_dequantize(nf4_weight, x.dtype), bias)


def _stacked_view(weights: list[nn.Parameter]):
    from ..kernels.nf4 import NF4Weight

    return NF4Weight.stack(weights)


def _repack_for_cpu_bf16(weights: list[nn.Parameter]) -> None:
    import bitsandbytes.functional as bnbf

    for weight in weights:
        state = weight.quant_state
        out_features, in_features = state.shape
        if out_features % 32 or in_features % state.blocksize:  # its layout: rows in 32s, whole blocks per row
            raise ValueError(f"nf4 path cpu-bf16-packed needs out_features % 32 == 0 and in_features % "
                             f"{state.blocksize} == 0; this model has a {out_features}x{in_features} projection "
                             "(use the dequantize path)")
        weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu(weight.data, weight.quant_state)


def _cpu_bf16_packed_forward(x: torch.Tensor, weights: list[nn.Parameter], prepared, bias: torch.Tensor | None) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    x16 = x.to(torch.bfloat16)
    y = _side_by_side([bnbf.gemv_4bit(x16, w, state=w.quant_state) for w in weights]).to(x.dtype)
    return y if bias is None else y + bias


# Up to this many tokens (decode steps, short prefill chunks) the C kernel reads the NF4 codes in
# place; beyond, the projection is dequantized (bitsandbytes' product, into a reused buffer) and
# multiplied by torch's GEMM: a prefill is compute-bound, and forming each weight again for every
# tile of tokens costs more than writing it once (measured on SmolLM2's projections, 2 cores, AVX2
# with the kernel's panel: the kernel 0.65-1.0x the GEMM's time at 32 tokens, even at 64, the GEMM
# ahead from 128 (1.15-1.26x) and 1.2-1.5x at 512).
CPU_NF4_KERNEL_MAX_TOKENS = 32


def cpu_fused(build_dir: Path | None) -> NF4Matmul:
    """The "cpu-fused" path on server/kernels/cpu_kernels's library, built into build_dir on first use."""
    from ..kernels import cpu_kernels

    library = cpu_kernels.load(build_dir)
    scratch = threading.local()  # one dense buffer per calling thread, reused by every projection

    def dequantized(packed) -> torch.Tensor:
        size = packed.shape[0] * packed.shape[1]
        if getattr(scratch, "buffer", None) is None or scratch.buffer.numel() < size:
            scratch.buffer = torch.empty(size, dtype=torch.float32)
        return library.nf4_dequantize(packed, scratch.buffer[:size].view(packed.shape))

    def forward(x: torch.Tensor, weights: list[nn.Parameter], packed, bias: torch.Tensor | None) -> torch.Tensor:
        if x.numel() // x.shape[-1] > CPU_NF4_KERNEL_MAX_TOKENS:
            # W as stored, not Wᵀ: x @ Wᵀ alone ran up to 14% faster, but after a transposed
            # dequantize the pair took 10% longer than this one (6.7 vs 7.4 ms on gate/up, 512 tokens)
            return torch.nn.functional.linear(x, dequantized(packed), bias)
        y = library.nf4_linear(x, packed)
        return y if bias is None else y + bias

    return NF4Matmul("cpu-fused", prepare=cpu_kernels.pack_nf4, forward=forward)


DEQUANTIZE = NF4Matmul("dequantize", prepare=lambda weights: None, forward=_dequantize_forward)
DEQUANTIZE_ONCE = NF4Matmul("dequantize-once", prepare=_dequantize_once, forward=_dense_forward)
CPU_BF16_PACKED = NF4Matmul("cpu-bf16-packed", prepare=_repack_for_cpu_bf16, forward=_cpu_bf16_packed_forward)
TRITON = NF4Matmul("triton", prepare=_stacked_view, forward=_triton_forward)


def choose_nf4_matmul(requested: str, device: torch.device, kernels: str = "torch",
                      quant: QuantConfig = QuantConfig(), kernel_build_dir: Path | None = None) -> NF4Matmul:
    """The engine's NF4 path for `requested` on `device` ("auto": Triton when the engine's
    `kernels` resolved to Triton and the weights are NF4 with double quantization, which is what
    the kernel reads; cpu-fused when they resolved to "cpu" and the weights are NF4; else
    dequantize-once on CPU, dequantize elsewhere); refuses a path the device cannot run, rather
    than falling back to different numbers."""
    if requested == "auto":
        reads_these_weights = quant.quant_type == "nf4" and quant.double_quant
        if kernels == "triton" and reads_these_weights:
            return TRITON
        if kernels == "cpu" and quant.quant_type == "nf4":
            return cpu_fused(kernel_build_dir)
        # a dense copy costs 4-8x the NF4 bits: worth it in host memory, not in a GPU's
        return DEQUANTIZE_ONCE if device.type == "cpu" else DEQUANTIZE
    if requested == "dequantize":
        return DEQUANTIZE
    if requested == "dequantize-once":
        return DEQUANTIZE_ONCE
    if requested == "triton":
        from ..kernels import resolve

        resolve("triton", device)  # raises where Triton cannot run
        return TRITON
    if requested == "cpu-fused":
        if device.type != "cpu":
            raise ValueError(f"nf4 path cpu-fused runs on CPU, not {device.type}")
        return cpu_fused(kernel_build_dir)
    if requested == "cpu-bf16-packed":
        if device.type != "cpu" or not import_bitsandbytes().functional.has_avx512bf16():
            raise ValueError("nf4 path cpu-bf16-packed needs a CPU with AVX512-BF16 "
                             f"(this is {device.type}{'' if device.type != 'cpu' else ' without it'})")
        return CPU_BF16_PACKED
    raise ValueError(f"unknown nf4 path {requested!r}; one of {NF4_PATHS}")


class NF4Linear(nn.Module):
    """A frozen y = x·W0ᵀ + b with W0 = doubleDequant(NF4), computed by the engine's NF4Matmul.
    W0 may stack several projections that share an input (q/k/v, gate/up): each is still the
    Params4bit bitsandbytes quantized on its own, and y holds their outputs side by side."""

    def __init__(self, weights: list[nn.Parameter], bias: nn.Parameter | None, matmul: NF4Matmul):
        super().__init__()
        self.weights = nn.ParameterList(weights)
        self.bias = bias
        self.matmul = matmul
        self.prepared = matmul.prepare(list(self.weights))
        # copies the path keeps beside the NF4 bits are buffers, so resident_bytes counts them
        if isinstance(self.prepared, list):  # dense copies
            for i, tensor in enumerate(self.prepared):
                self.register_buffer(f"dense{i}", tensor, persistent=False)
        elif hasattr(self.prepared, "codes"):  # the cpu-fused kernel's repacked codes and scales
            self.register_buffer("repacked_codes", self.prepared.codes, persistent=False)
            self.register_buffer("repacked_absmax", self.prepared.absmax, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul.forward(x, self.weights, self.prepared, self.bias)


def make_base_linear(weights: torch.Tensor | list[torch.Tensor], bias: torch.Tensor | None, quant: QuantConfig,
                     matmul: NF4Matmul, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A frozen `y = x·Wᵀ + b` from a dense [out, in] weight, or several stacked by rows (each
    quantized on its own, as transformers quantizes them): NF4 with double quantization, or, with
    quantization disabled (debugging only), a plain nn.Linear in the compute dtype."""
    weights = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    bias = None if bias is None else nn.Parameter(bias.to(device, dtype), requires_grad=False)
    if not quant.enabled:
        dense = torch.cat(weights) if len(weights) > 1 else weights[0]
        layer = nn.Linear(dense.shape[1], dense.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(dense.to(device, dtype), requires_grad=False)
        layer.bias = bias
        return layer
    bnb = import_bitsandbytes()
    # Params4bit quantizes when moved to a device; quantize from the compute dtype, as
    # transformers does when it loads with `dtype=compute dtype`.
    packed = [bnb.nn.Params4bit(w.to(dtype), requires_grad=False, blocksize=quant.blocksize,
                                compress_statistics=quant.double_quant, quant_type=quant.quant_type).to(device)
              for w in weights]
    return NF4Linear(packed, bias, matmul)


def keep_linear4bit_on_dequantize(model: nn.Module) -> int:
    """Pin every bitsandbytes Linear4bit in a transformers model to the dequantize path, so it
    computes as the engine does and never repacks its weight in eval mode (after which training
    would lose the base weight's gradient path). bitsandbytes has no option for this; the
    instance flag is what its forward checks. Returns the number of layers pinned."""
    bnb = import_bitsandbytes()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def is_repacked(weight: nn.Parameter) -> bool:
    """True when bitsandbytes has rewritten the weight into its CPU bf16 layout."""
    return bool(getattr(weight.quant_state, "packing_format_for_cpu", False))


def resident_bytes(module: nn.Module) -> int:
    """Bytes the module's weights occupy on their device, quantization statistics included."""
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += _quant_state_bytes(state)
    return total


def dequantized_copy_bytes(module: nn.Module) -> int:
    """Bytes of the dense copies the dequantize-once path keeps beside the NF4 bits."""
    return _copy_bytes(module, "dense")


def repacked_copy_bytes(module: nn.Module) -> int:
    """Bytes of the repacked codes and float32 scales the cpu-fused path keeps beside the NF4 bits."""
    return _copy_bytes(module, "repacked")


def _copy_bytes(module: nn.Module, prefix: str) -> int:
    return sum(t.numel() * t.element_size() for m in module.modules() if isinstance(m, NF4Linear)
               for name, t in m.named_buffers(recurse=False) if name.startswith(prefix))


def _quant_state_bytes(state) -> int:
    tensors = [state.absmax, state.code, getattr(state, "offset", None)]
    nested = getattr(state, "state2", None)  # the repacked layout keeps no nested statistics
    if nested is not None:
        tensors += [nested.absmax, nested.code]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight the layer multiplies by (W0 = doubleDequant(NF4), stacked parts by rows), for
    references. Not for a repacked weight."""
    if not isinstance(layer, NF4Linear):
        return layer.weight.detach()
    import bitsandbytes.functional as bnbf

    return torch.cat([bnbf.dequantize_4bit(w.data, w.quant_state) for w in layer.weights])
