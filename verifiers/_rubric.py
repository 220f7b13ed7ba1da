"""What the judges (``vlm`` local, ``openai`` over an API) share: their options' checks, the
question templates, the rubric's grading prompt, the reply's schema, and how aspect scores and
samples combine. Pure functions of text and numbers, so they are tested without a model; every
message names the judge it is about.

The prompt follows the grading prompt of Ma et al. 2025 ("Inference-Time Scaling for Diffusion
Models beyond Scaling Denoising Steps"): named aspects, each scored 0..10, answered as one JSON
object. A reply is valid when it holds a JSON object (fenced or surrounded by prose is fine)
whose every aspect is a number in range; extra keys (a "reasoning" field) are allowed.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from diffsearch.verifiers.base import VerifierError

RUBRIC_MAX = 10.0
"""Aspect scores run from 0 (worst) to RUBRIC_MAX (best), as in the grading prompt."""

DEFAULT_ASPECTS: dict[str, str] = {
    "prompt_accuracy": "how faithfully the image shows everything the prompt asks for",
    "visual_quality": "realism, detail and the absence of artifacts",
    "creativity": "originality and visual interest within what the prompt asks",
    "overall": "your overall judgement of the image for this prompt",
}

RUBRIC_QUESTION = (
    'You are grading an image generated from the prompt "{prompt}". Score each aspect from 0 '
    "(worst) to 10 (best):\n{aspects}\nReply with only a JSON object holding these keys and "
    "numbers, for example {example}."
)
"""The default ``question`` in rubric mode; ``{aspects}`` and ``{example}`` are filled in."""

COMBINES = ("mean", "majority")
MODES = ("yes-probability", "rubric")
YES_QUESTION = 'Does this image show "{prompt}"? Answer yes or no.'
"""The default ``question`` in yes-probability mode."""
QUOTE_CHARS = 200
"""How much of an unparseable reply an error message quotes."""


class RubricReplyError(VerifierError):
    """A judge's reply is not a JSON object of the aspect scores; the message quotes it."""


def normalise_aspects(aspects: Sequence[str] | Mapping[str, str] | None, *, judge: str
                      ) -> dict[str, str]:
    """Aspect name -> description (empty for names given as a list), checked."""
    if aspects is None:
        return dict(DEFAULT_ASPECTS)
    if isinstance(aspects, Mapping):
        named = {str(k): str(v) for k, v in aspects.items()}
    elif isinstance(aspects, Sequence) and not isinstance(aspects, str):
        named = {str(name): "" for name in aspects}
        if len(named) != len(aspects):
            raise VerifierError(f"{judge}: aspects must not repeat a name")
    else:
        raise VerifierError(f"{judge}: aspects must be a list of names or a mapping of name to "
                            f"description, got {type(aspects).__name__}")
    if not named or not all(name.strip() for name in named):
        raise VerifierError(f"{judge}: aspects must name at least one aspect, each non-empty")
    return named


def normalise_weights(weights: Mapping[str, float] | None, aspects: Sequence[str], *,
                      judge: str) -> dict[str, float]:
    """Weight of every aspect: 1 each by default; when given, unnamed aspects weigh 0."""
    if weights is None:
        return {name: 1.0 for name in aspects}
    if not isinstance(weights, Mapping):
        raise VerifierError(f"{judge}: weights must map aspect names to numbers, got "
                            f"{type(weights).__name__}")
    unknown = sorted(set(weights) - set(aspects))
    if unknown:
        raise VerifierError(f"{judge}: weights name unknown aspect(s) {', '.join(unknown)}; "
                            f"aspects: {', '.join(aspects)}")
    table = {name: 0.0 for name in aspects}
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0 \
                or not math.isfinite(weight):
            raise VerifierError(f"{judge}: weights.{name} must be a number >= 0, got {weight!r}")
        table[name] = float(weight)
    if sum(table.values()) <= 0:
        raise VerifierError(f"{judge}: weights must give at least one aspect a positive weight")
    return table


def rubric_fields(aspects: Mapping[str, str]) -> dict[str, str]:
    """The ``{aspects}`` and ``{example}`` text of the grading prompt."""
    lines = "\n".join(f"- {name}: {text}" if text else f"- {name}"
                      for name, text in aspects.items())
    example = json.dumps({name: 7 for name in aspects})
    return {"aspects": lines, "example": example}


def _quote(reply: str) -> str:
    text = " ".join(reply.split())
    return repr(text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "...")


def _first_object(reply: str) -> dict[str, Any] | None:
    """The first JSON object in ``reply`` (code fences and prose around it are skipped)."""
    decoder = json.JSONDecoder()
    start = reply.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(reply, start)
        except json.JSONDecodeError:
            pass
        else:
            if isinstance(value, dict):
                return value
        start = reply.find("{", start + 1)
    return None


def parse_rubric(reply: str, aspects: Sequence[str]) -> dict[str, float]:
    """Every aspect's score from a judge's reply; RubricReplyError (quoting the reply) when there
    is no JSON object, an aspect is missing, or a score is not a number in [0, RUBRIC_MAX]."""
    found = _first_object(reply)
    if found is None:
        raise RubricReplyError(f"the judge's reply holds no JSON object: {_quote(reply)}")
    missing = [name for name in aspects if name not in found]
    if missing:
        raise RubricReplyError(f"the judge's reply lacks {', '.join(missing)}: {_quote(reply)}")
    scores = {}
    for name in aspects:
        value = found[name]
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not 0 <= value <= RUBRIC_MAX:
            raise RubricReplyError(f"the judge's {name} is {value!r}, not a number in "
                                   f"[0, {RUBRIC_MAX:g}]: {_quote(reply)}")
        scores[name] = float(value)
    return scores


def weighted_score(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """The weighted mean of the aspect scores (so it stays on the 0..RUBRIC_MAX scale)."""
    return sum(weights[name] * scores[name] for name in weights) / sum(weights.values())


def combine_samples(values: Sequence[float], combine: str) -> float:
    """One score from a candidate's sampled judgements: their ``mean``, or the ``majority``
    (most frequent) value, a tie going to the lowest of the tied values (the cautious pick)."""
    if not values:
        raise ValueError("no samples to combine")
    if combine == "mean":
        return sum(values) / len(values)
    counts = Counter(values)
    top = max(counts.values())
    return min(value for value, count in counts.items() if count == top)


def is_whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def is_number(value: Any, *, positive: bool) -> bool:
    """A finite int or float (not a bool), > 0 when ``positive``, else >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return value > 0 if positive else value >= 0


def check_judge_options(judge: str, *, mode: Any, samples: Any, temperature: Any, combine: Any,
                        max_new_tokens: Any) -> None:
    """One-line errors for the options every judge shares (local or over an API), named after
    ``judge``, before anything slow (a model load, a request)."""
    if mode not in MODES:
        raise VerifierError(f"{judge}: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if combine not in COMBINES:
        raise VerifierError(f"{judge}: combine must be one of {', '.join(COMBINES)}, "
                            f"got {combine!r}")
    if not is_whole(samples, 1):
        raise VerifierError(f"{judge}: samples must be a whole number >= 1, got {samples!r}")
    if not is_number(temperature, positive=False):
        raise VerifierError(f"{judge}: temperature must be a number >= 0, got {temperature!r}")
    if mode == "yes-probability" and (samples != 1 or temperature != 0):
        raise VerifierError(f"{judge}: samples and temperature apply to mode: rubric "
                            f"(yes-probability reads the probability; nothing to sample)")
    if samples > 1 and temperature == 0:
        raise VerifierError(f"{judge}: samples > 1 needs temperature > 0 (greedy replies would "
                            f"all be the same)")
    if not is_whole(max_new_tokens, 1):
        raise VerifierError(f"{judge}: max_new_tokens must be a whole number >= 1, "
                            f"got {max_new_tokens!r}")


def check_question(judge: str, mode: str, question: str | None,
                   fields: Mapping[str, str]) -> str:
    """The question template (the mode's default when None), checked by filling it once with
    ``fields`` (the rubric's ``{aspects}`` and ``{example}``)."""
    if question is None:
        return RUBRIC_QUESTION if mode == "rubric" else YES_QUESTION
    if not isinstance(question, str) or "{prompt}" not in question:
        raise VerifierError(f"{judge}: question must be a string containing {{prompt}}")
    try:
        question.format(prompt="x", **fields)
    except (KeyError, IndexError, ValueError) as error:
        allowed = "{prompt}, {aspects}, {example}" if mode == "rubric" else "{prompt}"
        raise VerifierError(f"{judge}: question may use only {allowed} (double other braces): "
                            f"{type(error).__name__}: {error}") from None
    return question
