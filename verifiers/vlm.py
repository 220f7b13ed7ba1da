"""``vlm``: a local vision-language model as the judge (Qwen2.5-VL, Qwen2-VL, LLaVA-OneVision,
Idefics3, SmolVLM, ... any transformers image-text-to-text model with a chat template).

Two ways to turn the judge into a score:

- ``yes-probability`` (VQAScore, Lin et al. 2024; the default): ask a yes/no question about the
  image and read the probability of "Yes" as the answer's first token, softmax over the whole
  vocabulary in float32. A probability in [0, 1], no generation, deterministic.
- ``rubric`` (the grading prompt of Ma et al. 2025): ask for a JSON object of named aspect
  scores 0..10, generate greedily, check the reply against the aspects and take their weighted
  mean. An unparseable reply fails that candidate alone (see :meth:`VlmVerifier.score`).

Judge self-consistency (J1, 2025): ``samples: k`` with ``temperature > 0`` samples k rubric
replies and combines their scores (``combine: mean | majority``); it costs k judge calls, which
is what ``calls_per_score`` reports.

Pitfalls handled here, all measured: the answer's first token is found by rendering an
assistant turn (Qwen answers "Yes", Idefics3 " Yes", LLaVA-OneVision "Yes" although its
assistant turn and generation prompt disagree in whitespace, see :func:`answer_text`); the
processor's chat template is applied with tokenisation so no second BOS is added; rows are
left-padded (image token counts differ by model and image shape, and Idefics3 and
LLaVA-OneVision tile images) and everything the processor returns is passed on; float images
become uint8 PIL images first (processors rescale by 1/255 again); a fresh greedy configuration
replaces the checkpoint's sampling defaults.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from PIL import Image

from diffsearch.verifiers._preprocess import DEFAULT_CHUNK, check_batch, encode_fixed_chunks
from diffsearch.verifiers._rubric import (
    RubricReplyError,
    check_judge_options,
    check_question,
    combine_samples,
    normalise_aspects,
    normalise_weights,
    parse_rubric,
    rubric_fields,
    weighted_score,
)
from diffsearch.verifiers._weights import from_pretrained_local
from diffsearch.verifiers.base import Verifier, VerifierError

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
"""The default ``question`` in yes-probability mode (VQAScore's wording)."""
ANSWER = "Yes"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype(device: torch.device, name: str | None) -> torch.dtype:
    """bfloat16 on CUDA unless named: VLMs are released in bf16 and float16 overflows in some
    (Qwen2's activations); float32 elsewhere."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise VerifierError(f"vlm: dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float (B, 3, H, W) images in [0, 1] as 8-bit RGB PIL images, the processors' own input
    (given floats they would rescale by 1/255 a second time)."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(row.permute(1, 2, 0).cpu().numpy(), "RGB") for row in pixels]


def answer_text(asked: str, answered: str) -> str | None:
    """What follows the generation prompt ``asked`` when the model answers as the template's
    assistant turn (``answered``, the conversation with the answer appended) writes it; None
    when the two do not fit together.

    Mostly the assistant turn extends the generation prompt and the answer is the rest.
    LLaVA-OneVision's does not: its turns open with ``<|im_start|>assistant `` and the text
    follows on a new line, while its generation prompt is ``<|im_start|>assistant\\n``. When
    the two differ only in the whitespace before the answer, the prompt's whitespace already
    separates it, so the answer follows with none of its own (as the model was trained:
    ``assistant\\nYes``).
    """
    if answered.startswith(asked):
        return answered[len(asked):]
    common = len(os.path.commonprefix([asked, answered]))
    asked_rest, answered_rest = asked[common:], answered[common:]
    answer = answered_rest.lstrip()
    if asked_rest.isspace() and answer != answered_rest and answer.startswith(ANSWER):
        return answer
    return None


def _row_seed(seed: int, sample: int, image: Image.Image, prompt: str) -> int:
    """A sampling seed of one row that depends on its content, not on its place in a batch."""
    digest = hashlib.sha256(f"{seed}\0{sample}\0{prompt}\0".encode() + image.tobytes())
    return int.from_bytes(digest.digest()[:8], "little") & (2 ** 63 - 1)


class _RowSampler:
    """A logits processor that makes greedy decoding sample at ``temperature``, each row from its
    own generator: argmax(logits / T + Gumbel noise) is an exact draw from softmax(logits / T)
    (the Gumbel-max trick), and a row's noise never depends on its batch-mates (transformers'
    own sampling draws every row from one global RNG)."""

    def __init__(self, temperature: float, generators: list[torch.Generator]) -> None:
        self.temperature, self.generators = temperature, generators

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab, tiny = scores.shape[-1], torch.finfo(torch.float32).tiny
        uniform = torch.stack([torch.rand(vocab, generator=g, device=scores.device)
                               for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(tiny, 1 - 1e-7)))
        return scores.float() / self.temperature + gumbel


class VlmVerifier(Verifier):
    """A vision-language model judging each (image, prompt) pair."""

    name: ClassVar[str] = "vlm"
    needs_prompt: ClassVar[bool] = True
    input_size: ClassVar[int | None] = None

    def __init__(self, device: str | torch.device = "cpu", model: str = DEFAULT_MODEL,
                 mode: str = "yes-probability", question: str | None = None,
                 aspects: Sequence[str] | Mapping[str, str] | None = None,
                 weights: Mapping[str, float] | None = None, samples: int = 1,
                 temperature: float = 0.0, combine: str = "mean", seed: int = 0,
                 max_new_tokens: int = 200, allow_download: bool = False,
                 dtype: str | None = None, chunk: int = DEFAULT_CHUNK, **options: Any) -> None:
        super().__init__(device, **options)
        self._check_options(mode, samples, temperature, combine, seed, max_new_tokens, chunk)
        self.mode, self.samples, self.temperature = mode, samples, float(temperature)
        self.combine, self.seed, self.max_new_tokens, self.chunk = (combine, seed,
                                                                     max_new_tokens, chunk)
        self.calls_per_score = samples
        rubric = mode == "rubric"
        self.aspects = normalise_aspects(aspects, judge="vlm") if rubric else {}
        self.weights = normalise_weights(weights, list(self.aspects), judge="vlm") if rubric else {}
        if mode != "rubric" and (aspects is not None or weights is not None):
            raise VerifierError("vlm: aspects and weights apply to mode: rubric")
        # what the question template may use besides {prompt}
        self._fields = rubric_fields(self.aspects) if mode == "rubric" else {}
        self.question = check_question("vlm", mode, question, self._fields)
        self.dtype = _dtype(self.device, dtype)
        self.model_name = model
        self._load(model, allow_download)
        self.answer_token = self._answer_token() if mode == "yes-probability" else None

    @staticmethod
    def _check_options(mode: str, samples: int, temperature: float, combine: str, seed: int,
                       max_new_tokens: int, chunk: int) -> None:
        """One-line errors for bad options, before the (slow) model load."""
        check_judge_options("vlm", mode=mode, samples=samples, temperature=temperature,
                            combine=combine, max_new_tokens=max_new_tokens)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise VerifierError(f"vlm: seed must be a whole number, got {seed!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise VerifierError(f"vlm: chunk must be a whole number >= 1, got {chunk!r}")

    def _load(self, model: str, allow_download: bool) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = from_pretrained_local("vlm model", AutoProcessor, model,
                                               allow_download)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None or not getattr(self.processor, "chat_template", None):
            raise VerifierError(f"vlm: {model!r} has no processor with a tokenizer and a chat "
                                f"template; use an instruction-tuned image-text-to-text model")
        tokenizer.padding_side = "left"  # the next token is read at the last position
        loader = SimpleNamespace(from_pretrained=lambda source, **kwargs:
                                 AutoModelForImageTextToText.from_pretrained(
                                     source, dtype=self.dtype, **kwargs))
        try:
            loaded = from_pretrained_local("vlm model", loader, model, allow_download)
        except ValueError as error:  # a config that no image-text-to-text class takes
            raise VerifierError(f"vlm: {model!r} is not an image-text-to-text model: "
                                f"{' '.join(str(error).split())[:240]}") from error
        self.model = loaded.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer

    def _conversation(self, prompt: str, image: Image.Image | None,
                      answer: str | None = None) -> list[dict[str, Any]]:
        text = self.question.format(prompt=prompt, **self._fields)
        image_part = {"type": "image"} if image is None else {"type": "image", "image": image}
        turns = [{"role": "user", "content": [image_part, {"type": "text", "text": text}]}]
        if answer is not None:
            turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return turns

    def _answer_token(self) -> int:
        """The id of the first token of the answer "Yes" as the chat template writes it (Qwen
        "Yes", Idefics3 " Yes", LLaVA-OneVision "Yes"): the first token after the generation
        prompt."""
        render = self.processor.apply_chat_template
        asked = render(self._conversation("x", None), add_generation_prompt=True, tokenize=False)
        answered = render(self._conversation("x", None, ANSWER), tokenize=False)
        continuation = answer_text(asked, answered)
        prompt_ids = self.tokenizer(asked, add_special_tokens=False)["input_ids"]
        full_ids = self.tokenizer(asked + (continuation or ""),
                                  add_special_tokens=False)["input_ids"]
        if continuation is None or full_ids[:len(prompt_ids)] != prompt_ids \
                or len(full_ids) == len(prompt_ids):
            raise VerifierError(f"vlm: cannot find where the answer starts in {self.model_name!r}"
                                f"'s chat template (the assistant turn neither extends the "
                                f"generation prompt nor differs from it only in whitespace)")
        return int(full_ids[len(prompt_ids)])

    def _inputs(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        """The processor's whole output for a batch, left-padded, on the device; floating
        tensors (pixels) in the model's dtype."""
        batch = self.processor.apply_chat_template(
            [self._conversation(p, image) for image, p in zip(images, prompts, strict=True)],
            add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True})
        return {key: value.to(self.device, self.dtype) if value.is_floating_point()
                else value.to(self.device) for key, value in batch.items()}

    def _generate(self, inputs: dict[str, torch.Tensor], max_new_tokens: int,
                  sampler: _RowSampler | None = None) -> Any:
        """Greedy decoding with nothing from the checkpoint's generation defaults but its
        special tokens (Qwen's ship do_sample, top_k and a repetition penalty)."""
        from transformers import GenerationConfig, LogitsProcessorList

        own = self.model.generation_config
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
            temperature=1.0, top_k=None, top_p=1.0, eos_token_id=own.eos_token_id,
            pad_token_id=own.pad_token_id if own.pad_token_id is not None
            else self.tokenizer.pad_token_id, bos_token_id=own.bos_token_id,
            output_logits=True, return_dict_in_generate=True)
        processors = LogitsProcessorList([sampler] if sampler is not None else [])
        return self.model.generate(**inputs, generation_config=config,
                                   logits_processor=processors)

    def _yes_probability(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        logits = self._generate(self._inputs(images, prompts), max_new_tokens=1).logits[0]
        probabilities = torch.softmax(logits.float(), dim=-1)[:, self.answer_token]
        return probabilities.cpu().tolist()

    def _rubric(self, images: list[Image.Image], prompts: list[str]
                ) -> list[float | RubricReplyError]:
        """Each row's combined rubric score, or the error of its (every) unparseable reply."""
        inputs = self._inputs(images, prompts)
        start = inputs["input_ids"].shape[1]
        values: list[list[float]] = [[] for _ in images]
        errors: list[RubricReplyError | None] = [None] * len(images)
        for sample in range(self.samples):
            sampler = None
            if self.temperature > 0:
                generators = [torch.Generator(self.device).manual_seed(
                    _row_seed(self.seed, sample, image, prompt))
                    for image, prompt in zip(images, prompts, strict=True)]
                sampler = _RowSampler(self.temperature, generators)
            sequences = self._generate(inputs, self.max_new_tokens, sampler).sequences
            replies = self.tokenizer.batch_decode(sequences[:, start:], skip_special_tokens=True)
            for row, reply in enumerate(replies):
                try:
                    scores = parse_rubric(reply, list(self.aspects))
                except RubricReplyError as error:
                    errors[row] = errors[row] or error
                else:
                    values[row].append(weighted_score(scores, self.weights))
        return [combine_samples(v, self.combine) if v else errors[row]  # type: ignore[misc]
                for row, v in enumerate(values)]

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores in fixed-size chunks of ``chunk`` rows (the last padded by repetition), so a
        row's batch-mates are the same whatever batch it arrives in.

        A row whose every rubric reply is unparseable makes this call raise a VerifierError
        quoting the reply. That is how a failure stays with its candidate: the runtime retries a
        chunk that raises row by row, so the other rows are scored again alone (deterministic)
        and only the bad one fails, with this message. The interface has no per-row error, so
        the price of a bad reply is one more pass over the rows scored with it.
        """
        check_batch(self.name, images, prompts)
        pil, texts = to_pil(images), list(prompts)
        failures: dict[int, RubricReplyError] = {}

        def judge(rows: torch.Tensor) -> torch.Tensor:
            index = rows.tolist()
            chunk_images, chunk_prompts = [pil[i] for i in index], [texts[i] for i in index]
            if self.mode == "yes-probability":
                return torch.tensor(self._yes_probability(chunk_images, chunk_prompts),
                                    dtype=torch.float64)
            outcomes = self._rubric(chunk_images, chunk_prompts)
            for row, outcome in zip(index, outcomes, strict=True):
                if isinstance(outcome, RubricReplyError):
                    failures[row] = outcome
            return torch.tensor([o if isinstance(o, float) else float("nan") for o in outcomes],
                                dtype=torch.float64)

        scores = encode_fixed_chunks(judge, torch.arange(len(texts)), self.chunk)
        if failures:
            first = min(failures)
            raise VerifierError(f"{failures[first]} (row {first}; {len(failures)} of "
                                f"{len(texts)} rows failed)")
        return scores.float()

    def describe(self) -> dict[str, Any]:
        info = super().describe() | {"model": self.model_name, "mode": self.mode,
                                     "dtype": str(self.dtype).removeprefix("torch.")}
        if self.mode == "yes-probability":
            return info | {"answer_token": self.tokenizer.decode([self.answer_token])}
        return info | {"aspects": list(self.aspects), "weights": self.weights,
                       "samples": self.samples, "temperature": self.temperature,
                       "combine": self.combine, "seed": self.seed}
