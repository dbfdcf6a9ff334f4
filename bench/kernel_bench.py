"""The hot-path kernels (server/kernels) against what they replace, on CUDA: µs per call and
effective GB/s (bytes a call must read, over its time).

- NF4 linear (Triton, packed bits read in the matmul) vs bitsandbytes: `gemv_4bit` at 1 token,
  `matmul_4bit` (dequantize + GEMM) at 1-64 tokens, for the 1.1B (TinyLlama) and 7B (Llama 2)
  projection shapes. Goal on an H100: >= 1,000 GB/s at 4096x4096, 1 token.
- LoRA (BGMV shrink + expand, Triton) vs the stacked torch formulation (every slot's weights, a
  one-hot mask), 32 tokens over 8 adapters in a 64-slot pool, r=16.

    python bench/kernel_bench.py [--record]       # on a machine with CUDA; elsewhere it says so and exits 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (out, in); 2560 and 11264 rows are the engine's stacked q/k/v and gate/up (one launch each)
SHAPES = {"1.1B": [(2048, 2048), (256, 2048), (2560, 2048), (5632, 2048), (11264, 2048), (2048, 5632)],
          "7B": [(4096, 4096), (12288, 4096), (11008, 4096), (22016, 4096), (4096, 11008)]}


def time_us(fn, repeats: int = 50) -> float:
    """Median µs per call, measured with CUDA events after a warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


def nf4_rows() -> list[str]:
    from server.kernels.nf4 import NF4Weight, nf4_linear
    from server.model.quant import import_bitsandbytes

    bnb = import_bitsandbytes()
    rows = []
    for model, shapes in SHAPES.items():
        for out_features, in_features in shapes:
            weight = bnb.nn.Params4bit(torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02,
                                       requires_grad=False, blocksize=64, compress_statistics=True,
                                       quant_type="nf4").to("cuda")
            w = NF4Weight.from_bitsandbytes(weight)
            weight_bytes = w.packed.numel() + w.absmax.numel() + 4 * w.absmax2.numel()
            for tokens in (1, 16, 64):
                x = torch.randn(tokens, in_features, dtype=torch.bfloat16, device="cuda")
                ours = time_us(lambda: nf4_linear(x, w))
                theirs = time_us(lambda: bnb.matmul_4bit(x, weight, quant_state=weight.quant_state))
                gbps = lambda us: (weight_bytes + 2 * x.numel() + 2 * tokens * out_features) / us / 1e3  # noqa: E731
                rows.append(f"| {model} {out_features}x{in_features} | {tokens} | {ours:.1f} | {gbps(ours):.0f} | "
                            f"{theirs:.1f} | {gbps(theirs):.0f} | {theirs / ours:.2f}x |")
    return rows


def lora_rows(tokens: int = 32, adapters: int = 8, slots: int = 64, rank: int = 16) -> list[str]:
    from server.kernels import lora as kernels
    from server.lora.layers import lora_delta_stacked, slot_mask

    rows = []
    for model, (hidden, out) in {"1.1B q_proj": (2048, 2048), "1.1B gate_proj": (2048, 5632),
                                 "7B q_proj": (4096, 4096)}.items():
        a = torch.randn(slots, rank, hidden, dtype=torch.bfloat16, device="cuda") * 0.01
        b = torch.randn(slots, rank, out, dtype=torch.bfloat16, device="cuda") * 0.01
        ranks = torch.full((slots,), rank, dtype=torch.int32, device="cuda")
        starts = torch.tensor([0, out], dtype=torch.int32, device="cuda")
        token_slots = (torch.arange(tokens, device="cuda") % adapters) + 1
        x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")
        y = torch.zeros(tokens, out, dtype=torch.bfloat16, device="cuda")
        mask = slot_mask(token_slots, slots, x.dtype)

        def triton_lora():
            kernels.bgmv_expand(y, kernels.bgmv_shrink(x, a, token_slots, ranks, rank), b, token_slots, ranks, starts)

        ours = time_us(triton_lora)
        stacked = time_us(lambda: lora_delta_stacked(x, mask, a, b))
        rows.append(f"| {model} | {tokens} over {adapters} ({slots} slots, r={rank}) | {ours:.1f} | {stacked:.1f} | "
                    f"{stacked / ours:.2f}x |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="add the table to its section of bench/RESULTS.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("kernel_bench: no CUDA device here; the kernels' correctness is proven on CPU by "
              "tests/test_kernels.py (Triton interpreter). Nothing measured.")
        return 0
    from bench.engine_bench import machine

    table = [f"### kernel_bench: {machine()}", "",
             "| NF4 weight | tokens | Triton µs | Triton GB/s | bitsandbytes µs | bitsandbytes GB/s | speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|", *nf4_rows(), "",
             "| LoRA module | batch | Triton BGMV µs | stacked torch µs | speed-up |",
             "|---|---|---:|---:|---:|", *lora_rows(), ""]
    print("\n".join(table))
    if args.record:
        from bench.results import record

        record("kernel_bench.py", "\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
