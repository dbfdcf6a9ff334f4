"""/openapi.json is published and true to what the server answers: schemathesis generates
requests from it against a real server and checks that none gets a 5xx, every status and body
is one the schema documents (400 in OpenAI's error shape for a bad body, not FastAPI's 422), and
the content types match. Bounded: a few examples per operation."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,  # noqa: E402
                                               status_code_conformance)

from server.config import AdapterConfig, EngineConfig, RequestLimits, ServerConfig  # noqa: E402
from server.adapters.store import AdapterStore  # noqa: E402
from tests.helpers import RunningServer  # noqa: E402


@pytest.fixture(scope="module")
def server(llama_dir, peft_adapters, tmp_path_factory):
    store = AdapterStore(tmp_path_factory.mktemp("store"))
    store.publish("cheese", peft_adapters["cheese"])
    config = ServerConfig(model_dir=llama_dir, engine=EngineConfig(max_batch_size=4, max_seq_len=64),
                          adapters=AdapterConfig(store=store.root), host="127.0.0.1", port=0, metrics_port=0,
                          http_port=0, default_max_new_tokens=4, limits=RequestLimits(max_samples=2, max_prompts=2))
    with RunningServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{server.server.http_port}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_the_published_schema_is_what_the_server_answers(case):
    case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                   response_schema_conformance])
