"""``openai``: any OpenAI-compatible chat-completions endpoint that takes images as the judge
(GPT-4o, Gemini's OpenAI-compatible endpoint, vLLM, Ollama, LM Studio), through the official
``openai`` client. Named so it does not shadow that package.

The judging is the ``vlm`` verifier's, asked over HTTP: the same question templates, rubric
prompt and parser (``diffsearch.verifiers._rubric``), and the same modes:

- ``rubric`` (the default here, since every endpoint can answer it): the reply is a JSON object
  of aspect scores 0..10 and the score is their weighted mean; ``samples: k`` at
  ``temperature > 0`` asks k times and combines (J1-style self-consistency).
- ``yes-probability``: one token is asked for with ``logprobs``; the score is the probability
  mass of the top alternatives that read "yes" (any case, any surrounding space). An endpoint
  that returns no logprobs gets a one-line error saying to use rubric.

What an API judge needs that a local one does not, all here: network use only when the job says
``allow_network: true``; the key read from the environment variable ``api_key_env`` names and
never written anywhere (it is also scrubbed from error text, since servers echo it); requests
run ``max_concurrency`` at a time with scores put back in input order; retries with
exponential backoff and jitter on 429, 5xx, timeouts and dropped connections, honouring
Retry-After, done here with the client's own retries off so they are bounded and counted; and a
reply cache (in memory, plus ``cache_dir`` on disk) so a repeated or resumed run, the runtime's
row-by-row retry of a chunk and the padded rows of a short chunk are not paid twice.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from diffsearch.verifiers._preprocess import check_batch
from diffsearch.verifiers._rubric import (
    RubricReplyError,
    check_judge_options,
    check_question,
    combine_samples,
    is_number,
    is_whole,
    normalise_aspects,
    normalise_weights,
    parse_rubric,
    rubric_fields,
    weighted_score,
)
from diffsearch.verifiers.base import Verifier, VerifierError
from diffsearch.verifiers.vlm import to_pil

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
NO_KEY = "none"
"""Sent as the key when ``api_key_env`` is null: the client needs one, local servers ignore it."""
TOP_LOGPROBS = 20
"""Alternatives asked for in yes-probability mode (the most OpenAI allows)."""
BACKOFF_SECONDS = 0.5
"""The wait before the first retry; it doubles each retry, times a random factor in [0.5, 1]."""
BACKOFF_CAP_SECONDS = 20.0
RETRY_AFTER_CAP_SECONDS = 60.0
"""The longest a server's Retry-After is honoured for, so a run cannot stall for hours."""
RETRY_STATUSES = frozenset({408, 409, 429})
"""Statuses worth retrying besides every 5xx."""
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
"""What ``api_key_env`` may be: an upper-case variable name. Keys have lower-case letters or
dashes, so a key pasted there is refused without being repeated in the message."""
_MESSAGE_CHARS = 200
"""How much of a server's error text an error message quotes."""


class _RequestFailed(Exception):
    """A request that failed for good (after its retries); the message is one redacted line."""


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pixel_hash(image: Image.Image) -> str:
    """The image's identity in the cache: its size and 8-bit pixels (not the PNG bytes, which
    depend on the encoder's version)."""
    digest = hashlib.sha256(f"{image.width}x{image.height}\0".encode() + image.tobytes())
    return digest.hexdigest()


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds a server asked to wait (``retry-after-ms``, or ``Retry-After`` as seconds or an
    HTTP date), capped at RETRY_AFTER_CAP_SECONDS; None when it did not say."""
    if not headers:
        return None
    seconds: float | None = None
    if (millis := headers.get("retry-after-ms")) is not None:
        try:
            seconds = float(millis) / 1000
        except ValueError:
            seconds = None
    if seconds is None and (value := headers.get("retry-after")) is not None:
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                return None
    if seconds is None or not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_SECONDS)


class ReplyCache:
    """Replies by request key: in memory for the verifier's life, and in ``folder`` (one JSON
    file per key, written to a temporary file then renamed, so a killed run leaves no torn file)
    when given. A file that cannot be read is a miss and is written again."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._memory: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            if key in self._memory:
                return self._memory[key]
        if self.folder is None:
            return None
        try:
            record = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict):
            return None
        with self._lock:
            self._memory[key] = record
        return record

    def put(self, key: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._memory[key] = record
        if self.folder is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(record, file)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


class OpenAIJudge(Verifier):
    """A chat-completions endpoint judging each (image, prompt) pair."""

    name: ClassVar[str] = "openai"
    needs_prompt: ClassVar[bool] = True
    input_size: ClassVar[int | None] = None

    def __init__(self, device: str | torch.device = "cpu", model: str | None = None,
                 base_url: str = DEFAULT_BASE_URL, api_key_env: str | None = DEFAULT_KEY_ENV,
                 allow_network: bool = False, mode: str = "rubric", question: str | None = None,
                 aspects: Sequence[str] | Mapping[str, str] | None = None,
                 weights: Mapping[str, float] | None = None, samples: int = 1,
                 temperature: float = 0.0, combine: str = "mean", max_new_tokens: int = 200,
                 max_concurrency: int = 4, timeout: float = 60.0, max_retries: int = 4,
                 cache_dir: str | None = None, **options: Any) -> None:
        if "api_key" in options:
            raise VerifierError("openai: the API key is never an option (it would be stored "
                                "with the run); put it in an environment variable and name "
                                "that with api_key_env")
        super().__init__(device, **options)
        self._check_options(model, base_url, mode, samples, temperature, combine,
                            max_new_tokens, max_concurrency, timeout, max_retries)
        self.model, self.base_url, self.mode = model, base_url.rstrip("/"), mode
        self.samples, self.temperature, self.combine = samples, float(temperature), combine
        self.max_new_tokens, self.max_concurrency = max_new_tokens, max_concurrency
        self.timeout, self.max_retries = float(timeout), max_retries
        self.calls_per_score = samples
        rubric = mode == "rubric"
        if not rubric and (aspects is not None or weights is not None):
            raise VerifierError("openai: aspects and weights apply to mode: rubric")
        self.aspects = normalise_aspects(aspects, judge="openai") if rubric else {}
        self.weights = (normalise_weights(weights, list(self.aspects), judge="openai")
                        if rubric else {})
        self._fields = rubric_fields(self.aspects) if rubric else {}
        self.question = check_question("openai", mode, question, self._fields)
        if allow_network is not True:
            raise VerifierError(f"openai: this verifier sends images to {self.base_url}; set "
                                f"its option allow_network: true to allow network use")
        self.cache = ReplyCache(self._cache_folder(cache_dir))
        self.api_key_env = api_key_env
        self._key = self._read_key(api_key_env)
        self._client = self._make_client()
        self._usage = dict.fromkeys(("requests", "retries", "cache_hits", "prompt_tokens",
                                     "completion_tokens"), 0)
        self._lock = threading.Lock()
        self._random = random.Random()

    @staticmethod
    def _check_options(model: Any, base_url: Any, mode: str, samples: Any, temperature: Any,
                       combine: str, max_new_tokens: Any, max_concurrency: Any, timeout: Any,
                       max_retries: Any) -> None:
        """One-line errors for bad options, before anything reaches the network."""
        if not isinstance(model, str) or not model.strip():
            raise VerifierError("openai: model is required: the model name the endpoint serves "
                                "(e.g. gpt-4o, Qwen/Qwen2.5-VL-7B-Instruct, qwen2.5vl:7b)")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise VerifierError(f"openai: base_url must be an http:// or https:// URL, "
                                f"got {base_url!r}")
        check_judge_options("openai", mode=mode, samples=samples, temperature=temperature,
                            combine=combine, max_new_tokens=max_new_tokens)
        if not is_whole(max_concurrency, 1):
            raise VerifierError(f"openai: max_concurrency must be a whole number >= 1, "
                                f"got {max_concurrency!r}")
        if not is_whole(max_retries, 0):
            raise VerifierError(f"openai: max_retries must be a whole number >= 0, "
                                f"got {max_retries!r}")
        if not is_number(timeout, positive=True):
            raise VerifierError(f"openai: timeout must be a number of seconds > 0, "
                                f"got {timeout!r}")

    @staticmethod
    def _cache_folder(cache_dir: Any) -> Path | None:
        if cache_dir is None:
            return None
        if not isinstance(cache_dir, str) or not cache_dir:
            raise VerifierError(f"openai: cache_dir must be a folder path, got {cache_dir!r}")
        folder = Path(cache_dir).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise VerifierError(f"openai: cache_dir {str(folder)!r} cannot be created: "
                                f"{error.strerror or error}") from None
        return folder

    @staticmethod
    def _read_key(api_key_env: Any) -> str:
        """The key from the environment (checked here, before any request)."""
        if api_key_env is None:
            return NO_KEY
        if not isinstance(api_key_env, str) or not _ENV_NAME.fullmatch(api_key_env):
            raise VerifierError("openai: api_key_env must be the NAME of an environment "
                                "variable holding the key (capital letters, digits and _, e.g. "
                                "OPENAI_API_KEY), not the key itself; null for a server that "
                                "needs no key")
        key = os.environ.get(api_key_env, "")
        if not key.strip():
            raise VerifierError(f"openai: the environment variable {api_key_env} (api_key_env) "
                                f"is not set; export the API key in it, or set api_key_env: "
                                f"null for a server that needs no key")
        return key

    def _make_client(self) -> Any:
        try:
            import openai
        except ImportError:
            raise VerifierError("openai: the openai package is not installed; "
                                "pip install 'diffsearch[openai]'") from None
        # the client's own retries off: _request retries, bounded and counted
        return openai.OpenAI(base_url=self.base_url, api_key=self._key, timeout=self.timeout,
                             max_retries=0)

    def usage(self) -> dict[str, int]:
        """Counters since construction: HTTP requests sent (retries included), retries, replies
        taken from the cache instead of a request, and the tokens the endpoint reported."""
        with self._lock:
            return dict(self._usage)

    def _count(self, **amounts: int) -> None:
        with self._lock:
            for field, amount in amounts.items():
                self._usage[field] += amount

    # ---- one request ----------------------------------------------------------------------
    def _body(self, text: str, image_url: str) -> dict[str, Any]:
        content = [{"type": "image_url", "image_url": {"url": image_url}},
                   {"type": "text", "text": text}]
        body: dict[str, Any] = {"model": self.model,
                                "messages": [{"role": "user", "content": content}]}
        if self.mode == "yes-probability":
            return body | {"max_tokens": 1, "temperature": 0.0, "logprobs": True,
                           "top_logprobs": TOP_LOGPROBS}
        return body | {"max_tokens": self.max_new_tokens, "temperature": self.temperature}

    def _key_of(self, image_hash: str, text: str, sample: int) -> str:
        """The cache key: everything that decides the reply (the request without the image,
        which its pixel hash stands for, so model, question, mode and sampling settings) and
        the sample number."""
        request = self._body(text, image_hash)
        return hashlib.sha256(json.dumps([request, sample], sort_keys=True).encode()).hexdigest()

    def _redact(self, text: str) -> str:
        text = " ".join(str(text).split())
        return text.replace(self._key, "***") if self._key != NO_KEY else text

    def _backoff(self, attempt: int) -> float:
        base = min(BACKOFF_CAP_SECONDS, BACKOFF_SECONDS * 2 ** attempt)
        return base * self._random.uniform(0.5, 1.0)

    def _wait_before_retry(self, error: Exception, attempt: int) -> float | None:
        """Seconds to wait before retrying after ``error``, or None when retrying is pointless
        (a 400, 401, 404: the same request would fail the same way)."""
        import openai

        if isinstance(error, openai.APIConnectionError):  # timeouts included
            return self._backoff(attempt)
        if isinstance(error, openai.APIStatusError):
            status = error.status_code
            if status in RETRY_STATUSES or status >= 500:
                asked = retry_after(getattr(error.response, "headers", None))
                return asked if asked is not None else self._backoff(attempt)
        return None

    def _failure(self, error: Exception, attempts: int) -> str:
        import openai

        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        if isinstance(error, openai.APITimeoutError):
            return f"no reply from {self.base_url} within timeout {self.timeout:g} s ({tries})"
        if isinstance(error, openai.APIConnectionError):
            return f"cannot reach {self.base_url}: {self._redact(error)[:_MESSAGE_CHARS]} " \
                   f"({tries})"
        if isinstance(error, openai.APIStatusError):
            return f"HTTP {error.status_code} from {self.base_url}: " \
                   f"{self._redact(error.message)[:_MESSAGE_CHARS]} ({tries})"
        return f"{type(error).__name__}: {self._redact(error)[:_MESSAGE_CHARS]} ({tries})"

    def _request(self, body: dict[str, Any]) -> dict[str, Any]:
        """One chat completion with retries; the reply as a cache record."""
        import openai

        attempt = 0
        while True:
            self._count(requests=1)
            try:
                response = self._client.chat.completions.create(**body)
            except openai.OpenAIError as error:
                wait = self._wait_before_retry(error, attempt)
                if wait is None or attempt >= self.max_retries:
                    raise _RequestFailed(self._failure(error, attempt + 1)) from None
                attempt += 1
                self._count(retries=1)
                time.sleep(wait)
                continue
            return self._record(response)

    def _record(self, response: Any) -> dict[str, Any]:
        """What is kept of a reply: its text and the first token's alternatives (None when
        the endpoint sent no logprobs). The tokens it cost are counted."""
        usage = getattr(response, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        self._count(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        if not response.choices:
            raise _RequestFailed(f"{self.base_url} returned no choices")
        choice = response.choices[0]
        top = None
        logprobs = getattr(choice, "logprobs", None)
        if logprobs is not None and logprobs.content:
            top = [[entry.token, entry.logprob] for entry in logprobs.content[0].top_logprobs]
        return {"content": choice.message.content or "", "top_logprobs": top or None}

    # ---- scores ---------------------------------------------------------------------------
    def _yes_probability(self, record: dict[str, Any]) -> float:
        top = record["top_logprobs"]
        if not top:
            raise VerifierError(f"openai: {self.base_url} returned no logprobs for model "
                                f"{self.model!r}, which mode: yes-probability needs; use "
                                f"mode: rubric")
        return min(1.0, sum(math.exp(logprob) for token, logprob in top
                            if token.strip().lower() == "yes"))

    def _replies(self, pil: list[Image.Image], texts: list[str]
                 ) -> list[list[dict[str, Any] | str]]:
        """Every row's replies (a record, or the one-line reason its request failed), one per
        sample, in input order whatever order the requests finish in."""
        hashes = [_pixel_hash(image) for image in pil]
        keys = [[self._key_of(hashes[row], texts[row], sample) for sample in range(self.samples)]
                for row in range(len(pil))]
        outcomes: dict[str, dict[str, Any] | str] = {}
        needed: dict[str, int] = {}  # key -> a row that asks it (padding repeats rows)
        for row, row_keys in enumerate(keys):
            for key in row_keys:
                if key in outcomes or key in needed:
                    continue
                record = self.cache.get(key)
                if record is None:
                    needed[key] = row
                else:
                    outcomes[key] = record
                    self._count(cache_hits=1)

        urls = {row: _png_data_url(pil[row]) for row in set(needed.values())}

        def fetch(key: str) -> dict[str, Any] | str:
            row = needed[key]
            try:
                record = self._request(self._body(texts[row], urls[row]))
            except _RequestFailed as failure:
                return str(failure)
            self.cache.put(key, record)
            return record

        if needed:
            with ThreadPoolExecutor(min(self.max_concurrency, len(needed))) as pool:
                outcomes.update(zip(needed, pool.map(fetch, needed)))
        return [[outcomes[key] for key in row_keys] for row_keys in keys]

    def _row_score(self, replies: list[dict[str, Any] | str]) -> float | str:
        """A row's score from its replies, or why it has none (one line)."""
        failed = [reply for reply in replies if isinstance(reply, str)]
        records = [reply for reply in replies if not isinstance(reply, str)]
        if self.mode == "yes-probability":
            return failed[0] if failed else self._yes_probability(records[0])
        values, reasons = [], list(failed)
        for record in records:
            try:
                scores = parse_rubric(record["content"], list(self.aspects))
            except RubricReplyError as error:
                reasons.append(str(error))
            else:
                values.append(weighted_score(scores, self.weights))
        return combine_samples(values, self.combine) if values else reasons[0]

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores in input order. A row with no score (its requests failed after their retries,
        or every reply was unparseable) makes the call raise a VerifierError naming it; the
        runtime then scores the chunk row by row, which costs no new requests for the other
        rows (their replies are cached), so only the failed candidate fails."""
        check_batch(self.name, images, prompts)
        pil = to_pil(images)
        texts = [self.question.format(prompt=prompt, **self._fields) for prompt in prompts]
        outcomes = [self._row_score(replies) for replies in self._replies(pil, texts)]
        failures = {row: o for row, o in enumerate(outcomes) if isinstance(o, str)}
        if failures:
            first = min(failures)
            raise VerifierError(f"openai: row {first}: {failures[first]} ({len(failures)} of "
                                f"{len(outcomes)} rows failed)")
        return torch.tensor(outcomes, dtype=torch.float32)

    def describe(self) -> dict[str, Any]:
        info = super().describe() | {"model": self.model, "base_url": self.base_url,
                                     "api_key_env": self.api_key_env, "mode": self.mode,
                                     "max_concurrency": self.max_concurrency,
                                     "timeout": self.timeout, "max_retries": self.max_retries,
                                     "cache_dir": str(self.cache.folder)
                                     if self.cache.folder is not None else None}
        if self.mode == "yes-probability":
            return info
        return info | {"aspects": list(self.aspects), "weights": self.weights,
                       "samples": self.samples, "temperature": self.temperature,
                       "combine": self.combine}
