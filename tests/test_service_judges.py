"""An API judge in a request calls only an endpoint the operator configured, with the key the
operator named for it: a request can neither point it elsewhere nor pick which secret is sent."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_service_harness import TOKEN, FakeBackend, fake_config, serve

from diffsearch.cli_serve import parse_judge_endpoints
from diffsearch.service.requests import RequestError, build_job

ENDPOINT = "http://127.0.0.1:9/v1"
OFFERED = ["redness", "openai", "ensemble"]


def config(tmp_path: Path):
    return replace(fake_config(tmp_path), verifiers=tuple(OFFERED),
                   judge_endpoints={ENDPOINT: "JUDGE_KEY"})


def request(verifier: Any) -> dict[str, Any]:
    return {"prompts": ["a red circle on the left"], "model": "fake", "verifier": verifier}


def test_a_configured_endpoint_gets_the_operators_key_and_network_opt_in(tmp_path: Path) -> None:
    job = build_job(request({"name": "openai", "model": "judge", "base_url": ENDPOINT}),
                    config(tmp_path), OFFERED)
    assert job.verifier == {"name": "openai", "model": "judge", "base_url": ENDPOINT,
                            "api_key_env": "JUDGE_KEY", "allow_network": True}


@pytest.mark.parametrize(("verifier", "field", "fragment"), [
    ({"name": "openai", "model": "m", "base_url": "http://10.0.0.1/v1"}, "verifier.base_url",
     "not a judge endpoint of this service; allowed: http://127.0.0.1:9/v1"),
    ({"name": "openai", "model": "m"}, "verifier.base_url", "'https://api.openai.com/v1' is not"),
    ({"name": "openai", "model": "m", "base_url": ENDPOINT, "api_key_env": "AWS_SECRET"},
     "verifier.api_key_env", "set by the service"),
    ({"name": "openai", "model": "m", "base_url": ENDPOINT, "cache_dir": "c"},
     "verifier.cache_dir", "set by the service"),
    ({"name": "ensemble", "members": ["redness", {"name": "openai", "model": "m",
                                                  "base_url": "https://evil.example/v1"}]},
     "verifier.members.1.base_url", "not a judge endpoint"),
    ({"name": "ensemble", "members": ["redness", "pickscore"]}, "verifier.members.1",
     "unknown verifier 'pickscore'"),
])
def test_requests_cannot_reach_beyond_the_operators_endpoints(
        tmp_path: Path, verifier: Any, field: str, fragment: str) -> None:
    with pytest.raises(RequestError) as raised:
        build_job(request(verifier), config(tmp_path), OFFERED)
    assert raised.value.field == field and fragment in raised.value.message


def test_without_configured_endpoints_no_api_judge_runs(tmp_path: Path) -> None:
    plain = replace(config(tmp_path), judge_endpoints={})
    with pytest.raises(RequestError, match="allowed: none"):
        build_job(request({"name": "openai", "model": "m", "base_url": ENDPOINT}), plain,
                  OFFERED)


def test_over_http_a_foreign_endpoint_is_422(tmp_path: Path) -> None:
    with serve(config(tmp_path), FakeBackend(delay=0.0)) as url:
        response = httpx.post(f"{url}/v1/searches", headers={"Authorization": f"Bearer {TOKEN}"},
                              json=request({"name": "openai", "model": "m",
                                            "base_url": "http://169.254.169.254/v1"}))
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "verifier.base_url"


def test_serve_reads_endpoints_with_their_key_variables() -> None:
    assert parse_judge_endpoints(("https://api.openai.com/v1=OPENAI_API_KEY",
                                  "http://127.0.0.1:8000/v1")) == {
        "https://api.openai.com/v1": "OPENAI_API_KEY", "http://127.0.0.1:8000/v1": None}
