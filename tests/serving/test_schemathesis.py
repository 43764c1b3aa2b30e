"""The live server's OpenAPI document, fuzzed over every operation (schemathesis, seeded, bounded).

Checks: no 5xx, every status is one the document lists, every body has the documented
content type and conforms to the documented schema. DELETE and upload run against this
module's own registry home, so what they remove or add harms no other test.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from serving.app import create_app
from serving.serve_cli import ServerSettings, ServerThread, build_service

KEY = "test-key"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def service(home):
    # small bounds: a valid request generates at most 32 prompts × n=8 × 4 tokens
    with build_service(ServerSettings(home / "base", home, device="cpu", slots=8, residual_slots=4, max_batch=64,
                                      max_prompt_tokens=32, max_tokens=4, max_mixture=4)) as service:
        yield service


@pytest.fixture(scope="module")
def api_schema(service):
    with ServerThread(create_app(service, api_key=KEY)) as srv:
        yield schemathesis.openapi.from_url(srv.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_every_operation_under_fuzzing(case):
    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS, timeout=60)

