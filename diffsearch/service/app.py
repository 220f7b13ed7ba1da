"""The HTTP service: submit, list, watch (server-sent events), fetch images, cancel and resume
searches.

Endpoints live under ``/v1``; every one of them but ``/v1/health`` needs the bearer token when
the service has one. A1111-compatible ones live under ``/sdapi/v1``
(:mod:`~diffsearch.service.a1111`) and take the token as a bearer token or basic auth. The page
(``/``) and the OpenAPI schema (``/openapi.json``) are public: the page asks for the token and
keeps it in ``sessionStorage``. Errors are JSON ``{"detail": one line, "field": ..., "limit":
...}`` (see :class:`~diffsearch.service.schemas.ErrorResponse`; under /sdapi also ``error``).
"""

from __future__ import annotations

import asyncio
import hmac
import io
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from diffsearch import __version__, run_folder
from diffsearch.errors import DiffsearchError
from diffsearch.job import Job
from diffsearch.service import a1111, schemas
from diffsearch.service.backend import Backend, DaskBackend, LocalBackend
from diffsearch.service.config import ServiceConfig
from diffsearch.service.events import StreamSlots, TooManyStreams
from diffsearch.service.requests import (
    SERVICE_FIELDS,
    RequestError,
    build_job,
    check_against_model,
    check_family,
    default_model,
    parse_body,
    request_schema,
)
from diffsearch.service.searches import (
    NotCancellable,
    NotResumable,
    QueueFull,
    SearchManager,
    SearchRecord,
    Status,
    image_url,
    snapshot,
    summary_fields,
)
from diffsearch.strategies.registry import strategy_names

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": schemas.ErrorResponse, "description": "Missing or wrong bearer token."},
    404: {"model": schemas.ErrorResponse, "description": "No such search or image."},
    422: {"model": schemas.ErrorResponse, "description": "Invalid parameter."},
}
PNG = {200: {"content": {"image/png": {}}, "description": "A PNG image."}}


def make_backend(config: ServiceConfig) -> Backend:
    if config.executor == "dask":
        return DaskBackend(workers=config.workers, scheduler=config.scheduler,
                           threads=config.threads, concurrency=config.concurrency)
    if config.concurrency != 1:
        raise ValueError("the in-process executor runs one search at a time; use concurrency 1 "
                         "or the dask executor")
    return LocalBackend()


def offered_verifiers(config: ServiceConfig) -> list[str]:
    """The verifier names requests may use: the configured ones, else every importable one."""
    if config.verifiers is not None:
        return sorted(config.verifiers)
    from diffsearch.verifiers.registry import available_verifiers

    return sorted(info.name for info in available_verifiers() if info.status == "ok")


def create_app(config: ServiceConfig, backend: Backend | None = None) -> FastAPI:
    """The service as an ASGI app (uvicorn runs it; tests may pass their own ``backend``)."""
    backend = backend or make_backend(config)
    verifiers = offered_verifiers(config)
    static = resources.files("diffsearch.service") / "static"
    streams = StreamSlots(config.limits.max_event_streams)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager = SearchManager(backend, config.data_dir, max_queue=config.limits.max_queue,
                                max_records=config.max_records, max_events=config.max_events,
                                loop=asyncio.get_running_loop())
        manager.start()
        app.state.manager = manager
        try:
            yield
        finally:
            await run_in_threadpool(manager.stop)
            await run_in_threadpool(backend.close)

    app = FastAPI(title="diffsearch", version=__version__, lifespan=lifespan,
                  description="Test-time search for diffusion models over HTTP.")
    _install_error_handlers(app)
    bearer = HTTPBearer(auto_error=False, description="The service's token (DIFFSEARCH_TOKEN).")

    def authorise(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        assert config.token is not None  # only a service with a token depends on this
        if credentials is None:
            raise RequestError("missing bearer token: send 'Authorization: Bearer <token>'",
                               status=401)
        if not hmac.compare_digest(credentials.credentials.encode(), config.token.encode()):
            raise RequestError("wrong bearer token", status=401)

    def manager_of(request: Request) -> SearchManager:
        return request.app.state.manager  # type: ignore[no-any-return]

    def find(search_id: str, request: Request) -> SearchRecord:
        record = manager_of(request).get(search_id)
        if record is None:
            raise RequestError(f"no search {search_id!r}", status=404)
        return record

    async def read_body(request: Request) -> bytes:
        return await _read_body(request, config.limits.max_body_bytes)

    async def queue(job: Job, model_name: str, request: Request,
                    check: Callable[[Job], None] = check_family) -> SearchRecord:
        """Check a built job against its model's family from its config files (``check``),
        then against the model (loading it on first use), and queue it: what every route that
        starts a search does (/v1/searches, A1111's txt2img)."""
        await run_in_threadpool(check, job)
        model = await run_in_threadpool(_describe, backend, job)
        check_against_model(job, model, config, verifiers)
        try:
            return manager_of(request).submit(job, model_name)
        except QueueFull as error:
            raise RequestError(str(error), limit="max_queue", status=429) from None

    # Without a token nothing is enforced, so the OpenAPI document must declare no security
    # scheme and no 401 either: the dependency (which declares them) is added only with one.
    if config.token is None:
        router = APIRouter(prefix="/v1", responses={
            status: answer for status, answer in ERRORS.items() if status != 401})
    else:
        router = APIRouter(prefix="/v1", dependencies=[Depends(authorise)], responses=ERRORS)

    @router.get("/info", response_model=schemas.ServiceInfo)
    def info() -> schemas.ServiceInfo:
        """What this service offers: models, strategies, verifiers, limits."""
        return schemas.ServiceInfo(
            version=__version__, auth=config.token is not None, models=sorted(config.models),
            strategies=strategy_names(), verifiers=verifiers, limits=config.limits.as_dict(),
            executor=backend.describe_line())

    @router.post("/searches", status_code=202, response_model=schemas.SearchDetail,
                 responses={413: {"model": schemas.ErrorResponse,
                                  "description": "Body over max_body_bytes."},
                            429: {"model": schemas.ErrorResponse,
                                  "description": "The queue is full (max_queue)."}},
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": {
                         "$ref": "#/components/schemas/SearchRequest"}}}}})
    async def submit(request: Request, response: Response) -> schemas.SearchDetail:
        """Queue a search. The body has a job file's fields; the answer has its id and links."""
        body = parse_body(await read_body(request))
        record = await queue(build_job(body, config, verifiers), _model_name(body, config),
                             request)
        response.headers["Location"] = f"/v1/searches/{record.id}"
        return _detail(record, manager_of(request))

    @router.get("/searches", response_model=schemas.SearchList)
    def list_searches(request: Request) -> schemas.SearchList:
        """Every search the service's data dir holds (restarts included), oldest first."""
        return schemas.SearchList(searches=[_summary(r) for r in manager_of(request).all()])

    @router.get("/searches/{search_id}", response_model=schemas.SearchDetail)
    def get_search(search_id: str, request: Request) -> schemas.SearchDetail:
        """Status, progress in NFEs, best so far, and the result summary once done."""
        return _detail(find(search_id, request), manager_of(request))

    @router.post("/searches/{search_id}/cancel", status_code=202,
                 response_model=schemas.SearchDetail,
                 responses={409: {"model": schemas.ErrorResponse,
                                  "description": "The search is not queued or running."}})
    def cancel(search_id: str, request: Request) -> schemas.SearchDetail:
        """Cancel a search: a queued one at once, a running one after its batch in flight."""
        record = find(search_id, request)
        try:
            record = manager_of(request).cancel(record)
        except NotCancellable as error:
            raise RequestError(str(error), status=409) from None
        return _detail(record, manager_of(request))

    @router.post("/searches/{search_id}/resume", status_code=202,
                 response_model=schemas.SearchDetail,
                 responses={409: {"model": schemas.ErrorResponse,
                                  "description": "The search is neither interrupted nor "
                                                 "cancelled with finished work."},
                            429: {"model": schemas.ErrorResponse,
                                  "description": "The queue is full (max_queue)."}})
    def resume(search_id: str, request: Request) -> schemas.SearchDetail:
        """Queue an interrupted search (or a cancelled one with finished work) again. It
        continues its run folder: finished candidates are read back, never computed again."""
        record = find(search_id, request)
        try:
            record = manager_of(request).resume(record)
        except NotResumable as error:
            raise RequestError(str(error), status=409) from None
        except QueueFull as error:
            raise RequestError(str(error), limit="max_queue", status=429) from None
        return _detail(record, manager_of(request))

    @router.get("/searches/{search_id}/events",
                responses={200: {"content": {"text/event-stream": {}},
                                 "description": "Server-sent events: snapshot, status, "
                                                "progress."},
                           429: {"model": schemas.ErrorResponse,
                                 "description": "The search has max_event_streams streams "
                                                "open already."}})
    async def events(search_id: str, request: Request,
                     last_event_id: int = Header(-1, ge=-1)) -> StreamingResponse:
        """Progress as server-sent events, from the first kept (or after ``Last-Event-ID``) to
        the end: ``status`` {status, error} and ``progress`` {nfe_done, nfe_total,
        prompt_index, candidates: [...], best}. The newest max_events are kept: a client that
        needs an older event, or sends an id from before a restart, first gets ``snapshot``
        {status, error, nfe_done, nfe_total, best: [per prompt]}, the state now. The stream
        closes after the final status."""
        record = find(search_id, request)
        try:
            release = streams.take(record.id)
        except TooManyStreams as error:
            raise RequestError(str(error), limit="max_event_streams", status=429) from None

        async def stream() -> AsyncIterator[str]:
            try:
                async for event in record.events.follow(last_event_id,
                                                        lambda: snapshot(record)):
                    yield ": keep-alive\n\n" if event is None else event.sse()
            finally:
                release()

        # the background task releases the slot too, should the stream never start
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 background=BackgroundTask(release),
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    size_query = Query(None, ge=1, description="Longest side to shrink the image to.")

    @router.get("/searches/{search_id}/images/{prompt_index}/{candidate}.png",
                response_class=Response, responses=PNG)
    async def candidate_image(search_id: str, request: Request,
                              prompt_index: int = PathParam(ge=0),
                              candidate: int = PathParam(ge=0),
                              size: int | None = size_query) -> Response:
        """A candidate's final image. The service's searches write every candidate's (the
        job's ``images: all``); candidates scored only on intermediates have none."""
        record = find(search_id, request)
        path = record.run_dir / run_folder.candidate_image(prompt_index, candidate)
        return await _png(path, size, config, f"no image for candidate {candidate} of prompt "
                                              f"{prompt_index} of search {search_id}")

    @router.get("/searches/{search_id}/best/{prompt_index}.png", response_class=Response,
                responses=PNG)
    async def best_image(search_id: str, request: Request, prompt_index: int = PathParam(ge=0),
                         size: int | None = size_query) -> Response:
        """A prompt's best image: the best so far while running, the final best once done."""
        record = find(search_id, request)
        missing = f"search {search_id} has no best image for prompt {prompt_index} yet"
        return await _png(record.run_dir / run_folder.best_image(prompt_index), size, config,
                          missing)

    @router.get("/searches/{search_id}/results.json",
                responses={200: {"content": {"application/json": {}},
                                 "description": "The run's results.json."},
                           409: {"model": schemas.ErrorResponse,
                                 "description": "The search is not done."}})
    def results(search_id: str, request: Request) -> FileResponse:
        """Everything the run recorded: every candidate with its seed, parent, step, scores."""
        record = find(search_id, request)
        status = summary_fields(record)["status"]
        if status is not Status.DONE:
            raise RequestError(f"search {search_id} is {status.value}; results.json is written "
                               f"when it is done", status=409)
        return FileResponse(record.run_dir / run_folder.RESULTS, media_type="application/json")

    app.include_router(router)
    app.include_router(a1111.create_router(config, verifiers, queue=queue, read_body=read_body))

    @app.get("/v1/health", response_model=schemas.Health, tags=["health"])
    def health() -> schemas.Health:
        """Liveness, without a token."""
        return schemas.Health(status="ok")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    _document_request_body(app, config, verifiers)
    return app


# ---- helpers -------------------------------------------------------------------------------------
async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) as soon as it is known to be over ``limit`` bytes."""
    too_big = RequestError(f"body: over this service's limit of {limit} bytes (max_body_bytes)",
                           field="body", limit="max_body_bytes", status=413)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(backend: Backend, job: Job) -> Any:
    """The model's info; a model or verifier that cannot load is the request's fault (422)."""
    from diffsearch.verifiers.base import VerifierError

    try:
        return backend.describe(job)
    except VerifierError as error:
        raise RequestError(f"verifier: {error}", field="verifier") from None
    except DiffsearchError as error:
        from diffsearch.pipelines.sources import ModelLoadError

        named = str(error).partition(":")[0]
        if named in Job.model_fields:  # the model cannot take a setting (width: ...)
            raise RequestError(str(error), field=named) from None
        field = "model" if isinstance(error, ModelLoadError) else None
        raise RequestError(f"{field or 'job'}: {error}", field=field) from None


def _model_name(body: dict[str, Any], config: ServiceConfig) -> str:
    """The served name a search is listed under (the request's, else the default model)."""
    return str(body.get("model", default_model(config)))


async def _png(path: Path, size: int | None, config: ServiceConfig, missing: str) -> Response:
    limit = config.limits.max_image_side
    if size is not None and size > limit:
        raise RequestError(f"size: {size} is over this service's limit of {limit} pixels "
                           f"(max_image_side)", field="size", limit="max_image_side")
    if not path.is_file():
        raise RequestError(missing, status=404)
    if size is None:
        return FileResponse(path, media_type="image/png")
    return Response(await run_in_threadpool(_shrunk_png, path, size), media_type="image/png")


def _shrunk_png(path: Path, size: int) -> bytes:
    with Image.open(path) as image:
        image.thumbnail((size, size), Image.Resampling.LANCZOS)  # never enlarges
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _urls(record: SearchRecord) -> schemas.Links:
    base = f"/v1/searches/{record.id}"
    return schemas.Links(self=base, events=f"{base}/events", cancel=f"{base}/cancel",
                         resume=f"{base}/resume", results=f"{base}/results.json")


def _summary(record: SearchRecord, state: dict[str, Any] | None = None) -> schemas.SearchSummary:
    state = state or summary_fields(record)
    best = [state["best"].get(i) for i in range(len(record.job.prompts))]
    return schemas.SearchSummary(
        id=record.id, status=state["status"].value, model=record.model_name,
        strategy=record.job.strategy.name, budget=record.job.budget,
        prompts=record.job.prompt_texts, created_at=record.created_at,
        started_at=state["started_at"], finished_at=state["finished_at"],
        progress=schemas.Progress(nfe_done=state["nfe_done"], nfe_total=state["nfe_total"]),
        best=[None if b is None else schemas.BestSoFar(
            prompt_index=i, candidate=b.candidate, score=b.score, nfe=b.nfe,
            image=image_url(record.id, i, b.candidate)) for i, b in enumerate(best)],
        error=state["error"], links=_urls(record))


def _detail(record: SearchRecord, manager: SearchManager) -> schemas.SearchDetail:
    state = summary_fields(record)
    job = record.job.model_dump(mode="json", exclude=set(SERVICE_FIELDS))
    job["model"] = record.model_name
    return schemas.SearchDetail(
        **_summary(record, state).model_dump(), job=job,
        queue_position=manager.queue_position(record),
        history=[state["history"].get(i, []) for i in range(len(record.job.prompts))],
        result=state["result"])


def _error_response(request: Request, status: int, detail: str, field: str | None = None,
                    limit: str | None = None, headers: dict[str, str] | None = None
                    ) -> JSONResponse:
    body = schemas.ErrorResponse(detail=detail, field=field, limit=limit).model_dump()
    if a1111.serves(request.url.path):  # A1111 clients look for "error" too
        body = a1111.error_body(status, body)
    return JSONResponse(body, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return _error_response(request, error.status, error.message, error.field, error.limit,
                               headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, error: RequestValidationError
                                ) -> JSONResponse:
        first = error.errors()[0]
        location = [str(part) for part in first["loc"]]
        field = ".".join(location[1:] if location[0] in ("path", "query", "header")
                         else location)
        return _error_response(request, 422, f"{field}: {first['msg']}", field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        headers = error.headers
        if error.status_code == 405:  # Starlette names the methods of one route, not the path's
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return _error_response(request, error.status_code, str(error.detail), headers=headers)


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path (asked of each route through
    the routing's public ``matches``, so routes inside included routers count too)."""
    def served(method: str) -> bool:
        scope = {**request.scope, "method": method}
        return any(route.matches(scope)[0] is Match.FULL for route in request.app.routes)

    return [method for method in HTTP_METHODS if served(method)]


def _document_request_body(app: FastAPI, config: ServiceConfig, verifiers: list[str]) -> None:
    """Put the request body's schema into the OpenAPI document (the endpoint reads the raw body
    and validates it with Job itself, so the schema documents, it does not validate)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            request, definitions = request_schema(config, verifiers)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(definitions)
            components["SearchRequest"] = request
            components.update(a1111.schema_components(request))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
