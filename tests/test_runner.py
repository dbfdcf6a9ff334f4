"""The model runner (server/engine/runner.py), built from a model, a KV cache and its block
manager alone, and its fixed-shape decode step (server/engine/decode_step.py), eagerly on CPU:
what CUDA graphs capture on a GPU (tests/test_engine_gpu.py) is this same padded step. A runner
driven by hand gives the engine's tokens; padding changes no real row's logits, writes only into
the KV cache's scratch block, and an engine decoding through it gives the tokens of an engine
decoding unpadded."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from server.engine.blocks import BlockManager
from server.engine.decode_step import DecodeStep, padded_sizes
from server.engine.engine import Engine, EngineConfig, Request, RequestHandle, SamplingParams
from server.engine.runner import ModelRunner
from server.engine.sequence import Sequence
from server.engine.slots import AdapterSlots
from server.lora.peft_files import read_peft_adapter
from server.model.kv_cache import KVCache
from server.model.llama import load_model

CONFIG = EngineConfig(max_batch_size=6, max_seq_len=48, max_adapters=3, max_rank=16)
PROMPTS = [[5, 17, 42, 99, 7, 3, 120], [8, 200, 33], [150, 9, 12, 40, 41]]
SENTINEL = 12345.0


class Parts:
    """What an engine builds around its runner, built here by hand: model, cache, blocks, slots, runner."""

    def __init__(self, llama_dir, peft_adapters):
        self.model, _ = load_model(llama_dir, CONFIG)
        spec = self.model.spec
        self.cache = KVCache(spec.num_layers, 24, 8, spec.num_kv_heads, spec.head_dim, CONFIG.max_seq_len,
                             self.model.device, self.model.dtype)
        self.blocks = BlockManager(self.cache, CONFIG.max_batch_size)
        self.slots = AdapterSlots(self.model.lora_pools(), CONFIG.max_adapters, self.model.device, self.model.dtype,
                                  threading.Condition(), on_forget=lambda name: None)
        self.adapters = {}
        for name, path in peft_adapters.items():
            entry = self.slots.register(name, read_peft_adapter(path, spec, CONFIG.max_rank))
            assert self.slots.make_resident(entry, evict=False)
            self.adapters[name] = entry
        self.runner = ModelRunner(self.model, self.cache, self.blocks, CONFIG)

    def sequence(self, prompt: list[int], adapter: str | None, sampling: SamplingParams, seed: int = 0) -> Sequence:
        seq = Sequence(Request(prompt, adapter, sampling), RequestHandle("test", None), self.adapters.get(adapter),
                       frozenset(), seed, tokens=list(prompt))
        self.blocks.allocate(seq)
        return seq


@pytest.fixture(scope="module")
def parts(llama_dir, peft_adapters):
    return Parts(llama_dir, peft_adapters)


@pytest.fixture(scope="module")
def engine(llama_dir, peft_adapters):
    engine = Engine.from_pretrained(llama_dir, CONFIG)
    for name, path in peft_adapters.items():
        engine.load_adapter(name, path)
    yield engine
    engine.close()


def test_padded_sizes_cover_every_batch_up_to_the_maximum():
    assert padded_sizes(6) == (1, 2, 4, 6)
    assert padded_sizes(32) == (1, 2, 4, 8, 16, 24, 32)
    assert padded_sizes(1) == (1,)


def test_a_runner_driven_by_hand_gives_the_engines_tokens(parts, engine):
    """Prefill three mixed-adapter prompts together, then decode them as one batch: each sequence
    gets the tokens the engine generates for it."""
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    adapters = ["cheese", None, "wine"]
    want = [o.token_ids for o in engine.generate([Request(p, a, greedy) for p, a in zip(PROMPTS, adapters)])]
    seqs = [parts.sequence(p, a, greedy) for p, a in zip(PROMPTS, adapters)]
    try:
        with torch.inference_mode():
            first = parts.runner.prefill(seqs)
            for seq, token in zip(seqs, first.tokens):
                seq.tokens.append(token), seq.generated.append(token)
            for _ in range(greedy.max_new_tokens - 1):
                assert all(parts.blocks.grow(s) for s in seqs)
                for seq, token in zip(seqs, parts.runner.decode(seqs).tokens):
                    seq.tokens.append(token), seq.generated.append(token)
        assert [s.generated for s in seqs] == want
        assert len({tuple(t) for t in want}) == 3  # the adapters make a difference to check
    finally:
        for seq in seqs:
            parts.blocks.release(seq)


def test_a_sequence_prefilled_again_decodes_on_from_its_own_step(parts):
    """A preempted sequence is prefilled again with its tokens so far and decodes on, as the only
    running sequence before and after: its seeded draws continue where they were (the step
    reloads its parameters and step count), as if it had never stopped."""
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5)

    def drive(stop_after: int | None) -> list[int]:
        seq = parts.sequence(PROMPTS[0], "wine", sampled, seed=5)
        try:
            with torch.inference_mode():
                first = parts.runner.prefill([seq]).tokens[0]
                seq.tokens.append(first), seq.generated.append(first)
                for step in range(5):
                    if step == stop_after:  # preempted: blocks back, the whole sequence prefilled again
                        parts.blocks.release(seq)
                        parts.blocks.allocate(seq, share=False)
                        token = parts.runner.prefill([seq]).tokens[0]
                    else:
                        assert parts.blocks.grow(seq)
                        token = parts.runner.decode([seq]).tokens[0]
                    seq.tokens.append(token), seq.generated.append(token)
        finally:
            parts.blocks.release(seq)
        return seq.generated

    uninterrupted = drive(None)
    assert drive(2) == uninterrupted
    assert len(set(uninterrupted)) > 2


def test_padding_changes_no_row_and_writes_only_the_scratch_block(parts):
    greedy = SamplingParams(max_new_tokens=2, temperature=0.0)
    seqs = [parts.sequence(p, a, greedy) for p, a in zip(PROMPTS, ["cheese", None, "wine"])]
    cache, runner = parts.cache, parts.runner
    positions = [len(p) for p in PROMPTS]  # each row's next position: the first after its prompt
    step = dict(tokens=[11, 22, 33], positions=positions, rows=[s.row for s in seqs], slots=[s.slot for s in seqs])
    assert all(step["slots"][i] for i in (0, 2))
    scratch = cache.scratch_block
    try:
        with torch.inference_mode():
            runner.prefill(seqs)
            assert all(parts.blocks.grow(s) for s in seqs)
            plain = DecodeStep(parts.blocks, runner.decode_logits, runner.device, runner.seen)
            padded = DecodeStep(parts.blocks, runner.decode_logits, runner.device, runner.seen, padded=True)
            want = plain.decode(**step)[0].clone()
            cache.keys[:, scratch] = SENTINEL  # masked out of every real row's attention; written by padding
            keys, values = cache.keys.clone(), cache.values.clone()
            got = padded.decode(**step)[0]
    finally:
        for seq in seqs:
            parts.blocks.release(seq)
    assert got.shape == want.shape == (3, parts.model.spec.vocab_size)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the same keys (up to summation order: a 4-row matmul blocks differently), nothing else touched
    torch.testing.assert_close(cache.keys[:, :scratch], keys[:, :scratch], rtol=0, atol=1e-5)
    torch.testing.assert_close(cache.values[:, :scratch], values[:, :scratch], rtol=0, atol=1e-5)
    # 3 rows ran as 4: the padding row wrote its key (token 0 at position 0) into the scratch block
    assert (keys[:, scratch, 0] == SENTINEL).all() and (cache.keys[:, scratch, 0] != SENTINEL).all()


def test_an_engine_on_the_padded_step_gives_the_unpadded_tokens(engine):
    requests = [Request([5, 17, 42, 99], adapter=a, sampling=SamplingParams(max_new_tokens=9, temperature=0.0, ignore_eos=True))
                for a in ("cheese", None, "wine", "bread", None)]
    want = [o.token_ids for o in engine.generate(requests)]
    runner = engine.runner

    def pad():
        plain = runner.step
        runner.step = DecodeStep(engine.blocks, runner.decode_logits, runner.device, runner.seen, padded=True)
        return plain

    plain = engine._call_on_engine_thread(pad)
    try:
        assert runner.step.padded
        assert [o.token_ids for o in engine.generate(requests)] == want  # 5 rows decode padded to 6
        assert [o.token_ids for o in engine.generate(requests[:3])] == want[:3]  # 3 rows padded to 4
    finally:
        engine._call_on_engine_thread(lambda: setattr(runner, "step", plain))


def test_the_step_samples_what_sample_draws_from_its_logits(parts):
    """Sampling is part of the step (a CUDA graph captures it after the forward): each row's own
    parameters loaded once, steps moving on each step, a grammar's bitmask, the repetition penalty
    reading the seen table and each sampled token marked in it. Padded or not, the tokens are what
    server/model/sampling.py's sample() draws from the step's logits."""
    from server.engine.structured import allowed_tokens, bitmask_words
    from server.model.sampling import SamplingBatch, sample

    runner, blocks = parts.runner, parts.blocks
    vocab = parts.model.spec.vocab_size
    params = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0, repetition_penalty=1.4),
              SamplingParams(temperature=1.2, top_k=5)]
    seeds, steps = [11, 12, 13], [0, 4, 2]
    seqs = [parts.sequence(list(range(1, n + 1)), None, SamplingParams()) for n in (9, 4, 6)]  # blocks to write into
    step = dict(tokens=[11, 22, 33], positions=[8, 3, 5], rows=[s.row for s in seqs], slots=[0, 0, 0])
    bitmask = torch.full((3, bitmask_words(vocab)), -1, dtype=torch.int32)
    bitmask[2, 2:] = 0  # the third row's grammar allows tokens 0..63 only
    rows = torch.tensor(step["rows"])

    def run(padded: bool):
        seen = torch.zeros_like(runner.seen)
        seen[rows[1], [22, 7, 40]] = True
        decode = DecodeStep(blocks, runner.decode_logits, runner.device, seen, padded=padded)
        decode.load_sampling(params, seeds, steps)
        reference, reference_seen = SamplingBatch.build(params, seeds, steps, vocab, runner.device), seen.clone()
        drawn = []
        for _ in range(4):
            logits, tokens = decode.decode(**step, bitmask=bitmask)
            want = sample(logits, reference, reference_seen[rows], allowed_tokens(bitmask, vocab))
            assert torch.equal(tokens, want)
            reference_seen[rows, want] = True
            assert torch.equal(seen[:blocks.scratch_row], reference_seen[:blocks.scratch_row])
            drawn.append(tokens.tolist())
        return drawn

    try:
        with torch.inference_mode():
            plain, padded = run(False), run(True)
    finally:
        for seq in seqs:
            blocks.release(seq)
    assert plain == padded
    assert all(t[2] < 64 for t in plain) and len({t[0] for t in plain}) > 1  # the grammar held; draws move on



CHURN = """
import os, sys
import torch
from server.engine.engine import Engine, EngineConfig
if sys.argv[2] == "engine":
    Engine.from_pretrained(sys.argv[1], EngineConfig(max_batch_size=2, max_seq_len=32)).close()
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = resident()
blocks = [torch.ones(1 << 20) for _ in range(25)]  # what prefill activations do: 100 MiB allocated, then freed
del blocks
print(resident() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from Linux's /proc")
def test_an_engine_on_cpu_keeps_freed_activation_memory_for_the_next_step(llama_dir):
    """server/engine/host_memory.py: after an Engine starts on CPU, 100 MiB of activations freed
    stay in the process, so the next step reuses them instead of faulting in zeroed pages again;
    in a process without an engine glibc hands them back to the OS at once."""
    import subprocess
    import sys

    def kept_after_free(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", CHURN, str(llama_dir), mode], capture_output=True, text=True,
                             check=True)
        return int(run.stdout.split()[-1])

    assert kept_after_free("alone") < 16 << 20  # the problem is real here
    assert kept_after_free("engine") > 96 << 20
