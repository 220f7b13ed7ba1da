"""The ``diffsearch`` command line: a thin layer over :mod:`diffsearch.api`.

Errors the user can fix print one line and exit with status 2; Ctrl-C exits with 130 and leaves
a resumable store.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import yaml

from diffsearch.cli_errors import one_line_errors
from diffsearch.job import Job, job_from_mapping, load_job
from diffsearch.pipelines.samplers import sampler_names

if TYPE_CHECKING:  # the CLI starts without torch: a wrong flag is answered at once
    from diffsearch.results import RunResult

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(command: F) -> F:
    """One-line errors (:func:`one_line_errors`), and Ctrl-C during a run exits 130 saying how
    to resume."""
    checked = one_line_errors(command)

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return checked(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("\ninterrupted: finished candidates are saved; run the same command "
                       "with --resume to continue", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


@click.group()
@click.version_option(package_name="diffsearch")
def main() -> None:
    """Test-time search for diffusion models: explore seeds and trajectories, keep the best."""


FLAGS = {
    "executor": "--executor", "workers": "--workers", "scheduler": "--scheduler",
    "batch_size": "--batch-size", "allow_download": "--allow-download",
}
"""Job fields the run-time flags of every command set, by flag (errors name the flag)."""

GENERATE_FLAGS = {
    **FLAGS, "prompts": "PROMPT", "model": "--model", "strategy": "--strategy/--option",
    "budget": "--budget", "verifier": "--verifier", "eval_verifiers": "--eval-verifier",
    "seed": "--seed", "num_steps": "--steps", "guidance_scale": "--guidance",
    "threads": "--threads", "negative_prompt": "--negative-prompt", "width": "--width",
    "height": "--height", "sampler": "--sampler",
}
"""Every job field ``diffsearch generate`` sets, by flag."""


def _execution_options(command: F) -> F:
    options = [
        click.option("--out", type=click.Path(file_okay=False, path_type=Path),
                     help="Output folder (default: runs/<name>)."),
        click.option("--resume", is_flag=True,
                     help="Continue a stopped run in --out without recomputing finished work."),
        click.option("--executor", type=click.Choice(["local", "dask"]),
                     help="Where to run (default: the job's, else dask: a local cluster)."),
        click.option("--workers", type=int, help="Workers of the local Dask cluster."),
        click.option("--scheduler", help="Address of a running Dask scheduler."),
        click.option("--batch-size", type=int, help="Candidates per work unit."),
        click.option("--allow-download", is_flag=True, default=None,
                     help="Let workers download a Hugging Face model that is not in the "
                          "local cache (default: never touch the network)."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
        click.option("--profile", type=click.Path(dir_okay=False, path_type=Path),
                     help="Write Dask's performance report (HTML) of the run here."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _with_execution(data: dict[str, Any], executor: str | None, workers: int | None,
                    scheduler: str | None, batch_size: int | None,
                    allow_download: bool | None) -> dict[str, Any]:
    overrides = {"executor": executor, "workers": workers, "scheduler": scheduler,
                 "batch_size": batch_size, "allow_download": allow_download}
    if scheduler and not executor:
        overrides["executor"] = "dask"
    return {**data, **{k: v for k, v in overrides.items() if v is not None}}


@main.command()
@click.argument("prompt")
@click.option("--model", default="shapes", show_default=True,
              help="'shapes' (bundled), a local pipeline folder or a Hugging Face id (cache).")
@click.option("--strategy", default="best-of-n", show_default=True)
@click.option("--option", "strategy_options", multiple=True, metavar="KEY=VALUE",
              help="Strategy option (YAML value), repeatable.")
@click.option("--budget", default="8x", show_default=True,
              help="NFEs per prompt, or Nx for N samples' worth.")
@click.option("--verifier", default="shapes-clip", show_default=True,
              help="Guiding verifier.")
@click.option("--eval-verifier", "eval_verifiers", multiple=True,
              help="Held-out verifier reported on final images, repeatable.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--steps", type=int, help="Denoising steps (default: the model's).")
@click.option("--guidance", type=float, help="Classifier-free guidance scale.")
@click.option("--negative-prompt",
              help="Unconditional prompt of classifier-free guidance (not for FLUX).")
@click.option("--width", type=int, help="Image width in pixels (default: the model's).")
@click.option("--height", type=int, help="Image height in pixels (default: the model's).")
@click.option("--sampler", metavar="NAME",
              help=f"Denoising sampler, from the model's scheduler config: "
                   f"{', '.join(sampler_names(flow=False))} (UNet models) or "
                   f"{', '.join(sampler_names(flow=True))} (flow-matching models; the "
                   f"multistep flow solvers only for models that ship them). Default: the "
                   f"model's.")
@click.option("--threads", default=2, show_default=True, type=int,
              help="CPU threads per worker (pinned: part of the results' identity).")
@_execution_options
@friendly_errors
def generate(prompt: str, model: str, strategy: str, strategy_options: tuple[str, ...],
             budget: str, verifier: str, eval_verifiers: tuple[str, ...], seed: int,
             steps: int | None, guidance: float | None, negative_prompt: str | None,
             width: int | None, height: int | None, sampler: str | None, threads: int,
             out: Path | None, resume: bool,
             executor: str | None, workers: int | None, scheduler: str | None,
             batch_size: int | None, allow_download: bool | None, quiet: bool,
             profile: Path | None) -> None:
    """Search for the best image of one PROMPT."""
    data: dict[str, Any] = {
        "prompts": [prompt], "model": model,
        "strategy": {"name": strategy, **_parse_options(strategy_options)},
        "budget": int(budget) if budget.isdigit() else budget, "verifier": verifier,
        "eval_verifiers": list(eval_verifiers), "seed": seed, "num_steps": steps,
        "guidance_scale": guidance, "threads": threads, "negative_prompt": negative_prompt,
        "width": width, "height": height, "sampler": sampler,
    }
    job = job_from_mapping(
        _with_execution(data, executor, workers, scheduler, batch_size, allow_download),
        source="options", base_dir=Path.cwd(), names=GENERATE_FLAGS)
    out = out or Path("runs") / f"{_slug(prompt)}-{_timestamp()}"
    _run(job, out, resume=resume, quiet=quiet, profile=profile)


@main.command()
@click.argument("job_file", type=click.Path(path_type=Path))
@_execution_options
@friendly_errors
def run(job_file: Path, out: Path | None, resume: bool, executor: str | None,
        workers: int | None, scheduler: str | None, batch_size: int | None,
        allow_download: bool | None, quiet: bool, profile: Path | None) -> None:
    """Run a job file (YAML): many prompts, inline or from a .txt/.jsonl file."""
    job = load_job(job_file)
    flags = _with_execution({}, executor, workers, scheduler, batch_size, allow_download)
    if flags:
        job = job_from_mapping({**job.model_dump(), **flags}, source="options",
                               base_dir=job_file.parent, names=FLAGS)
    _run(job, out or Path("runs") / job_file.stem, resume=resume, quiet=quiet, profile=profile)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the best per prompt as JSON.")
@friendly_errors
def show(run_dir: Path, as_json: bool) -> None:
    """List the best candidate per prompt of a run (finished or not)."""
    from diffsearch.run_reading import best_per_prompt

    rows = best_per_prompt(run_dir)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        score = "-" if row["score"] is None else f"{row['score']:.4f}"
        click.echo(f"{row['index']:>4}  {score:>9}  {row['image'] or '-':<28}  {row['prompt']}")


def _run(job: Job, out: Path, *, resume: bool, quiet: bool, profile: Path | None) -> None:
    from diffsearch.preflight import check_model

    check_model(job)  # before the heavy imports below: a wrong model is told at once
    from diffsearch.api import run_job

    click.echo(f"diffsearch: {len(job.prompts)} prompt(s), strategy {job.strategy.name}, "
               f"budget {job.budget} per prompt, model {job.model} -> {out}", err=True)
    result = run_job(job, out, resume=resume, progress_bar=not quiet, profile=profile)
    _summarise(result)


def _summarise(result: RunResult) -> None:
    """Print the best per prompt; exit 1 when every candidate failed (the run found nothing)."""
    for prompt in result.prompts:
        best = prompt.best
        score = "no result" if best is None else f"score {best.reward:.4f}"
        click.echo(f"[{prompt.prompt_index}] {prompt.prompt!r}: {score}")
    click.echo(f"{result.nfe} NFE, {result.verifier_calls} verifier calls, "
               f"{result.wall_seconds:.1f} s; failed candidates: {result.failed_candidates}; "
               f"results in {result.run_dir / 'results.json'}")
    errors = [c.error for p in result.prompts for c in p.candidates]
    if errors and all(errors):
        click.echo(f"error: every candidate failed; the first: {errors[0]}", err=True)
        sys.exit(1)


def _parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--option")
        options[key.strip()] = yaml.safe_load(value)
    return options


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def _timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _register_subcommands() -> None:
    """Commands that live in their own modules (each imports its heavy parts lazily)."""
    from diffsearch.cli_distill import distill_command
    from diffsearch.cli_serve import serve
    from diffsearch.cli_verifiers import verifiers

    main.add_command(verifiers)
    main.add_command(serve)
    main.add_command(distill_command)


_register_subcommands()
