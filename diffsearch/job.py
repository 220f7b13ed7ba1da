"""The job: what to search for, with what, how hard. Validated once, used everywhere.

A job comes from a YAML file (``diffsearch run JOB.yaml``), CLI flags (``diffsearch generate``) or
API JSON; all three build the same :class:`Job`. Validation errors become one line that names the
field, e.g. ``job.yaml: budget: must be a positive number of NFEs or 'Nx'``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from diffsearch.errors import JobError
from diffsearch.pipelines.samplers import sampler_names
from diffsearch.pipelines.sources import NEEDS_CUDA, Attention, Offload, names_non_cuda_device

VerifierSpec = str | dict[str, Any]
"""A verifier name, or ``{"name": ..., **options}`` (options go to the verifier's constructor)."""

_BUDGET_MULTIPLE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*x\s*$")


class StrategySpec(BaseModel):
    """A strategy's name and its options (the other keys), each checked by the strategy's own
    rules without the model, so a bad option fails when the job is read, naming it:
    ``strategy.n: must be an integer, got 2.5``. The options are kept as given, which is what
    the job's identity (``result_key``) is made of."""

    model_config = ConfigDict(extra="allow")

    name: str = "best-of-n"

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from diffsearch.strategies.registry import strategy_names

        if name not in strategy_names():
            raise ValueError(f"unknown strategy {name!r}; choose one of: "
                             f"{', '.join(strategy_names())}")
        return name

    @model_validator(mode="after")
    def _options_checked(self) -> StrategySpec:
        from diffsearch.strategies.options import OptionError
        from diffsearch.strategies.registry import strategy_class

        try:
            strategy_class(self.name).check_options(self.options)
        except OptionError as error:
            # located at the option, so the error reads strategy.<option>: reason
            raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(
                type="value_error", loc=tuple(error.option.split(".")),
                input=self.options.get(error.option.split(".")[0]),
                ctx={"error": error.reason})]) from None
        return self

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PromptSpec(BaseModel):
    """One prompt with settings of its own (a mapping in ``prompts``, a line of a ``.jsonl``
    prompts file). Each unset field takes the job's value. The bounds are the job's."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = Field(default=None, strict=True)
    width: int | None = Field(default=None, ge=8, le=8192, strict=True)
    height: int | None = Field(default=None, ge=8, le=8192, strict=True)
    guidance_scale: float | None = Field(default=None, ge=0, strict=True)
    num_steps: int | None = Field(default=None, ge=1, le=1000, strict=True)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("is empty")
        return prompt

    @field_validator("negative_prompt")
    @classmethod
    def _negative_not_blank(cls, negative_prompt: str | None) -> str | None:
        return _check_negative_prompt(negative_prompt)


@dataclass(frozen=True)
class Sampling:
    """The settings that need an adapter of their own: prompts that differ in any of them never
    share a forward pass (a size is a latent shape, steps are a schedule, a guidance scale
    decides whether the unconditional pass runs). None: the model's default."""

    num_steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class PromptSettings:
    """What one prompt of a job runs with: its own fields, else the job's."""

    text: str
    negative_prompt: str | None
    """Travels with each row's conditioning, so prompts that differ only in it still share
    forward passes."""
    seed: int
    sampling: Sampling


_TEXT_TAG, _SETTINGS_TAG = "text", "settings"
PromptEntry = Annotated[
    Annotated[str, Tag(_TEXT_TAG)] | Annotated[PromptSpec, Tag(_SETTINGS_TAG)],
    Discriminator(lambda entry: _TEXT_TAG if isinstance(entry, str) else _SETTINGS_TAG),
]
"""A prompt's text, or a mapping with its settings. The tag makes a mapping's error name its
own field (``prompts.3.width``), not also say it is not a string."""


class Job(BaseModel):
    """Everything that decides a run's results, plus how to execute it.

    Fields in :data:`EXECUTION_FIELDS` change how fast a run goes, never its results; every other
    field is part of the job's identity (``result_key``), which ``--resume`` checks.
    """

    model_config = ConfigDict(extra="forbid")
    # Numbers are strict: true/false (or "8") is refused, not read as 1/0 (or 8), as a job
    # file, a request body and the OpenAPI schema all say they are numbers.

    prompts: list[PromptEntry] = Field(min_length=1)
    """Prompt texts, or mappings that give a prompt its own settings (:class:`PromptSpec`)."""
    model: str = "shapes"
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    budget: StrictInt | str = "8x"
    """NFEs per prompt, or ``"Nx"``: N times the cost of one sample (N * num_steps)."""
    verifier: VerifierSpec = "shapes-clip"
    """The guiding verifier: its score is the reward strategies maximise."""
    eval_verifiers: list[VerifierSpec] = Field(default_factory=list)
    """Held-out verifiers scored on final images for the report; strategies never see them."""
    seed: int = Field(default=0, strict=True)
    num_steps: int | None = Field(default=None, ge=1, le=1000, strict=True)
    guidance_scale: float | None = Field(default=None, ge=0, strict=True)
    threads: int = Field(default=2, ge=1, le=256, strict=True)
    """Intra-op CPU threads per worker. Pinned because CPU kernels round differently with other
    thread counts: keep it fixed to keep results bit-identical across machines and worker counts."""
    compute_batch: int | None = Field(default=None, ge=1, le=1024, strict=True)
    """Rows per model forward pass (None: the adapter's default). Part of the results' identity."""
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    device: str | None = None
    # The accelerator options below change the float rounding of every candidate, so they are
    # part of the results' identity like dtype: a resume with other kernels would mix numerics.
    compile: bool = False
    """torch.compile the denoiser network (its first pass compiles). Inductor fuses and reorders
    float operations, so results differ in the last bits from eager PyTorch."""
    attention: Attention = "auto"
    """``auto``: xformers on CUDA when installed, else PyTorch SDPA; ``sdpa``; ``xformers``
    (refused when it is not installed). The kernels round differently; ``auto`` depends on what
    the worker has installed, so name one to keep results the same on every machine."""
    offload: Offload = "none"
    """``model`` or ``sequential`` CPU offload for models larger than the GPU (needs CUDA).
    The same kernels run on the same weights, but that it changes no bit is not yet measured
    on a GPU, so it counts as numerics until it is."""
    vae_tiling: bool = False
    """Decode large images in overlapping tiles (less VAE memory); pixels near the seams
    change, and with them the scores."""
    vae_slicing: bool = False
    """Decode one image at a time (less VAE memory); a batch of one rounds differently."""
    # Generation settings, one value for the whole job. What the model's family takes (sizes,
    # samplers, a negative prompt at all) is checked from its config files before it loads
    # (diffsearch.pipelines.sources.plan_model, called by the pre-run checks).
    negative_prompt: str | None = None
    """The unconditional prompt of classifier-free guidance (SD, SDXL, SD3, video; FLUX has no
    such pass). None: the family's default (the empty prompt; zeros for SDXL base)."""
    width: int | None = Field(default=None, ge=8, le=8192, strict=True)
    """Image width in pixels (None: the model's). The latent shape, and the store's, follow."""
    height: int | None = Field(default=None, ge=8, le=8192, strict=True)
    """Image height in pixels (None: the model's)."""
    sampler: str | None = None
    """The denoising sampler, built from the model's own scheduler config (None: the model's
    scheduler). Not ``scheduler``: that field is the Dask scheduler's address."""

    # ---- execution only ---------------------------------------------------------------------
    batch_size: int = Field(default=8, ge=1, le=4096, strict=True)
    """Candidates per work unit sent to a worker; does not change results."""
    executor: Literal["local", "dask"] = "dask"
    workers: int | None = Field(default=None, ge=1, le=1024, strict=True)
    scheduler: str | None = None
    allow_download: bool = False
    images: Literal["best", "all", "none"] = "best"
    """Which images the run folder gets: ``best`` (each prompt's best, kept up to date while the
    run goes), ``all`` (also every candidate's final image or clip under ``images/``) or
    ``none``. Encoding happens off the denoiser's path, in the driver."""

    @field_validator("prompts")
    @classmethod
    def _prompts_not_blank(cls, prompts: list[str | PromptSpec]) -> list[str | PromptSpec]:
        for index, prompt in enumerate(prompts):
            if isinstance(prompt, str) and not prompt.strip():
                raise ValueError(f"prompt {index} is empty")
        # a mapping that sets nothing of its own is its text: one job, one identity
        return [p.prompt if isinstance(p, PromptSpec) and not p.model_fields_set - {"prompt"}
                else p for p in prompts]

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt_not_blank(cls, negative_prompt: str | None) -> str | None:
        return _check_negative_prompt(negative_prompt)

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, sampler: str | None) -> str | None:
        if sampler is not None and sampler not in sampler_names():
            raise ValueError(f"unknown sampler {sampler!r}; choose one of: "
                             f"{', '.join(sampler_names())}")
        return sampler

    @field_validator("offload")
    @classmethod
    def _offload_needs_cuda(cls, offload: str, info: ValidationInfo) -> str:
        device = info.data.get("device")
        if offload != "none" and names_non_cuda_device(device):
            raise ValueError(f"{NEEDS_CUDA}; device is {device!r}")
        return offload

    @field_validator("attention")
    @classmethod
    def _xformers_needs_cuda(cls, attention: str, info: ValidationInfo) -> str:
        device = info.data.get("device")
        if attention == "xformers" and names_non_cuda_device(device):
            raise ValueError(f"xformers {NEEDS_CUDA}; device is {device!r}")
        return attention

    @field_validator("budget")
    @classmethod
    def _budget_form(cls, budget: int | str) -> int | str:
        if isinstance(budget, int):
            if budget < 1:
                raise ValueError("must be a positive number of NFEs or 'Nx'")
            return budget
        if _BUDGET_MULTIPLE.match(budget):
            return budget.strip()
        raise ValueError(f"{budget!r} is not a number of NFEs or 'Nx' (e.g. 8x)")

    @model_validator(mode="after")
    def _scheduler_needs_dask(self) -> Job:
        if self.scheduler and self.executor != "dask":
            raise ValueError("scheduler: only used with executor: dask")
        return self

    @property
    def prompt_texts(self) -> list[str]:
        """Every prompt's text, in order."""
        return [p if isinstance(p, str) else p.prompt for p in self.prompts]

    def prompt_settings(self, index: int) -> PromptSettings:
        """Prompt ``index``'s settings: its own, else the job's."""
        entry = self.prompts[index]
        own = entry if isinstance(entry, PromptSpec) else PromptSpec(prompt=entry)

        def pick(name: str) -> Any:
            value = getattr(own, name)
            return getattr(self, name) if value is None else value

        return PromptSettings(
            text=own.prompt, negative_prompt=pick("negative_prompt"), seed=pick("seed"),
            sampling=Sampling(num_steps=pick("num_steps"), guidance_scale=pick("guidance_scale"),
                              width=pick("width"), height=pick("height")))

    @property
    def job_sampling(self) -> Sampling:
        """The job's own sampling settings: what prompts without settings of their own use."""
        return Sampling(num_steps=self.num_steps, guidance_scale=self.guidance_scale,
                        width=self.width, height=self.height)

    def samplings(self) -> list[Sampling]:
        """The distinct sampling settings of the job's prompts, the job's own first."""
        found = dict.fromkeys([self.job_sampling])
        found.update(dict.fromkeys(self.prompt_settings(i).sampling
                                   for i in range(len(self.prompts))))
        return list(found)

    def budget_nfe(self, num_steps: int) -> int:
        """The per-prompt budget in NFEs for a model with ``num_steps`` steps."""
        if isinstance(self.budget, int):
            return self.budget
        multiple = float(_BUDGET_MULTIPLE.match(self.budget).group(1))  # type: ignore[union-attr]
        return int(round(multiple * num_steps))

    def result_key(self) -> str:
        """A digest of every field that can change results (used to refuse a wrong --resume)."""
        identity = self.model_dump(mode="json", exclude=EXECUTION_FIELDS)
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


EXECUTION_FIELDS = {
    "batch_size", "executor", "workers", "scheduler", "allow_download", "images",
}


def _check_negative_prompt(negative_prompt: str | None) -> str | None:
    if negative_prompt is not None and not negative_prompt.strip():
        raise ValueError("is blank; leave it out for the model's default unconditional prompt")
    return negative_prompt


def verifier_label(spec: VerifierSpec) -> str:
    """The name a verifier's scores are stored under (``label`` option, else its name)."""
    if isinstance(spec, str):
        return spec
    return str(spec.get("label") or spec.get("name"))


def load_prompts_file(path: Path) -> list[str | dict[str, Any]]:
    """Prompts from a .txt (one per line, blank lines and # comments skipped) or .jsonl file
    (one object per line: ``prompt`` and optionally the :class:`PromptSpec` settings; a line
    with only ``prompt`` is its text). A .jsonl line's settings are checked with the job."""
    return [entry for _, entry in _numbered_prompts(path)]


def prompt_texts_file(path: Path) -> list[str]:
    """Only the texts of a prompts file (for tools that take no per-prompt settings)."""
    return [p if isinstance(p, str) else str(p["prompt"]) for p in load_prompts_file(path)]


def _numbered_prompts(path: Path) -> list[tuple[int, str | dict[str, Any]]]:
    """The prompts of a prompts file with their line numbers."""
    if not path.is_file():
        raise JobError(f"{path}: prompts file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        prompts: list[tuple[int, str | dict[str, Any]]] = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
                raise JobError(f'{path}:{number}: expected a JSON object with a "prompt" '
                               f'string')
            prompts.append((number, entry["prompt"] if entry.keys() == {"prompt"} else entry))
        return prompts
    if path.suffix == ".txt":
        return [(number, line.strip()) for number, line in enumerate(lines, 1)
                if line.strip() and not line.startswith("#")]
    raise JobError(f"{path}: prompts file must be .txt or .jsonl")


def job_from_mapping(data: dict[str, Any], *, source: str, base_dir: Path,
                     names: dict[str, str] | None = None) -> Job:
    """Validate a job given as a mapping; ``prompts_file`` is resolved against ``base_dir``.
    Errors read ``source: field: problem``, with fields renamed by ``names``; an error in a
    prompts file's line reads ``file:line: field: problem``."""
    data = dict(data)
    prompts_file = data.pop("prompts_file", None)
    numbered: list[tuple[int, str | dict[str, Any]]] = []
    if prompts_file is not None:
        if "prompts" in data:
            raise JobError(f"{source}: give either prompts or prompts_file, not both")
        path = base_dir / str(prompts_file)
        numbered = _numbered_prompts(path)
        data["prompts"] = [entry for _, entry in numbered]
    try:
        return Job.model_validate(data)
    except ValidationError as error:
        loc = error.errors()[0]["loc"]
        if numbered and len(loc) > 1 and loc[0] == "prompts" and isinstance(loc[1], int):
            field = describe_validation_error(error).split(": ", 1)
            inner = field[0].split(".", 2)[2:]  # the field within the line, if any
            where = f"{path}:{numbered[loc[1]][0]}"
            raise JobError(f"{where}: {': '.join([*inner, field[1]])}") from None
        raise JobError(f"{source}: {describe_validation_error(error, names)}") from None


def load_job(path: Path) -> Job:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise JobError(f"{path}: cannot read job file ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise JobError(f"{path}: not a UTF-8 text file (byte {error.object[error.start]:#04x} "
                       f"at offset {error.start}); a job file is YAML") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise JobError(f"{path}{where}: not valid YAML") from None
    if not isinstance(data, dict):
        raise JobError(f"{path}: a job file must be a mapping of fields (prompts, model, ...)")
    return job_from_mapping(data, source=str(path), base_dir=path.parent)


def describe_validation_error(error: ValidationError, names: dict[str, str] | None = None) -> str:
    """pydantic's first error as ``field.path: message`` on one line. ``names`` renames
    top-level fields for the user (the CLI names its flags: ``num_steps`` -> ``--steps``)."""
    first = error.errors()[0]
    parts = [str(part) for part in first["loc"]
             if part not in (_TEXT_TAG, _SETTINGS_TAG)]  # tags of a prompts entry
    if parts and names and parts[0] in names:
        parts[0] = names[parts[0]]
    location = ".".join(parts) or "job"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "model_type" and _SETTINGS_TAG in first["loc"]:
        message = ("must be a prompt's text or a mapping of prompt and its own settings "
                   f"({', '.join(PromptSpec.model_fields)})")
    return f"{location}: {message}"
