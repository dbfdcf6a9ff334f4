"""The acceptance check before publishing: the serving engine must apply the adapter as the trained
PEFT model does, and the adapter must change the base model's output.

Two implementations never agree exactly (the engine may compute in bfloat16, through another NF4
kernel, or sum in another order), and how far apart they are depends on the machine. So the
tolerance is measured, not guessed; see `decide`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from server.config import EngineConfig
from server.engine.engine import Engine, Request, SamplingParams
from server.errors import HotloraError
from server.model.quant import keep_linear4bit_on_dequantize

from .data import IGNORE, Example

# Calibrated by bench/acceptance_calibration.py (table in bench/RESULTS.md): with a correct adapter
# the engine stayed within 0.2-1.0x the adapter-off floor on the float32, bfloat16 and packed-bf16
# paths; wrong adapters of a trained adapter's strength (B x1.25, B x2, two layers swapped)
# disagreed by 5.6x (bfloat16) to 1e6x (float32) the floor. 3x leaves room for other models.
NOISE_MULTIPLE = 3.0
# Float32 on both sides can agree bit for bit (floor 0); summation order alone moves logits ~1e-6.
ABSOLUTE_FLOOR = 1e-4
# An adapter "does something" when it moves the trained model's logits by this many tolerances.
EFFECT_MULTIPLE = 3.0


class AcceptanceError(RuntimeError):
    """The adapter must not be published; the message says why."""


@dataclass(frozen=True)
class AcceptanceReport:
    """What the check measured (stored in the manifest's "acceptance" section). Logit differences
    are relative: max |a - b| over every position and token, over the trained base's max |logit|."""

    engine: str  # how the engine computed: device, dtype, NF4 path
    prompts: int
    positions: int
    noise_floor: float  # engine vs trained model, adapter off: the two implementations' own disagreement
    max_relative_difference: float  # engine vs trained model, adapter on
    adapter_effect: float  # trained model with vs without the adapter
    tolerance: float  # NOISE_MULTIPLE * noise_floor + ABSOLUTE_FLOOR
    greedy_agreement: float  # fraction of positions where engine and trained model pick the same next token
    base_greedy_agreement: float  # the same with the adapter off: what two correct implementations agree to here
    kl_mean: float  # KL(trained || engine) of the next-token distributions, nats, mean over positions
    kl_max: float

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def extra_flips_sigma(self) -> float:
        """How far the greedy tokens the engine flips with the adapter on exceed those it flips with
        the adapter off, in standard deviations: (on - off) / sqrt(on + off), the test of two counts
        of rare events. Adapter off, two correct implementations still flip near-ties (bfloat16
        rounding flips ~10% of a random model's tokens); a correctly applied adapter flips about
        as many, a wrong one more (a 25% scale error: 5.5 sigma, bench/RESULTS.md)."""
        on = round((1 - self.greedy_agreement) * self.positions)
        off = round((1 - self.base_greedy_agreement) * self.positions)
        return (on - off) / max(on + off, 1) ** 0.5


def decide(noise_floor: float, disagreement: float, effect: float) -> tuple[float, str | None]:
    """The rule. Returns (tolerance, reason to refuse or None).

    The noise floor is the engine's disagreement with the trained model with the adapter off on
    the same prompts: whatever separates the two implementations on this machine, in this dtype,
    through this NF4 kernel. An adapter the engine applies correctly adds little to it, so:
    - accept only when the disagreement with the adapter on is at most
      tolerance = NOISE_MULTIPLE x floor + ABSOLUTE_FLOOR;
    - refuse as a no-op an adapter whose effect on the trained model is not clearly above that
      tolerance (at most EFFECT_MULTIPLE x tolerance): it could not be told apart from noise, and
      a wrong adapter with so small an effect would pass the first test.
    A wrong adapter (weights swapped, scale off) disagrees by a fraction of its effect, which the
    second condition keeps above the tolerance. The limit is the floor itself: in float32 it is
    ~5e-7 and any real error shows; in bfloat16 it is ~8e-2 (relative, measured), and errors
    smaller than that (a 25% scale error of a weak adapter) cannot be told from rounding.
    """
    tolerance = NOISE_MULTIPLE * noise_floor + ABSOLUTE_FLOOR
    if disagreement > tolerance:
        return tolerance, (f"the serving engine's logits differ from the trained model's by {disagreement:.2e} "
                           f"(relative); the tolerance is {tolerance:.2e} ({NOISE_MULTIPLE:g}x the {noise_floor:.1e} "
                           f"measured with the adapter off, + {ABSOLUTE_FLOOR:g})")
    if effect <= EFFECT_MULTIPLE * tolerance:
        return tolerance, (f"the adapter does nothing measurable: it moves the trained model's logits by {effect:.2e} "
                           f"(relative), not clearly above the {tolerance:.2e} that separates the engine from the "
                           f"trained model (needs > {EFFECT_MULTIPLE:g}x)")
    return tolerance, None


def prompts_from(examples: list[Example], count: int) -> list[list[int]]:
    prompts = []
    for example in examples:
        prompt = [t for t, label in zip(example.input_ids, example.labels) if label == IGNORE]
        if prompt:
            prompts.append(prompt)
        if len(prompts) == count:
            break
    return prompts


def check(base_dir: Path, adapter_dir: Path, peft_model, prompts: list[list[int]], rank: int,
          dtype: torch.dtype | None = None, nf4_path: str = "auto") -> AcceptanceReport:
    """Score `prompts` with the serving engine (compute dtype: `dtype`, else bfloat16 on CUDA and
    float32 on CPU; NF4 path `nf4_path`) and with `peft_model`, both with and without the adapter,
    and apply `decide`. Raises AcceptanceError with the reason when the adapter must not ship."""
    report = measure(base_dir, adapter_dir, peft_model, prompts, rank, dtype, nf4_path)
    _, refusal = decide(report.noise_floor, report.max_relative_difference, report.adapter_effect)
    if refusal:
        raise AcceptanceError(refusal)
    return report


def measure(base_dir: Path, adapter_dir: Path, peft_model, prompts: list[list[int]], rank: int,
            dtype: torch.dtype | None = None, nf4_path: str = "auto") -> AcceptanceReport:
    """check()'s figures without its verdict (AcceptanceError only when the engine cannot load
    the adapter at all)."""
    if not prompts:
        raise AcceptanceError("no eval prompts to check the adapter on")
    device = next(p.device for p in peft_model.parameters())
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = EngineConfig(max_batch_size=len(prompts), max_seq_len=max(len(p) for p in prompts) + 1, max_adapters=1,
                          max_rank=rank, device=str(device), dtype=str(dtype).removeprefix("torch."), nf4_path=nf4_path)
    engine = Engine.from_pretrained(base_dir, config)
    try:
        try:
            engine.load_adapter("candidate", adapter_dir)
        except HotloraError as exc:
            raise AcceptanceError(f"the serving engine cannot apply this adapter: {exc}") from None
        one = SamplingParams(max_new_tokens=1)  # scoring reads the prompt's logits; nothing is generated
        served = torch.cat(engine.score([Request(prompt_ids=p, adapter="candidate", sampling=one) for p in prompts]))
        served_base = torch.cat(engine.score([Request(prompt_ids=p, sampling=one) for p in prompts]))
        described = engine.describe()
    finally:
        engine.close()

    trained, trained_base = _trained_logits(peft_model, prompts, device)
    scale = trained_base.abs().max().item() + 1e-6
    floor = (served_base - trained_base).abs().max().item() / scale
    disagreement = (served - trained).abs().max().item() / scale
    effect = (trained - trained_base).abs().max().item() / scale
    kl = torch.nn.functional.kl_div(served.log_softmax(-1), trained.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).clamp_min(0)  # rounding can make it -1e-9
    tolerance, _ = decide(floor, disagreement, effect)
    return AcceptanceReport(
        engine=f"{described['device']} {described['dtype']} nf4={described['nf4_path']}", prompts=len(prompts),
        positions=trained.shape[0], noise_floor=floor, max_relative_difference=disagreement, adapter_effect=effect,
        tolerance=tolerance, greedy_agreement=(served.argmax(-1) == trained.argmax(-1)).float().mean().item(),
        base_greedy_agreement=(served_base.argmax(-1) == trained_base.argmax(-1)).float().mean().item(),
        kl_mean=kl.mean().item(), kl_max=kl.max().item())


@torch.no_grad()
def _trained_logits(peft_model, prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """[positions, vocab] float32 logits of every prompt, with the adapter and with it disabled."""
    keep_linear4bit_on_dequantize(peft_model)  # the trained model's own path, whatever the CPU
    peft_model.eval()
    with_adapter, without = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        with_adapter.append(peft_model(input_ids=ids).logits[0].float().cpu())
        with peft_model.disable_adapter():
            without.append(peft_model(input_ids=ids).logits[0].float().cpu())
    return torch.cat(with_adapter), torch.cat(without)
