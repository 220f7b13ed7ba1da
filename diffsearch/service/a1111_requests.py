"""A1111 txt2img requests as searches: the request's fields, where strategy, budget and
verifier come from, A1111's sampler names, and every refusal naming the request's field.

A request is turned into the body of a ``/v1/searches`` request and validated by the same code
(:func:`~diffsearch.service.requests.build_job`), so it reaches exactly what a /v1 request may
reach; errors about the job's fields are renamed to the A1111 fields they came from
(``num_steps`` -> ``steps``). What a field asks for is done, or the request is refused: A1111
features diffsearch does not have are accepted only at the values that ask for nothing
(:data:`UNSUPPORTED`), so no setting is silently dropped. The routes are in
:mod:`~diffsearch.service.a1111`.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from diffsearch.errors import DiffsearchError
from diffsearch.job import Job
from diffsearch.service import requests
from diffsearch.service.config import ServiceConfig
from diffsearch.service.requests import RequestError, build_job, default_model

PREFIX = "/sdapi/v1"
SCRIPT = "diffsearch"
"""The ``alwayson_scripts`` entry that selects the search."""
SEARCH_SETTINGS = ("strategy", "budget", "verifier")
"""The search settings, in the order of the script's positional ``args``."""
OPTION_PREFIX = "diffsearch_"
"""An option (and ``override_settings`` key) is this prefix and a search setting's name."""
MODEL_OPTION = "sd_model_checkpoint"
"""A1111's option naming the model; its values are this service's served model names."""

SAMPLERS: dict[str, tuple[tuple[str, ...], dict[bool, str]]] = {
    "DDIM": (("ddim",), {False: "ddim"}),
    "Euler": (("k_euler",), {False: "euler", True: "flow-euler"}),
    "Euler a": (("k_euler_a", "k_euler_ancestral"), {False: "euler-ancestral"}),
    "DPM++ 2M": (("k_dpmpp_2m",), {False: "dpm++-2m"}),
    "DPM++ 2M Karras": (("k_dpmpp_2m_ka",), {False: "dpm++-2m-karras"}),
    "UniPC": (("unipc",), {False: "unipc"}),
}
"""A1111's sampler names: their aliases, and the job's ``sampler`` for UNet models (False) and
flow-matching ones (True). A1111 calls flow matching's Euler plain "Euler"."""
KARRAS = {"DPM++ 2M": "DPM++ 2M Karras"}
"""A1111 1.9 names the sigma schedule apart (``scheduler: "Karras"``)."""
AUTOMATIC_SCHEDULERS = (None, "", "automatic")
"""``scheduler`` values that leave the sigma schedule to the sampler."""


# ---- the request ---------------------------------------------------------------------------------
class Txt2ImgRequest(BaseModel):
    """A1111's txt2img body. Fields under "not supported" are accepted at the values that ask
    for nothing (A1111's and webuiapi's defaults); any other value is refused, naming it. The
    hires-fix fields (``hr_*``, ``firstphase_*``, ``denoising_strength``) mean nothing while
    ``enable_hr`` is false, in A1111 too."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1: a random seed (told in info).")
    steps: int | None = Field(None, description="None: the model's own.")
    cfg_scale: float | None = Field(None, description="None: the model's own.")
    width: int | None = Field(None, description="None: the model's own.")
    height: int | None = Field(None, description="None: the model's own.")
    sampler_name: str | None = Field(None, description="See GET /sdapi/v1/samplers.")
    sampler_index: str | None = Field(None, description="Deprecated alias of sampler_name.")
    scheduler: str | None = Field(None, description="Automatic, or Karras with DPM++ 2M.")
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    # ---- not supported (see the docstring) ----------------------------------------------------
    styles: list[str] | None = None
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    restore_faces: bool | None = None
    tiling: bool | None = None
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    enable_hr: bool = False
    denoising_strength: float | None = None
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    infotext: str | None = None


UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "styles": (lambda v: not v, "prompt styles are the A1111 UI's presets; put the text in "
                                "prompt"),
    "subseed_strength": (lambda v: v == 0, "variation seeds are not supported; send 0"),
    "seed_resize_from_h": (lambda v: v <= 0, "seed resizing is not supported"),
    "seed_resize_from_w": (lambda v: v <= 0, "seed resizing is not supported"),
    "restore_faces": (lambda v: not v, "face restoration is not supported"),
    "tiling": (lambda v: not v, "tiling is not supported"),
    "eta": (lambda v: v in (None, 1), "the search strategy sets each step's noise (its eta "
                                      "option); send null (or 1, webuiapi's default)"),
    "s_min_uncond": (lambda v: v in (None, 0), "not supported; send 0"),
    "s_churn": (lambda v: v in (None, 0), "not supported; send 0"),
    "s_tmax": (lambda v: v in (None, 0), "not supported; send 0"),
    "s_tmin": (lambda v: v in (None, 0), "not supported; send 0"),
    "s_noise": (lambda v: v in (None, 1), "not supported; send 1"),
    "enable_hr": (lambda v: not v, "hires fix is not supported; ask for the size you want"),
    "refiner_checkpoint": (lambda v: v in (None, "", "None"), "refiners are not supported"),
    "script_name": (lambda v: v in (None, "", "None"),
                    f"scripts are not supported; select the search with alwayson_scripts "
                    f"{SCRIPT!r}"),
    "infotext": (lambda v: not v, "infotext parameters are not supported; send the fields"),
}
"""Fields whose other values would change the image in A1111: the test a value must pass, and
why another is refused."""


# ---- mapping a request onto a search ------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """A txt2img request as a search: the job, where each of its fields came from (for error
    messages), and how many images to answer with."""

    job: Job
    model_name: str
    images: int
    sources: dict[str, str]
    sampler_name: str | None


def search_settings(request: Txt2ImgRequest, options: dict[str, Any]
                    ) -> tuple[dict[str, Any], dict[str, str]]:
    """Strategy, budget, verifier and model, each from the first place that says: the script's
    args, override_settings, the options; and the field each came from."""
    settings = {name: options[OPTION_PREFIX + name] for name in SEARCH_SETTINGS}
    sources = {name: OPTION_PREFIX + name for name in SEARCH_SETTINGS}
    settings["model"], sources["model"] = options[MODEL_OPTION], MODEL_OPTION
    for key, value in request.override_settings.items():
        name = key.removeprefix(OPTION_PREFIX) if key.startswith(OPTION_PREFIX) else None
        if key == MODEL_OPTION:
            settings["model"], sources["model"] = value, f"override_settings.{key}"
        elif name in SEARCH_SETTINGS:
            settings[name], sources[name] = value, f"override_settings.{key}"
        else:
            raise RequestError(f"override_settings.{key}: not a setting of this service; it has "
                               f"{', '.join(option_names())}", field=f"override_settings.{key}")
    for name, value, source in _script_settings(request.alwayson_scripts):
        settings[name], sources[name] = value, source
    return settings, sources


def _script_settings(scripts: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """The settings the :data:`SCRIPT` entry gives; other scripts must be off (no args, or
    ``[false]`` as webuiapi sends for an extension it found)."""
    found: list[tuple[str, Any, str]] = []
    for name, entry in scripts.items():
        where = f"alwayson_scripts.{name}"
        args = entry.get("args") if isinstance(entry, dict) else None
        if not isinstance(args, list):
            raise RequestError(f"{where}: expected {{\"args\": [...]}}", field=where)
        if name != SCRIPT:
            if args not in ([], [False]):
                raise RequestError(f"{where}: this service has no script {name!r}; it has "
                                   f"{SCRIPT!r}", field=where)
            continue
        if len(args) == 1 and isinstance(args[0], dict):
            for key, value in args[0].items():
                if key not in SEARCH_SETTINGS:
                    raise RequestError(f"{where}.args.0.{key}: not a search setting; give "
                                       f"{', '.join(SEARCH_SETTINGS)}",
                                       field=f"{where}.args.0.{key}")
                found.append((key, value, f"{where}.args.0.{key}"))
            continue
        if len(args) > len(SEARCH_SETTINGS):
            raise RequestError(f"{where}.args: at most {len(SEARCH_SETTINGS)} (strategy, budget, "
                               f"verifier), got {len(args)}", field=f"{where}.args")
        found += [(key, value, f"{where}.args.{index}")
                  for index, (key, value) in enumerate(zip(SEARCH_SETTINGS, args, strict=False))
                  if value is not None]
    return found


def option_names() -> list[str]:
    return [MODEL_OPTION, *(OPTION_PREFIX + name for name in SEARCH_SETTINGS)]


def served_model(value: Any, config: ServiceConfig, field_name: str) -> str:
    """A served model's name from an A1111 checkpoint title (ours are the names)."""
    if isinstance(value, str) and value in config.models:
        return value
    raise RequestError(f"{field_name}: {str(value)[:80]!r} is not served here; choose one of: "
                       f"{', '.join(sorted(config.models))} (GET {PREFIX}/sd-models)",
                       field=field_name)


def _budget(value: Any, source: str, config: ServiceConfig) -> Any:
    """A budget, refusing JSON's true and false (pydantic's lax integers would take them for 1
    and 0, and the schema says a budget is an integer or a string), and NFEs over the limit
    at once (an ``Nx`` budget's NFEs need the model: they are checked when a search is
    queued)."""
    if isinstance(value, bool):
        raise RequestError(f"{source}: {json.dumps(value)} is not a number of NFEs or 'Nx' "
                           f"(e.g. 8x)", field=source)
    limit = config.limits.max_budget_nfe
    if isinstance(value, int) and value > limit:
        raise RequestError(f"{source}: {value} NFE is over this service's limit of {limit} "
                           f"(max_budget_nfe)", field=source, limit="max_budget_nfe")
    return value


def _strategy_spec(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


def map_request(request: Txt2ImgRequest, options: dict[str, Any], config: ServiceConfig,
                verifiers: list[str]) -> Plan:
    """The search a txt2img request asks for, validated as /v1/searches validates a body, plus
    the model family's checks of the size, negative prompt and sampler; or a RequestError
    naming the request's field."""
    for name, (allowed, why) in UNSUPPORTED.items():
        value = getattr(request, name)
        if not allowed(value):
            raise RequestError(f"{name}: {json.dumps(value)[:80]} is not supported here: {why}",
                               field=name)
    images = request.batch_size * request.n_iter
    limit = config.a1111.max_images
    if images > limit:
        raise RequestError(f"batch_size: batch_size x n_iter is {images} images, over this "
                           f"service's limit of {limit} (max_images)", field="batch_size",
                           limit="max_images")
    settings, sources = search_settings(request, options)
    model_name = served_model(settings["model"], config, sources["model"])
    body: dict[str, Any] = {
        "prompts": [request.prompt], "model": model_name,
        "strategy": _strategy_spec(settings["strategy"]),
        "budget": _budget(settings["budget"], sources["budget"], config),
        "verifier": settings["verifier"],
        "seed": secrets.randbelow(2**32) if request.seed == -1 else request.seed,
    }
    optional = {"num_steps": request.steps, "guidance_scale": request.cfg_scale,
                "width": request.width, "height": request.height,
                "negative_prompt": request.negative_prompt if request.negative_prompt.strip()
                else None}  # A1111's "" (or blank): no negative prompt
    body.update({key: value for key, value in optional.items() if value is not None})
    sources.update(prompts="prompt", num_steps="steps", guidance_scale="cfg_scale",
                   seed="seed", width="width", height="height",
                   negative_prompt="negative_prompt", sampler="sampler_name")
    sampler_name = request.sampler_name or request.sampler_index or None
    if sampler_name:
        body["sampler"] = job_sampler(sampler_name, request.scheduler,
                                      family_is_flow(config.models[model_name]))
    elif request.scheduler not in AUTOMATIC_SCHEDULERS:
        raise RequestError(f"scheduler: {request.scheduler!r} needs a sampler_name",
                           field="scheduler")
    with renamed(sources):
        job = build_job(body, config, verifiers)
    return Plan(job=job, model_name=model_name, images=images, sources=sources,
                sampler_name=sampler_name)


def job_sampler(name: str, scheduler: str | None, flow: bool | None) -> str:
    """The job's ``sampler`` for an A1111 sampler name (or alias) and ``scheduler``, for a model
    of a flow-matching family or not (None: unknown, taken as a UNet)."""
    known = {key.lower(): key for key in SAMPLERS}
    known.update({alias: key for key, (aliases, _) in SAMPLERS.items() for alias in aliases})
    key = known.get(name.lower())
    offered = [n for n, (_, jobs) in SAMPLERS.items() if bool(flow) in jobs]
    if key is None or bool(flow) not in SAMPLERS[key][1]:
        raise RequestError(f"sampler_name: {name!r} is not offered for this model; choose one "
                           f"of: {', '.join(offered)}", field="sampler_name")
    if scheduler not in AUTOMATIC_SCHEDULERS:
        karras = KARRAS.get(key)
        if str(scheduler).lower() != "karras" or karras is None:
            raise RequestError(f"scheduler: {scheduler!r} with {key!r} is not offered; use "
                               f"Automatic (or Karras with {', '.join(KARRAS)})",
                               field="scheduler")
        key = karras
    return SAMPLERS[key][1][bool(flow)]


def family_is_flow(source: str) -> bool | None:
    """Whether a served model is a flow-matching one, from its config files (None: it is not
    a model folder this diffsearch can plan, e.g. one held in process)."""
    from diffsearch.pipelines.sources import plan_model

    try:
        return plan_model(source).family.flow
    except DiffsearchError:
        return None


def check_family(job: Job) -> None:
    """:func:`~diffsearch.service.requests.check_family`, saying samplers in A1111's names."""
    requests.check_family(job, sampler_names=a1111_sampler_names)


def a1111_sampler_names(message: str) -> str:
    """A message about the job's samplers with A1111's names for them (``use ddim or euler``
    -> ``use DDIM or Euler``), longest first so that ``euler`` is not found in
    ``euler-ancestral``."""
    names = {job: a1111 for a1111, (_, jobs) in SAMPLERS.items() for job in jobs.values()}
    for job in sorted(names, key=len, reverse=True):
        message = re.sub(rf"(?<![\w+-]){re.escape(job)}(?![\w+-])", names[job], message)
    return message


@contextmanager
def renamed(sources: dict[str, str]) -> Iterator[None]:
    """Re-raise a RequestError about a job field as one about the request field it came from
    (``num_steps: ...`` -> ``steps: ...``)."""
    try:
        yield
    except RequestError as error:
        head, dot, rest = (error.field or "").partition(".")
        if head not in sources:
            raise
        if head == "prompts":  # one prompt: "prompts.0" is the prompt
            dot, rest = "", ""
        new_field = sources[head] + dot + rest
        message = error.message
        if error.field and message.startswith(error.field):
            message = new_field + message[len(error.field):]
        raise RequestError(message, field=new_field, limit=error.limit,
                           status=error.status) from None


def default_options(config: ServiceConfig, verifiers: list[str]) -> dict[str, Any]:
    """The options at start: the operator's defaults, checked as a request's would be (a
    ValueError names the default: ``a1111.strategy: ...``)."""
    from diffsearch.service.requests import default_verifier

    defaults = config.a1111
    options = {MODEL_OPTION: default_model(config),
               OPTION_PREFIX + "strategy": defaults.strategy,
               OPTION_PREFIX + "budget": defaults.budget,
               OPTION_PREFIX + "verifier": defaults.verifier or default_verifier(verifiers)}
    try:
        return checked_options(options, config, verifiers)
    except RequestError as error:
        prefix = f"{error.field}:"
        named = error.message.removeprefix(prefix) if error.message.startswith(prefix) \
            else f" {error.message}"
        raise ValueError(f"a1111.{(error.field or '').removeprefix(OPTION_PREFIX)}:{named}"
                         ) from None


def checked_options(options: dict[str, Any], config: ServiceConfig, verifiers: list[str]
                    ) -> dict[str, Any]:
    """Options that a search can run with (the settings validated as a job's)."""
    served_model(options[MODEL_OPTION], config, MODEL_OPTION)
    body = {"prompts": ["options"], "model": options[MODEL_OPTION],
            "strategy": _strategy_spec(options[OPTION_PREFIX + "strategy"]),
            "budget": _budget(options[OPTION_PREFIX + "budget"], OPTION_PREFIX + "budget",
                              config),
            "verifier": options[OPTION_PREFIX + "verifier"]}
    with renamed({name: OPTION_PREFIX + name for name in SEARCH_SETTINGS}):
        build_job(body, config, verifiers)
    return options
