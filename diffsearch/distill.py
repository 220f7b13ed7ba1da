"""TTSnap's noise-aware verifier by self-distillation (see docs/strategies.md).

A reward model trained on clean images ranks the blurry x0 estimates of early steps badly, so
pruning on them throws good candidates away. Distillation teaches a copy of it (the student) to
predict, from the x0 estimate at step k, the score the frozen teacher gives the final image of
the same trajectory:

1. :func:`generate_trajectories`: the chosen model denoises K seeds per prompt in the chunks
   TTSnap's tasks use (0 -> k1, k1 -> k2, ..., k_last -> T), decoding the x0 estimate at each
   pruning step and the final image, exactly what TTSnap scores at run time.
2. :func:`train_stage`, once per level, from the least noisy (largest k) to the noisiest: the
   first stage starts from the teacher, each next one from the previous stage's student; MSE of
   the student's score of x0 at k against the teacher's score of the final image (or, with the
   ``within-prompt`` objective, of both centred on their prompt's mean); AdamW.
   Each level's student is saved as a verifier folder ``OUT/step-KK/``, usable by path.
3. Evaluation on held-out trajectories (other prompts): Kendall tau, per prompt, between the
   scores of the x0 estimates at step k and the teacher's scores of the finals, averaged over
   prompts, before (the teacher on x0) and after (the step's student, loaded from its folder).

``OUT/distilled.json`` records the mapping step -> folder that TTSnap's ``verifiers`` option
takes (the folder itself, or the mapping), the Kendall tau table and the training figures.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from scipy.stats import kendalltau
from tqdm.auto import tqdm

from diffsearch.errors import DistillError
from diffsearch.pipelines.base import Denoiser
from diffsearch.seeding import derive_seed, torch_generator
from diffsearch.strategies.ttsnap import DISTILLED_MANIFEST
from diffsearch.verifiers.base import Verifier
from diffsearch.verifiers.distillable import Distillable, distillable
from diffsearch.verifiers.registry import create_verifier

VerifierSpec = str | dict[str, Any]
SCORE_CHUNK = 64
"""Images per verifier call when scoring trajectories (verifiers are batch-invariant)."""
WEIGHTS_DTYPES = {"float32": torch.float32, "float16": torch.float16}
"""How student checkpoints may be stored; float16 halves their size (for shipping them)."""
SAVED_SCORE_TOLERANCE = 1e-4
"""How far (relative to the score scale) a saved student may score from the trained one."""


def student_folder(step: int) -> str:
    """The checkpoint folder name of the student for pruning step ``step``."""
    return f"step-{step:02d}"


def check_steps(steps: Sequence[int], num_steps: int) -> list[int]:
    """``steps`` sorted, each a pruning step strictly inside 1 .. T-1, no repeats."""
    if not steps:
        raise DistillError("steps: give at least one pruning step")
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int)
           or not 1 <= s <= num_steps - 1]
    if bad:
        raise DistillError(f"steps: {bad} outside 1..{num_steps - 1} (a pruning step lies "
                           f"strictly between pure noise 0 and the clean step {num_steps})")
    if len(set(steps)) != len(steps):
        raise DistillError(f"steps: {list(steps)} repeats a step")
    return sorted(steps)


# ---- 1. trajectories -------------------------------------------------------------------------
@dataclass(frozen=True)
class Trajectories:
    """Decoded images of ``samples`` trajectories per prompt, rows prompt-major (prompt i owns
    rows i*samples .. (i+1)*samples - 1)."""

    prompts: list[str]
    samples: int
    x0: dict[int, torch.Tensor]
    """Pruning step -> decoded x0 estimates there, float32 (rows, 3, H, W) in [0, 1]."""
    final: torch.Tensor
    """Decoded final images, float32 (rows, 3, H, W) in [0, 1]."""

    @property
    def row_prompts(self) -> list[str]:
        return [p for p in self.prompts for _ in range(self.samples)]


def generate_trajectories(
    denoiser: Denoiser, prompts: Sequence[str], samples: int, steps: Sequence[int], seed: int,
    *, batch: int = 32, progress: bool = True, desc: str = "trajectories",
) -> Trajectories:
    """Denoise ``samples`` seeds per prompt, stopping at each pruning step to decode x0.

    Sample k of a prompt starts from the noise of ``derive_seed(seed, prompt, k,
    "distill-noise")``; the purpose keeps these trajectories apart from a search's own
    candidates (which use "noise").
    """
    steps = check_steps(steps, denoiser.num_steps)
    rows = [(prompt, k) for prompt in prompts for k in range(samples)]
    boundaries = [0, *steps, denoiser.num_steps]
    x0_parts: dict[int, list[torch.Tensor]] = {step: [] for step in steps}
    final_parts: list[torch.Tensor] = []
    for begin in tqdm(range(0, len(rows), batch), desc=desc, disable=not progress, leave=False):
        chunk = rows[begin:begin + batch]
        conds = [denoiser.encode(prompt) for prompt, _ in chunk]
        latents = denoiser.initial_noise(
            [derive_seed(seed, prompt, k, "distill-noise") for prompt, k in chunk])
        for start, end in zip(boundaries, boundaries[1:]):
            result = denoiser.denoise(latents, conds, start, end)
            latents = result.latents
            if end < denoiser.num_steps:
                x0_parts[end].append(denoiser.decode(result.x0))
        final_parts.append(denoiser.decode(latents))
    return Trajectories(prompts=list(prompts), samples=samples,
                        x0={step: torch.cat(parts) for step, parts in x0_parts.items()},
                        final=torch.cat(final_parts))


def verifier_scores(verifier: Verifier, images: torch.Tensor, prompts: Sequence[str]
                    ) -> torch.Tensor:
    """``verifier``'s scores of ``images`` in chunks of :data:`SCORE_CHUNK`, float32 on the
    CPU."""
    parts = [verifier.score(images[i:i + SCORE_CHUNK], list(prompts[i:i + SCORE_CHUNK]))
             for i in range(0, images.shape[0], SCORE_CHUNK)]
    return torch.cat([p.detach().float().cpu() for p in parts])


# ---- 2. one curriculum stage -----------------------------------------------------------------
@dataclass(frozen=True)
class StageReport:
    step: int
    loss_before: float
    """Mean squared error over the stage's training set before its first update."""
    loss_after: float
    epoch_losses: list[float]
    """Mean training-batch loss of each epoch."""
    updates: int
    seconds: float


OBJECTIVES = ("mse", "within-prompt")
"""``mse``: the reference's regression of the student's score onto the teacher's final score.
``within-prompt``: the same regression after subtracting each prompt's mean from both sides.
Pruning only ever compares candidates of one prompt, and with plain MSE most of the error (and
of the gradient) is the spread between prompts, which a ranking inside a prompt never uses."""


def objective_loss(scores: torch.Tensor, targets: torch.Tensor, objective: str, samples: int,
                   reduction: str = "mean") -> torch.Tensor:
    """The stage's loss on rows that come in whole prompt groups of ``samples`` rows (for
    ``within-prompt``; ``mse`` takes any rows)."""
    if objective == "within-prompt":
        grouped_scores, grouped_targets = scores.view(-1, samples), targets.view(-1, samples)
        scores = grouped_scores - grouped_scores.mean(dim=1, keepdim=True)
        targets = grouped_targets - grouped_targets.mean(dim=1, keepdim=True)
    return F.mse_loss(scores.flatten(), targets.flatten(), reduction=reduction)


def mean_loss(adapter: Distillable, student: torch.nn.Module, images: torch.Tensor,
              prompts: Sequence[str], targets: torch.Tensor, batch: int, objective: str = "mse",
              samples: int = 1) -> float:
    """The student's mean loss against ``targets`` over all rows (no gradients); ``batch`` is
    rounded down to whole prompt groups."""
    total = 0.0
    batch = max(samples, batch - batch % samples)
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            scores = adapter.score(student, images[i:i + batch], prompts[i:i + batch])
            total += objective_loss(scores.float().cpu(), targets[i:i + batch], objective,
                                    samples, reduction="sum").item()
    return total / images.shape[0]


def train_stage(
    adapter: Distillable, student: torch.nn.Module, images: torch.Tensor,
    prompts: Sequence[str], targets: torch.Tensor, *, step: int, epochs: int, lr: float,
    batch: int, seed: int, progress: bool = True, objective: str = "mse", samples: int = 1,
) -> StageReport:
    """Regress ``student``'s scores of ``images`` (x0 estimates at ``step``) onto ``targets``
    (the teacher's scores of the same trajectories' final images), in place.

    AdamW without weight decay: decay would pull the student towards zero, not towards the
    teacher it starts from. The learning rate warms up linearly over the first tenth of the
    updates and decays linearly to zero: Adam's first updates move every weight by about the
    full learning rate whatever its gradient, which would knock a student that starts close to
    the answer (the teacher at a low-noise level) away from it. Batches are shuffled by a
    generator seeded from (seed, step): whole prompt groups of ``samples`` rows (rows are
    prompt-major), so a ``within-prompt`` batch always holds complete groups.
    """
    started = time.perf_counter()
    prompts = list(prompts)
    n = images.shape[0]
    if objective == "within-prompt":
        groups, batch_groups = n // samples, max(1, batch // samples)
    else:
        samples = 1
        groups, batch_groups = n, batch
    loss_before = mean_loss(adapter, student, images, prompts, targets, batch, objective,
                            samples)
    params = [p for p in student.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total_updates = epochs * math.ceil(groups / batch_groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _warmup_then_decay(total_updates))
    order = torch_generator(derive_seed(seed, "", step, "distill-shuffle"))
    epoch_losses, updates = [], 0
    bar = tqdm(total=total_updates, desc=f"step {step}", disable=not progress, leave=False)
    for _ in range(epochs):
        permutation = torch.randperm(groups, generator=order)
        total = 0.0
        for i in range(0, groups, batch_groups):
            chosen = permutation[i:i + batch_groups]
            rows = (chosen[:, None] * samples + torch.arange(samples)).flatten()
            scores = adapter.score(student, images[rows], [prompts[r] for r in rows.tolist()])
            loss = objective_loss(scores.float(), targets[rows].to(scores.device), objective,
                                  samples)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * rows.numel()
            updates += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3g}")
        epoch_losses.append(total / n)
    bar.close()
    return StageReport(step=step, loss_before=loss_before,
                       loss_after=mean_loss(adapter, student, images, prompts, targets, batch,
                                            objective, samples),
                       epoch_losses=epoch_losses, updates=updates,
                       seconds=time.perf_counter() - started)


def _warmup_then_decay(total: int) -> Callable[[int], float]:
    """Learning-rate factor of update ``i`` (0-based): linear warm-up over the first tenth of
    ``total`` updates (at least one), then linear decay that reaches zero after the last."""
    warmup = max(1, total // 10)

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return max(0.0, (total - i) / max(1, total - warmup))

    return factor


# ---- 3. ranking quality ----------------------------------------------------------------------
def kendall_taus(scores: torch.Tensor, finals: torch.Tensor, samples: int) -> list[float]:
    """Kendall tau between ``scores`` and ``finals`` within each prompt's ``samples`` rows, one
    per prompt; NaN where either side is constant (the ranking is undefined)."""
    return [float(kendalltau(scores[i:i + samples].numpy(), finals[i:i + samples].numpy())
                  .statistic) for i in range(0, scores.shape[0], samples)]


def paired_means(before: Sequence[float], after: Sequence[float]
                 ) -> tuple[float | None, float | None, int]:
    """Mean of each list over the prompts where both are defined, so the two means compare the
    same prompts; (None, None, 0) when there is none."""
    pairs = [(b, a) for b, a in zip(before, after) if not (math.isnan(b) or math.isnan(a))]
    if not pairs:
        return None, None, 0
    return (sum(b for b, _ in pairs) / len(pairs), sum(a for _, a in pairs) / len(pairs),
            len(pairs))


# ---- the whole run ---------------------------------------------------------------------------
def _check_saved(folder: Path, adapter: Distillable, student: torch.nn.Module,
                 images: torch.Tensor, prompts: Sequence[str], device: str) -> Verifier:
    """Load the saved student by path, as a search would, and make sure it scores like the
    trained network (a lost preprocessing or activation setting would not)."""
    loaded = create_verifier(str(folder), device=device)
    with torch.no_grad():
        trained = adapter.score(student, images, prompts).float().cpu()
    saved = verifier_scores(loaded, images, prompts)
    scale = max(1.0, trained.abs().max().item())
    gap = (saved - trained).abs().max().item()
    if gap > SAVED_SCORE_TOLERANCE * scale:
        raise DistillError(f"{folder}: the saved student scores up to {gap:.3g} away from the "
                           f"trained one; {adapter.teacher.name!r} cannot be saved faithfully")
    return loaded


def distill(
    *, denoiser: Denoiser, teacher: VerifierSpec, model: str, train_prompts: Sequence[str],
    eval_prompts: Sequence[str], out: Path, steps: Sequence[int], samples: int = 4,
    eval_samples: int | None = None, epochs: int = 3, lr: float = 1e-5, batch: int = 32,
    seed: int = 0, weights_dtype: str = "float32", objective: str = "mse",
    progress: bool = True, log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Distil ``teacher`` into one noise-aware student per pruning step on trajectories of
    ``denoiser``; write ``out/step-KK/`` folders and ``out/distilled.json``; return the
    manifest. ``model`` is recorded as the name the denoiser was loaded from.

    With ``weights_dtype="float16"`` each student is rounded to float16 in place before it is
    saved, so the checkpoint, the scores reported for it and the next level's starting point
    are the same weights.
    """
    steps = check_steps(steps, denoiser.num_steps)
    train_prompts, eval_prompts = _prompts(train_prompts, eval_prompts)
    eval_samples = eval_samples or samples
    _check_options(samples=samples, eval_samples=eval_samples, epochs=epochs, batch=batch,
                   lr=lr, out=out)
    if objective not in OBJECTIVES:
        raise DistillError(f"objective must be one of {', '.join(OBJECTIVES)}, "
                           f"got {objective!r}")
    if weights_dtype not in WEIGHTS_DTYPES:
        raise DistillError(f"weights dtype must be one of {', '.join(WEIGHTS_DTYPES)}, "
                           f"got {weights_dtype!r}")
    dtype = WEIGHTS_DTYPES[weights_dtype]
    device = str(denoiser.device)
    teacher_verifier = create_verifier(teacher, device=device)
    adapter = distillable(teacher_verifier)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    train = generate_trajectories(denoiser, train_prompts, samples, steps, seed, batch=batch,
                                  progress=progress, desc="train trajectories")
    held_out = generate_trajectories(denoiser, eval_prompts, eval_samples, steps, seed,
                                     batch=batch, progress=progress, desc="eval trajectories")
    timings["generate"] = time.perf_counter() - started
    log(f"trajectories: {len(train.prompts)} x {samples} to train, "
        f"{len(held_out.prompts)} x {eval_samples} held out "
        f"({timings['generate']:.0f}s)")

    started = time.perf_counter()
    targets = verifier_scores(teacher_verifier, train.final, train.row_prompts)
    eval_finals = verifier_scores(teacher_verifier, held_out.final, held_out.row_prompts)
    before = {step: kendall_taus(verifier_scores(teacher_verifier, held_out.x0[step],
                                                 held_out.row_prompts),
                                 eval_finals, eval_samples)
              for step in steps}
    timings["teacher_scores"] = time.perf_counter() - started

    out.mkdir(parents=True, exist_ok=True)
    teacher_label = teacher if isinstance(teacher, str) else json.loads(json.dumps(teacher))
    student = adapter.new_student()
    stages: dict[str, dict[str, Any]] = {}
    kendall: dict[str, dict[str, Any]] = {}
    parent = "teacher"
    started = time.perf_counter()
    for step in sorted(steps, reverse=True):  # least noisy level first
        report = train_stage(adapter, student, train.x0[step], train.row_prompts, targets,
                             step=step, epochs=epochs, lr=lr, batch=batch, seed=seed,
                             progress=progress, objective=objective, samples=samples)
        folder = out / student_folder(step)
        _round_to(student, dtype)
        adapter.save(student, folder, {"noise_aware": True, "step": step,
                                       "num_steps": denoiser.num_steps, "model": model,
                                       "teacher": teacher_label, "initialised_from": parent},
                     dtype=dtype)
        loaded = _check_saved(folder, adapter, student, held_out.x0[step][:8],
                              held_out.row_prompts[:8], device)
        tau_before, tau_after, counted = paired_means(
            before[step], kendall_taus(verifier_scores(loaded, held_out.x0[step],
                                                       held_out.row_prompts),
                                       eval_finals, eval_samples))
        stages[str(step)] = {"initialised_from": parent, "loss_before": report.loss_before,
                             "loss_after": report.loss_after,
                             "epoch_losses": report.epoch_losses, "updates": report.updates,
                             "seconds": round(report.seconds, 2)}
        kendall[str(step)] = {"before": tau_before, "after": tau_after, "prompts": counted}
        log(f"step {step}: loss {report.loss_before:.4g} -> {report.loss_after:.4g}, "
            f"kendall tau {_fmt(tau_before)} -> {_fmt(tau_after)}")
        parent = student_folder(step)
    timings["train"] = time.perf_counter() - started

    manifest = {
        "teacher": teacher_label,
        "model": model,
        "num_steps": denoiser.num_steps,
        "steps": {str(step): student_folder(step) for step in steps},
        "kendall_tau": {str(step): kendall[str(step)] for step in steps},
        "train": {
            "prompts": len(train.prompts), "samples": samples,
            "images": len(train.prompts) * samples, "eval_prompts": len(held_out.prompts),
            "eval_samples": eval_samples, "epochs": epochs, "lr": lr, "batch": batch,
            "seed": seed, "weights_dtype": weights_dtype, "objective": objective,
            "curriculum": sorted(steps, reverse=True), "stages": stages,
            "seconds": {k: round(v, 2) for k, v in timings.items()},
        },
    }
    (out / DISTILLED_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _round_to(student: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round the student's floating-point weights and buffers to ``dtype``'s precision, in
    place (they stay float32 tensors)."""
    with torch.no_grad():
        for tensor in student.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype))


def _check_options(*, samples: int, eval_samples: int, epochs: int, batch: int, lr: float,
                   out: Path) -> None:
    for name, value in (("epochs", epochs), ("batch", batch)):
        if value < 1:
            raise DistillError(f"{name} must be at least 1, got {value}")
    if samples < 2 or eval_samples < 2:
        raise DistillError("samples: need at least 2 trajectories per prompt to rank them")
    if not lr > 0:
        raise DistillError(f"lr must be positive, got {lr}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DistillError(f"out: {out} exists and is not an empty folder; choose a new one")


def _prompts(train: Sequence[str], held_out: Sequence[str]) -> tuple[list[str], list[str]]:
    """Distinct prompts (a repeated prompt would repeat its seeds, hence its trajectories);
    held-out prompts that also appear in training are dropped."""
    train_list = list(dict.fromkeys(train))
    seen = set(train_list)
    eval_list = [p for p in dict.fromkeys(held_out) if p not in seen]
    if not train_list:
        raise DistillError("prompts: no training prompts")
    if not eval_list:
        raise DistillError("eval prompts: none left that are not also training prompts")
    return train_list, eval_list


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def format_table(manifest: dict[str, Any]) -> str:
    """The Kendall tau table of a manifest: one row per step, before and after distillation."""
    lines = ["step  kendall tau before  after  (held-out prompts)"]
    for step, row in manifest["kendall_tau"].items():
        lines.append(f"{int(step):>4}  {_fmt(row['before']):>18}  {_fmt(row['after']):>5}  "
                     f"({row['prompts']})")
    return "\n".join(lines)
