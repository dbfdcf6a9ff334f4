"""Runs the model on the sequences the scheduler picked: prefill (whole prompts together,
right-padded, or a long prompt one chunk per step), the decode step, scoring, and the sampling of
each new token.

The runner owns what those computations share: the table of tokens each batch row has seen (the
repetition penalty reads it), the host buffer grammar masks are written into, and how the decode
step runs — eagerly, torch.compile'd, or replayed from CUDA graphs (server/engine/decode_step.py).
It is built from a model, a KV cache and its block manager alone, so tests drive it with
Sequences and no Engine.
Each call ends in the step's one host sync: reading the sampled tokens (and logprobs) into a
`Sampled`. Prompt logprobs, when a prefill computes them, are read once per few hundred positions
(prefill is not the decode loop).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import EngineConfig
from ..model.kv_cache import KVCache
from ..model.llama import ForwardBatch, Transformer
from ..model.quant import TRITON_GEMV_MAX_TOKENS
from ..model.sampling import SamplingBatch, sample, token_logprobs
from .blocks import BlockManager
from .decode_step import DecodeStep
from .requests import TokenLogprob
from .sequence import Sequence
from .slots import AdapterSlots
from .structured import allowed_tokens, bitmask_words

log = logging.getLogger(__name__)

PROMPT_LOGPROBS_CHUNK = 256  # prompt positions whose logits are made at once (each [vocab] float32)


@dataclass(frozen=True)
class Sampled:
    """A step's new token per sequence, with (when any sequence asked for logprobs) each token's
    logprob and the top alternatives' ids and logprobs, as host lists."""

    tokens: list[int]
    logprobs: tuple[list[float], list[list[int]], list[list[float]]] | None = None

    def rows(self, kept: list[int]) -> "Sampled":
        """Only the rows at `kept`, in that order."""
        pick = [self.tokens[i] for i in kept]
        if self.logprobs is None:
            return Sampled(pick)
        return Sampled(pick, tuple([values[i] for i in kept] for values in self.logprobs))


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache, blocks: BlockManager, config: EngineConfig):
        self.model = model
        self.cache = cache
        self.blocks = blocks
        self.config = config
        self.device = model.device
        vocab = model.spec.vocab_size
        rows = blocks.rows
        # tokens each batch row has seen (prompt and output), for the repetition penalty; the last
        # row is the scratch row, where the padding rows of a fixed-shape step mark theirs
        self.seen = torch.zeros(rows + 1, vocab, dtype=torch.bool, device=self.device)
        # grammar masks are written on the host, then copied to the device with the step
        self._bitmask = torch.empty(rows, bitmask_words(vocab), dtype=torch.int32, pin_memory=self.device.type == "cuda")
        if config.compile and model.kernels.lora.name == "triton" and self.device.type != "cuda":
            raise ValueError("compile=True with the Triton kernels needs CUDA (their CPU interpreter cannot be compiled)")
        if config.compile and model.kernels.decode_attention.name == "cpu":
            raise ValueError("compile=True does not apply to kernels='cpu': its C kernels are what compile would fuse")
        self.decode_logits = self._compiled_decode() if config.compile else self.last_position_logits
        # captured at max_seq_len, the torch attention would gather every row's whole block table every step
        graphs = (config.cuda_graphs and self.device.type == "cuda" and not config.compile
                  and model.kernels.decode_attention.name == "triton")
        with torch.inference_mode():  # the step's buffers are written only inside steps, in inference mode
            self.step = DecodeStep(blocks, self.decode_logits, self.device, self.seen, padded=graphs)
            self.graphs = "off"
            if graphs:
                try:
                    self.step.capture()
                    self.graphs = "on"
                except Exception:  # serve eagerly rather than not at all; describe() and the log say so
                    log.exception("capturing the decode step as CUDA graphs failed; decoding eagerly")
                    self.step = DecodeStep(blocks, self.decode_logits, self.device, self.seen)
                    self.graphs = "failed"
        self._loaded: list[Sequence] = []  # the sequences whose sampling parameters the step holds

    # ---------------------------------------------------------------- prefill

    def prefill(self, seqs: list[Sequence]) -> Sampled:
        """Whole prompts (past any cached prefix) into their KV blocks, together; samples each
        one's first token."""
        AdapterSlots.wait_for_writes(s.adapter for s in seqs)
        starts = [s.prefilled for s in seqs]
        hidden, lengths = self._prompt_forward(seqs)
        self._prompt_logprobs(seqs, hidden, starts)
        last = hidden[torch.arange(len(seqs), device=self.device), torch.tensor(lengths, device=self.device) - 1]
        return self._sample_first(seqs, self.model.logits(last))

    def prefill_chunk(self, seq: Sequence) -> Sampled | None:
        """The next prefill_chunk_tokens of seq's prompt into the cache: its queries attend to
        what is before (in the cache) and causally within the chunk. After the last chunk, its
        first token; before, None."""
        AdapterSlots.wait_for_writes([seq.adapter])
        start = seq.prefilled
        stop = min(start + self.config.prefill_chunk_tokens, len(seq.tokens))
        hidden = self.model(self._extend_batch([seq], [stop - start]), self.cache)
        self._prompt_logprobs([seq], hidden, [start])
        seq.prefilled = stop
        if stop < len(seq.tokens):
            return None
        return self._sample_first([seq], self.model.logits(hidden[:, -1]))

    def score(self, seqs: list[Sequence]) -> list[torch.Tensor]:
        """Logits [len(prompt), vocab] at every prompt position (on the host), by prefill's forward
        (seqs hold fresh blocks: nothing cached is skipped)."""
        AdapterSlots.wait_for_writes(s.adapter for s in seqs)
        hidden, lengths = self._prompt_forward(seqs)
        logits = self.model.logits(hidden)
        return [logits[i, :n].cpu() for i, n in enumerate(lengths)]

    def _prompt_logprobs(self, seqs: list[Sequence], hidden: torch.Tensor, starts: list[int]) -> None:
        """Append to each sequence that asked for them the logprobs of the prompt tokens its row of
        `hidden` (positions starts[i]...) predicts: position p's logits score token p + 1. Logits
        are made a few hundred positions at a time, never [prompt, vocab] at once."""
        for i, seq in enumerate(seqs):
            top_n = seq.request.sampling.prompt_logprobs
            if top_n is None:
                continue
            prompt_len = len(seq.request.prompt_ids)
            first = max(starts[i], len(seq.prompt_logprobs))  # a recomputation after preemption adds none
            last = min(starts[i] + hidden.shape[1], prompt_len - 1)
            for a in range(first, last, PROMPT_LOGPROBS_CHUNK):
                b = min(a + PROMPT_LOGPROBS_CHUNK, last)
                targets = torch.tensor(seq.tokens[a + 1:b + 1], device=self.device)
                logits = self.model.logits(hidden[i, a - starts[i]:b - starts[i]])
                chosen, top_ids, top_values = (t.tolist() for t in token_logprobs(logits, targets, top_n))
                seq.prompt_logprobs += [TokenLogprob(token, lp, tuple(zip(ids, values))) for token, lp, ids, values
                                        in zip(seq.tokens[a + 1:b + 1], chosen, top_ids, top_values)]

    # ---------------------------------------------------------------- decode

    def decode(self, seqs: list[Sequence]) -> Sampled:
        """One token for every sequence, whatever its adapter, through the fixed-shape step."""
        if seqs != self._loaded:  # membership changed: each row's sampling parameters, once
            self.step.load_sampling([s.request.sampling for s in seqs], [s.seed for s in seqs],
                                    [len(s.generated) for s in seqs])
            self._loaded = list(seqs)
        logits, tokens = self.step.decode([s.tokens[-1] for s in seqs], [len(s.tokens) - 1 for s in seqs],
                                          [s.row for s in seqs], [s.slot for s in seqs], self._grammar_bitmask(seqs))
        top_n = self.step.top_logprobs
        return _to_host(tokens, token_logprobs(logits, tokens, top_n) if top_n is not None else None)

    def last_position_logits(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model.logits(self.model(batch, self.cache)[:, -1])

    # ---------------------------------------------------------------- parts

    def _prompt_forward(self, seqs: list[Sequence]) -> tuple[torch.Tensor, list[int]]:
        """Hidden states of every token of seqs past what is already in the cache, and how many
        each row has. Fresh prompts attend among themselves (one causal attention over the batch);
        a prompt with a cached prefix attends through the cache."""
        lengths = [len(s.tokens) - s.prefilled for s in seqs]
        if any(s.prefilled for s in seqs):
            return self.model(self._extend_batch(seqs, lengths), self.cache), lengths
        width = max(lengths)
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        cache_slots = torch.full((len(seqs), width), self.cache.scratch_slot, dtype=torch.long)  # padding: scratch
        for i, s in enumerate(seqs):
            tokens[i, : lengths[i]] = torch.tensor(s.tokens)
            cache_slots[i, : lengths[i]] = self.blocks.slots(s, 0, lengths[i])
        batch = ForwardBatch(
            tokens=tokens.to(self.device),
            positions=torch.arange(width, device=self.device).expand(len(seqs), width),
            slots=cache_slots.flatten().to(self.device),
            block_tables=self.blocks.tables[[s.row for s in seqs]].to(self.device),
            token_slots=self._token_slots(seqs, width),
            prefill=True,
            kv_length=width,
        )
        return self.model(batch, self.cache), lengths

    def _extend_batch(self, seqs: list[Sequence], counts: list[int]) -> ForwardBatch:
        """The next counts[i] tokens of each sequence after its seq.prefilled, right-padded (padding
        at position 0, written to the scratch slot), attending through the cache like a decode
        step of several tokens."""
        width = max(counts)
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        positions = torch.zeros(len(seqs), width, dtype=torch.long)
        cache_slots = torch.full((len(seqs), width), self.cache.scratch_slot, dtype=torch.long)
        for i, (s, n) in enumerate(zip(seqs, counts)):
            start = s.prefilled
            tokens[i, :n] = torch.tensor(s.tokens[start:start + n])
            positions[i, :n] = torch.arange(start, start + n)
            cache_slots[i, :n] = self.blocks.slots(s, start, start + n)
        return ForwardBatch(
            tokens=tokens.to(self.device), positions=positions.to(self.device),
            slots=cache_slots.flatten().to(self.device),
            block_tables=self.blocks.tables[[s.row for s in seqs]].to(self.device),
            token_slots=self._token_slots(seqs, width), prefill=False,
            kv_length=max(s.prefilled + n for s, n in zip(seqs, counts)))

    def _token_slots(self, seqs: list[Sequence], width: int) -> torch.Tensor | None:
        adapters = [s.slot for s in seqs]
        return torch.tensor(adapters, device=self.device).repeat_interleave(width) if any(adapters) else None

    def _sample_first(self, seqs: list[Sequence], logits: torch.Tensor) -> Sampled:
        """Each prefilled sequence's first token from its row of logits, by the same sample() the
        decode step runs on its static buffers. Its row's seen-token table is set to its tokens
        (the prompt, and what it had generated before a preemption) first."""
        self._loaded = []  # the next decode reloads every row's parameters and step, whoever runs
        for seq in seqs:
            self.seen[seq.row].zero_()
            self.seen[seq.row, torch.tensor(seq.tokens, device=self.device)] = True
        sampling = SamplingBatch.build([s.request.sampling for s in seqs], [s.seed for s in seqs],
                                       [len(s.generated) for s in seqs], self.model.spec.vocab_size, self.device)
        rows = torch.tensor([s.row for s in seqs], device=self.device)
        bitmask = self._grammar_bitmask(seqs)
        allowed = None if bitmask is None else allowed_tokens(bitmask.to(self.device, non_blocking=True),
                                                              self.model.spec.vocab_size)
        tokens = sample(logits, sampling, self.seen[rows] if sampling.flags.use_penalty else None, allowed)
        self.seen[rows, tokens] = True
        top_n = sampling.top_logprobs
        return _to_host(tokens, token_logprobs(logits, tokens, top_n) if top_n is not None else None)

    def _grammar_bitmask(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Host int32 [len(seqs), words]: the tokens each sequence's grammar allows next (all on
        free rows); None when no sequence has a grammar."""
        if all(s.matcher is None for s in seqs):
            return None
        bitmask = self._bitmask[: len(seqs)]
        bitmask.fill_(-1)
        for i, seq in enumerate(seqs):
            if seq.matcher is not None:
                seq.matcher.fill_bitmask(self._bitmask, i)
        return bitmask

    def _compiled_decode(self) -> Callable[[ForwardBatch], torch.Tensor]:
        """torch.compile of the decode forward, warmed up on every variant a step can hit, so no
        request waits for a compile: with and without adapters, for one row and for several (the
        batch size and KV length stay symbolic; torch specializes a size of 1). Warm-up writes
        only into the scratch block."""
        # The cache's shapes are fixed for the engine's life; static, they cannot be mistaken
        # for (and guarded equal to) the batch size.
        torch._dynamo.mark_static(self.cache.keys)
        torch._dynamo.mark_static(self.cache.values)
        compiled = torch.compile(self.last_position_logits, dynamic=True)
        most = self.blocks.rows
        sizes = [1] + ([3] if most >= 3 else [2] if most == 2 else [])
        if most > TRITON_GEMV_MAX_TOKENS:  # the Triton NF4 path switches kernels above it
            sizes.append(most)
        with torch.inference_mode(), _explain_compile_failure():
            for rows in sizes:
                for slots in (None, torch.zeros(rows, dtype=torch.long, device=self.device)):
                    kv_length = min(7, self.config.max_seq_len)  # unlike the sizes, so not guarded equal to one
                    compiled(ForwardBatch(
                        tokens=torch.zeros(rows, 1, dtype=torch.long, device=self.device),
                        positions=torch.full((rows, 1), kv_length - 1, device=self.device),
                        slots=torch.full((rows,), self.cache.scratch_slot, device=self.device),
                        block_tables=self.blocks.tables[[self.blocks.scratch_row] * rows].to(self.device),
                        token_slots=slots, prefill=False, kv_length=kv_length))
        return compiled


def _to_host(tokens: torch.Tensor, logprobs: tuple[torch.Tensor, ...] | None) -> Sampled:
    """The step's one host sync."""
    if logprobs is None:
        return Sampled(tokens.tolist())
    chosen, top_ids, top_values = (t.tolist() for t in logprobs)
    return Sampled(tokens.tolist(), (chosen, top_ids, top_values))


@contextlib.contextmanager
def _explain_compile_failure():
    try:
        yield
    except Exception as exc:  # inductor's errors run to pages; lead with the cause it caught
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RuntimeError(f"EngineConfig(compile=True) could not compile the decode step: {type(exc).__name__}: "
                           f"{cause[:500]} (serve without --compile to run it eagerly)") from exc
