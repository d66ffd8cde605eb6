"""Schemathesis against the published OpenAPI document: generated requests for every
route, each answered as the document says (no 5xx, documented status codes and content
types, response bodies matching their schemas). Bounded: a few examples per operation.

Left out: the check that every schema-valid request is accepted. Whether a request fits
depends on things no schema states (prompt tokens + max_tokens within the context, token
ids within the vocabulary), and those get a documented 400."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402


@pytest.fixture(scope="session")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case, auth):
    case.call_and_validate(headers=auth, timeout=60, excluded_checks=[positive_data_acceptance])
