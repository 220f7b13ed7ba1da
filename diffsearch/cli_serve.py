"""``diffsearch serve``: the HTTP service and its page (see docs/api.md).

Every option has an environment variable (shown by ``--help``), so a container or a systemd unit
can configure the service without a command line. Listening beyond the loopback interface needs
a token: the service never serves the network unauthenticated.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

import click

from diffsearch.cli_errors import fail
from diffsearch.model_cache import (
    DEFAULT_MAX_MODELS,
    DEFAULT_MAX_VERIFIERS,
    MAX_MODELS_ENV,
    MAX_VERIFIERS_ENV,
    set_limits,
)
from diffsearch.service.config import A1111Defaults, Limits, ServiceConfig

TOKEN_ENV = "DIFFSEARCH_TOKEN"
_DEFAULTS = Limits()
_CONFIG_DEFAULTS = ServiceConfig(data_dir=Path())
_A1111 = A1111Defaults()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def read_token(token_file: Path | None) -> str | None:
    """The token from ``--token-file`` (first line), else from $DIFFSEARCH_TOKEN."""
    if token_file is not None:
        try:
            lines = token_file.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            fail(f"--token-file {token_file}: cannot read it ({error.strerror})")
        token = lines[0].strip() if lines else ""
        if not token:
            fail(f"--token-file {token_file}: the file is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def parse_models(pairs: tuple[str, ...]) -> dict[str, str]:
    """``NAME=FOLDER_OR_HUB_ID`` pairs (a bare ``NAME`` serves it under its own name)."""
    models = {"shapes": "shapes"}
    for pair in pairs:
        name, sep, target = pair.partition("=")
        name = name.strip()
        if not name or (sep and not target.strip()):
            fail(f"--model {pair!r}: expected NAME=FOLDER (or a bare NAME)")
        models[name] = target.strip() if sep else name
    return models


def parse_judge_endpoints(pairs: tuple[str, ...]) -> dict[str, str | None]:
    """``URL[=KEY_ENV]`` pairs: the base URLs an ``openai`` judge may call, and the environment
    variable holding each one's API key (upper-case, so a URL's own ``=`` is not taken for it)."""
    endpoints: dict[str, str | None] = {}
    for pair in pairs:
        url, sep, env = pair.rpartition("=")
        if not (sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", env)):
            url, env = pair, ""
        if not url.startswith(("http://", "https://")):
            fail(f"--judge-endpoint {pair!r}: expected an http(s) base URL, optionally "
                 f"=KEY_ENV (e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1="
                 f"OPENAI_API_KEY)")
        endpoints[url] = env or None
    return endpoints


def _limit(name: str, help_text: str) -> click.Option:
    default = getattr(_DEFAULTS, name)
    return click.option(f"--{name.replace('_', '-')}", name, type=click.IntRange(min=1),
                        default=default, show_default=True, show_envvar=True,
                        envvar=f"DIFFSEARCH_{name.upper()}", help=help_text)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="DIFFSEARCH_HOST",
              show_envvar=True, help="Interface to listen on; other than loopback needs a token.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              envvar="DIFFSEARCH_PORT", show_envvar=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("diffsearch-service"), show_default=True,
              envvar="DIFFSEARCH_DATA_DIR", show_envvar=True,
              help="Run folders go to DATA_DIR/runs/<search id>.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
              help=f"File whose first line is the bearer token (default: ${TOKEN_ENV}).")
@click.option("--model", "models", multiple=True, metavar="NAME=FOLDER",
              help="Serve a model under NAME (a diffusers folder or a cached hub id); "
                   "repeatable. 'shapes' is always served.")
@click.option("--verifier", "verifiers", multiple=True, metavar="NAME",
              help="Offer only these verifiers (repeatable; default: every installed one).")
@click.option("--judge-endpoint", "judge_endpoints", multiple=True, metavar="URL[=KEY_ENV]",
              help="Let requests' openai judges call this OpenAI-compatible base URL, sending "
                   "the API key held in the environment variable KEY_ENV (none without "
                   "=KEY_ENV); repeatable. Default: no API judge.")
@click.option("--executor", type=click.Choice(["local", "dask"]), default="local",
              show_default=True, envvar="DIFFSEARCH_EXECUTOR", show_envvar=True)
@click.option("--workers", type=click.IntRange(min=1), help="Workers of the local Dask cluster.")
@click.option("--scheduler", help="Address of a running Dask scheduler.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="CPU threads per worker (pinned: part of the results' identity).")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Searches running at once (dask executor only).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=8, show_default=True,
              help="Candidates per work unit; smaller gives livelier progress, larger batches "
                   "the model better.")
@_limit("max_budget_nfe", "Most NFEs per prompt a search may spend.")
@_limit("max_prompts", "Most prompts per search.")
@_limit("max_prompt_chars", "Most characters per prompt.")
@_limit("max_queue", "Most searches waiting to start.")
@_limit("max_image_side", "Largest ?size= an image download may be shrunk to.")
@_limit("max_pixels", "Most pixels (width x height) a requested image size may have.")
@_limit("max_body_bytes", "Largest request body.")
@_limit("max_event_streams", "Most event streams (SSE clients) open at once per search.")
@click.option("--max-records", type=click.IntRange(min=1), default=_CONFIG_DEFAULTS.max_records,
              show_default=True, envvar="DIFFSEARCH_MAX_RECORDS", show_envvar=True,
              help="Searches kept in memory once nothing runs in them (older ones are read "
                   "back from the data dir when asked for).")
@click.option("--max-events", type=click.IntRange(min=1), default=_CONFIG_DEFAULTS.max_events,
              show_default=True, envvar="DIFFSEARCH_MAX_EVENTS", show_envvar=True,
              help="Events each search's log keeps in memory (a client that needs an older one "
                   "gets a snapshot of the search).")
@click.option("--max-loaded", type=click.IntRange(min=1), default=DEFAULT_MAX_MODELS,
              show_default=True, envvar=MAX_MODELS_ENV, show_envvar=True,
              help="Models kept loaded (one copy per model, device and dtype, whatever the "
                   "searches' steps, sizes or verifiers); the least recently used goes first.")
@click.option("--max-loaded-verifiers", type=click.IntRange(min=1),
              default=DEFAULT_MAX_VERIFIERS, show_default=True, envvar=MAX_VERIFIERS_ENV,
              show_envvar=True, help="Verifiers kept loaded; the least recently used goes first.")
@click.option("--a1111-strategy", default=_A1111.strategy, show_default=True,
              envvar="DIFFSEARCH_A1111_STRATEGY", show_envvar=True,
              help="Strategy of an A1111 txt2img request that names none.")
@click.option("--a1111-budget", default=str(_A1111.budget), show_default=True,
              envvar="DIFFSEARCH_A1111_BUDGET", show_envvar=True,
              help="Budget (NFEs, or Nx samples) of an A1111 txt2img request that names none.")
@click.option("--a1111-verifier", envvar="DIFFSEARCH_A1111_VERIFIER", show_envvar=True,
              help="Verifier of an A1111 txt2img request that names none (default: the "
                   "service's default verifier).")
@click.option("--a1111-max-images", type=click.IntRange(min=1), default=_A1111.max_images,
              show_default=True, envvar="DIFFSEARCH_A1111_MAX_IMAGES", show_envvar=True,
              help="Most images (batch_size x n_iter) one A1111 txt2img request may ask for.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(host: str, port: int, data_dir: Path, token_file: Path | None,
          models: tuple[str, ...], verifiers: tuple[str, ...],
          judge_endpoints: tuple[str, ...], executor: str,
          workers: int | None, scheduler: str | None, threads: int, concurrency: int,
          batch_size: int,
          max_budget_nfe: int, max_prompts: int, max_prompt_chars: int, max_queue: int,
          max_image_side: int, max_pixels: int, max_body_bytes: int, max_event_streams: int,
          max_records: int, max_events: int, max_loaded: int, max_loaded_verifiers: int,
          a1111_strategy: str, a1111_budget: str,
          a1111_verifier: str | None, a1111_max_images: int, log_level: str) -> None:
    """Serve searches over HTTP (/v1, OpenAPI at /openapi.json) with a page at /."""
    import uvicorn

    from diffsearch.service.app import create_app

    token = read_token(token_file)
    if token is None and not is_loopback(host):
        fail(f"refusing to listen on {host} without a token: set ${TOKEN_ENV} or pass "
              f"--token-file (or listen on 127.0.0.1)")
    if executor == "local" and concurrency != 1:
        fail("--concurrency: the local executor runs one search at a time; use "
              "--executor dask to run several")
    if scheduler and executor != "dask":
        fail("--scheduler: only used with --executor dask")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"--data-dir {data_dir}: cannot create it ({error.strerror})")
    config = ServiceConfig(
        data_dir=data_dir.resolve(), token=token, models=parse_models(models),
        verifiers=tuple(verifiers) or None, judge_endpoints=parse_judge_endpoints(judge_endpoints),
        limits=Limits(max_budget_nfe=max_budget_nfe, max_prompts=max_prompts,
                      max_prompt_chars=max_prompt_chars, max_queue=max_queue,
                      max_image_side=max_image_side, max_pixels=max_pixels,
                      max_body_bytes=max_body_bytes,
                      max_event_streams=max_event_streams),
        executor=executor,  # type: ignore[arg-type]
        workers=workers, scheduler=scheduler, threads=threads, concurrency=concurrency,
        batch_size=batch_size, max_records=max_records, max_events=max_events,
        a1111=A1111Defaults(strategy=a1111_strategy,
                            budget=int(a1111_budget) if a1111_budget.isdigit() else a1111_budget,
                            verifier=a1111_verifier, max_images=a1111_max_images))
    set_limits(models=max_loaded, verifiers=max_loaded_verifiers)
    try:
        app = create_app(config)
    except ValueError as error:  # an A1111 default is no strategy, budget or verifier offered
        fail(str(error).replace("a1111.", "--a1111-", 1))
    click.echo(f"diffsearch: serving on http://{host}:{port}/ (auth: "
               f"{'bearer token' if token else 'none, loopback only'}; runs in {data_dir})",
               err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
