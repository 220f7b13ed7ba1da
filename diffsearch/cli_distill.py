"""``diffsearch distill``: train TTSnap's noise-aware verifiers (see diffsearch/distill.py).

    diffsearch distill --model shapes --teacher shapes-clip --steps 2,6,11 --num-steps 20 \\
        --prompts 200 --samples 4 --epochs 3 --out runs/ttsnap-shapes-clip

The output folder goes straight into TTSnap: ``strategy: {name: ttsnap, verifiers: FOLDER}``.
"""

from __future__ import annotations

from pathlib import Path

import click

from diffsearch.cli_errors import one_line_errors
from diffsearch.errors import DistillError
from diffsearch.job import prompt_texts_file


def _steps(text: str | None, num_steps: int) -> list[int]:
    """``--steps`` as integers; without it, TTSnap's default pruning steps for ``num_steps``."""
    if text is None:
        from diffsearch.strategies.ttsnap import default_schedule

        return default_schedule(num_steps)[0]
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DistillError(f"--steps must be comma-separated integers (e.g. 2,6,11), "
                           f"got {text!r}") from None


def _prompts(model: str, count: int | None, prompts_file: Path | None, eval_count: int,
             eval_file: Path | None, seed: int) -> tuple[list[str], list[str]]:
    """Training and held-out prompts: from files, else the shapes world's seeded train and
    held-out splits (only meaningful for the bundled model)."""
    if count is not None and prompts_file is not None:
        raise DistillError("give either --prompts N or --prompts-file F, not both")
    if model != "shapes" and (prompts_file is None or eval_file is None):
        raise DistillError(f"--model {model}: give --prompts-file and --eval-prompts-file "
                           f"(--prompts N draws shapes-world prompts, only for --model shapes)")
    from diffsearch.pipelines.shapes import world

    train = (prompt_texts_file(prompts_file) if prompts_file is not None
             else world.distinct_prompts("train", 200 if count is None else count, seed))
    held_out = (prompt_texts_file(eval_file) if eval_file is not None
                else world.distinct_prompts("heldout", eval_count, seed))
    return train, held_out


@click.command(name="distill")
@click.option("--model", default="shapes", show_default=True,
              help="Model whose trajectories train the students: shapes, a pipeline folder or "
                   "a Hugging Face id in the local cache.")
@click.option("--teacher", default="shapes-clip", show_default=True,
              help="Verifier to distil: a name or a verifier folder (shapes-clip, clip).")
@click.option("--steps", help="Pruning steps, comma-separated (default: TTSnap's for the "
                              "number of steps, e.g. 2,6,11 of 20).")
@click.option("--num-steps", type=int, help="Denoising steps T (default: the model's).")
@click.option("--prompts", "prompt_count", type=int,
              help="Number of distinct shapes-world training prompts (default 200).")
@click.option("--prompts-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Training prompts (.txt one per line, or .jsonl with a prompt field).")
@click.option("--eval-prompts", "eval_count", type=int, default=50, show_default=True,
              help="Number of distinct held-out shapes-world prompts for the Kendall tau table.")
@click.option("--eval-prompts-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Held-out prompts for the Kendall tau table (required off shapes).")
@click.option("--samples", type=int, default=4, show_default=True,
              help="Trajectories (seeds) per training prompt.")
@click.option("--eval-samples", type=int, default=8, show_default=True,
              help="Trajectories per held-out prompt (the candidates Kendall tau ranks).")
@click.option("--epochs", type=int, default=3, show_default=True, help="Epochs per level.")
@click.option("--lr", type=float, default=1e-5, show_default=True,
              help="AdamW peak learning rate (at 1e-4 shapes-clip students ranked worse).")
@click.option("--batch-size", type=int, default=32, show_default=True,
              help="Trajectories per denoising batch and images per training step.")
@click.option("--objective", type=click.Choice(["mse", "within-prompt"]), default="mse",
              show_default=True,
              help="mse: the reference's regression onto the teacher's final score; "
                   "within-prompt: the same after centring each prompt's scores (pruning only "
                   "compares candidates of one prompt).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--weights-dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="How checkpoints are stored (float16: half the size; "
                                      "students are rounded before they are scored).")
@click.option("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available).")
@click.option("--threads", type=int, help="Torch CPU threads (default: torch's).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="New folder for the checkpoints (step-KK/) and distilled.json.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line_errors
def distill_command(model: str, teacher: str, steps: str | None, num_steps: int | None,
                    prompt_count: int | None, prompts_file: Path | None, eval_count: int,
                    eval_prompts_file: Path | None, samples: int, eval_samples: int,
                    epochs: int, lr: float, batch_size: int, objective: str, seed: int,
                    weights_dtype: str,
                    device: str | None,
                    threads: int | None, out: Path, quiet: bool) -> None:
    """Distil a verifier into noise-aware students, one per TTSnap pruning step.

    Students start from the teacher and learn to give the x0 estimate at step k the teacher's
    score of the same trajectory's final image, from the least to the most noisy step. Prints
    Kendall tau (per held-out prompt, averaged) between intermediate and final scores, before
    and after distillation.
    """
    import torch  # torch, diffusers and open_clip load here, not when the CLI starts

    from diffsearch.distill import distill, format_table
    from diffsearch.pipelines.loading import load_denoiser

    if threads is not None:
        torch.set_num_threads(threads)
    train, held_out = _prompts(model, prompt_count, prompts_file, eval_count,
                               eval_prompts_file, seed)
    denoiser = load_denoiser(model, num_steps=num_steps, device=device)
    manifest = distill(
        denoiser=denoiser, teacher=teacher, model=model, train_prompts=train,
        eval_prompts=held_out, out=out, steps=_steps(steps, denoiser.num_steps),
        samples=samples, eval_samples=eval_samples, epochs=epochs, lr=lr,
        batch=batch_size, seed=seed, weights_dtype=weights_dtype, objective=objective,
        progress=not quiet,
        log=lambda message: click.echo(message, err=True))
    click.echo(format_table(manifest))
    click.echo(f"students and distilled.json in {out}; use with "
               f"strategy: {{name: ttsnap, verifiers: {out}}}")
