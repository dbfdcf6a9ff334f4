"""The C kernels of EngineConfig(kernels="cpu") (server/kernels/cpu_kernels.c): each against its
definition in float64, in both compiled versions (AVX-512 where the CPU has it, and the portable
one), then the whole engine on them against the torch path and transformers + PEFT.

Tolerance of a float32 sum of K products, whatever its order: |error| <= K·u·Σ|x·w| with u = 2^-24
(the standard bound; an order that differs from torch's can never break it, a wrong weight does)."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from server.config import QuantConfig
from server.engine.engine import Engine, EngineConfig, Request, SamplingParams
from server.kernels import cpu_kernels, resolve
from server.kernels.attention import decode_attention_reference
from server.model.quant import DEQUANTIZE, make_base_linear
from tests.helpers import assert_peft_generates_the_same

U = 2.0 ** -24
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")


CPU_FLAGS = set(open("/proc/cpuinfo").read().split()) if sys.platform == "linux" else set()


@pytest.fixture(scope="module", params=["avx512", "avx2", "portable"])
def kernels(request, build_dir):
    """Each version of the library this machine can run: AVX-512 (auto, where torch runs AVX-512),
    AVX2 (a build capped as under ATEN_CPU_CAPABILITY=avx2), the portable C."""
    if request.param == "portable":
        return cpu_kernels.load(build_dir, portable=True)
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "avx2":
            patch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        library = cpu_kernels.load(build_dir / request.param)
    if library.version != request.param:
        pytest.skip(f"no {request.param} version here (the CPU, or torch's capability, lacks it): "
                    f"{library.version}, tested as such")
    return library


def nf4_weights(shapes, seed=0, blocksize=64):
    torch.manual_seed(seed)
    weights = [torch.randn(*shape) * 0.05 for shape in shapes]
    layer = make_base_linear(weights, None, QuantConfig(blocksize=blocksize), DEQUANTIZE, CPU, torch.float32)
    return list(layer.weights), layer


def assert_within_float32_sum_bound(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    exact = x.double() @ w.double().T
    bound = x.shape[1] * U * (x.double().abs() @ w.double().abs().T)
    assert ((got.double() - exact).abs() <= bound).all(), (got.double() - exact).abs().max()


def test_the_nf4_kernel_forms_each_weight_as_bitsandbytes_dequantizes_it(kernels):
    """A one-hot input picks single weights out: the products are exact, so y is W's bits."""
    weights, layer = nf4_weights([(96, 128), (32, 128)])
    packed = cpu_kernels.pack_nf4(weights)
    from server.model.quant import dequantized_weight

    w = dequantized_weight(layer)
    assert torch.equal(kernels.nf4_linear(torch.eye(128), packed), w.T)
    assert torch.equal(cpu_kernels.nf4_linear_reference(torch.eye(128), packed), w.T)


@pytest.mark.parametrize("blocksize", [64, 32, 128])
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8, 9, 19, 37])
def test_the_nf4_kernel_sums_within_float32_rounding_of_the_exact_product(kernels, tokens, blocksize):
    """Each tiling the kernels have: 1-2 tokens' folded block sums, 3-5 tokens per row, the panel
    from 6 tokens on (pairs and a lone token, blocks of 32 tokens; 640 columns: a slice of 512 and a
    shorter one; 250 rows: a tail under the panel's 4)."""
    weights, layer = nf4_weights([(200, 640), (40, 640), (10, 640)], seed=tokens, blocksize=blocksize)
    from server.model.quant import dequantized_weight

    x = torch.randn(tokens, 640)
    assert_within_float32_sum_bound(kernels.nf4_linear(x, cpu_kernels.pack_nf4(weights)), x, dequantized_weight(layer))


def test_dequantizing_packed_codes_gives_bitsandbytes_weights_bit_for_bit(kernels):
    """What a prefill multiplies by torch's GEMM on the cpu-fused path: the very weights the
    dequantize-once path keeps (the torch path's prefill numbers)."""
    weights, layer = nf4_weights([(96, 128), (40, 128)], seed=5)
    from server.model.quant import dequantized_weight

    reused = torch.full((136, 128), float("nan"))
    assert torch.equal(kernels.nf4_dequantize(cpu_kernels.pack_nf4(weights), reused), dequantized_weight(layer))


def test_packing_refuses_what_the_nf4_kernel_cannot_read():
    weights, _ = nf4_weights([(64, 160)])  # 160 = 2.5 blocks of 64: blocks straddle rows
    with pytest.raises(ValueError, match="whole blocks"):
        cpu_kernels.pack_nf4(weights)
    bf16 = make_base_linear(torch.randn(64, 128), None, QuantConfig(), DEQUANTIZE, CPU, torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.pack_nf4(list(bf16.weights))


# 100 columns: off the vector width (the per-row kernels); 640: whole chunks, so from 6 tokens on the
# panel, over a slice of 512 and a shorter one. 333 rows: a tail under the panel's 4.
@pytest.mark.parametrize("columns", [100, 640])
@pytest.mark.parametrize("tokens", [1, 8, 11])
def test_the_dense_kernel_sums_within_float32_rounding_of_the_exact_product(kernels, tokens, columns):
    torch.manual_seed(tokens)
    w, x = torch.randn(333, columns), torch.randn(tokens, columns)
    assert_within_float32_sum_bound(kernels.dense_linear(x, w), x, w)


@pytest.mark.parametrize("columns", [100, 640])
@pytest.mark.parametrize("tokens", [1, 8, 11])
def test_the_dense_kernel_reads_a_bfloat16_weight_as_the_same_float32_weight(kernels, tokens, columns):
    """The LM head kept in the checkpoint's bfloat16: widening is exact, so the result is the
    float32 weight's sum (within the float32 bound of the widened weight; one-hot picks it out)."""
    torch.manual_seed(tokens)
    w, x = torch.randn(333, columns).to(torch.bfloat16), torch.randn(tokens, columns)
    assert_within_float32_sum_bound(kernels.dense_linear(x, w), x, w.float())
    assert torch.equal(kernels.dense_linear(torch.eye(columns), w), w.float().T)


def test_lora_add_gives_every_token_its_own_slot_like_the_definition(kernels):
    from server.lora.layers import LoRAPool, lora_delta_reference

    torch.manual_seed(3)
    pool = LoRAPool(4, 8, 64, {"q_proj": 48, "k_proj": 16, "v_proj": 16}, CPU, torch.float32)
    pool.lora_a[1:].normal_()
    pool.scaled_b_t[1:].normal_()
    pool.scaled_b_t[2, 5:] = 0  # slot 2 has rank 5: its padded rows contribute nothing
    x, y = torch.randn(13, 64), torch.randn(13, 80)
    slots = torch.tensor([0, 1, 2, 3, 3, 1, 0, 2, 2, 2, 1, 3, 0])
    want = y.double() + lora_delta_reference(x.double(), slots, pool.lora_a.double(), pool.scaled_b_t.double(), pool.starts)
    got = kernels.lora_add(y.clone(), x, pool.lora_a, pool.scaled_b_t, pool.host_starts, slots)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("head_dim", [16, 24])  # 24: not whole AVX-512 vectors, the portable loop serves it
def test_decode_attention_reads_each_row_blocks_in_place_like_the_definition(kernels, head_dim):
    torch.manual_seed(head_dim)
    blocks, block_size, kv_heads, heads = 9, 4, 2, 6
    keys, values = torch.randn(blocks, block_size, kv_heads, head_dim), torch.randn(blocks, block_size, kv_heads, head_dim)
    tables = torch.tensor([[7, 2, 5, 0], [3, 8, 8, 8], [1, 4, 6, 8]], dtype=torch.int32)  # 8: unused entries
    lengths = torch.tensor([14, 2, 9], dtype=torch.int32)
    q = torch.randn(3, heads, head_dim) * 2
    got = kernels.decode_attention(q, keys, values, tables, lengths, head_dim ** -0.5)
    want = decode_attention_reference(q.double(), keys.double(), values.double(), tables, lengths, head_dim ** -0.5)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_calls_from_several_threads_at_once_each_get_their_own_result(kernels):
    """The engine calls from its own thread; tests and other engines from theirs."""
    weights, _ = nf4_weights([(2048, 256)])
    packed = cpu_kernels.pack_nf4(weights)
    inputs = [[torch.randn(3, 256) for _ in range(30)] for _ in range(4)]  # every call its own numbers
    got = [[] for _ in inputs]

    def run(i):
        got[i] = [kernels.nf4_linear(x, packed) for x in inputs[i]]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for xs, ys in zip(inputs, got):  # the same split, the same sums as one call at a time
        assert all(torch.equal(y, kernels.nf4_linear(x, packed)) for x, y in zip(xs, ys))


def test_the_library_is_built_once_per_directory_and_refused_without_a_compiler(tmp_path, monkeypatch):
    cpu_kernels.load(tmp_path / "built")
    assert [p.suffix for p in (tmp_path / "built").iterdir()] == [".so"]  # no partial file left behind
    cpu_kernels._loaded.clear()
    monkeypatch.setattr(cpu_kernels.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt a cached library"))
    cpu_kernels.load(tmp_path / "built")
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    with pytest.raises(cpu_kernels.KernelBuildError, match="C compiler"):
        cpu_kernels.load(tmp_path / "elsewhere")


def test_the_library_has_vector_code_only_where_torch_runs_the_same(tmp_path, monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 (or default) caps the C kernels too: one setting moves the whole
    engine onto another CPU's code paths."""
    has_avx2 = {"avx2", "fma"} <= CPU_FLAGS
    for capability, widest in (("DEFAULT", "portable"), ("AVX2", "avx2" if has_avx2 else "portable"),
                               ("AVX512", "avx512" if "avx512f" in CPU_FLAGS else "avx2" if has_avx2 else "portable")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert cpu_kernels.load(tmp_path).version == widest, capability
    assert len(list(tmp_path.glob("*.so"))) == 3  # three builds, named apart


def test_every_kernel_leaves_the_upper_avx512_registers_clean(kernels):
    """While the upper halves of the vector registers hold data, the SSE code that runs between two
    kernels (glibc's expf among it) slows down ~20x per call: a base-only decode step of SmolLM2 took
    1.6x an adapter one for that (the LoRA kernels happened to clean them)."""
    if kernels.upper_registers_dirty() is None:
        pytest.skip(f"the {kernels.version} version: the check reads zmm registers, in the AVX-512 build only (the "
                    "vzeroupper after each job is the same code in every version)")
    weights, _ = nf4_weights([(96, 128)], seed=3)
    packed, x, w = cpu_kernels.pack_nf4(weights), torch.randn(5, 128), torch.randn(64, 128)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):  # the caller's part, whether it runs alone or beside the pool's workers
            torch.set_num_threads(threads)
            kernels.nf4_linear(x, packed)
            assert not kernels.upper_registers_dirty(), threads
            kernels.dense_linear(x, w)
            assert not kernels.upper_registers_dirty(), threads
    finally:
        torch.set_num_threads(before)


def test_cpu_kernels_are_refused_where_they_cannot_run(model_dirs):
    with pytest.raises(ValueError, match="runs on CPU"):
        resolve("cpu", torch.device("cuda"))
    with pytest.raises(ValueError, match="whole blocks"):  # "tiny": a 160-wide MLP input
        Engine.from_pretrained(model_dirs["tiny"], EngineConfig(max_seq_len=32, kernels="cpu"))


# ---- the engine on them ----

PROMPTS = [[5, 17, 42, 99, 7, 3], [8, 200, 33], [150, 9, 12, 40, 41], [77, 78, 79, 80]]


def engine(model_dir, adapters, kernels, tmp_path=None, max_seq_len=32):
    e = Engine.from_pretrained(model_dir, EngineConfig(max_batch_size=4, max_seq_len=max_seq_len, max_adapters=2,
                                                       max_rank=8, kernels=kernels, kernel_build_dir=tmp_path))
    for name, path in adapters.items():
        e.load_adapter(name, path)
    return e


def test_engine_on_cpu_kernels_generates_what_the_torch_path_and_peft_do(aligned_model, build_dir):
    """Decode steps run every layer in C (q/k/v with LoRA, RoPE, the paged cache, attention, MLP):
    each generated token's log-probability agrees with the torch path's, the tokens are PEFT's."""
    model_dir, adapters = aligned_model
    names = [None, "cheese", "wine", "wine"]
    cpu_engine, torch_engine = engine(model_dir, adapters, "cpu", str(build_dir)), engine(model_dir, adapters, "torch")
    try:
        assert cpu_engine.describe()["nf4_path"] == "cpu-fused"
        sampling = SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=1)
        requests = [Request(prompt_ids=p, adapter=n, sampling=sampling) for p, n in zip(PROMPTS, names)]
        handles = [[e.submit(r) for r in requests] for e in (cpu_engine, torch_engine)]
        got, want = ([h.result() for h in hs] for hs in handles)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        for mine, theirs in zip(*handles):
            torch.testing.assert_close(torch.tensor([t.logprob for t in mine.logprobs]),
                                       torch.tensor([t.logprob for t in theirs.logprobs]), rtol=0, atol=1e-4)
    finally:
        cpu_engine.close()
        torch_engine.close()

    assert_peft_generates_the_same(model_dir, adapters, PROMPTS, names, got)


def test_a_long_prompt_prefills_through_dense_gemms_with_the_torch_paths_numbers(aligned_model, build_dir,
                                                                                 monkeypatch):
    """Prompts past CPU_NF4_KERNEL_MAX_TOKENS: each projection is dequantized (bitsandbytes'
    bits) and multiplied by torch's GEMM, the LoRA by GEMMs per prompt, not by the C kernels
    made for a few tokens; every prompt token's log-probability is the torch path's."""
    from server.lora.layers import CPU_LORA_KERNEL_MAX_TOKENS_PER_ROW
    from server.model.quant import CPU_NF4_KERNEL_MAX_TOKENS

    model_dir, adapters = aligned_model
    length = max(CPU_NF4_KERNEL_MAX_TOKENS, CPU_LORA_KERNEL_MAX_TOKENS_PER_ROW) + 8
    g = torch.Generator().manual_seed(4)
    prompts = torch.randint(3, 250, (3, length), generator=g).tolist()
    names = [None, "cheese", "wine"]
    cpu_engine = engine(model_dir, adapters, "cpu", str(build_dir), max_seq_len=length + 8)
    torch_engine = engine(model_dir, adapters, "torch", max_seq_len=length + 8)
    library = cpu_engine.model.kernels.layers.library
    calls: list[str] = []
    for name in ("nf4_linear", "lora_add", "nf4_dequantize"):
        original = getattr(library, name)
        monkeypatch.setattr(library, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    try:
        sampling = SamplingParams(max_new_tokens=1, temperature=0.0, prompt_logprobs=0)
        got, want = ([e.submit(Request(prompt_ids=p, adapter=n, sampling=sampling)) for p, n in zip(prompts, names)]
                     for e in (cpu_engine, torch_engine))
        for mine, theirs in zip(got, want):
            assert mine.result().token_ids == theirs.result().token_ids
    finally:
        cpu_engine.close()
        torch_engine.close()
    assert "nf4_dequantize" in calls and "nf4_linear" not in calls and "lora_add" not in calls
    for mine, theirs in zip(got, want):
        assert len(mine.prompt_logprobs) == length - 1
        torch.testing.assert_close(torch.tensor([t.logprob for t in mine.prompt_logprobs]),
                                   torch.tensor([t.logprob for t in theirs.prompt_logprobs]), rtol=0, atol=1e-4)


def test_the_lm_head_stays_in_the_checkpoints_bfloat16_on_the_c_kernels(aligned_model, tmp_path):
    """Half the bytes a decode step reads for it, the same weights: a bf16 checkpoint's
    embeddings widen exactly, so the logits are the float32 head's (the torch path keeps float32)."""
    import shutil

    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "bf16"
    shutil.copytree(aligned_model[0], model_dir)
    for path in model_dir.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    cpu_engine, torch_engine = engine(model_dir, {}, "cpu", str(tmp_path / "k")), engine(model_dir, {}, "torch")
    try:
        assert cpu_engine.model.lm_head.dtype == torch.bfloat16 and cpu_engine.dtype == torch.float32
        assert torch_engine.model.lm_head.dtype == torch.float32
        sampling = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=1)
        got, want = ([e.submit(Request(prompt_ids=p, sampling=sampling)) for p in PROMPTS]
                     for e in (cpu_engine, torch_engine))
        for mine, theirs in zip(got, want):
            assert mine.result().token_ids == theirs.result().token_ids
    finally:
        cpu_engine.close()
        torch_engine.close()
    for mine, theirs in zip(got, want):
        torch.testing.assert_close(torch.tensor([t.logprob for t in mine.logprobs]),
                                   torch.tensor([t.logprob for t in theirs.logprobs]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("settings, path, why", [
    ({}, "cpu-fused", None),
    ({"dtype": "bfloat16"}, "dequantize-once", "float32"),
    ({"nf4_path": "dequantize"}, "dequantize", "NF4 path asked for is dequantize"),
], ids=["aligned float32", "bfloat16", "another nf4 path"])
def test_auto_on_a_cpu_runs_the_c_kernels_wherever_they_can_run_and_says_why_not(aligned_model, settings, path, why,
                                                                                  caplog, tmp_path):
    config = EngineConfig(max_seq_len=32, kernel_build_dir=str(tmp_path), **settings)
    with caplog.at_level("INFO", logger="server.model.llama"):
        e = Engine.from_pretrained(aligned_model[0], config)
    try:
        assert e.describe()["nf4_path"] == path
        assert e.describe()["lora_kernels"] == ("cpu" if why is None else "torch")
    finally:
        e.close()
    said = [r.getMessage() for r in caplog.records if "not the C kernels" in r.getMessage()]
    assert (said == []) if why is None else (len(said) == 1 and why in said[0])


def test_auto_leaves_the_c_kernels_out_of_a_compiled_engine(aligned_model, tmp_path):
    """(Its start-up compiles for minutes: the rule alone is checked.)"""
    from transformers import AutoConfig

    from server.model.llama import ModelSpec, cpu_kernels_refusal

    spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(aligned_model[0]))
    assert cpu_kernels_refusal(EngineConfig(), spec, tmp_path) is None
    assert "compile=True" in cpu_kernels_refusal(EngineConfig(compile=True), spec, tmp_path)


def test_auto_falls_back_to_torch_for_a_model_the_c_kernels_cannot_read_or_without_a_compiler(model_dirs, aligned_model,
                                                                                               tmp_path, monkeypatch):
    e = Engine.from_pretrained(model_dirs["tiny"], EngineConfig(max_seq_len=32))  # a 160-wide MLP input
    try:
        assert e.describe()["nf4_path"] == "dequantize-once"
    finally:
        e.close()
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    e = Engine.from_pretrained(aligned_model[0], EngineConfig(max_seq_len=32, kernel_build_dir=str(tmp_path / "none")))
    try:
        assert e.describe()["nf4_path"] == "dequantize-once"
    finally:
        e.close()


def test_a_base_only_batch_takes_the_route_an_adapter_batch_takes(aligned_model, build_dir, monkeypatch):
    """The same prompts with and without adapters: every decode step in one C call either way
    (the base rows skip only the LoRA inside it), the same prefill and LM-head calls."""
    model_dir, adapters = aligned_model
    e = engine(model_dir, adapters, "auto", str(build_dir))
    library = e.model.kernels.layers.library
    calls: list[str] = []
    for name in ("decode_layers", "nf4_linear", "dense_linear", "lora_add", "decode_attention"):
        original = getattr(library, name)
        monkeypatch.setattr(library, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    sampling = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    routes = {}
    try:
        for label, names in (("base", [None] * 4), ("adapters", [None, "cheese", "wine", "wine"])):
            calls.clear()
            e.generate([Request(prompt_ids=p, adapter=n, sampling=sampling) for p, n in zip(PROMPTS, names)])
            routes[label] = [c for c in calls if c != "lora_add"]  # the prefill's LoRA, base rows have none
    finally:
        e.close()
    assert routes["base"] == routes["adapters"] and routes["base"].count("decode_layers") == 5


def test_compile_does_not_apply_to_the_cpu_kernels(aligned_model):
    with pytest.raises(ValueError, match="kernels='cpu'"):
        Engine.from_pretrained(aligned_model[0], EngineConfig(max_seq_len=32, kernels="cpu", compile=True))
