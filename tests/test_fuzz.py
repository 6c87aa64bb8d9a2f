"""Fuzzing every operation of docs/openapi.json with schemathesis against the real app (Flask test client).

Each generated request carries the valid token of its operation (so it reaches the validation behind the
authentication) unless schemathesis generated an Authorization header itself. Every answer must be documented
in the description (status, content type, body schema, headers), never 5xx; a refused request (4xx) must leave
the federation's state as it was: global model, round, phase, participants, accepted updates, nodes, bans,
tokens, history. (Liveness counters and the refusal counters of monitors are not "state" here: any
authenticated request counts as liveness, and a refused update is counted by design.)

FL_FUZZ_EXAMPLES sets the examples per operation and mode (valid / invalid by the schema; default 300;
``FL_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py`` is the longer run). The number of requests sent is printed at the
end of the module.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi import checks as openapi_checks
from schemathesis import checks as core_checks

from conftest import ADMIN_TOKEN, JOIN_TOKEN, MONITOR_TOKEN, fingerprint, make_config, register

from fedrest.server.app import create_app

EXAMPLES = int(os.environ.get("FL_FUZZ_EXAMPLES", "300"))  # per operation and mode
SENT: Counter = Counter()
CHECKS = [core_checks.not_a_server_error, openapi_checks.status_code_conformance,
          openapi_checks.content_type_conformance, openapi_checks.response_schema_conformance,
          openapi_checks.response_headers_conformance]


POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
WITH_INPUT = ["register", "heartbeat", "leave", "task", "submit_update", "rotate_token", "ban", "unban"]
WITHOUT_INPUT = ["health", "openapi", "model", "status", "metrics", "dashboard"]  # nothing to vary but headers
CASES = ([(op, POSITIVE) for op in WITH_INPUT + WITHOUT_INPUT] + [(op, NEGATIVE) for op in WITH_INPUT])


def make_fuzz_app(tmp_path):
    app = create_app(make_config(tmp_path, min_nodes_to_start=1, max_nodes=50), start_driver=False)
    node = register(app.test_client(), "fuzz-node")
    app.extensions["federation"].tick()  # round 1 opens with this node as a participant
    tokens = {"joinToken": JOIN_TOKEN, "monitorToken": MONITOR_TOKEN, "adminToken": ADMIN_TOKEN,
              "nodeToken": node["node_token"]}
    return app, tokens




@pytest.mark.parametrize("operation_id, mode", CASES, ids=[f"{op}-{m.value}" for op, m in CASES])
def test_every_operation_answers_as_documented_and_refusals_change_nothing(tmp_path, operation_id, mode):
    app, tokens = make_fuzz_app(tmp_path)
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)  # the description the app serves
    operation = schema.find_operation_by_id(operation_id)
    security = operation.definition.raw.get("security") or [{}]
    scheme = next(iter(security[0]), None)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate], derandomize=True, database=None)
    def fuzz(case):
        headers = {}
        if scheme is not None and not any(k.lower() == "authorization" for k in (case.headers or {})):
            headers["Authorization"] = f"Bearer {tokens[scheme]}"
        before = fingerprint(app)
        response = case.call(headers=headers)
        SENT[operation_id] += 1
        case.validate_response(response, checks=CHECKS)
        if 400 <= response.status_code < 500:
            assert fingerprint(app) == before, (response.status_code, response.text[:300])
        elif operation_id == "rotate_token" and response.status_code == 200:
            body = response.json()
            tokens[f"{body['kind']}Token"] = body["token"]

    fuzz()


def test_fuzzing_sent_enough_requests():
    """Runs after the fuzzing above (file order): the normal suite sends at least 5,000 generated requests."""
    total = sum(SENT.values())
    print(f"\nfuzzing: {total} generated requests over {len(SENT)} operations: "
          + ", ".join(f"{k} {v}" for k, v in sorted(SENT.items())))
    if not SENT:
        pytest.skip("the fuzzing tests did not run (deselected)")
    assert total >= 5000 or EXAMPLES < 300
