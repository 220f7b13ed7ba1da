"""Property-based test of the HTTP API from its own OpenAPI schema (schemathesis + hypothesis):
valid and invalid requests to every operation, over real HTTP, with and without a token, must
never get a 5xx, and every answer must match the documented status codes, content types and
bodies. With a token, every operation must refuse a request without it. The schema's pattern for
option strings is the service's path rule itself, so no schema-valid request is refused as a
path."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import checks
from test_service_harness import FAKE_REQUEST, TOKEN, FakeBackend, client, fake_config, serve

from diffsearch.service.requests import NAME_PATTERN, NOT_BLANK, RequestError, _reject_paths

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

UNANNOUNCED = ("looks like a path", "set by the service", "is empty")
"""422s that a schema-valid request must never get: the schema states these rules."""


def no_unannounced_refusal(ctx: Any, response: Any, case: schemathesis.Case) -> None:
    """A schema-valid request is not refused for something the schema rules out itself."""
    if response.status_code == 422:
        detail = response.json().get("detail", "")
        assert not any(reason in detail for reason in UNANNOUNCED), detail


@pytest.fixture(scope="module", params=["token", "no token"])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[schemathesis.BaseSchema, dict[str, str]]]:
    config = fake_config(tmp_path_factory.mktemp("schema"), max_budget_nfe=100, max_queue=4)
    if request.param == "no token":
        config = replace(config, token=None)
    auth = {"Authorization": f"Bearer {TOKEN}"} if config.token else {}
    with serve(config, FakeBackend()) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json"), auth


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE,
                                  schemathesis.GenerationMode.NEGATIVE])
def test_no_server_errors_and_answers_match_the_schema(
        live: tuple[schemathesis.BaseSchema, dict[str, str]],
        mode: schemathesis.GenerationMode) -> None:
    api_schema, auth = live
    extra = [no_unannounced_refusal] if mode is schemathesis.GenerationMode.POSITIVE else []

    # (schemathesis' own pytest integration does not run under pytest 9; @given does)
    @given(case=api_schema.as_strategy(mode))
    @settings(max_examples=100, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=auth, timeout=30, checks=[*CHECKS, *extra])

    check()


# ---- the path rule, stated in the schema ------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab/\\~.\x00\n é"), max_size=6) | st.text())
def test_the_schema_s_pattern_is_the_path_rule(value: str) -> None:
    # a JSON Schema `pattern` is a search, not a full match
    documented = re.search(NAME_PATTERN, value) is not None
    try:
        _reject_paths(value, "strategy.x")
        refused = False
    except RequestError:
        refused = True
    assert documented is not refused, repr(value)


def test_the_prompt_pattern_is_python_s_idea_of_blank() -> None:
    # Job refuses a prompt that str.strip() empties; ECMA's \S (JSON Schema's) is not that
    keeps = re.compile(NOT_BLANK)
    wrong = [hex(code) for code in range(0x110000)
             if (keeps.fullmatch(chr(code)) is None) is bool(chr(code).strip())]
    assert wrong == []


def test_path_like_options_are_schema_invalid_and_refused(tmp_path: Path) -> None:
    with serve(fake_config(tmp_path)) as url, client(url) as http:
        document = httpx.get(f"{url}/openapi.json").json()
        validator = jsonschema_rs.Draft202012Validator(
            {"$ref": "#/components/schemas/SearchRequest", **document})
        for options in ({"label": "../x"}, {"label": "~/x"}, {"a/b": 1},
                        {"labels": ["ok", "x/y"]}, {"device": "cpu"}):
            body = {**FAKE_REQUEST, "verifier": {"name": "redness", **options}}
            assert not validator.is_valid(body), options
            response = http.post("/v1/searches", json=body)
            assert response.status_code == 422, response.text
            assert response.json()["field"].startswith("verifier"), response.text
        for strategy in ({"name": "ttsnap", "verifiers": {"2": "~/x"}}, {"name": "paths", "x/": 1}):
            body = {**FAKE_REQUEST, "strategy": strategy}
            assert not validator.is_valid(body), strategy
            assert http.post("/v1/searches", json=body).status_code == 422
        fine = {**FAKE_REQUEST, "budget": "8x", "verifier": {"name": "fails-on-bright",
                                                              "threshold": 0.7},
                "strategy": {"name": "particles", "potential": "max"}}
        assert validator.is_valid(fine)
        accepted = http.post("/v1/searches", json=fine)
        assert accepted.status_code == 202, accepted.text
