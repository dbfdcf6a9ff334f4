"""Where the acceptance check's constants come from (trainer/acceptance.py): on this machine, how
far the serving engine is from the trained model with the adapter off (the noise floor) and on,
for a correct adapter and for wrong ones, on each engine compute path.

An adapter is trained with `trainer fit` on the demo data, and a weaker one made from it (B x0.25
in the model and its files alike); the wrong ones are their files with B scaled by 2 or by 1.25,
with the A and B of two layers swapped, and with B = 0 (saved before training, say). The
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

from bench.results import record  # noqa: E402
from tests.helpers import tampered_adapter  # noqa: E402


def engine_paths() -> list[tuple[str, torch.dtype, str]]:
    from server.model.quant import import_bitsandbytes

    paths = [("float32, dequantize", torch.float32, "dequantize"), ("bfloat16, dequantize", torch.bfloat16, "dequantize")]
    if import_bitsandbytes().functional.has_avx512bf16():
        paths.append(("float32, cpu-bf16-packed", torch.float32, "cpu-bf16-packed"))
    return paths


def run(preset: str, steps: int, work: Path) -> list[str]:
    from server.model.factory import make_model
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
    model, prompts = result.model, prompts_from(result.eval, 4)
    rows = []
    for strength in (1.0, 0.25):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(strength)
        adapter = work / f"adapter-{preset}-{strength}"
        model.save_pretrained(adapter)
        cases = ["correct", "B x1.25", "B x2", "swap 2 layers", "file B = 0"]
        dirs = {c: adapter if c == "correct" else tampered_adapter(adapter, work / f"{preset}-{strength}-{c.replace(' ', '')}", c)
                for c in cases}
        for label, dtype, nf4_path in engine_paths():
            try:
                reports = {c: measure(base, d, model, prompts, rank=8, dtype=dtype, nf4_path=nf4_path) for c, d in dirs.items()}
            except ValueError as exc:  # e.g. the packed kernel cannot hold this preset's shapes
                rows.append(f"| {preset} | {label} | n/a: {exc} | | | | | | | |")
                print(rows[-1], flush=True)
                continue
            for case, r in reports.items():
                _, refusal = decide(r.noise_floor, r.max_relative_difference, r.adapter_effect)
                ratio = r.max_relative_difference / max(r.noise_floor, 1e-12)
                verdict = "accepted" if refusal is None else ("refused: differs" if "differ" in refusal else "refused: no-op")
                rows.append(f"| {preset} | {label} | x{strength:g}: {case} | {r.noise_floor:.2e} | {r.max_relative_difference:.2e} "
                            f"| {ratio:.1f} | {r.adapter_effect:.2e} | {r.greedy_agreement:.3f} | {r.kl_mean:.1e} | {verdict} |")
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=40, help="training steps for the adapter")
    parser.add_argument("--record", action="store_true", help="add the table to bench/RESULTS.md")
    args = parser.parse_args()
    from server.model.quant import import_bitsandbytes, quiet_bitsandbytes

    quiet_bitsandbytes()
    torch.manual_seed(0)

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
