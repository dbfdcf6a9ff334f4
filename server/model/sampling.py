"""Per-row sampling for a batch where every request has its own parameters and seed.

Sampling is Gumbel-max: token = argmax(logits/T + g) with g ~ Gumbel(0, 1), an exact draw from
softmax(logits/T) restricted by top-k/top-p. The noise is counter-based: a hash of (the request's
seed, its step, the token id), computed for the whole batch in a few tensor ops. A request's noise
depends only on its seed and step, so a seeded request gives the same tokens whatever else shares
its batch; there is no per-request generator to step row by row, and nothing here needs the host,
so the step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from ..errors import InvalidRequest

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries per request, as OpenAI allows; each row's bias table has this many


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy. top_k 0 = off. top_p 1 = off. repetition_penalty 1 = off (HF's
    definition: logits of already-seen tokens are divided by it when positive, multiplied when
    negative). seed None = drawn from the engine's seed sequence. logprobs None = off; N = each
    generated token's log-probability and the N most likely alternatives' (0 <= N <= MAX_LOGPROBS),
    under the model's own distribution (before bias, temperature, penalty, top-k/p and grammar).
    prompt_logprobs the same for every prompt token after the first (vLLM's name; what echo and
    lm-evaluation-harness read); with it, max_new_tokens may be 0: the prompt is scored, nothing
    is generated. min_p 0 = off; p = drop tokens less likely than p times the most likely one (after
    temperature, as vLLM). logit_bias: (token id, bias) pairs added to the logits before anything
    else (OpenAI's; bias in [-100, 100], at most MAX_LOGIT_BIAS)."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def validate(self) -> None:
        least = 0 if self.prompt_logprobs is not None else 1  # 0: score the prompt only
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < least:
            raise InvalidRequest(f"max_new_tokens must be >= {least}, got {self.max_new_tokens}"
                                 + ("" if least == 0 else " (0 is allowed with prompt logprobs, to score the prompt)"))
        for name in ("temperature", "top_p", "repetition_penalty", "min_p"):
            if not math.isfinite(getattr(self, name)):  # inf would sample uniformly or zero every logit
                raise InvalidRequest(f"{name} must be a finite number, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {len(self.logit_bias)}")
        if len({token for token, _ in self.logit_bias}) != len(self.logit_bias):
            raise InvalidRequest("logit_bias names a token more than once")
        for token, bias in self.logit_bias:
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise InvalidRequest(f"logit_bias for token {token} must be in [-100, 100], got {bias}")
        if not self.repetition_penalty > 0:
            raise InvalidRequest(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidRequest(f"seed must be in [0, 2**64), got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs (top alternatives) must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"prompt_logprobs (top alternatives) must be in [0, {MAX_LOGPROBS}], "
                                 f"got {self.prompt_logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class SamplingFlags:
    """Which parts of sample() a batch needs. A captured step fixes them (server/engine/decode_step.py's
    variants); an eager one takes them from its requests."""

    all_greedy: bool = True
    use_top_k: bool = False
    use_top_p: bool = False
    use_penalty: bool = False
    use_min_p: bool = False
    use_bias: bool = False

    @classmethod
    def of(cls, params: list[SamplingParams]) -> "SamplingFlags":
        return cls(all(p.greedy for p in params), any(p.top_k > 0 for p in params),
                   any(p.top_p < 1 for p in params), any(p.repetition_penalty != 1 for p in params),
                   any(p.min_p > 0 for p in params), any(p.logit_bias for p in params))


# The per-row parameters, one row of parameter_table each; every value is exact in float64.
PARAMETERS = (("greedy", torch.bool), ("temperature", torch.float32), ("top_k", torch.int64),
              ("top_p", torch.float32), ("penalty", torch.float32), ("min_p", torch.float32), ("seeds", torch.int64), ("steps", torch.int64))


def parameter_table(params: list[SamplingParams], seeds: list[int], steps: list[int], vocab_size: int) -> torch.Tensor:
    """[len(PARAMETERS), B] float64 on the host: what SamplingBatch holds, in one block for one copy.
    Greedy rows get temperature 1 (never divided by 0); top_k 0 (off) becomes the vocabulary."""
    return torch.tensor([
        [float(p.greedy) for p in params],
        [p.temperature if p.temperature > 0 else 1.0 for p in params],
        [p.top_k if p.top_k > 0 else vocab_size for p in params],
        [p.top_p for p in params],
        [p.repetition_penalty for p in params],
        [p.min_p for p in params],
        [_mix64(s) for s in seeds],  # 32-bit, from the 64-bit seed
        steps,
    ], dtype=torch.float64)


def bias_table(params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Host ([B, MAX_LOGIT_BIAS] int64 token ids, [B, MAX_LOGIT_BIAS] float32 biases): each row's
    logit_bias, padded with (0, 0.0) entries, which add nothing. A fixed width, so a captured step
    applies any request's bias."""
    ids = torch.zeros(len(params), MAX_LOGIT_BIAS, dtype=torch.int64)
    values = torch.zeros(len(params), MAX_LOGIT_BIAS, dtype=torch.float32)
    for row, p in enumerate(params):
        if p.logit_bias:
            ids[row, :len(p.logit_bias)] = torch.tensor([t for t, _ in p.logit_bias])
            values[row, :len(p.logit_bias)] = torch.tensor([b for _, b in p.logit_bias])
    return ids, values


def top_logprobs_of(params: list[SamplingParams]) -> int | None:
    """How many alternatives to compute for the batch: the most any row wants (None: no row)."""
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    return max(wanted) if wanted else None


@dataclass
class SamplingBatch:
    """Device tensors of the per-row parameters (see PARAMETERS). seeds: each row's seed (any for
    greedy rows); steps: the tokens each row has generated so far. Every sample() moves the rows
    one step on."""

    greedy: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    penalty: torch.Tensor
    min_p: torch.Tensor
    seeds: torch.Tensor
    steps: torch.Tensor
    flags: SamplingFlags
    top_logprobs: int | None = None
    bias_ids: torch.Tensor | None = None  # [B, MAX_LOGIT_BIAS] (bias_table); None: no row has a bias
    bias_values: torch.Tensor | None = None

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], steps: list[int], vocab_size: int,
              device: torch.device) -> "SamplingBatch":
        table = parameter_table(params, seeds, steps, vocab_size).to(device)
        tensors = {name: table[i].to(dtype) for i, (name, dtype) in enumerate(PARAMETERS)}
        flags = SamplingFlags.of(params)
        if flags.use_bias:
            tensors["bias_ids"], tensors["bias_values"] = (t.to(device) for t in bias_table(params))
        return cls(**tensors, flags=flags, top_logprobs=top_logprobs_of(params))


_MASK32 = 0xFFFFFFFF


def _mix64(seed: int) -> int:
    """A 64-bit seed folded into 32 well-mixed bits (host side, once per request)."""
    seed %= 2**64
    return _hash32_int((seed & _MASK32) ^ _hash32_int(seed >> 32))


def _hash32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x · constant) mod 2³² for x < 2³² held in int64, in 16-bit halves so nothing overflows."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 on int64 tensors holding 32-bit values (= _hash32_int)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 in (0, 1): a function of (seed, step, token id) only."""
    tokens = torch.arange(vocab_size, device=seeds.device)
    row = _hash32(seeds ^ _hash32(steps & _MASK32))[:, None]
    bits = _hash32(row ^ tokens[None, :])
    return (bits.to(torch.float64).add_(0.5) / 2**32).to(torch.float32).clamp_(1e-7, 1.0 - 1e-7)


def sample(logits: torch.Tensor, batch: SamplingBatch, seen: torch.Tensor | None,
           allowed: torch.Tensor | None = None) -> torch.Tensor:
    """logits: [B, V] float32; seen: [B, V] bool (tokens in prompt or output) for the penalty;
    allowed: [B, V] bool, the tokens each row's grammar allows (all True on free rows).
    Returns the next token of every row, [B] int64."""
    flags = batch.flags
    if flags.use_bias and batch.bias_ids is not None:
        logits = logits.scatter_add(1, batch.bias_ids, batch.bias_values)
    if flags.use_penalty and seen is not None:
        penalty = batch.penalty[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    greedy_tokens = logits.argmax(dim=-1)
    steps = batch.steps.clone()
    batch.steps += 1
    if flags.all_greedy:
        return greedy_tokens

    scores = logits / batch.temperature[:, None]
    if flags.use_top_k or flags.use_top_p:
        scores = _restrict_top_k_top_p(scores, batch)
    if flags.use_min_p:  # p < min_p * p_max, in log space: no softmax; min_p 0 gives -inf, keeping all
        floor = scores.amax(dim=-1, keepdim=True) + batch.min_p[:, None].log()
        scores = scores.masked_fill(scores < floor, float("-inf"))
    noise = -torch.log(-torch.log(uniform_noise(batch.seeds, steps, scores.shape[1])))
    sampled = (scores + noise).argmax(dim=-1)
    return torch.where(batch.greedy, greedy_tokens, sampled)


def _restrict_top_k_top_p(scores: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    ranks = torch.arange(scores.shape[1], device=scores.device)[None, :]
    remove = ranks >= batch.top_k[:, None]
    if batch.flags.use_top_p:
        probs = sorted_scores.masked_fill(remove, float("-inf")).softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays);
        # rows with top_p 1 keep every token, even where float32 sums reach 1 before the tail.
        top_p = batch.top_p[:, None]
        remove |= ((probs.cumsum(dim=-1) - probs) >= top_p) & (top_p < 1)
    remove_in_vocab_order = torch.zeros_like(remove).scatter(1, order, remove)
    return scores.masked_fill(remove_in_vocab_order, float("-inf"))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int) -> tuple[torch.Tensor, ...]:
    """Under log_softmax(logits): each row's chosen token's logprob [B], and its top_n tokens
    [B, top_n] with their logprobs [B, top_n], most likely first. On device, from the step's logits."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    top_values, top_ids = logprobs.topk(top_n, dim=-1) if top_n else (logprobs[:, :0], tokens[:, None][:, :0])
    return chosen, top_ids, top_values
