"""Scoring rows with a verifier the way the denoiser computes them: in fixed-size chunks.

A verifier's output for a row may depend on the batch shape it was computed in (CPU kernels
round differently per shape), so chunks are always ``size`` rows, the last one padded with
copies of its final row. A chunk that raises is retried row by row, so one bad candidate fails
alone, with its error, and the others keep their scores.
"""

from __future__ import annotations

import math
import traceback

import torch

from diffsearch.errors import DiffsearchError
from diffsearch.verifiers.base import Verifier


def score_in_chunks(verifier: Verifier, label: str, inputs: torch.Tensor, prompts: list[str],
                    size: int) -> tuple[list[float], list[str | None]]:
    """Each row's score and, for rows that failed, why (None where it succeeded)."""
    values: list[float] = []
    failures: list[str | None] = []
    for begin in range(0, inputs.shape[0], size):
        chunk, chunk_prompts = inputs[begin:begin + size], prompts[begin:begin + size]
        try:
            values.extend(_score_padded(verifier, chunk, chunk_prompts, size))
            failures.extend([None] * chunk.shape[0])
        except Exception:
            for row in range(chunk.shape[0]):
                try:
                    values.extend(_score_padded(verifier, chunk[row:row + 1],
                                                chunk_prompts[row:row + 1], size))
                    failures.append(None)
                except Exception as error:  # a plugin may raise anything
                    values.append(math.nan)
                    failures.append(f"verifier {label!r} failed: "
                                    f"{type(error).__name__}: {error}")
                    if not isinstance(error, DiffsearchError):  # a bug, not the input
                        traceback.print_exc()
    return values, failures


def _score_padded(verifier: Verifier, inputs: torch.Tensor, prompts: list[str], size: int
                  ) -> list[float]:
    real = inputs.shape[0]
    if real < size:
        inputs = torch.cat([inputs, inputs[-1:].expand(size - real, *inputs.shape[1:])])
        prompts = prompts + [prompts[-1]] * (size - real)
    values = verifier.score(inputs, prompts).detach().to("cpu", torch.float64)[:real].tolist()
    for value in values:
        if not math.isfinite(value):
            raise ValueError(f"non-finite score {value}")
    return values


def same_shape_groups(inputs: torch.Tensor | list[torch.Tensor], rows: list[int]
                      ) -> list[tuple[list[int], torch.Tensor]]:
    """``rows`` of ``inputs`` as stacked batches: one for an image tensor, one per clip length
    for a list of clips (a verifier scores a rectangular batch)."""
    if isinstance(inputs, torch.Tensor):
        return [(rows, inputs[rows])] if rows else []
    groups: dict[tuple[int, ...], list[int]] = {}
    for row in rows:
        groups.setdefault(tuple(inputs[row].shape), []).append(row)
    return [(group, torch.stack([inputs[r] for r in group])) for group in groups.values()]
