"""Tenants without a server: the tenants file (its shape, the line at fault, keys by digest only,
re-read on change), the quotas (token buckets on an injected clock, exact refunds) and the
scheduler's fair share (weighted round robin across tenants, then across each one's adapters)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from types import SimpleNamespace

import pytest

from server.config import EngineConfig
from server.engine.requests import Request, RequestHandle
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.errors import InvalidRequest, RateLimited, Unauthenticated
from server.model.sampling import SamplingParams
from server.serving.quotas import Quotas
from server.serving.tenants import Limits, Tenant, Tenants, parse_tenants
from server.serving.usage_log import Usage, UsageLog
from tests.helpers import wait_until


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


EXAMPLE = f"""\
tenants:
  acme:
    keys: ["{sha('sk-acme-1')}", "sk-acme-plain"]
    adapters: ["acme-*"]
    base: false
    limits: {{requests_per_minute: 600, tokens_per_minute: 200000, concurrent: 32}}
    weight: 2
    admin_keys: ["{sha('admin-acme')}"]
  globex:
    keys: ["{sha('sk-globex')}"]
    adapters: ["globex", "shared-?"]
    base: true
"""


def write(path, text: str) -> None:
    """Write as a rotation would (a new file renamed over the old: a new inode, so a change is
    seen even within the file system's timestamp granularity)."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)


# ---------------------------------------------------------------- the file


def test_the_documented_shape_parses_with_every_field(caplog):
    with caplog.at_level(logging.WARNING):
        table = parse_tenants(EXAMPLE)
    acme, globex = table.tenants["acme"], table.tenants["globex"]
    assert acme == Tenant("acme", ("acme-*",), False, Limits(600.0, 200000.0, 32), 2.0)
    assert globex.base and globex.limits == Limits() and globex.weight == 1.0
    assert len(table.keys) == 3 and len(table.admin_keys) == 1
    assert "line 3" in caplog.text and "plain key" in caplog.text  # the plain key is accepted, with a warning


def test_patterns_decide_what_a_tenant_may_call():
    globex = parse_tenants(EXAMPLE).tenants["globex"]
    assert globex.may_call("globex") and globex.may_call("shared-1") and globex.may_call(None)
    assert not globex.may_call("globex-2") and not globex.may_call("shared-12") and not globex.may_call("GLOBEX")
    assert not parse_tenants(EXAMPLE).tenants["acme"].may_call(None)


@pytest.mark.parametrize("text, line, words", [
    ("tenants:\n  acme:\n    keys: [k]\n    wieght: 2\n", 4, "unknown field 'wieght'"),
    ("tenants:\n  acme:\n    keys: [k]\n    weight: -1\n", 4, "positive"),
    ("tenants:\n  acme:\n    keys: [k]\n    weight: .inf\n", 4, "positive"),
    ("tenants:\n  acme:\n    keys: [k]\n    limits: {tokens_per_minute: .nan}\n", 4, "positive"),
    ("tenants:\n  acme:\n    keys: [k]\n    limits: {concurrent: 2.5}\n", 4, "positive integer"),
    ("tenants:\n  acme:\n    keys: [k]\n    limits: {rpm: 5}\n", 4, "unknown field 'rpm'"),
    ("tenants:\n  acme:\n    keys: [k]\n    base: maybe\n", 4, "base must be bool"),
    ("tenants:\n  acme:\n    keys: ['sha256:abc']\n", 3, "64 hex digits"),
    ("tenants:\n  acme:\n    keys: [k]\n  globex:\n    keys: [k]\n", 5, "listed twice"),
    ("tenants:\n  acme:\n    keys: [k]\n    admin_keys: [k]\n", 4, "listed twice"),
    ("tenants:\n  acme:\n    adapters: ['*']\n", 3, "no keys"),
    ("tenants:\n  'no spaces please':\n    keys: [k]\n", 2, "tenant name"),
    ("tenants:\n  acme:\n    keys: k\n", 3, "list of strings"),
    ("tenants:\n  acme: {keys: [k]\n", 3, "expected"),  # YAML's own error, with its line
    ("tenant:\n  acme: {}\n", 1, "unknown field 'tenant'"),
])
def test_a_bad_file_is_refused_with_the_line_at_fault(text, line, words):
    with pytest.raises(ValueError) as info:
        parse_tenants(text)
    assert f"line {line}:" in str(info.value) and words in str(info.value)


def test_keys_are_recognised_by_their_digest_only(tmp_path):
    path = tmp_path / "tenants.yaml"
    write(path, EXAMPLE)
    tenants = Tenants(path)
    caller = tenants.identify("Bearer sk-acme-1")
    assert caller.tenant.name == "acme" and caller.key_id == hashlib.sha256(b"sk-acme-1").hexdigest()[:12]
    assert tenants.identify("Bearer sk-acme-plain").tenant.name == "acme"
    assert tenants.identify("bearer  sk-globex ").tenant.name == "globex"
    for near_miss in ("sk-acme-", "sk-acme-11", "SK-ACME-1", "sk-acme-1x", "admin-acme", sha("sk-acme-1"), ""):
        with pytest.raises(Unauthenticated):
            tenants.identify(f"Bearer {near_miss}")
    with pytest.raises(Unauthenticated):
        tenants.identify(None)
    assert tenants.identify_admin("Bearer admin-acme").name == "acme"
    assert tenants.identify_admin("Bearer admin-acm") is None and tenants.identify_admin("Bearer sk-acme-1") is None


def test_an_edited_file_changes_who_gets_in_and_a_broken_edit_keeps_the_last_good_one(tmp_path, caplog):
    path = tmp_path / "tenants.yaml"
    write(path, EXAMPLE)
    tenants = Tenants(path)
    write(path, EXAMPLE.replace(sha("sk-globex"), sha("sk-globex-rotated")))
    assert tenants.identify("Bearer sk-globex-rotated").tenant.name == "globex"
    with pytest.raises(Unauthenticated):
        tenants.identify("Bearer sk-globex")
    with caplog.at_level(logging.WARNING):
        write(path, "tenants:\n  acme: [\n")
        assert tenants.identify("Bearer sk-globex-rotated").tenant.name == "globex"
        assert tenants.identify("Bearer sk-acme-1").tenant.name == "acme"
    assert caplog.text.count("cannot be used") == 1  # said once, not once per request
    path.unlink()
    assert tenants.identify("Bearer sk-acme-1").tenant.name == "acme"  # gone: the keys last read stay


def test_a_bad_file_at_start_is_refused(tmp_path):
    path = tmp_path / "tenants.yaml"
    write(path, "tenants:\n  acme:\n    keys: [k]\n    weight: 0\n")
    with pytest.raises(ValueError, match=r"--tenants-file .*line 4: tenant 'acme': weight must be a positive"):
        Tenants(path)
    with pytest.raises(ValueError, match="No such file"):
        Tenants(tmp_path / "missing.yaml")


# ---------------------------------------------------------------- quotas


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited(**limits) -> Tenant:
    return Tenant("acme", ("*",), True, Limits(**limits))


def test_requests_per_minute_refill_continuously_and_say_when_to_retry():
    clock = Clock()
    quotas, tenant = Quotas(clock), limited(requests_per_minute=2)
    quotas.reserve(tenant, 10).settle(10)
    quotas.reserve(tenant, 10).settle(10)
    with pytest.raises(RateLimited) as info:
        quotas.reserve(tenant, 10)
    assert info.value.limit == "requests_per_minute" and info.value.retry_after_s == pytest.approx(30.0)
    clock.now += 29.9
    with pytest.raises(RateLimited):
        quotas.reserve(tenant, 10)
    clock.now += 0.1
    quotas.reserve(tenant, 10).settle(10)


def test_tokens_are_reserved_at_admission_and_the_unused_part_refunded_exactly():
    clock = Clock()
    quotas, tenant = Quotas(clock), limited(tokens_per_minute=1000)
    held = quotas.reserve(tenant, 600)  # prompt + max_tokens x n
    with pytest.raises(RateLimited) as info:
        quotas.reserve(tenant, 401)
    assert info.value.limit == "tokens_per_minute" and info.value.retry_after_s == pytest.approx(1 * 60 / 1000)
    held.settle(150)  # it used 150: 450 come back
    held.settle(0)  # settling twice changes nothing
    quotas.reserve(tenant, 850)  # 1000 - 150 left
    with pytest.raises(RateLimited) as info:
        quotas.reserve(tenant, 1)
    assert info.value.retry_after_s == pytest.approx(0.06)
    with pytest.raises(InvalidRequest, match="lower max_tokens"):  # could never fit: waiting would not help
        quotas.reserve(tenant, 1001)


def test_the_concurrent_limit_counts_requests_until_they_end():
    quotas, tenant = Quotas(Clock()), limited(concurrent=2)
    first, second = quotas.reserve(tenant, 1), quotas.reserve(tenant, 1)
    with pytest.raises(RateLimited) as info:
        quotas.reserve(tenant, 1)
    assert info.value.limit == "concurrent" and info.value.retry_after_s > 0
    first.settle(1)
    third = quotas.reserve(tenant, 1)
    assert quotas.in_flight("acme") == 2
    second.settle(1), third.settle(1)
    assert quotas.in_flight("acme") == 0


def test_new_limits_from_the_file_apply_to_the_buckets_already_there():
    clock = Clock()
    quotas = Quotas(clock)
    quotas.reserve(limited(tokens_per_minute=1000), 900)
    quotas.reserve(limited(tokens_per_minute=100), 100)  # shrunk: the level is cut to 100, not reset
    with pytest.raises(RateLimited):
        quotas.reserve(limited(tokens_per_minute=100), 1)
    quotas.reserve(limited(), 10 ** 9)  # the limit removed: nothing refuses


# ---------------------------------------------------------------- fair share


def scheduler() -> Scheduler:
    return Scheduler(EngineConfig(), blocks=None, slots=None, lock=threading.Condition())


def seq(tenant: str | None, adapter: str | None, weight: float = 1.0) -> Sequence:
    request = Request([1, 2, 3], sampling=SamplingParams(max_new_tokens=4), tenant=tenant, weight=weight)
    return Sequence(request, RequestHandle("r", None), SimpleNamespace(name=adapter) if adapter else None,
                    frozenset(), None)


def admit(sched: Scheduler, waiting: list[Sequence], count: int) -> list[Sequence]:
    """Admit `count` sequences in order()'s order, as schedule() does, one step at a time."""
    taken = []
    for _ in range(count):
        first = sched.order(waiting)[0]
        sched._admitted(first)
        waiting.remove(first)
        taken.append(first)
    return taken


def test_a_tenant_with_one_adapter_is_not_starved_by_one_with_many():
    sched = scheduler()
    flood = [seq("a", f"a-{i}") for _ in range(4) for i in range(16)]
    waiting = flood + [seq("b", "b-only")]
    order = sched.order(waiting)
    assert order[1].request.tenant == "b"  # its turn right after a's first, not after a's 16 adapters
    assert [s.adapter.name for s in order if s.request.tenant == "a"][:16] == [f"a-{i}" for i in range(16)]
    # b keeps sending one request at a time: each is admitted at the next admission
    for _ in range(5):
        admitted = admit(sched, waiting, 3)
        assert [s.request.tenant for s in admitted].count("b") == 1
        waiting.append(seq("b", "b-only"))


def test_without_tenants_admission_is_round_robin_across_adapters_as_before():
    sched = scheduler()
    waiting = [seq(None, f"a-{i}") for _ in range(2) for i in range(16)] + [seq(None, "b-only")]
    order = sched.order(waiting)
    assert [s.queue_key[1] for s in order[:17]] == [f"a-{i}" for i in range(16)] + ["b-only"]


def test_weights_share_admissions_between_busy_tenants():
    sched = scheduler()
    waiting = [seq("heavy", f"h-{i % 3}", weight=3) for i in range(60)] + [seq("light", "l", weight=1) for _ in range(60)]
    admitted = admit(sched, waiting, 40)
    assert [s.request.tenant for s in admitted].count("heavy") == 30


def test_a_tenant_back_from_idle_does_not_spend_credit_saved_while_away():
    sched = scheduler()
    waiting = [seq("a", "x") for _ in range(40)]
    admit(sched, waiting, 30)  # a alone for 30 admissions
    waiting += [seq("b", "y") for _ in range(10)]
    admitted = [s.request.tenant for s in admit(sched, waiting, 10)]
    assert admitted.count("b") == 5 and "a" in admitted[:2]  # alternating, not b ten times


# ---------------------------------------------------------------- the usage log


def usage(i: int) -> Usage:
    return Usage(tenant="acme", key_id="9f86d081884c", adapter="acme-a@v1", protocol="grpc", status="OK",
                 request_id=f"r{i}", prompt_tokens=i, cached_tokens=0, completion_tokens=2 * i, latency_s=0.5)


def test_the_usage_log_starts_a_new_file_at_its_size_and_loses_no_line(tmp_path):
    log = UsageLog(tmp_path, max_bytes=1000)
    for i in range(40):
        log.write(usage(i))
    log.close()
    files = sorted(tmp_path.iterdir())
    assert len(files) >= 4 and all(f.stat().st_size <= 1000 for f in files)
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert [line["request_id"] for line in lines] == [f"r{i}" for i in range(40)]
    assert lines[3]["completion_tokens"] == 6 and lines[3]["time"].endswith("Z")


def test_the_usage_log_reaches_the_disk_batch_by_batch_without_closing(tmp_path):
    log = UsageLog(tmp_path, batch_lines=3, batch_s=30.0)
    for i in range(3):  # a whole batch: written and fsynced at once, long before batch_s
        log.write(usage(i))
    wait_until(lambda: sum(len(f.read_text().splitlines()) for f in tmp_path.iterdir()) == 3, timeout=5)
    log.write(usage(3))  # a batch begun: on disk within batch_s, or at close
    log.close()
    assert sum(len(f.read_text().splitlines()) for f in tmp_path.iterdir()) == 4


def test_a_tenant_under_its_share_gets_a_row_without_waiting_for_another_tenants_long_requests(llama_dir):
    from server.engine.engine import Engine

    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=2, max_seq_len=256))
    long = SamplingParams(max_new_tokens=120, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    alone = [o.token_ids for o in engine.generate([Request(p, sampling=long) for p in prompts])]
    try:
        for flooder, other, expected_preemptions in (("a", "b", 1), (None, None, 0)):
            before = engine.scheduler.fair_share_preemptions
            flood = [engine.submit(Request(p, sampling=long, tenant=flooder)) for p in prompts]
            for handle in flood:
                next(iter(handle))  # both rows taken: both are decoding
            quick = engine.submit(Request([3, 4], sampling=SamplingParams(max_new_tokens=2, temperature=0.0),
                                          tenant=other))
            quick.result(timeout=120)
            # with tenants it took a row at once; without, it waited for a long request to end
            assert any(h.done() for h in flood) == (flooder is None), flooder
            assert engine.scheduler.fair_share_preemptions - before == expected_preemptions
            # the preempted request was recomputed and went on as if never interrupted
            assert [h.result(timeout=120).token_ids for h in flood] == alone
    finally:
        engine.close()


def test_fractional_shares_never_swap_rows_back_and_forth(llama_dir):
    """Batch 3, two tenants of weight 1 (1.5 rows each): 2 + 1 rows is as fair as it gets; no
    preemption would make it fairer, and one would only be undone at the next step."""
    from server.engine.engine import Engine

    engine = Engine.from_pretrained(llama_dir, EngineConfig(max_batch_size=3, max_seq_len=256))
    long = SamplingParams(max_new_tokens=60, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15, 16]]
    try:
        alone = [o.token_ids for o in engine.generate([Request(p, sampling=long) for p in prompts])]
        a = [engine.submit(Request(p, sampling=long, tenant="a")) for p in prompts[:2]]
        for handle in a:
            next(iter(handle))
        b = [engine.submit(Request(p, sampling=long, tenant="b")) for p in prompts[2:]]
        assert [h.result(timeout=120).token_ids for h in a + b] == alone
        assert engine.scheduler.fair_share_preemptions == 0 and engine.scheduler.preemptions == 0
    finally:
        engine.close()
