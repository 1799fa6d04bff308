"""Fuzzing the generation server's HTTP API from its own OpenAPI schema (schemathesis + hypothesis): zero 5xx.

A real uvicorn server on 127.0.0.1 serves ``server_app`` around the tiny JAX engine (``server_fixtures``).
Schemathesis draws valid and invalid requests for every operation of ``/openapi.json``; each is sent with the
right token, a wrong one or none. Bounded: ``MAX_EXAMPLES`` requests (derandomised, so the same ones every
run) and a ``BUDGET_S`` wall-clock budget after which the remaining examples are not sent.
"""

from __future__ import annotations

import time

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install -e '.[test]' (schemathesis)")

from engine_helpers import ThreadServer  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from protocol_helpers import make_tokenizer  # noqa: E402
from server_fixtures import TOKEN, JaxServed  # noqa: E402

from atlas_jax.engines.server_app import create_app  # noqa: E402

MAX_EXAMPLES = 300
BUDGET_S = 150.0
HEADERS = [{}, {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": "Bearer wrong"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = JaxServed(make_tokenizer())
    app = create_app(
        engine, role="teacher", token=TOKEN, max_weights_bytes=1 << 20, max_json_bytes=16 << 10,
        weights_root=str(tmp_path_factory.mktemp("weights")), max_inflight=4, max_sequences=8, max_new_tokens=128,
    )  # fmt: skip
    s = ThreadServer(app)
    yield s
    s.stop()


@pytest.mark.slow
def test_fuzz_the_openapi_schema_no_5xx(server):
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/generate", "/update_weights", "/v1/completions", "/v1/chat/completions"} <= paths
    cases = st.one_of(
        schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)
    )
    start, sent, failures, statuses = time.monotonic(), [], [], {}

    @settings(
        max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(case=cases, auth=st.sampled_from(HEADERS))
    def one(case, auth):
        if time.monotonic() - start > BUDGET_S:
            return
        r = case.call(base_url=server.url, headers=auth, timeout=60)
        sent.append(case.operation.path)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code >= 500:
            failures.append((case.method, case.path, case.body, r.status_code, r.text[:300]))

    one()
    print(
        f"sent {len(sent)} requests in {time.monotonic() - start:.0f} s; statuses {sorted(statuses.items())}"
    )
    assert not failures, failures[:5]
    assert len(set(sent)) >= 4 and len(sent) >= 50  # it did exercise the API
