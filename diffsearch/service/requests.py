"""Turn a request body into a :class:`~diffsearch.job.Job`, or say exactly what is wrong.

A request has the fields of a job file and goes through the same validation (``Job``), so a
search submitted over HTTP means what the same job file means. Before that, everything that could
reach beyond the service is refused: fields the service decides (where work runs, devices,
threads, output), model names not in its allow-list, verifier names it does not offer, and any
string in verifier or strategy options that looks like a file path (verifiers and TTSnap
checkpoints can be loaded "by path"). Validation checks every strategy option's type and range;
after it the limits are checked. The budget limit and the strategy checks that need the model's
step count (a budget that pays for the options) run once the model is known
(:func:`check_against_model`), by building the strategies exactly as the engine will; what the
model's family takes (sampler, size, negative prompt) is read from its config files before it
loads (:func:`check_family`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ValidationError

from diffsearch.errors import DiffsearchError, JobError
from diffsearch.job import Job, describe_validation_error
from diffsearch.runtime import ModelInfo
from diffsearch.service.config import ServiceConfig
from diffsearch.strategies.registry import build_strategies

SERVICE_FIELDS = frozenset({
    "executor", "workers", "scheduler", "allow_download", "device", "dtype", "threads",
    "compute_batch", "batch_size",
})
"""Job fields the service sets itself: they decide where and how work runs, not what it finds."""

PATH_FIELDS = frozenset({"prompts_file"})
"""Job-file fields that read files: a request names no paths."""

VERIFIER_SERVICE_KEYS = frozenset({"device"})
"""Verifier spec keys the service decides (a verifier runs where the model runs)."""

NAME_PATTERN = r"^([^/\\\x00~.][^/\\\x00]*)?$"
"""What every string in strategy and verifier options (and every key) must match: no ``/``,
``\\`` or NUL, and no leading ``~`` or ``.``, so that nothing in a request can name a file. The
OpenAPI document states this pattern on those fields (one rule, checked and documented)."""
_NAME = re.compile(NAME_PATTERN)

NOT_BLANK = (r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f"
             r"\u3000]")
"""A character that Python's ``str.strip()`` keeps: a prompt needs one (Job refuses blank ones).
Spelled out for the schema's pattern, since ECMA's ``\\S`` (which JSON Schema means) differs."""


class RequestError(Exception):
    """A request the service refuses: one line naming the field (and the limit, if one)."""

    def __init__(self, message: str, *, field: str | None = None, limit: str | None = None,
                 status: int = 422) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.limit = limit
        self.status = status


def parse_body(raw: bytes) -> Any:
    """JSON without NaN/Infinity (which are not JSON, though Python accepts them)."""
    def reject(constant: str) -> Any:
        raise ValueError(f"{constant} is not allowed in JSON")

    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=reject)
    except UnicodeDecodeError:
        raise RequestError("body: not UTF-8 text", field="body") from None
    except json.JSONDecodeError as error:
        raise RequestError(f"body: not valid JSON: {error.msg} (line {error.lineno} column "
                           f"{error.colno})", field="body") from None
    except ValueError as error:
        raise RequestError(f"body: not valid JSON: {error}", field="body") from None
    _check_text(body, "body")
    return body


def _check_text(value: Any, field: str) -> None:
    """JSON escapes can smuggle lone UTF-16 surrogates ("\\ud800") into strings, which no file,
    store or answer can encode: refuse them here, naming where they are."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(f"{field}: a string holds a lone UTF-16 surrogate escape; send "
                               f"real Unicode text", field=field) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, field)
            _check_text(item, f"{field}.{key}" if field != "body" else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_text(item, f"{field}.{index}")


API_JUDGE = "openai"
"""The verifier that calls out over the network: only to the operator's judge endpoints."""
ENSEMBLE = "ensemble"
"""The verifier whose ``members`` are verifier specs (each checked like the job's own)."""
API_JUDGE_SERVICE_KEYS = frozenset({"api_key_env", "allow_network", "cache_dir"})
"""Its options the service sets itself: which key is sent, the network opt-in, the disk."""


def build_job(body: Any, config: ServiceConfig, verifier_names: Iterable[str]) -> Job:
    """Validate a request body into the job the service will run (limits not needing the
    model included)."""
    if not isinstance(body, dict):
        raise RequestError("body: must be a JSON object of job fields (prompts, model, ...)",
                           field="body")
    for name in body:
        if name in SERVICE_FIELDS:
            raise RequestError(f"{name}: set by the service, not by a request", field=name)
        if name in PATH_FIELDS:
            raise RequestError(f"{name}: the service reads no files; give prompts", field=name)
    offered = sorted(verifier_names)
    data = dict(body)
    for field, spec in _verifier_specs(data):
        _place_api_judge(spec, field, config)
    data["model"] = _served_model(data.get("model", default_model(config)), config)
    data.setdefault("verifier", default_verifier(offered))
    data.setdefault("images", "all")  # the page shows every candidate as it arrives
    data.update(executor=config.executor, threads=config.threads, batch_size=config.batch_size)
    if config.executor == "dask":
        data.update(workers=config.workers, scheduler=config.scheduler)
    try:
        job = Job.model_validate(data)
    except ValidationError as error:
        message = describe_validation_error(error)
        raise RequestError(message, field=message.partition(":")[0]) from None
    _check_prompts(job, config)
    _check_verifier(job.verifier, "verifier", set(offered))
    for index, spec in enumerate(job.eval_verifiers):
        _check_verifier(spec, f"eval_verifiers.{index}", set(offered))
    _reject_paths(job.strategy.options, "strategy")
    return job


def default_model(config: ServiceConfig) -> str:
    """A request without ``model`` gets the bundled one if served, else the first served."""
    return "shapes" if "shapes" in config.models else sorted(config.models)[0]


def default_verifier(offered: list[str]) -> str:
    """A request without ``verifier`` gets a job file's default if offered, else the first."""
    default = Job.model_fields["verifier"].default
    return default if default in offered or not offered else offered[0]


def request_schema(config: ServiceConfig, verifier_names: Iterable[str]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON schema of a request body and its definitions, for the OpenAPI document.

    It is Job's own schema without the service's fields, narrowed to what this service accepts
    (served models, offered verifiers, known strategies, prompt limits) so that tools can build
    forms from it. Limits that depend on the model (an ``Nx`` budget, strategy options) are
    checked on submission only.
    """
    from diffsearch.strategies.registry import strategy_names

    schema = Job.model_json_schema(ref_template="#/components/schemas/{model}")
    definitions = schema.pop("$defs", {})
    properties = schema["properties"]
    for name in SERVICE_FIELDS:
        properties.pop(name, None)
    limits, offered = config.limits, sorted(verifier_names)
    properties["prompts"].update(maxItems=limits.max_prompts, items={
        "type": "string", "minLength": 1, "maxLength": limits.max_prompt_chars,
        "pattern": NOT_BLANK})
    properties["model"].update(enum=sorted(config.models), default=default_model(config))
    strategy = definitions["StrategySpec"]
    strategy["properties"]["name"]["enum"] = strategy_names()
    strategy.update(propertyNames={"pattern": NAME_PATTERN}, additionalProperties=_OPTION,
                    description=(
                        "A strategy's name and its options (the other keys). Every string in the "
                        "options, and every key, must match the pattern: no '/', '\\' or NUL, "
                        "no leading '~' or '.' (a request names no files). Verifiers named in "
                        "options (TTSnap's verifiers, Tree-of-Frames' image_verifier) must be "
                        "offered ones. Each option's type and range are the strategy's; those "
                        "that need the model (a budget that pays for them) are checked on "
                        "submission."))
    definitions["OptionValue"] = _option_value_schema()
    definitions["ServedVerifier"] = _verifier_schema(offered, config)
    properties["verifier"] = {"allOf": [_SERVED_VERIFIER], "default": default_verifier(offered),
                              "title": "Verifier"}
    properties["eval_verifiers"]["items"] = _SERVED_VERIFIER
    properties["budget"]["anyOf"] = [
        {"type": "integer", "minimum": 1, "maximum": limits.max_budget_nfe},
        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*x\s*$"}]
    schema.update(title="SearchRequest", description=(
        "A job file's fields; the service sets where and how the work runs. Limits that need "
        "the model (an Nx budget's NFEs, strategy options) are checked on submission."))
    return schema, definitions


_OPTION = {"$ref": "#/components/schemas/OptionValue"}
_SERVED_VERIFIER = {"$ref": "#/components/schemas/ServedVerifier"}


def _option_value_schema() -> dict[str, Any]:
    """An option's value, to any depth: strings (and keys) match :data:`NAME_PATTERN`."""
    return {"title": "OptionValue", "description": (
        "A strategy or verifier option's value: a number, boolean, null, a string matching the "
        "pattern (no '/', '\\' or NUL, no leading '~' or '.'), or a list or object of these, "
        "with keys matching the pattern too."), "anyOf": [
        {"type": "string", "pattern": NAME_PATTERN}, {"type": "number"}, {"type": "boolean"},
        {"type": "null"}, {"type": "array", "items": _OPTION},
        {"type": "object", "propertyNames": {"pattern": NAME_PATTERN},
         "additionalProperties": _OPTION}]}


def _verifier_schema(offered: list[str], config: ServiceConfig) -> dict[str, Any]:
    """A verifier a request may name: an offered name, or ``{"name": ..., **options}`` with
    option strings matching :data:`NAME_PATTERN` and without the keys the service sets. An
    ensemble's members are such verifiers; an API judge's ``base_url`` is one of the operator's
    endpoints (and it is offered as an object only when there is one)."""
    def spec(names: list[str], required: list[str], **properties: Any) -> dict[str, Any]:
        refused = dict.fromkeys(VERIFIER_SERVICE_KEYS, False)  # false: the key may not appear
        return {"type": "object", "required": required,
                "properties": {"name": {"type": "string", "enum": names}, **properties,
                               **refused},
                "propertyNames": {"pattern": NAME_PATTERN}, "additionalProperties": _OPTION}

    objects = []
    plain = [name for name in offered if name not in (ENSEMBLE, API_JUDGE)]
    if plain:
        objects.append(spec(plain, ["name"]))
    if ENSEMBLE in offered:
        objects.append(spec([ENSEMBLE], ["name", "members"], members={
            "type": "array", "minItems": 1, "items": _SERVED_VERIFIER}))
    if API_JUDGE in offered and config.judge_endpoints:
        from diffsearch.verifiers.openai_judge import DEFAULT_BASE_URL

        endpoints = sorted(config.judge_endpoints)
        required = ["name"] if DEFAULT_BASE_URL in endpoints else ["name", "base_url"]
        objects.append(spec([API_JUDGE], required,
                            base_url={"type": "string", "enum": endpoints},
                            **dict.fromkeys(API_JUDGE_SERVICE_KEYS, False)))
    # an ensemble needs its members and an API judge its endpoint: neither is a bare name
    names = [{"type": "string", "enum": plain}] if plain else []
    return {"title": "ServedVerifier", "description": (
        "A verifier this service offers: its name, or {name, ...options}. Option strings and "
        "keys match the pattern; device is the service's (and an openai judge's api_key_env, "
        "allow_network and cache_dir)."),
        "anyOf": [*names, *objects]}


def check_against_model(job: Job, info: ModelInfo, config: ServiceConfig,
                        verifier_names: Iterable[str]) -> None:
    """The checks that need the model: the NFE budget limit, the strategies built as the
    engine builds them (their options against the model and the budget), and the verifiers
    their options name, against the offered ones."""
    limit = config.limits.max_budget_nfe
    try:
        budget = job.budget_nfe(info.num_steps)
    except OverflowError:  # a multiple with hundreds of digits
        budget = limit + 1
    if budget > limit:
        raise RequestError(
            f"budget: {job.budget!r} is {budget} NFE per prompt ({info.num_steps} steps per "
            f"sample), over this service's limit of {limit} (max_budget_nfe)",
            field="budget", limit="max_budget_nfe")
    if budget < 1:
        raise RequestError(f"budget: {job.budget!r} is 0 NFE; give a positive budget",
                           field="budget")
    try:  # what the engine does first; refusing now beats a search that fails once queued
        strategies = build_strategies(job, info.num_steps, info.nfe_per_step)
    except JobError as error:
        message = str(error)
        raise RequestError(message, field=message.partition(":")[0]) from None
    offered = set(verifier_names)
    for option, spec in strategies[0].named_verifiers().items():
        _check_verifier(spec, f"strategy.{option}", offered)


def check_family(job: Job, *, sampler_names: Callable[[str], str] | None = None) -> None:
    """The pre-run checks of the job's sampler, size and negative prompt against the model's
    family, of the sampler against the strategy, and that an image-to-video model gets a
    strategy that gives its first frames, before queueing and before the model loads:
    a refusal is a 422 rather than a search that fails once queued. Reads config files only (a
    model held in process, known once loaded, has no family to check). ``sampler_names``
    rewrites a sampler message in a protocol's own names (A1111's)."""
    from diffsearch.pipelines.sources import ModelNotFoundError
    from diffsearch.preflight import check_first_frame, check_sampler, check_strategies, plan_job

    try:
        plan = plan_job(job)
        if plan is not None:
            strategy = check_strategies(job, plan.num_steps)
            check_sampler(plan.sampler, strategy)
            check_first_frame(plan.family, strategy)
    except ModelNotFoundError:
        return  # not on disk: the model's loading reports it (or finds one held in process)
    except DiffsearchError as error:
        message = str(error)
        field_name = message.partition(":")[0]
        if field_name == "sampler" and sampler_names is not None:
            message = sampler_names(message)
        raise RequestError(message, field=field_name) from None


def _served_model(name: Any, config: ServiceConfig) -> Any:
    if not isinstance(name, str):
        return name  # Job validation names the type error
    if name not in config.models:
        raise RequestError(f"model: {name!r} is not served here; choose one of: "
                           f"{', '.join(sorted(config.models))}", field="model")
    return config.models[name]


def _check_prompts(job: Job, config: ServiceConfig) -> None:
    limits = config.limits
    if len(job.prompts) > limits.max_prompts:
        raise RequestError(f"prompts: {len(job.prompts)} prompts, over this service's limit of "
                           f"{limits.max_prompts} per search (max_prompts)",
                           field="prompts", limit="max_prompts")
    for index, prompt in enumerate(job.prompts):
        if not isinstance(prompt, str):
            raise RequestError(f"prompts.{index}: must be a prompt's text; a request's settings "
                               f"(negative_prompt, width, ...) apply to all of its prompts",
                               field=f"prompts.{index}")
        if len(prompt) > limits.max_prompt_chars:
            raise RequestError(f"prompts.{index}: {len(prompt)} characters, over this service's "
                               f"limit of {limits.max_prompt_chars} (max_prompt_chars)",
                               field=f"prompts.{index}", limit="max_prompt_chars")
    if job.negative_prompt is not None and len(job.negative_prompt) > limits.max_prompt_chars:
        raise RequestError(f"negative_prompt: {len(job.negative_prompt)} characters, over this "
                           f"service's limit of {limits.max_prompt_chars} (max_prompt_chars)",
                           field="negative_prompt", limit="max_prompt_chars")
    if job.width is not None or job.height is not None:
        # a side not given is the model's, unknown before it loads: count it as the other side
        width, height = job.width or job.height, job.height or job.width
        if width * height > limits.max_pixels:  # type: ignore[operator]
            raise RequestError(f"width x height: {width} x {height} is {width * height} "  # type: ignore[operator]
                               f"pixels, over this service's limit of {limits.max_pixels} "
                               f"(max_pixels)", field="width" if job.width else "height",
                               limit="max_pixels")


def _check_verifier(spec: str | dict[str, Any], field: str, offered: set[str]) -> None:
    name = spec if isinstance(spec, str) else spec.get("name")
    if not isinstance(name, str) or name not in offered:
        raise RequestError(f"{field}: unknown verifier {name!r}; this service offers: "
                           f"{', '.join(sorted(offered)) or 'none'}", field=field)
    if isinstance(spec, dict):
        for key in spec:
            if key in VERIFIER_SERVICE_KEYS:
                raise RequestError(f"{field}.{key}: set by the service, not by a request",
                                   field=f"{field}.{key}")
        members = spec.get("members")
        if name == ENSEMBLE and isinstance(members, list):  # each member must be offered too
            for index, member in enumerate(members):
                _check_verifier(member, f"{field}.members.{index}", offered)
        # an API judge's base URL was checked against the operator's endpoints instead
        rest = {k: v for k, v in spec.items()
                if not (k == "members" and name == ENSEMBLE)
                and not (k == "base_url" and name == API_JUDGE)}
        _reject_paths(rest, field)


def _verifier_specs(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every verifier mapping a request body holds, with its field, ensemble members included
    (strings and malformed values are left to Job's validation)."""
    found: list[tuple[str, dict[str, Any]]] = []

    def walk(spec: Any, field: str) -> None:
        if isinstance(spec, dict):
            found.append((field, spec))
            members = spec.get("members")
            if isinstance(members, list):
                for index, member in enumerate(members):
                    walk(member, f"{field}.members.{index}")

    walk(data.get("verifier"), "verifier")
    evals = data.get("eval_verifiers")
    if isinstance(evals, list):
        for index, spec in enumerate(evals):
            walk(spec, f"eval_verifiers.{index}")
    return found


def _place_api_judge(spec: dict[str, Any], field: str, config: ServiceConfig) -> None:
    """An ``openai`` judge may call only an endpoint the operator configured, with the key the
    operator named for it; the request's base URL is then no path, so it leaves the spec
    before the path check and comes back after it (see :func:`_check_verifier`)."""
    if spec.get("name") != API_JUDGE:
        return
    for key in API_JUDGE_SERVICE_KEYS & set(spec):
        raise RequestError(f"{field}.{key}: set by the service, not by a request",
                           field=f"{field}.{key}")
    from diffsearch.verifiers.openai_judge import DEFAULT_BASE_URL

    base_url = spec.get("base_url", DEFAULT_BASE_URL)
    if base_url not in config.judge_endpoints:
        allowed = ", ".join(sorted(config.judge_endpoints)) or "none"
        raise RequestError(f"{field}.base_url: {str(base_url)[:80]!r} is not a judge endpoint "
                           f"of this service; allowed: {allowed}", field=f"{field}.base_url")
    spec.update(base_url=base_url, api_key_env=config.judge_endpoints[base_url],
                allow_network=True)


def _reject_paths(value: Any, field: str) -> None:
    """Refuse any string that could name a file (:data:`NAME_PATTERN`): nothing in a request may
    reach the disk."""
    if isinstance(value, str):
        if not _NAME.fullmatch(value):
            raise RequestError(f"{field}: {value[:80]!r} looks like a path; the service accepts "
                               f"names and numbers here, not paths", field=field)
    elif isinstance(value, dict):
        for key, item in value.items():
            _reject_paths(str(key), field)
            _reject_paths(item, f"{field}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _reject_paths(item, f"{field}.{index}")
