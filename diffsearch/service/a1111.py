"""A1111-compatible routes (``/sdapi/v1``), so that tools built on the AUTOMATIC1111 web UI's API
(Krita, Photoshop, GIMP and Blender plugins, web front ends) run a search unchanged.

``POST /sdapi/v1/txt2img`` is one search of one prompt, queued through the same
:class:`~diffsearch.service.searches.SearchManager` as ``/v1/searches`` (so it is listed,
persisted and can be followed there), and answered when it ends, as A1111 answers: the
``batch_size x n_iter`` best distinct images found (by the guiding verifier's reward), as base64
PNGs, with an ``info`` JSON string giving each image's seed and score, the search id, strategy
and NFEs. How the search runs comes, first to last, from the request's ``alwayson_scripts``
entry :data:`SCRIPT` (``{"args": [strategy, budget, verifier]}`` or ``{"args": [{"strategy":
..., "budget": ..., "verifier": ...}]}``), its ``override_settings`` (the options below), the
options set with ``POST /sdapi/v1/options``, and the operator's defaults
(:class:`~diffsearch.service.config.A1111Defaults`).

What a field asks for is done, or the request is refused (422, naming the field): A1111
features this service does not have (hires fix, face restoration, styles, variation seeds,
scripts, ...) are accepted only at the values that ask for nothing, so no setting is silently
dropped. The size, negative prompt and sampler go to the job's own fields and are checked
against the model's family before anything is queued. That mapping is
:mod:`~diffsearch.service.a1111_requests`; this module has the routes and their answers.

Auth is the service's token, sent as a bearer token or as HTTP basic auth's password (any user
name): A1111's own ``--api-auth`` is basic auth, so that is what its clients send (webuiapi's
``set_auth`` sends nothing else).
"""

from __future__ import annotations

import base64
import hmac
import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.security import (
    HTTPAuthorizationCredentials,
    HTTPBasic,
    HTTPBasicCredentials,
    HTTPBearer,
)
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from diffsearch import run_folder
from diffsearch.job import Job, describe_validation_error, verifier_label
from diffsearch.service.a1111_requests import (
    MODEL_OPTION,
    OPTION_PREFIX,
    PREFIX,
    SAMPLERS,
    SCRIPT,
    SEARCH_SETTINGS,
    Plan,
    Txt2ImgRequest,
    check_family,
    checked_options,
    default_options,
    family_is_flow,
    map_request,
    option_names,
    renamed,
)
from diffsearch.service.config import ServiceConfig
from diffsearch.service.requests import RequestError, parse_body
from diffsearch.service.searches import NotCancellable, SearchRecord, Status, summary_fields

INTERNAL_ERROR = "internal error"
"""How a failed search's error starts when the service, not the request, was at fault (see
:meth:`SearchManager._run`)."""

class Options(BaseModel):
    """What GET /sdapi/v1/options answers: the model, and the search that txt2img runs when a
    request does not say."""

    sd_model_checkpoint: str
    diffsearch_strategy: str | dict[str, Any]
    diffsearch_budget: int | str
    diffsearch_verifier: str | dict[str, Any]


class Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="Base64 PNGs, best first.")
    parameters: dict[str, Any] = Field(description="The request, as read.")
    info: str = Field(description="JSON: seeds, scores, the search id, strategy, NFEs.")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    job: str = Field("", description="The search id.")
    job_count: int = Field(0, description="txt2img searches queued or running.")
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = Field(0, description="NFEs done.")
    sampling_steps: int = Field(0, description="The search's NFE budget.")


class ProgressResponse(BaseModel):
    progress: float = Field(description="0..1, in NFEs.")
    eta_relative: float = Field(description="Seconds left, from the pace so far.")
    state: ProgressState
    current_image: str | None = Field(description="Base64 PNG of the best so far.")
    textinfo: str | None


class Sampler(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str] = Field(default_factory=dict)


class SdModel(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class InterruptResponse(BaseModel):
    interrupted: str | None = Field(description="The search stopped, if one ran.")


class A1111Error(BaseModel):
    """An error as A1111 clients read it (``error``, ``detail``), with the service's ``field``
    and ``limit``."""

    error: str
    detail: str
    field: str | None = None
    limit: str | None = None


def serves(path: str) -> bool:
    """Whether a request path is one of these routes (its errors get an ``error`` key)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def error_body(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """The service's error body with A1111's ``error`` (the status's name) in front."""
    return A1111Error(error=HTTPStatus(status).phrase, **body).model_dump()


# ---- the answer ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Found:
    candidate: int
    seed: int
    score: float
    scores: dict[str, float]
    png: bytes


def best_images(record: SearchRecord, count: int) -> list[Found]:
    """The final images of the search's prompt's ``count`` best candidates (each candidate
    once) by the guiding reward, best first: from results.json when the search is done, else
    from its store (a stopped search: what finished)."""
    run_dir = record.run_dir
    results = run_dir / run_folder.RESULTS
    if results.is_file():
        prompt = json.loads(results.read_text())["prompts"][0]
        answers = [(c["candidate"], c["seed"], c["reward"], c["scores"])
                   for c in prompt["candidates"]
                   if c["image"] is not None and c["reward"] is not None and not c["error"]]
    else:
        answers = _stored_answers(run_dir, record.job)
    answers.sort(key=lambda a: (-a[2], a[0]))
    found: list[Found] = []
    for candidate, seed, score, scores in answers:
        path = run_dir / run_folder.candidate_image(0, candidate)
        if path.is_file():
            found.append(Found(candidate, seed, score, scores, path.read_bytes()))
        if len(found) == count:
            break
    return found


def _stored_answers(run_dir: Path, job: Job) -> list[tuple[int, int, float, dict[str, float]]]:
    from diffsearch.run_reading import stored_answers
    from diffsearch.store import RunStore

    store_path = run_dir / run_folder.STORE
    if not store_path.exists():
        return []
    store = RunStore.open(store_path, writable=False)
    candidates = store.finished_candidates(0) if store.has_prompt(0) else []
    return [(c.candidate, c.seed, float(c.reward), dict(c.scores))  # type: ignore[arg-type]
            for c in stored_answers(candidates, verifier_label(job.verifier))]


def info_of(plan: Plan, request: Txt2ImgRequest, record: SearchRecord, found: list[Found],
            sizes: list[tuple[int, int]]) -> dict[str, Any]:
    """A1111's info fields for what was made, and the search's own (``diffsearch``)."""
    job, state = record.job, summary_fields(record)
    width, height = sizes[0] if sizes else (job.width, job.height)
    seeds = [f.seed for f in found]
    return {
        "prompt": request.prompt, "all_prompts": [request.prompt] * len(found),
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * len(found),
        "seed": seeds[0] if seeds else job.seed, "all_seeds": seeds,
        "all_scores": [f.score for f in found],
        "subseed": -1, "all_subseeds": [-1] * len(found), "subseed_strength": 0,
        "width": width, "height": height, "sampler_name": plan.sampler_name,
        "cfg_scale": job.guidance_scale, "steps": job.num_steps,
        "batch_size": request.batch_size, "n_iter": request.n_iter,
        "sd_model_name": plan.model_name, "sd_model_hash": None, "index_of_first_image": 0,
        "infotexts": [f"{request.prompt}\nSeed: {f.seed}, Score: {f.score:.6g}, Search: "
                      f"{record.id}, Candidate: {f.candidate}" for f in found],
        "job_timestamp": _timestamp(state["started_at"]),
        "diffsearch": {
            "search_id": record.id, "status": state["status"].value,
            "strategy": job.strategy.model_dump(), "budget": job.budget,
            "verifier": verifier_label(job.verifier), "nfe": state["nfe_done"],
            "images_asked": plan.images,
            "candidates": [{"candidate": f.candidate, "seed": f.seed, "score": f.score,
                            "scores": f.scores} for f in found],
            "links": {"search": f"/v1/searches/{record.id}",
                      "results": f"/v1/searches/{record.id}/results.json"},
        },
    }


def _timestamp(started: float | None) -> str:
    return "0" if started is None else time.strftime("%Y%m%d%H%M%S", time.gmtime(started))


def _png_size(png: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR (no decoding)."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


# ---- the routes ----------------------------------------------------------------------------------
@dataclass
class Sessions:
    """The routes' state: the options, and the txt2img searches not yet answered (oldest
    first: progress and interrupt act on the first)."""

    options: dict[str, Any]
    waiting: list[SearchRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def current(self) -> SearchRecord | None:
        """The running txt2img search, else the next to run."""
        with self.lock:
            waiting = list(self.waiting)
        states = [(record, summary_fields(record)["status"]) for record in waiting]
        running = [record for record, status in states if status is Status.RUNNING]
        return (running or waiting or [None])[0]


def create_router(config: ServiceConfig, verifiers: list[str], *,
                  queue: Callable[..., Awaitable[SearchRecord]],
                  read_body: Callable[[Request], Awaitable[bytes]]) -> APIRouter:
    """The /sdapi/v1 routes; ``queue(job, model name, request, check)`` checks a job against
    its model (and with ``check``) and queues it, and ``read_body`` reads a body within the
    service's size limit (both the service's own)."""
    sessions = Sessions(options=default_options(config, verifiers))
    errors: dict[int | str, dict[str, Any]] = {
        status: {"model": A1111Error, "description": description}
        for status, description in ((401, "Missing or wrong token."),
                                    (422, "Invalid parameter."))
        if status != 401 or config.token is not None}
    dependencies = [Depends(authoriser(config.token))] if config.token is not None else []
    router = APIRouter(prefix=PREFIX, tags=["a1111"], dependencies=dependencies,
                       responses=errors)

    def manager_of(request: Request) -> Any:
        return request.app.state.manager

    @router.post("/txt2img", response_model=Txt2ImgResponse,
                 responses={413: {"model": A1111Error, "description": "Body over max_body_bytes."},
                            429: {"model": A1111Error,
                                  "description": "The queue is full (max_queue)."},
                            500: {"model": A1111Error,
                                  "description": "The search failed on an internal error (one "
                                                 "that bad input caused is a 422)."}},
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": {
                         "$ref": "#/components/schemas/Txt2ImgRequest"}}}}})
    async def txt2img(request: Request) -> Txt2ImgResponse:
        """Run one search and answer with its best images (batch_size x n_iter of them),
        when it ends; it is listed under /v1/searches meanwhile."""
        data = parse_body(await read_body(request))
        try:
            body = Txt2ImgRequest.model_validate(data)
        except ValidationError as error:
            message = describe_validation_error(error)
            raise RequestError(message, field=message.partition(":")[0]) from None
        with sessions.lock:
            options = dict(sessions.options)
        plan = await run_in_threadpool(map_request, body, options, config, verifiers)
        with renamed(plan.sources):
            record = await queue(plan.job, plan.model_name, request, check_family)
        with sessions.lock:
            sessions.waiting.append(record)
        try:
            async for _ in record.events.follow(-1, lambda: {}):
                pass  # until its final status
        finally:
            with sessions.lock:
                sessions.waiting.remove(record)
        state = summary_fields(record)
        if state["status"] is Status.FAILED:  # bad input the engine found (a DiffsearchError)
            error = str(state["error"])     # is the request's fault; a bug is the service's
            raise RequestError(f"search {record.id} failed: {error}",
                               status=500 if error.startswith(INTERNAL_ERROR) else 422)
        found = await run_in_threadpool(best_images, record, plan.images)
        info = info_of(plan, body, record, found, [_png_size(f.png) for f in found])
        return Txt2ImgResponse(images=[_b64(f.png) for f in found] if body.send_images else [],
                               parameters=body.model_dump(), info=json.dumps(info))

    @router.get("/progress", response_model=ProgressResponse)
    def progress(skip_current_image: Annotated[bool, Query()] = False) -> ProgressResponse:
        """The running txt2img search (else the next): its NFEs as progress, and its best
        image so far as ``current_image``."""
        record = sessions.current()
        if record is None:
            return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState(),
                                    current_image=None, textinfo=None)
        state = summary_fields(record)
        done, total = state["nfe_done"], state["nfe_total"] or 0
        fraction = min(done / total, 1.0) if total else 0.0
        started = state["started_at"]
        elapsed = time.time() - started if started else 0.0
        eta = elapsed * (1 - fraction) / fraction if fraction else 0.0
        image = None
        best = record.run_dir / run_folder.best_image(0)
        if not skip_current_image and best.is_file():
            image = _b64(best.read_bytes())
        score = state["best"].get(0)
        return ProgressResponse(
            progress=fraction, eta_relative=eta, current_image=image,
            state=ProgressState(interrupted=record.cancel.is_set(), job=record.id,
                                job_count=len(sessions.waiting),
                                job_timestamp=_timestamp(started), sampling_step=done,
                                sampling_steps=total),
            textinfo=f"search {record.id}: {state['status'].value}, {done}/{total} NFE"
                     + ("" if score is None else f", best {score.score:.4g}"))

    @router.post("/interrupt", response_model=InterruptResponse)
    def interrupt(request: Request) -> InterruptResponse:
        """Stop the running txt2img search (else the next) after its batch in flight; its
        txt2img answers with the best images finished by then."""
        record = sessions.current()
        if record is None:
            return InterruptResponse(interrupted=None)
        try:
            manager_of(request).cancel(record)
        except NotCancellable:  # it ended meanwhile: nothing to stop
            return InterruptResponse(interrupted=None)
        return InterruptResponse(interrupted=record.id)

    @router.get("/sd-models", response_model=list[SdModel])
    def sd_models() -> list[SdModel]:
        """The served models (their names are the checkpoint titles)."""
        return [SdModel(title=name, model_name=name, filename=name)
                for name in sorted(config.models)]

    @router.get("/samplers", response_model=list[Sampler])
    async def samplers() -> list[Sampler]:
        """The A1111 samplers some served model takes."""
        families = await run_in_threadpool(
            lambda: {family_is_flow(source) for source in config.models.values()})
        return [Sampler(name=name, aliases=list(aliases))
                for name, (aliases, jobs) in SAMPLERS.items()
                if any(flow in jobs for flow in families if flow is not None)]

    @router.get("/options", response_model=Options)
    def get_options() -> Options:
        """The model and the search txt2img runs when a request does not say."""
        with sessions.lock:
            return Options(**sessions.options)

    @router.post("/options", response_model=Options,
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": {
                         "$ref": "#/components/schemas/OptionsUpdate"}}}}})
    async def set_options(request: Request) -> Options:
        """Change some options (for every later request, as in A1111); the answer has them
        all."""
        update = parse_body(await read_body(request))
        if not isinstance(update, dict):
            raise RequestError("body: must be a JSON object of options", field="body")
        for key in update:
            if key not in option_names():
                raise RequestError(f"{key}: not an option of this service; it has "
                                   f"{', '.join(option_names())}", field=key)
        with sessions.lock:
            options = {**sessions.options, **update}
        checked = await run_in_threadpool(checked_options, options, config, verifiers)
        with sessions.lock:
            sessions.options = checked
            return Options(**checked)

    return router


def authoriser(token: str) -> Callable[..., None]:
    """The token as a bearer token, or as basic auth's password (any user name)."""
    bearer = HTTPBearer(auto_error=False, description="The service's token.")
    basic = HTTPBasic(auto_error=False, description="Any user name; the token as password.")

    def authorise(
            bearer_credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
            basic_credentials: HTTPBasicCredentials | None = Depends(basic),  # noqa: B008
    ) -> None:
        if bearer_credentials is not None:
            presented = bearer_credentials.credentials
        elif basic_credentials is not None:
            presented = basic_credentials.password
        else:
            raise RequestError("missing token: send 'Authorization: Bearer <token>', or basic "
                               "auth with the token as the password", status=401)
        if not hmac.compare_digest(presented.encode(), token.encode()):
            raise RequestError("wrong token", status=401)

    return authorise


def schema_components(search_request: dict[str, Any]) -> dict[str, Any]:
    """The request bodies' schemas for the OpenAPI document (the routes read raw bodies), the
    search settings' taken from the /v1 request's (``search_request``), so both say the same:
    served models, offered verifiers, strategies and their option rules, the budget's form."""
    from diffsearch.strategies.registry import strategy_names

    fields = search_request["properties"]
    setting = {
        "strategy": {"anyOf": [{"type": "string", "enum": strategy_names()},
                               fields["strategy"]]},
        "budget": {"anyOf": fields["budget"]["anyOf"]},
        "verifier": {"allOf": fields["verifier"]["allOf"]},
    }
    model = {"type": "string", "enum": fields["model"]["enum"]}
    options = {MODEL_OPTION: model, **{OPTION_PREFIX + name: schema
                                       for name, schema in setting.items()}}
    script = {"type": "object", "required": ["args"], "properties": {"args": {"anyOf": [
        {"type": "array", "maxItems": len(SEARCH_SETTINGS),
         "prefixItems": [{"anyOf": [{"type": "null"}, setting[name]]}
                         for name in SEARCH_SETTINGS]},
        {"type": "array", "minItems": 1, "maxItems": 1, "prefixItems": [
            {"type": "object", "properties": setting, "additionalProperties": False}]}]}}}
    request = Txt2ImgRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    properties = request["properties"]
    properties["prompt"].update(fields["prompts"]["items"])
    properties["override_settings"] = {"type": "object", "properties": options,
                                       "additionalProperties": False}
    properties["alwayson_scripts"] = {
        "type": "object", "properties": {SCRIPT: script},
        "additionalProperties": {"type": "object", "required": ["args"], "properties": {
            "args": {"enum": [[], [False]]}}},
        "description": f"{SCRIPT!r} selects the search: args [strategy, budget, verifier] or "
                       f"[{{strategy, budget, verifier}}]; other scripts must be off."}
    update = {"title": "OptionsUpdate", "type": "object", "properties": options,
              "additionalProperties": False,
              "description": "Some options; the others keep their values."}
    return {"Txt2ImgRequest": request, "OptionsUpdate": update}
