"""``diffsearch serve``: refusing unsafe configurations, and a real start in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from test_service_harness import wait_until_serving

from diffsearch.cli_serve import is_loopback, serve


def run_serve(*args: str, env: dict[str, str] | None = None):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSEARCH_")}
    return CliRunner().invoke(serve, list(args), env={**environment, **(env or {})},
                              catch_exceptions=False)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.com"])
def test_refuses_a_non_loopback_address_without_a_token(host: str, tmp_path: Path) -> None:
    result = run_serve("--host", host, "--data-dir", str(tmp_path))
    assert_one_line_error(result, f"refusing to listen on {host} without a token",
                          "DIFFSEARCH_TOKEN")


def test_loopback_detection() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.3.2.1", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "localhost.example.com"]))


def test_token_file_problems_are_one_line_errors(tmp_path: Path) -> None:
    assert_one_line_error(run_serve("--token-file", str(tmp_path / "missing")),
                          "--token-file", "cannot read")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert_one_line_error(run_serve("--token-file", str(empty)), "the file is empty")


def test_other_refusals(tmp_path: Path) -> None:
    assert_one_line_error(run_serve("--concurrency", "2"), "--concurrency", "--executor dask")
    assert_one_line_error(run_serve("--scheduler", "tcp://127.0.0.1:8786"),
                          "only used with --executor dask")
    assert_one_line_error(run_serve("--model", "broken="), "--model 'broken='")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(run_serve("--data-dir", str(blocker / "data")), "--data-dir")
    limit = run_serve("--max-queue", "0")
    assert limit.exit_code == 2 and "--max-queue" in limit.output


def test_serves_with_a_token_file_and_limits_from_the_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    with socket.socket() as probe:  # a free port for the subprocess
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSEARCH_")}
    env.update(DIFFSEARCH_MAX_QUEUE="3", DIFFSEARCH_MAX_BUDGET_NFE="123",
               DIFFSEARCH_TOKEN="ignored-when-a-file-is-given")
    process = subprocess.Popen(
        [sys.executable, "-c", "from diffsearch.cli_serve import serve; serve()",
         "--port", str(port), "--data-dir", str(tmp_path / "data"), "--token-file",
         str(token_file), "--verifier", "shapes-oracle", "--model", "mine=/models/mine",
         "--log-level", "warning"],
        env=env, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(process, base)
        assert httpx.get(f"{base}/v1/info").status_code == 401
        assert httpx.get(f"{base}/v1/info", headers={
            "Authorization": "Bearer ignored-when-a-file-is-given"}).status_code == 401
        info = httpx.get(f"{base}/v1/info", headers={"Authorization": "Bearer s3cret"}).json()
        assert info["models"] == ["mine", "shapes"] and info["verifiers"] == ["shapes-oracle"]
        assert info["limits"]["max_queue"] == 3 and info["limits"]["max_budget_nfe"] == 123
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert f"serving on http://127.0.0.1:{port}/ (auth: bearer token" in stderr
    assert (tmp_path / "data" / "runs").is_dir()


def test_memory_bounds_reach_the_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from diffsearch.service import app

    made = []
    monkeypatch.setattr(app, "create_app", lambda config: made.append(config) or object())
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    result = run_serve("--data-dir", str(tmp_path), "--max-records", "5", "--max-events", "7",
                       env={"DIFFSEARCH_MAX_EVENT_STREAMS": "3"})
    assert result.exit_code == 0, result.output
    config = made[0]
    assert (config.max_records, config.max_events, config.limits.max_event_streams) == (5, 7, 3)
    for option in ("--max-records", "--max-events", "--max-event-streams"):
        refused = run_serve("--data-dir", str(tmp_path), option, "0")
        assert refused.exit_code == 2 and option in refused.output
