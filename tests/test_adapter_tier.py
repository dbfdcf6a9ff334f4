"""The host tier and the copy into device slots (server/lora/host_tier.py): a packed image written
into a slot gives exactly what LoRAPool.write_slot (the readable reference) gives, over a slot
that held a larger adapter; the host tier is bounded by bytes; slot writes and adapter misses are
measured."""

from __future__ import annotations

import pytest
import torch

from server.lora.peft_files import AdapterWeights, ModuleLoRA, read_peft_adapter
from server.lora.host_tier import SlotImage, SlotWriter
from server.config import AdapterConfig, EngineConfig
from server.engine.engine import Engine, Request, SamplingParams
from server.lora.layers import LoRAPool

SHAPES = {(0, "q_proj"): (24, 32), (0, "k_proj"): (24, 8), (0, "down_proj"): (40, 24), (1, "q_proj"): (24, 32)}
POOLS = {(0, "qk_proj"): ("q_proj", "k_proj"), (0, "down_proj"): ("down_proj",), (1, "q_proj"): ("q_proj",)}


def weights(seed: int, ranks: dict) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    modules = {key: ModuleLoRA(torch.randn(r, SHAPES[key][0], generator=g), torch.randn(SHAPES[key][1], r, generator=g), 0.5 + seed)
               for key, r in ranks.items()}
    return AdapterWeights(modules, max(ranks.values()), tuple(sorted({k[1] for k in ranks})), f"hash{seed}", "test")


def pools(dtype: torch.dtype, device: str = "cpu") -> dict:
    return {(layer, name): LoRAPool(4, 8, SHAPES[(layer, modules[0])][0], {m: SHAPES[(layer, m)][1] for m in modules},
                                    torch.device(device), dtype)
            for (layer, name), modules in POOLS.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_slot_write_from_the_image_equals_write_slot(dtype):
    big = weights(1, {(0, "q_proj"): 8, (0, "k_proj"): 6, (0, "down_proj"): 8, (1, "q_proj"): 8})
    # no k_proj (its slice must clear) nor down_proj (its whole slot must clear)
    small = weights(2, {(0, "q_proj"): 3, (1, "q_proj"): 5})
    written, reference = pools(dtype), pools(dtype)
    writer = SlotWriter(written, torch.device("cpu"))
    for adapter in (big, small):
        writer.write(2, SlotImage.pack(adapter, written, dtype, pin=False))
        for (layer, _), pool in reference.items():
            pool.write_slot(2, {m: adapter.modules[(layer, m)] for m in pool.slices if (layer, m) in adapter.modules})
        if adapter is big:
            assert written[(0, "qk_proj")].slot_ranks.tolist() == [0, 0, 8, 0]
    for key in POOLS:
        for name in ("lora_a", "scaled_b_t", "slot_ranks"):
            assert torch.equal(getattr(written[key], name), getattr(reference[key], name)), (key, name)
    assert written[(1, "q_proj")].slot_ranks.tolist() == [0, 0, 5, 0]
    assert written[(0, "qk_proj")].slot_ranks.tolist() == [0, 0, 3, 0]
    assert len(writer.completed_seconds()) == 2 and writer.completed_seconds() == []


def test_the_image_costs_what_its_tensors_take():
    """Each A as it is; one scale·Bᵀ per pool, across the pool's slices (k's columns zero here)."""
    adapter = weights(3, {(0, "q_proj"): 4, (0, "down_proj"): 2})
    image = SlotImage.pack(adapter, pools(torch.bfloat16), torch.bfloat16, pin=False)
    assert image.nbytes == 2 * (4 * 24 + 4 * (32 + 8) + 2 * (40 + 24))


def test_host_tier_is_bounded_by_bytes(llama_dir, peft_adapters, cheese_and_wine_store):
    from server.adapters.manager import AdapterManager
    from server.adapters.versions import AdapterRef
    from server.metrics import Metrics

    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=2, max_seq_len=32, max_adapters=1, max_rank=16))
    try:
        wine = read_peft_adapter(peft_adapters["wine"], engine.spec, 16)
        one = SlotImage.pack(wine, engine.model.lora_pools(), engine.dtype, pin=False).nbytes
        config = AdapterConfig(store=cheese_and_wine_store.root, host_cache_bytes=one + 1)  # wine alone, or cheese alone
        manager = AdapterManager(engine, config, Metrics(), None)
        manager.load(AdapterRef("cheese"))
        manager.load(AdapterRef("wine"))
        tiers = {s.version.name: s.tier for s in manager.list()}
        assert tiers == {"cheese": "store", "wine": "device"} or tiers == {"cheese": "store", "wine": "host"}, tiers
        manager.close()
    finally:
        engine.close()


def test_slot_writes_and_adapter_misses_are_observed(llama_dir, peft_adapters):
    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=2, max_seq_len=32, max_adapters=1, max_rank=16))
    writes, misses = [], []
    engine.observe_slot_write, engine.observe_adapter_miss = writes.append, misses.append
    try:
        for name in ("cheese", "wine"):
            engine.load_adapter(name, peft_adapters[name])  # cheese takes the one slot now
        greedy = SamplingParams(max_new_tokens=2, temperature=0.0)
        for name in ("wine", "cheese", "cheese"):  # miss, miss, hit
            engine.generate([Request([5, 6, 7], name, greedy)])
        engine._call_on_engine_thread(lambda: None)  # a turn of the loop after the last step reports its writes
        assert len(writes) == 3 and all(0 <= s < 5 for s in writes)
        assert len(misses) == 2 and all(0 <= s < 30 for s in misses)
    finally:
        engine.close()


def test_a_failed_slot_write_fails_its_requests_not_the_engine(llama_dir, peft_adapters):
    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=2, max_seq_len=32, max_adapters=1, max_rank=16))
    try:
        for name in ("cheese", "wine"):
            engine.load_adapter(name, peft_adapters[name])  # cheese in the slot; wine must be written later
        real_write = engine.slots.writer.write

        def broken(slot, image):
            engine.slots.writer.write = real_write  # fails once, like a transient device error
            raise RuntimeError("device fell over")

        engine.slots.writer.write = broken
        greedy = SamplingParams(max_new_tokens=3, temperature=0.0)
        with pytest.raises(RuntimeError, match="device fell over"):
            engine.generate([Request([5, 6, 7], "wine", greedy)])
        assert engine.alive and engine.stats()["free_adapter_slots"] == 1  # the half-written slot was given back
        outputs = engine.generate([Request([5, 6, 7], name, greedy) for name in ("wine", "cheese", None)])
        assert [len(o.token_ids) for o in outputs] == [3, 3, 3]
    finally:
        engine.close()
