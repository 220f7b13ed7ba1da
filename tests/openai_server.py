"""A real OpenAI-compatible chat-completions server on loopback, for the ``openai`` verifier,
whose answers come from a tiny random transformers vision-language model.

``JudgeServer`` serves ``POST /v1/chat/completions`` over HTTP from a thread (the standard
library's threading HTTP server on 127.0.0.1, port 0). Its ``TinyJudge`` loads a model folder
(``tests/vlm_fixtures.py`` writes one: weights, tokenizer, processor, chat template) with the
transformers Auto classes, offline. Each request's messages become the model's chat: every
``image_url`` data URL is decoded to an image (in order), text parts stay text, the processor's
chat template renders it, and the model runs in float32, one request at a time.

Random weights write no JSON and put "Yes" far down their vocabulary, so the server decodes under
a constraint, as a server with structured outputs does (vLLM's guided decoding, OpenAI's response
formats): the constraint fixes the reply's shape and the model's next-token distribution decides
what fills it. What is model-computed:

- yes-probability (a request asking for ``logprobs``): the one-token reply is constrained to the
  first tokens of the answers in ``ANSWERS`` ("Yes", " Yes", "No", " No": with the tests'
  byte-level tokenizer ``Yes``, `` Yes``, ``N`` and `` ``). ``top_logprobs`` are those tokens
  with the model's log-probabilities at the end of the prompt, renormalised over them, most
  likely first; the reply is the likeliest. So the judge's P(yes) is the model's
  P("Yes" or " Yes") among the answers' first tokens.
- rubric (other requests): the reply is the JSON object of the aspects the question asks for
  (the keys of the first JSON object in its text: the rubric prompt's example). Each aspect's
  value is read from the model's next-token distribution after the prompt and the forced reply
  prefix ``{"<aspect>": ``, restricted to the digit tokens "0".."9" and renormalised: at
  temperature 0 its mean digit (G-Eval's probability-weighted score, in [0, 9]); at
  temperature T > 0 a digit drawn from it at temperature T, by a generator seeded with the
  image, the question, the aspect and how many times this image and question were asked at
  T > 0 before (so samples differ, and a test's run is reproducible).
- a question holding ``GARBLE`` is answered without a constraint: the model's own greedy reply
  of up to ``max_tokens`` tokens, which from random weights is not JSON.
- ``usage``: the prompt's tokens (image tokens included) and the reply's, as the model's
  tokenizer counts them.

What is not model-computed, the test controls: ``faults`` (statuses and headers answered, in
order, before real replies), ``delay`` (a random sleep range per request), ``SLOW`` in a
question sleeps ``slow_seconds`` first (one that wakes after a reset or close gets a 503, the
model not run), ``logprobs = False`` sends no logprobs (as Ollama's
endpoint does), and the expected key (a wrong one gets a 401 that echoes it, as real servers
partly do). It counts requests, the peak number in flight and the tokens it reported, and keeps
every request body (``bodies``) and each answered one with its reply text (``answered``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ANSWERS = ("Yes", " Yes", "No", " No")
"""The answers a yes-probability reply is constrained to (its first token is one of theirs)."""
DIGITS = tuple(str(digit) for digit in range(10))
"""The tokens an aspect's value is read from."""


class BadRequest(Exception):
    """A request body the server cannot read; answered with a 400 naming what is wrong."""


class Outlived(Exception):
    """A SLOW request that woke after a reset or close: the client has given up and the test
    is over, so the model is not run for it (nor, at exit, in a dying interpreter)."""


def decode_image(url: str) -> Image.Image:
    """The RGB image of a ``data:image/...;base64,`` URL."""
    header, _, encoded = url.partition(",")
    if not (header.startswith("data:image/") and header.endswith(";base64")):
        raise BadRequest(f"image_url must be a base64 data URL of an image, got {header!r}")
    return Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")


def read_chat(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """The messages as a processor's chat (image parts as placeholders) and their images."""
    chat, images = [], []
    for message in messages:
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        turn = []
        for part in parts or []:
            if part.get("type") == "image_url":
                images.append(decode_image(part["image_url"]["url"]))
                turn.append({"type": "image"})
            elif part.get("type") == "text":
                turn.append({"type": "text", "text": part["text"]})
            else:
                raise BadRequest(f"content part type {part.get('type')!r} is not supported")
        chat.append({"role": message["role"], "content": turn})
    return chat, images


def asked_aspects(question: str) -> list[str]:
    """The keys of the first JSON object in ``question`` (the rubric prompt's example)."""
    decoder = json.JSONDecoder()
    start = question.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(question, start)
        except json.JSONDecodeError:
            pass
        else:
            if isinstance(value, dict) and value:
                return list(value)
        start = question.find("{", start + 1)
    raise BadRequest("the question shows no JSON object of the aspects to grade")


class TinyJudge:
    """A transformers vision-language model folder, loaded once; every method is one model
    computation on the processor's inputs for a chat (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(folder)
        self.tokenizer = self.processor.tokenizer
        self.model = AutoModelForImageTextToText.from_pretrained(
            folder, dtype=torch.float32).eval().requires_grad_(False)
        self.digit_ids = [self._single_token(digit) for digit in DIGITS]
        self.answer_ids = sorted({self._ids(answer)[0] for answer in ANSWERS})

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _single_token(self, text: str) -> int:
        ids = self._ids(text)
        assert len(ids) == 1, f"{text!r} is {len(ids)} tokens"
        return ids[0]

    def count_tokens(self, text: str) -> int:
        return len(self._ids(text))

    def inputs(self, chat: list[dict[str, Any]], images: list[Image.Image], forced: str = ""
               ) -> dict[str, torch.Tensor]:
        """The processor's inputs for ``chat`` with its generation prompt, followed by the
        ``forced`` start of the reply (as a constrained decoder forces it)."""
        text = self.processor.apply_chat_template(chat, add_generation_prompt=True,
                                                  tokenize=False)
        return dict(self.processor(text=[text + forced], images=images or None,
                                   return_tensors="pt"))

    def next_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's float32 logits for the token after ``inputs``."""
        with torch.no_grad():
            return self.model(**inputs).logits[0, -1].float()

    def answer_logprobs(self, prompt: dict[str, torch.Tensor]) -> list[tuple[str, float]]:
        """The answers' first tokens with their log-probabilities after ``prompt`` (the
        processor's inputs) renormalised over them, most likely first."""
        logits = self.next_logits(prompt)[self.answer_ids]
        logprobs = torch.log_softmax(logits, dim=0)
        ranked = sorted(zip(self.answer_ids, logprobs.tolist(), strict=True),
                        key=lambda pair: -pair[1])
        return [(self.tokenizer.decode([token]), logprob) for token, logprob in ranked]

    def aspect_value(self, chat: list[dict[str, Any]], images: list[Image.Image], aspect: str,
                     temperature: float = 0.0, seed: int = 0) -> float:
        """The value of ``aspect``: the mean digit (temperature 0) or a digit drawn at
        ``temperature`` with ``seed``, from the digits' renormalised distribution after the
        reply prefix ``{"<aspect>": ``."""
        forced = "{" + json.dumps(aspect) + ": "
        logits = self.next_logits(self.inputs(chat, images, forced))[self.digit_ids]
        if temperature == 0:
            weights = torch.softmax(logits, dim=0)
            return float((weights * torch.arange(len(DIGITS), dtype=torch.float32)).sum())
        weights = torch.softmax(logits / temperature, dim=0)
        generator = torch.Generator().manual_seed(seed)
        return float(torch.multinomial(weights, 1, generator=generator))

    def free_reply(self, prompt: dict[str, torch.Tensor], max_tokens: int) -> str:
        """The model's own greedy reply to ``prompt``, unconstrained."""
        with torch.no_grad():
            out = self.model.generate(**prompt, max_new_tokens=max_tokens, do_sample=False)
        return self.tokenizer.decode(out[0, prompt["input_ids"].shape[1]:],
                                     skip_special_tokens=True)


def identity(images: list[Image.Image], question: str) -> str:
    """A request's images and question, as a digest."""
    digest = hashlib.sha256(f"{question}\0".encode())
    for image in images:
        digest.update(f"{image.width}x{image.height}\0".encode() + image.tobytes())
    return digest.hexdigest()


def sample_seed(request: str, aspect: str, count: int) -> int:
    """The seed of ``aspect``'s draw in the ``count``-th sampled reply to ``request`` (an
    :func:`identity`)."""
    digest = hashlib.sha256(f"{request}\0{aspect}\0{count}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


class JudgeServer:
    """The server and what it saw; ``url`` is the ``base_url`` to give the verifier."""

    def __init__(self, key: str, model: Path) -> None:
        self.key = key
        self.judge = TinyJudge(model)
        self._model_lock = threading.Lock()  # one model computation at a time
        self._lock = threading.Lock()
        self._epoch = 0
        self.reset()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet test output
                pass

            def do_POST(self) -> None:  # noqa: N802 - the http.server hook
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                status, headers, payload = server.answer(self.path, self.headers, body)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for name, value in {**headers, "Content-Type": "application/json",
                                        "Content-Length": str(len(data))}.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (a timeout test)
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        """Forget what was seen and clear the controls (between tests). A request still
        running from before (a sleeping SLOW one) is not counted in the new totals."""
        with self._lock:
            self._epoch += 1
            self.requests = 0
            self.in_flight = self.peak_in_flight = 0
            self.prompt_tokens = self.completion_tokens = 0
            self.bodies: list[dict[str, Any]] = []
            self.answered: list[tuple[dict[str, Any], str]] = []
            self.faults: list[tuple[int, dict[str, str]]] = []
            self.delay = (0.0, 0.0)
            self.slow_seconds = 2.0
            self.logprobs = True
            self._seen: dict[str, int] = {}

    def close(self) -> None:
        with self._lock:
            self._epoch += 1  # sleeping SLOW requests will not run the model
        self._httpd.shutdown()
        self._httpd.server_close()

    def answer(self, path: str, headers: Any, body: dict[str, Any]
               ) -> tuple[int, dict[str, str], dict[str, Any]]:
        with self._lock:
            epoch = self._epoch
            self.requests += 1
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            self.bodies.append(body)
            fault = self.faults.pop(0) if self.faults else None
            low, high = self.delay
        try:
            if path != "/v1/chat/completions":
                return 404, {}, _error(f"no route {path}")
            presented = headers.get("Authorization", "").removeprefix("Bearer ")
            if presented != self.key:
                return 401, {}, _error(f"Incorrect API key provided: {presented}")
            if fault is not None:
                return fault[0], fault[1], _error(f"scripted fault {fault[0]}")
            time.sleep(random.uniform(low, high))
            try:
                return 200, {}, self._reply(body, epoch)
            except (BadRequest, KeyError, TypeError) as error:
                return 400, {}, _error(f"bad request: {error}")
            except Outlived:
                return 503, {}, _error("the server was reset while this request slept")
        finally:
            with self._lock:
                if epoch == self._epoch:
                    self.in_flight -= 1

    def _times_seen(self, request: str) -> int:
        """How many sampled requests with this :func:`identity` came before this one."""
        with self._lock:
            seen = self._seen.get(request, 0)
            self._seen[request] = seen + 1
        return seen

    def _reply(self, body: dict[str, Any], epoch: int) -> dict[str, Any]:
        chat, images = read_chat(body["messages"])
        question = " ".join(part["text"] for turn in chat for part in turn["content"]
                            if part["type"] == "text")
        if "SLOW" in question:
            time.sleep(self.slow_seconds)
            if epoch != self._epoch:
                raise Outlived
        temperature = float(body.get("temperature") or 0.0)
        logprobs = None
        with self._model_lock:
            prompt = self.judge.inputs(chat, images)
            if body.get("logprobs"):
                ranked = self.judge.answer_logprobs(prompt)
                reply = ranked[0][0]
                top = ranked[:body.get("top_logprobs") or 0]
                if self.logprobs:
                    logprobs = {"content": [{
                        "token": reply, "logprob": ranked[0][1], "bytes": None,
                        "top_logprobs": [{"token": token, "logprob": logprob, "bytes": None}
                                         for token, logprob in top]}]}
            elif "GARBLE" in question:
                reply = self.judge.free_reply(prompt, int(body.get("max_tokens") or 16))
            else:
                request = identity(images, question)
                seen = self._times_seen(request) if temperature > 0 else 0
                grades = {aspect: self.judge.aspect_value(
                    chat, images, aspect, temperature, sample_seed(request, aspect, seen))
                    for aspect in asked_aspects(question)}
                reply = json.dumps(grades)
            prompt_tokens = int(prompt["input_ids"].shape[1])
            completion_tokens = max(1, self.judge.count_tokens(reply))
        with self._lock:
            if epoch == self._epoch:
                self.prompt_tokens += prompt_tokens
                self.completion_tokens += completion_tokens
                self.answered.append((body, reply))
        return {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                             "message": {"role": "assistant", "content": reply}}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": None}}

