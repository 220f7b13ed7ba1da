"""The OpenAPI document says what the server does: security only where a token is enforced, and
a 405's Allow names every method served at that path (over real HTTP)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from test_service_harness import TOKEN, FakeBackend, fake_config, serve


def _operations(document: dict) -> list[dict]:
    return [op for path in document["paths"].values() for op in path.values()]


def test_with_a_token_the_document_declares_bearer_auth(tmp_path: Path) -> None:
    with serve(fake_config(tmp_path), FakeBackend(delay=0.0)) as url:
        document = httpx.get(f"{url}/openapi.json").json()
        assert httpx.get(f"{url}/v1/info").status_code == 401
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    info = document["paths"]["/v1/info"]["get"]
    assert info["security"] == [{"HTTPBearer": []}] and "401" in info["responses"]


def test_without_a_token_the_document_declares_no_security(tmp_path: Path) -> None:
    config = replace(fake_config(tmp_path), token=None)
    with serve(config, FakeBackend(delay=0.0)) as url:
        document = httpx.get(f"{url}/openapi.json").json()
        assert httpx.get(f"{url}/v1/info").status_code == 200  # and indeed none is enforced
    assert "securitySchemes" not in document.get("components", {})
    assert not [op for op in _operations(document) if "security" in op]
    assert not [op for op in _operations(document) if "401" in op["responses"]]


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("DELETE", "/v1/searches", {"GET", "POST"}),
    ("PUT", "/v1/info", {"GET"}),
    ("GET", "/v1/searches/s000001/cancel", {"POST"}),
])
def test_a_405_names_every_method_of_the_path(tmp_path: Path, method: str, path: str,
                                              allowed: set[str]) -> None:
    with serve(fake_config(tmp_path), FakeBackend(delay=0.0)) as url:
        response = httpx.request(method, f"{url}{path}",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) - {"HEAD"} == allowed
