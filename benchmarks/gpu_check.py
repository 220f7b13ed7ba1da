"""Ready for GPUs? The search loop's speed and numerics under each accelerator option.

Made to be run once on a lent GPU machine (it also runs on a CPU, skipping with a printed reason
what needs CUDA). Two parts:

- ``loop``: the search loop itself, for the bundled "shapes" model and a tiny SD built from config
  (``tests/tiny_pipelines.py``): ``--prompts`` x ``--candidates`` seeds denoised 0 -> T in
  chunks of ``--compute-batch`` rows, then decoded. Rows: float32 / float16 / bfloat16 with SDPA;
  then, at the loader's CUDA dtype (float16; float32 on a CPU), xformers, compile and model /
  sequential CPU offload. Each row gives the best of ``--repeats`` timed passes after one untimed
  warm-up (which is where compile compiles, so ``warmup_s`` is its cost), NFE/s, its final
  latents' largest difference from the float32 SDPA row, and whether they are bit-identical to
  the SDPA row of the same dtype (the question that decides whether an option may leave the
  results' identity).
- ``dask``: the bundled model's best-of-N job through the engine on 1 and 2 Dask workers, with
  the job's default options (one GPU shared by both workers).

    python benchmarks/gpu_check.py [--prompts 2] [--candidates 16] [--steps 10]
        [--compute-batch 8] [--repeats 2] [--no-compile] [--no-dask]

Prints and saves JSON: ``$OUT/gpu_check.json`` when ``OUT`` is set (the lent machine's output
folder), else ``benchmarks/results/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

from diffsearch.errors import DiffsearchError
from diffsearch.pipelines.loading import load_denoiser
from diffsearch.pipelines.sources import ModelLoadError

from _report import command_line, save_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_pipelines import tiny_sd_pipeline  # noqa: E402 - a test helper, found through tests/

PROMPTS = ["a red circle to the left of a blue square", "two green triangles above a circle"]


def search_loop(denoiser, prompts: list[str], candidates: int) -> torch.Tensor:
    """Every prompt's candidates denoised from noise to the end, then decoded: best-of-N's
    work without the verifier. Returns the final latents (on the CPU)."""
    seeds = list(range(len(prompts) * candidates))
    conds = [denoiser.encode(prompt) for prompt in prompts for _ in range(candidates)]
    final = denoiser.denoise(denoiser.initial_noise(seeds), conds, 0, denoiser.num_steps).latents
    denoiser.decode(final)
    return final


def _synchronized_seconds(run) -> tuple[float, Any]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    began = time.perf_counter()
    value = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - began, value


def loop_rows(model: str, label: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    cuda = torch.cuda.is_available()
    option_dtype = "float16" if cuda else "float32"
    configs: list[tuple[str, dict[str, Any]]] = [
        (f"{dtype} sdpa", {"dtype": dtype, "attention": "sdpa"})
        for dtype in ("float32", "float16", "bfloat16")]
    options_rows = {"xformers": {"attention": "xformers"},
                    "compile": {"attention": "sdpa", "compile": True},
                    "offload model": {"attention": "sdpa", "offload": "model"},
                    "offload sequential": {"attention": "sdpa", "offload": "sequential"}}
    configs += [(f"{option_dtype} {name}", {"dtype": option_dtype, **options})
                for name, options in options_rows.items()]
    prompts = PROMPTS[:args.prompts]
    rows: list[dict[str, Any]] = []
    reference: dict[str, torch.Tensor] = {}  # dtype -> the SDPA row's final latents
    for name, options in configs:
        row: dict[str, Any] = {"model": label, "config": name, **options}
        skip = _skip_reason(options, cuda, args)
        if skip:
            row["skipped"] = skip
            print(f"{label:>8} {name:<28} skipped: {skip}", file=sys.stderr)
            rows.append(row)
            continue
        try:
            denoiser = load_denoiser(model, num_steps=args.steps,
                                     compute_batch=args.compute_batch,
                                     device="cuda" if cuda else "cpu", **options)
        except ModelLoadError as error:  # e.g. an xformers built for another torch
            row["error"] = str(error)
            print(f"{label:>8} {name:<28} error: {error}", file=sys.stderr)
            rows.append(row)
            continue
        row["warmup_s"], latents = _synchronized_seconds(
            lambda d=denoiser: search_loop(d, prompts, args.candidates))
        times = [_synchronized_seconds(lambda d=denoiser: search_loop(d, prompts,
                                                                      args.candidates))[0]
                 for _ in range(args.repeats)]
        nfe = len(prompts) * args.candidates * denoiser.num_steps * denoiser.nfe_per_step
        row.update(seconds=round(min(times), 4), warmup_s=round(row["warmup_s"], 3),
                   nfe=nfe, nfe_per_s=round(nfe / min(times), 1))
        if "float32" in reference:
            row["max_abs_diff_to_float32"] = float((latents - reference["float32"]).abs().max())
        if name.endswith("sdpa"):
            reference[options["dtype"]] = latents
        elif options["dtype"] in reference:
            row["bit_identical_to_sdpa"] = torch.equal(latents, reference[options["dtype"]])
        if cuda:
            row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            torch.cuda.reset_peak_memory_stats()
        print(f"{label:>8} {name:<28} {row['seconds']:8.3f} s  {row['nfe_per_s']:9.1f} NFE/s",
              file=sys.stderr)
        rows.append(row)
        del denoiser
        torch._dynamo.reset()
    return rows


def _skip_reason(options: dict[str, Any], cuda: bool, args: argparse.Namespace) -> str | None:
    if not cuda and options["dtype"] != "float32":
        return "half precision is for CUDA (on a CPU the loader runs float32)"
    if options.get("attention") == "xformers":
        if not cuda:
            return "xformers needs CUDA"
        if importlib.util.find_spec("xformers") is None:
            return "xformers is not installed (pip install 'diffsearch[xformers]')"
    if options.get("offload", "none") != "none" and not cuda:
        return "offload needs CUDA"
    if options.get("compile") and args.no_compile:
        return "--no-compile"
    return None


def dask_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from executor_overhead import EngineRun

    from diffsearch.dask_executor import DaskExecutor
    from diffsearch.job import Job

    rows = []
    for workers in (1, 2):
        job = Job.model_validate({
            "prompts": PROMPTS[:args.prompts], "model": "shapes", "verifier": "shapes-clip",
            "strategy": {"name": "best-of-n"}, "budget": f"{args.candidates}x",
            "num_steps": args.steps, "compute_batch": args.compute_batch,
            "batch_size": args.compute_batch, "threads": 1, "executor": "dask",
        })
        run = EngineRun(job, DaskExecutor(workers=workers, threads=1, dashboard_address=None))
        try:
            seconds = min(run.search()[0] for _ in range(args.repeats))
        finally:
            run.close()
        nfe = len(job.prompts) * job.budget_nfe(args.steps)
        rows.append({"workers": workers, "seconds": round(seconds, 3), "nfe": nfe,
                     "nfe_per_s": round(nfe / seconds, 1), "setup_s": round(run.setup_s, 2)})
        print(f"dask x{workers} {seconds:8.3f} s  {nfe / seconds:9.1f} NFE/s", file=sys.stderr)
    return rows


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if importlib.util.find_spec("xformers") is not None:
        import xformers

        info["xformers"] = xformers.__version__
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2, choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--candidates", type=int, default=16, help="per prompt")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compute-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the compile rows (inductor takes minutes on a CPU)")
    parser.add_argument("--no-dask", action="store_true", help="skip the Dask rows")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        tiny = str(tiny_sd_pipeline(Path(folder)))
        try:
            loop = loop_rows("shapes", "shapes", args) + loop_rows(tiny, "tiny-sd", args)
        except DiffsearchError as error:
            raise SystemExit(f"error: {error}") from None
    report = {
        "benchmark": "gpu_check", "machine": machine(),
        "prompts": args.prompts, "candidates": args.candidates, "steps": args.steps,
        "compute_batch": args.compute_batch, "repeats": args.repeats,
        "loop": loop, "dask": [] if args.no_dask else dask_rows(args),
        "command": command_line(argv),
    }
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu_check.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    else:
        path = save_report(report, "gpu_check")
    print(f"saved {path}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
