"""A real OpenAI-compatible chat-completions server on loopback, for the ``openai`` verifier.

``JudgeServer`` serves ``POST /v1/chat/completions`` over HTTP from a thread (the standard
library's threading HTTP server on 127.0.0.1, port 0). It decodes the request's base64 PNG data
URL and judges the pixels, so a score proves which image the verifier sent and under which
prompt:

- rubric replies are JSON: ``prompt_accuracy`` is 10 x the mean of the colour channel the
  prompt names first (red, green or blue; red when none), ``visual_quality``, ``creativity``
  10 x the mean green and blue, ``overall`` 10 x the mean of all pixels. At temperature > 0
  ``overall`` is 3, 9, 3, 3, 9, ... on successive requests for the same image and question;
  a question holding ``GARBLE`` gets prose instead of JSON.
- with ``logprobs`` asked (and ``logprobs`` not switched off on the server, as Ollama's
  endpoint does), the first token's alternatives give P(yes) = the mean red, split between
  ``Yes`` and `` yes``.
- ``usage`` counts 85 tokens per image plus the question's words, and the reply's words.

Test controls: ``faults`` (statuses and headers answered, in order, before real replies),
``delay`` (a random sleep range per request), ``SLOW`` in a question sleeps ``slow_seconds``,
and the expected key (a wrong one gets a 401 that echoes it, as real servers partly do).
It counts requests, the peak number in flight and the tokens it reported.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

IMAGE_TOKENS = 85
CHANNELS = {"red": 0, "green": 1, "blue": 2}
SAMPLED_OVERALL = (3, 9, 3)


def mean_colour(image: Image.Image) -> np.ndarray:
    """Mean R, G, B in [0, 1] of 8-bit pixels."""
    return np.asarray(image.convert("RGB"), dtype=np.float64).mean(axis=(0, 1)) / 255


def named_channel(text: str) -> int:
    """The channel of the first colour word in ``text`` (red when none)."""
    found = re.search(r"\b(red|green|blue)\b", text)
    return CHANNELS[found.group(1)] if found else 0


class JudgeServer:
    """The server and what it saw; ``url`` is the ``base_url`` to give the verifier."""

    def __init__(self, key: str) -> None:
        self.key = key
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
            self.faults: list[tuple[int, dict[str, str]]] = []
            self.delay = (0.0, 0.0)
            self.slow_seconds = 2.0
            self.logprobs = True
            self._seen: dict[tuple[bytes, str], int] = {}

    def close(self) -> None:
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
            return 200, {}, self._reply(body, epoch)
        finally:
            with self._lock:
                if epoch == self._epoch:
                    self.in_flight -= 1

    def _reply(self, body: dict[str, Any], epoch: int) -> dict[str, Any]:
        content = body["messages"][0]["content"]
        url = next(part["image_url"]["url"] for part in content if part["type"] == "image_url")
        text = next(part["text"] for part in content if part["type"] == "text")
        header, encoded = url.split(",", 1)
        assert header == "data:image/png;base64", header
        png = base64.b64decode(encoded)
        colour = mean_colour(Image.open(io.BytesIO(png)))
        if "SLOW" in text:
            time.sleep(self.slow_seconds)
        logprobs = None
        if body.get("logprobs") and self.logprobs:
            yes = min(max(float(colour[0]), 1e-9), 1 - 1e-9)
            top = [("Yes", math.log(0.8 * yes)), (" yes", math.log(0.2 * yes)),
                   ("No", math.log(1 - yes))][:body.get("top_logprobs", 0)]
            reply = "Yes" if yes >= 0.5 else "No"
            logprobs = {"content": [{"token": reply, "logprob": math.log(max(yes, 1 - yes)),
                                     "bytes": None,
                                     "top_logprobs": [{"token": token, "logprob": logprob,
                                                       "bytes": None} for token, logprob in top]
                                     }]}
        elif "GARBLE" in text:
            reply = "I would rather not grade this one."
        else:
            grades = {"prompt_accuracy": 10 * colour[named_channel(text)],
                      "visual_quality": 10 * colour[1], "creativity": 10 * colour[2],
                      "overall": 10 * colour.mean()}
            if body.get("temperature", 0) > 0:
                with self._lock:
                    seen = self._seen.get((png, text), 0)
                    self._seen[(png, text)] = seen + 1
                grades["overall"] = SAMPLED_OVERALL[seen % len(SAMPLED_OVERALL)]
            reply = "```json\n" + json.dumps({k: float(v) for k, v in grades.items()}) + "\n```"
        prompt_tokens = IMAGE_TOKENS + len(text.split())
        completion_tokens = max(1, len(reply.split()))
        with self._lock:
            if epoch == self._epoch:
                self.prompt_tokens += prompt_tokens
                self.completion_tokens += completion_tokens
        return {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                             "message": {"role": "assistant", "content": reply}}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": None}}
