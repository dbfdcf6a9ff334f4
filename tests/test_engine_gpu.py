"""CUDA twins of test_engine_vs_transformers (which runs the same checks on CPU in float32).

On CUDA both sides compute in bfloat16, where summation order matters more: logits are compared
with a bf16-sized tolerance and greedy next-token choices must agree at nearly every position."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from server.engine.engine import Engine, EngineConfig, Request, SamplingParams
from tests.helpers import NF4_REFERENCE, decode_batch, fail_on_recompile

pytestmark = pytest.mark.gpu


def test_mixed_adapter_batch_matches_peft_on_cuda_bf16(llama_dir, peft_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=8, max_seq_len=64, max_adapters=4,
                                                            max_rank=16, device="cuda", dtype="bfloat16"))
    quant = BitsAndBytesConfig(**dict(NF4_REFERENCE, bnb_4bit_compute_dtype=torch.bfloat16))
    base = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=quant, dtype=torch.bfloat16, device_map="cuda")
    names = list(peft_adapters)
    reference = PeftModel.from_pretrained(base, peft_adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        reference.load_adapter(peft_adapters[name], adapter_name=name)
    for name, path in peft_adapters.items():
        engine.load_adapter(name, path)
    try:
        rows = [None, *names]
        prompts = torch.randint(10, 400, (len(rows), 9), generator=torch.Generator().manual_seed(0)).tolist()
        scored = engine.score([Request(prompt_ids=p, adapter=n) for p, n in zip(prompts, rows)])
        with torch.no_grad():
            want = reference(torch.tensor(prompts, device="cuda"), adapter_names=[n or "__base__" for n in rows]).logits.float().cpu()
        agree = 0
        for row, logits in enumerate(scored):
            torch.testing.assert_close(logits, want[row], rtol=0.02, atol=0.1)
            agree += (logits.argmax(-1) == want[row].argmax(-1)).sum().item()
        assert agree >= 0.95 * len(rows) * 9
    finally:
        engine.close()


def test_compiled_decode_matches_eager_decode_on_cuda_bf16(llama_dir, peft_adapters):
    """CUDA twin of test_engine_compiled: in bfloat16 the fused kernels round differently from the
    eager ops, so the compiled decode logits are compared with a bf16-sized tolerance, and serving
    after warm-up must not recompile."""
    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=4, max_seq_len=64, max_adapters=3, max_rank=16,
                                                            device="cuda", dtype="bfloat16", compile=True))
    for name, path in peft_adapters.items():
        engine.load_adapter(name, path)
    engine._call_on_engine_thread(fail_on_recompile)  # dynamo's config is per thread
    try:
        def both():
            with torch.inference_mode():
                batch = decode_batch(4, device="cuda")
                return engine.runner.decode_logits(batch).cpu(), engine.runner.last_position_logits(batch).cpu()

        got, want = engine._call_on_engine_thread(both)
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.1)
        fixed = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
        outputs = engine.generate([Request(prompt_ids=[5, 6, 7], adapter=name, sampling=fixed)
                                   for name in [None, *peft_adapters]])
        assert all(o.finish_reason.value == "length" and len(o.token_ids) == 8 for o in outputs)
    finally:
        engine.close()


def test_cuda_graph_decode_gives_the_eager_padded_steps_tokens(llama_dir, peft_adapters):
    """CUDA twin of tests/test_runner.py: the captured graphs replay exactly the padded step that
    runs eagerly (same kernels, same shapes), with mixed adapters, at several padded sizes, and
    see an adapter written into a slot after capture."""
    from server.engine.decode_step import DecodeStep

    config = EngineConfig(max_batch_size=6, max_seq_len=64, max_adapters=3, max_rank=16, device="cuda", dtype="bfloat16")
    graphed = Engine.from_pretrained(llama_dir, config)
    eager = Engine.from_pretrained(llama_dir, dataclasses.replace(config, cuda_graphs=False))
    try:
        assert graphed.describe()["cuda_graphs"] == "on" and graphed.runner.step.captured
        with torch.inference_mode():
            runner = eager.runner
            runner.step = DecodeStep(eager.blocks, runner.decode_logits, runner.device, runner.seen, padded=True)
        for engine in (graphed, eager):
            for name, path in peft_adapters.items():  # loaded after capture: the graphs read the slots
                engine.load_adapter(name, path)
        requests = [Request([5, 17, 42, 99], adapter=a, sampling=greedy_fixed(10)) for a in ("cheese", None, "wine", "bread", None)]
        for batch in (requests, requests[:3], requests[:1]):
            assert [o.token_ids for o in graphed.generate(batch)] == [o.token_ids for o in eager.generate(batch)]
        # sampling inside the graphs: each variant (greedy with a penalty, seeded, top-k/p) as eagerly
        sampled = [SamplingParams(max_new_tokens=10, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
                   SamplingParams(max_new_tokens=10, temperature=0.9, seed=5, ignore_eos=True),
                   SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=20, seed=6, ignore_eos=True)]
        for params in ([sampled[0]], sampled[1:2], sampled):
            batch = [Request([5, 17, 42, 99], adapter=a, sampling=p) for a, p in zip(("cheese", None, "wine"), params)]
            assert [o.token_ids for o in graphed.generate(batch)] == [o.token_ids for o in eager.generate(batch)]
        assert len(graphed.runner.step._sample_graphs) == 3 * len(graphed.runner.step.sizes)
    finally:
        graphed.close()
        eager.close()


def greedy_fixed(n: int):
    from server.model.sampling import SamplingParams

    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


def test_slot_writes_on_cuda_are_asynchronous_and_exact():
    """CUDA twin of test_adapter_tier's slot write: from pinned memory on a side stream, with an
    event the compute stream waits on; the result equals LoRAPool.write_slot's."""
    from server.lora.host_tier import SlotImage, SlotWriter
    from tests.test_adapter_tier import POOLS, pools, weights

    adapter = weights(1, {(0, "q_proj"): 8, (0, "down_proj"): 3})
    written, reference = pools(torch.bfloat16, "cuda"), pools(torch.bfloat16, "cuda")
    image = SlotImage.pack(adapter, written, torch.bfloat16, pin=True)
    assert all(part.scaled_b_t.is_pinned() for part in image.parts.values())
    writer = SlotWriter(written, torch.device("cuda"))
    event = writer.write(3, image)
    assert isinstance(event, torch.cuda.Event)
    torch.cuda.current_stream().wait_event(event)
    for (layer, _), pool in reference.items():
        pool.write_slot(3, {m: adapter.modules[(layer, m)] for m in pool.slices if (layer, m) in adapter.modules})
    torch.cuda.synchronize()
    for key in POOLS:
        for name in ("lora_a", "scaled_b_t", "slot_ranks"):
            assert torch.equal(getattr(written[key], name), getattr(reference[key], name)), (key, name)
    assert len(writer.completed_seconds()) == 1


def test_hot_load_under_load_on_cuda(llama_dir, peft_adapters):
    """A stream keeps decoding while another adapter is read, packed and written into a slot on the
    side stream, and the new adapter's request completes (CPU twin: test_server_adapters' hot swap)."""
    import threading

    from server.lora.peft_files import read_peft_adapter

    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=4, max_seq_len=160, max_adapters=2, max_rank=16,
                                                            device="cuda", dtype="bfloat16"))
    try:
        engine.load_adapter("cheese", peft_adapters["cheese"])
        long = engine.submit(Request([5, 17, 42], "cheese", greedy_fixed(150)))
        tokens = iter(long)
        next(tokens)
        during = []
        loaded = threading.Event()

        def load():
            engine.install_adapter("wine", read_peft_adapter(peft_adapters["wine"], engine.spec, 16))
            loaded.set()

        threading.Thread(target=load).start()
        for token in tokens:  # the stream goes on while wine loads
            during.append(token)
            if loaded.is_set():
                break
        assert loaded.wait(60)
        wine = engine.generate([Request([8, 9, 10], "wine", greedy_fixed(8))])[0]
        rest = list(tokens)
        assert len(wine.token_ids) == 8 and 1 + len(during) + len(rest) == 150
        assert long.result().finish_reason.value == "length"
    finally:
        engine.close()


def test_on_cuda_the_default_kv_pool_fits_in_a_fraction_of_free_memory(llama_dir):
    """CUDA twin of tests/test_paged_kv.py's default pool: without kv_cache_bytes the pool would
    be max_batch_size sequences of max_seq_len, but on CUDA it takes at most kv_cache_fraction of
    the memory free after the weights."""
    config = EngineConfig(max_batch_size=64, max_seq_len=8192, max_adapters=1, max_rank=8, device="cuda",
                          dtype="bfloat16", kv_cache_fraction=0.001, cuda_graphs=False)
    free_before, _ = torch.cuda.mem_get_info()
    engine = Engine.from_pretrained(llama_dir, config)
    try:
        full = 64 * engine.cache.max_blocks_per_seq
        assert engine.cache.max_blocks_per_seq <= engine.cache.num_blocks < full
        assert engine.cache.nbytes <= 0.001 * free_before
        out = engine.generate([Request(prompt_ids=[5, 6, 7], sampling=greedy_fixed(4))])[0]
        assert len(out.token_ids) == 4
    finally:
        engine.close()
