"""Per-row sampling: each row's own temperature/top-k/top-p/penalty/seed, checked against
transformers' logits processors and against the softmax distribution."""

from __future__ import annotations

import pytest
import torch

from server.model.sampling import SamplingBatch, SamplingParams, bias_table, sample

V = 12


def batch_of(params, seed=0):
    return SamplingBatch.build(params, [seed + i for i in range(len(params))], [0] * len(params), V, torch.device("cpu"))


def draws(logits, params, n=400):
    batch = batch_of([params] * n)
    return sample(logits.expand(n, V).clone(), batch, None)


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    logits = torch.randn(3, V)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=2.0), SamplingParams(temperature=0)]
    out = sample(logits, batch_of(params), None)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_top_k_keeps_only_the_k_most_likely_tokens():
    logits = torch.randn(V)
    allowed = set(logits.topk(3).indices.tolist())
    got = set(draws(logits, SamplingParams(temperature=5.0, top_k=3)).tolist())
    assert got == allowed  # high temperature: all three show up, nothing else does


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1] + [0.0] * (V - 4)) + 1e-9
    logits = probs.log()
    assert set(draws(logits, SamplingParams(top_p=0.7)).tolist()) == {0, 1}
    assert set(draws(logits, SamplingParams(top_p=0.1)).tolist()) == {0}


def test_sampled_frequencies_follow_softmax_of_logits_over_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4))
    n = 4000
    counts = torch.bincount(draws(logits, SamplingParams(temperature=0.7), n), minlength=V).double() / n
    want = torch.softmax(logits.double() / 0.7, dim=0)
    assert (counts - want).abs().max() < 0.03


def test_filters_match_transformers_logits_processors():
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(1, V)
    seen_ids = torch.tensor([[1, 4, 5]])
    seen = torch.zeros(1, V, dtype=torch.bool)
    seen[0, seen_ids[0]] = True
    params = SamplingParams(temperature=1.0, top_k=6, top_p=0.8, repetition_penalty=1.3)
    want = RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.clone())
    want = TopPLogitsWarper(0.8)(seen_ids, TopKLogitsWarper(6)(seen_ids, want))
    allowed = set(torch.nonzero(want[0] > float("-inf")).flatten().tolist())
    assert 3 <= len(allowed) < 6  # the filters really cut something here
    got = set(sample(logits.expand(500, V).clone(), batch_of([params] * 500), seen.expand(500, V)).tolist())
    assert got <= allowed and len(got) >= 2
    greedy_penalised = sample(logits.clone(), batch_of([SamplingParams(temperature=0, repetition_penalty=1.3)]), seen)
    assert greedy_penalised.item() == want[0].argmax().item()


def test_min_p_matches_transformers_min_p_warper():
    from transformers import MinPLogitsWarper

    logits = torch.tensor([3.0, 2.5, 1.0, 0.0, -1.0] + [-4.0] * (V - 5))
    for min_p, temperature in ((0.3, 1.0), (0.05, 2.0)):
        want = MinPLogitsWarper(min_p)(None, logits[None] / temperature)
        allowed = set(torch.nonzero(want[0] > float("-inf")).flatten().tolist())
        assert 1 < len(allowed) < V  # it really cuts
        got = set(draws(logits, SamplingParams(temperature=temperature, min_p=min_p), n=2000).tolist())
        assert got == allowed


def test_logit_bias_is_added_to_the_logits_before_greedy_and_sampled_draws():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4))
    banned = sample(logits[None].clone(), batch_of([SamplingParams(temperature=0, logit_bias=((0, -100.0),))]), None)
    assert banned.item() == 1
    bias = ((3, 2.5), (1, -1.0))
    n = 4000
    counts = torch.bincount(draws(logits, SamplingParams(temperature=1.0, logit_bias=bias), n), minlength=V).double() / n
    biased = logits.clone().double()
    for token, value in bias:
        biased[token] += value
    assert (counts - torch.softmax(biased, dim=0)).abs().max() < 0.03


@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("temperature", -0.1), ("top_k", -1),
                                         ("top_p", 0.0), ("top_p", 1.01), ("repetition_penalty", 0.0),
                                         ("min_p", 1.5), ("logit_bias", ((1, 101.0),)),
                                         ("logit_bias", ((1, 1.0), (1, 2.0))),
                                         ("logit_bias", tuple((i, 1.0) for i in range(301)))])
def test_invalid_parameters_name_their_field(field, value):
    from server.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match=field):
        SamplingParams(**{field: value}).validate()


def test_the_noise_hash_on_tensors_is_the_reference_hash():
    from server.model.sampling import _hash32, _hash32_int

    values = torch.randint(0, 2**32, (1000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    assert _hash32(values).tolist() == [_hash32_int(v) for v in values.tolist()]


def test_noise_depends_on_seed_and_step_only_and_is_uniform():
    from server.model.sampling import uniform_noise

    seeds, steps = torch.tensor([7, 7, 8]), torch.tensor([3, 3, 3])
    noise = uniform_noise(seeds, steps, 5000)
    assert torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert not torch.equal(noise[0], uniform_noise(seeds, steps + 1, 5000)[0])
    counts = torch.histc(noise[2], bins=10, min=0, max=1)
    assert counts.min() > 400 and counts.max() < 600  # 500 expected per bin


def test_each_sample_moves_the_rows_a_step_on():
    params = [SamplingParams(temperature=1.0)] * 50
    logits = torch.zeros(50, V)
    batch = SamplingBatch.build(params, list(range(50)), [0] * 50, V, torch.device("cpu"))
    first, second = sample(logits, batch, None), sample(logits, batch, None)
    assert not torch.equal(first, second)  # a new draw each step
    resumed = SamplingBatch.build(params, list(range(50)), [1] * 50, V, torch.device("cpu"))  # rebuilt mid-generation
    assert torch.equal(sample(logits, resumed, None), second)


MIXED = [SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.5),
         SamplingParams(temperature=0.7, seed=3), SamplingParams(temperature=1.3, top_k=4),
         SamplingParams(temperature=0.9, top_p=0.6, repetition_penalty=0.8), SamplingParams(temperature=1.0, top_p=1.0),
         SamplingParams(temperature=0, logit_bias=((2, 9.0), (5, -9.0))), SamplingParams(temperature=1.5, min_p=0.2)]


@pytest.mark.parametrize("rows", [[0, 1], [0, 2, 5], [1, 2, 3, 5], [1, 4, 5], [0, 6], [2, 7], [3, 6, 7]],
                         ids=["greedy", "sample", "top-k", "top-p", "bias", "min-p", "all"])
def test_a_captured_variant_samples_what_the_batch_s_own_flags_do(rows):
    """CUDA graphs fix which ops sampling runs (server/engine/decode_step.py's VARIANTS: the penalty and the
    grammar mask always, top-k/p in one variant): on rows without them those ops must change
    nothing, so a graph samples exactly what the batch's own flags would."""
    from dataclasses import replace

    from server.engine.decode_step import VARIANTS, variant_for

    params = [MIXED[i] for i in rows]
    g = torch.Generator().manual_seed(len(rows))
    logits = torch.randn(len(rows), V, generator=g) * 8  # sharp: the tail's probabilities vanish in float32 sums
    seen = torch.rand(len(rows), V, generator=g) < 0.3
    own = batch_of(params, seed=7)
    ids, values = bias_table(params)  # a captured step always has the bias tables: zeros on rows without one
    fixed = replace(batch_of(params, seed=7), flags=VARIANTS[variant_for(own.flags)], bias_ids=ids, bias_values=values)
    everything = torch.ones(len(rows), V, dtype=torch.bool)
    for _ in range(50):  # steps move on in both
        want = sample(logits, own, seen if own.flags.use_penalty else None)
        assert torch.equal(sample(logits, fixed, seen, everything), want)


def test_top_p_of_1_keeps_every_token_even_where_float32_sums_reach_1():
    """A row with top_p=1 beside a row with top_p<1 (so the batch runs top-p, as a captured variant
    always does) keeps its whole tail, though its head alone already rounds to 1 in float32."""
    from server.model.sampling import _restrict_top_k_top_p

    scores = torch.tensor([[30.0] + [0.0] * (V - 1), torch.linspace(2, -2, V).tolist()])
    batch = batch_of([SamplingParams(temperature=1.0, top_p=1.0), SamplingParams(temperature=1.0, top_p=0.5)])
    restricted = _restrict_top_k_top_p(scores, batch)
    assert torch.equal(restricted[0], scores[0])
    assert torch.isinf(restricted[1]).sum() > 0  # the other row's top-p still cuts
