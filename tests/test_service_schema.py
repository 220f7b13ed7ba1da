"""Property-based test of the HTTP API from its own OpenAPI schema (schemathesis + hypothesis):
valid and invalid requests to every operation, over real HTTP, must never get a 5xx, and every
answer must match the documented status codes, content types and bodies."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from test_service_harness import TOKEN, FakeBackend, fake_config, serve

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.negative_data_rejection,
    checks.ignored_auth,
]
"""Everything but ``positive_data_acceptance``: a schema-valid body may still break a limit that
depends on the model (an ``Nx`` budget's NFEs, a strategy's options), which is answered 422."""


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    config = fake_config(tmp_path_factory.mktemp("schema"), max_budget_nfe=100, max_queue=4)
    with serve(config, FakeBackend()) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE,
                                  schemathesis.GenerationMode.NEGATIVE])
def test_no_server_errors_and_answers_match_the_schema(
        api_schema: schemathesis.BaseSchema, mode: schemathesis.GenerationMode) -> None:
    # (schemathesis' own pytest integration does not run under pytest 9; @given does)
    @given(case=api_schema.as_strategy(mode))
    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30,
                               checks=CHECKS)

    check()
