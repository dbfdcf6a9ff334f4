"""The acceptance check before publishing: the serving engine must apply the adapter and agree
with the trained PEFT model, and the adapter must change the base model's output.

Logits are compared on eval prompts (the prompt part of held-out examples). The tolerance is
relative to the logits' scale: float32 on CPU agrees to ~1e-5, bfloat16 on CUDA to ~1e-2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from server.config import EngineConfig
from server.engine import Engine, Request, SamplingParams
from server.errors import HotloraError

from .data import IGNORE, Example


class AcceptanceError(RuntimeError):
    """The adapter must not be published; the message says why."""


@dataclass(frozen=True)
class AcceptanceReport:
    prompts: int
    max_relative_difference: float  # engine vs trained PEFT model
    adapter_effect: float  # engine with adapter vs without, relative
    tolerance: float

    def as_dict(self) -> dict:
        return asdict(self)


def prompts_from(examples: list[Example], count: int) -> list[list[int]]:
    prompts = []
    for example in examples:
        prompt = [t for t, label in zip(example.input_ids, example.labels) if label == IGNORE]
        if prompt:
            prompts.append(prompt)
        if len(prompts) == count:
            break
    return prompts


def check(base_dir: Path, adapter_dir: Path, peft_model, prompts: list[list[int]], rank: int) -> AcceptanceReport:
    if not prompts:
        raise AcceptanceError("no eval prompts to check the adapter on")
    device = next(p.device for p in peft_model.parameters())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-3
    config = EngineConfig(max_batch_size=len(prompts), max_seq_len=max(len(p) for p in prompts) + 1, max_adapters=1,
                          max_rank=rank, device=str(device), dtype=str(dtype).removeprefix("torch."))
    engine = Engine.from_pretrained(base_dir, config)
    try:
        try:
            engine.load_adapter("candidate", adapter_dir)
        except HotloraError as exc:
            raise AcceptanceError(f"the serving engine cannot apply this adapter: {exc}") from None
        one = SamplingParams(max_new_tokens=1)  # scoring reads the prompt's logits; nothing is generated
        with_adapter = engine.score([Request(prompt_ids=p, adapter="candidate", sampling=one) for p in prompts])
        base = engine.score([Request(prompt_ids=p, sampling=one) for p in prompts])
    finally:
        engine.close()

    worst, effect = 0.0, 0.0
    peft_model.eval()
    with torch.no_grad():
        for prompt, served, plain in zip(prompts, with_adapter, base):
            trained = peft_model(input_ids=torch.tensor([prompt], device=device)).logits[0].float().cpu()
            scale = trained.abs().max().item() + 1e-6
            worst = max(worst, (served.float() - trained).abs().max().item() / scale)
            effect = max(effect, (served.float() - plain.float()).abs().max().item() / scale)
    report = AcceptanceReport(len(prompts), worst, effect, tolerance)
    if worst > tolerance:
        raise AcceptanceError(f"the serving engine's logits differ from the trained model's by {worst:.2e} "
                              f"(relative; tolerance {tolerance:.0e})")
    if effect <= tolerance:
        raise AcceptanceError(f"the adapter does nothing: with it the logits move by {effect:.2e} (relative), "
                              f"within the tolerance {tolerance:.0e} of the base model")
    return report
