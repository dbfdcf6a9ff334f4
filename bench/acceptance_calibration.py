"""Where the acceptance check's constants come from (trainer/acceptance.py): on this machine, how
far the serving engine is from the trained model with the adapter off (the noise floor) and on,
for a correct adapter and for wrong ones, on each engine compute path.

An adapter is trained with `trainer fit` on the demo data; the wrong ones are its files with
B scaled by 2 or by 1.25, with the A and B of two layers swapped, and with B = 0 (a no-op). The
engine then runs in float32 (dequantize), bfloat16 (dequantize: plain torch, any CPU) and,
where the CPU has AVX512-BF16, float32 activations through bitsandbytes' packed bf16 kernel.

    python bench/acceptance_calibration.py [--presets tiny small] [--steps 40] [--record]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from bench.results import record  # noqa: E402


def tampered(adapter: Path, out: Path, how: str) -> Path:
    """A copy of `adapter` with its weights changed as `how` says."""
    import shutil

    shutil.copytree(adapter, out)
    path = out / "adapter_model.safetensors"
    weights = load_file(path)
    b_keys = sorted(k for k in weights if "lora_B" in k)
    if how.startswith("B x"):
        factor = float(how.removeprefix("B x"))
        weights = {k: v * factor if "lora_B" in k else v for k, v in weights.items()}
    elif how == "B = 0":
        weights = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()}
    elif how == "swap 2 layers":
        # layer 0's q_proj adapter goes to layer 1 and back (same shapes, wrong place)
        first = next(k for k in b_keys if ".layers.0." in k and "q_proj" in k)
        second = first.replace(".layers.0.", ".layers.1.")
        for a, b in ((first, second), (first.replace("lora_B", "lora_A"), second.replace("lora_B", "lora_A"))):
            weights[a], weights[b] = weights[b], weights[a]
    save_file(weights, path)
    return out


def engine_paths() -> list[tuple[str, torch.dtype, str]]:
    from server.quant import import_bitsandbytes

    paths = [("float32, dequantize", torch.float32, "dequantize"), ("bfloat16, dequantize", torch.bfloat16, "dequantize")]
    if import_bitsandbytes().functional.has_avx512bf16():
        paths.append(("float32, cpu-bf16-packed", torch.float32, "cpu-bf16-packed"))
    return paths


def run(preset: str, steps: int, work: Path) -> list[str]:
    from server.model_factory import make_model
    from trainer.acceptance import decide, measure, prompts_from
    from trainer.config import FitConfig
    from trainer.demo.make_dataset import write as write_dataset
    from trainer.fit import fit

    base = make_model(work / preset, preset, seed=1)
    data = work / "cheese.jsonl"
    write_dataset(data)
    config = FitConfig(base=base, data=data, name="calibration", store=work / "store", output_dir=work / f"run-{preset}",
                       rank=8, max_seq_len=128, batch_size=4, learning_rate=1e-2, max_steps=steps, eval_every=10**9,
                       checkpoint_every=10**9, eval_fraction=0.1, seed=5)
    result = fit(config)
    adapter = work / f"adapter-{preset}"
    result.model.save_pretrained(adapter)
    prompts = prompts_from(result.eval, 4)
    cases = ["correct", "B x1.25", "B x2", "swap 2 layers", "B = 0"]
    dirs = {c: adapter if c == "correct" else tampered(adapter, work / f"{preset}-{c.replace(' ', '')}", c) for c in cases}
    rows = []
    for label, dtype, nf4_path in engine_paths():
        try:
            reports = {c: measure(base, d, result.model, prompts, rank=8, dtype=dtype, nf4_path=nf4_path) for c, d in dirs.items()}
        except ValueError as exc:  # e.g. the packed kernel cannot hold this preset's shapes
            rows.append(f"| {preset} | {label} | n/a: {exc} | | | | | |")
            continue
        for case, r in reports.items():
            _, refusal = decide(r.noise_floor, r.max_relative_difference, r.adapter_effect)
            ratio = r.max_relative_difference / max(r.noise_floor, 1e-12)
            verdict = "accepted" if refusal is None else ("refused: differs" if "differ" in refusal else "refused: no-op")
            rows.append(f"| {preset} | {label} | {case} | {r.noise_floor:.2e} | {r.max_relative_difference:.2e} "
                        f"| {ratio:.1f} | {r.adapter_effect:.2e} | {r.greedy_agreement:.3f} | {r.kl_mean:.1e} | {verdict} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=40, help="training steps for the adapter")
    parser.add_argument("--record", action="store_true", help="add the table to bench/RESULTS.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    from server.quant import import_bitsandbytes

    header = ["| preset | engine path | adapter | floor (off) | disagreement (on) | on / off | effect | greedy agree | KL mean | verdict |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    print("\n".join(header), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            rows += run(preset, args.steps, Path(tmp))
    avx = "yes" if import_bitsandbytes().functional.has_avx512bf16() else "no"
    from trainer.acceptance import ABSOLUTE_FLOOR, EFFECT_MULTIPLE, NOISE_MULTIPLE

    text = "\n".join([
        f"### acceptance calibration: presets {', '.join(args.presets)}, adapter r=8 trained {args.steps} steps, 4 eval prompts",
        "",
        f"Machine: CPU {platform.processor() or platform.machine()}, AVX512_BF16 {avx}, torch {torch.__version__}. "
        f"Rule in force: tolerance = {NOISE_MULTIPLE:g} x floor + {ABSOLUTE_FLOOR:g}; no-op when effect <= "
        f"{EFFECT_MULTIPLE:g} x tolerance. Figures are max |logit difference| / max |base logit| over all positions.",
        "", *header, *rows, ""])
    if args.record:
        record("acceptance_calibration.py", text)
        print("recorded in bench/RESULTS.md")


if __name__ == "__main__":
    main()
