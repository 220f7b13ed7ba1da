"""The job: what to search for, with what, how hard. Validated once, used everywhere.

A job comes from a YAML file (``diffsearch run JOB.yaml``), CLI flags (``diffsearch generate``) or
API JSON; all three build the same :class:`Job`. Validation errors become one line that names the
field, e.g. ``job.yaml: budget: must be a positive number of NFEs or 'Nx'``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
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


class Job(BaseModel):
    """Everything that decides a run's results, plus how to execute it.

    Fields in :data:`EXECUTION_FIELDS` change how fast a run goes, never its results; every other
    field is part of the job's identity (``result_key``), which ``--resume`` checks.
    """

    model_config = ConfigDict(extra="forbid")
    # Numbers are strict: true/false (or "8") is refused, not read as 1/0 (or 8), as a job
    # file, a request body and the OpenAPI schema all say they are numbers.

    prompts: list[str] = Field(min_length=1)
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
    def _prompts_not_blank(cls, prompts: list[str]) -> list[str]:
        for index, prompt in enumerate(prompts):
            if not prompt.strip():
                raise ValueError(f"prompt {index} is empty")
        return prompts

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt_not_blank(cls, negative_prompt: str | None) -> str | None:
        if negative_prompt is not None and not negative_prompt.strip():
            raise ValueError("is blank; leave it out for the model's default unconditional "
                             "prompt")
        return negative_prompt

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


def verifier_label(spec: VerifierSpec) -> str:
    """The name a verifier's scores are stored under (``label`` option, else its name)."""
    if isinstance(spec, str):
        return spec
    return str(spec.get("label") or spec.get("name"))


def load_prompts_file(path: Path) -> list[str]:
    """Prompts from a .txt (one per line, blank lines and # comments skipped) or .jsonl file
    (one object per line with a "prompt" field)."""
    if not path.is_file():
        raise JobError(f"{path}: prompts file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise JobError(f'{path}:{number}: expected a JSON object with a "prompt" field')\
                    from None
        return prompts
    if path.suffix == ".txt":
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    raise JobError(f"{path}: prompts file must be .txt or .jsonl")


def job_from_mapping(data: dict[str, Any], *, source: str, base_dir: Path,
                     names: dict[str, str] | None = None) -> Job:
    """Validate a job given as a mapping; ``prompts_file`` is resolved against ``base_dir``.
    Errors read ``source: field: problem``, with fields renamed by ``names``."""
    data = dict(data)
    prompts_file = data.pop("prompts_file", None)
    if prompts_file is not None:
        if "prompts" in data:
            raise JobError(f"{source}: give either prompts or prompts_file, not both")
        data["prompts"] = load_prompts_file(base_dir / str(prompts_file))
    try:
        return Job.model_validate(data)
    except ValidationError as error:
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
    parts = [str(part) for part in first["loc"]]
    if parts and names and parts[0] in names:
        parts[0] = names[parts[0]]
    location = ".".join(parts) or "job"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    return f"{location}: {message}"
