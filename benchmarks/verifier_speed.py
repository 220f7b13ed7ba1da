"""How long does each built-in verifier take per image and per call?

Every model-based verifier is built at the size of its published weights but with random weights
(no downloads: timing does not depend on the values). Each row scores ``--batch`` random
512 x 512 images (a typical SD decode size) after one warm-up call and reports the median over
``--repeats`` calls: ``seconds_per_call`` (one ``score()`` of the batch), ``seconds_per_image``
and ``images_per_second``; every call's time is kept (``seconds_per_batch``), and the table
shows the fastest too, which on a shared machine is closer to what the machine can do. Prompt
embeddings are cached after the first call, as in a search (one prompt, many candidates), so the
CLIP-family figures are image-encoder time; ImageReward fuses text and image for every pair.

Tokenizers: open_clip's bundled BPE (the real CLIP vocabulary, also used to build PickScore's
transformers tokenizer); ImageReward gets a stand-in WordPiece vocabulary because bert-base-uncased
is not on disk (its prompts are always padded to 35 tokens, so the timing is the same).

The judges are measured differently, and their figures are NOT a real judge's speed:

- ``vlm-<architecture>-<mode>``: the tiny random vision-language models the tests build
  (tests/vlm_fixtures.py: Qwen2-VL, Idefics3, LLaVA-OneVision with 32-wide layers). A real
  judge's time is its model's forward passes (a 7B model over ~1,000+ image tokens per
  candidate); these rows measure what the ``vlm`` verifier adds around them: PIL conversion, the
  chat template, the processor's resizing and tiling, padding, and the generate loop. In rubric
  mode every reply runs to REPLY_TOKENS tokens (the model's end token is unset), about the length
  of a default-aspects JSON reply, and since random weights write no JSON the replies are graded
  by a stub that gives every aspect 5.
- ``openai-<mode>-<cache>``: the ``openai`` verifier through the official client against the
  loopback server of tests/openai_server.py (it decodes each PNG and answers with the tiny
  random Qwen2-VL of the ``vlm`` rows: one forward pass in yes-probability mode, one per aspect
  in rubric mode), with the default 4 requests in flight. ``cold``: a new verifier with an
  empty cache for every call, so every image is one HTTP request; ``warm``: a new verifier per
  call reading the on-disk cache an earlier call filled (a resumed or repeated run), so no
  request is sent (``requests_per_call`` shows both). This is the client's own cost (PNG
  encoding of 512 x 512 noise, which compresses badly, base64, HTTP and JSON on loopback) plus
  the server's decoding and tiny model, which run in this process and share its interpreter
  lock; a real endpoint adds its model's time and the network's.

Prints a table and saves JSON (``benchmarks/results/verifier_speed.json``). On a machine shared
with other work, run it with ``OMP_WAIT_POLICY=PASSIVE``: spinning OpenMP threads that lose their
core to another process make the many small operations of the tiny models many times slower::

    OMP_WAIT_POLICY=PASSIVE nice -n 10 python benchmarks/verifier_speed.py [--batch 8]
        [--repeats 3] [--device cpu] [--only clip-vit-b-32 vlm-qwen2-vl-rubric ...]
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from diffsearch.verifiers.base import Verifier

from _report import command_line, save_report

TESTS = Path(__file__).resolve().parents[1] / "tests"
"""Where the tiny VLM fixtures and the loopback judge server live (shared with the tests)."""
PROMPT = "a red circle on the left of two blue squares"
REPLY_TOKENS = 32
"""Tokens in each rubric reply of the tiny VLMs (a default-aspects JSON object is ~30)."""
BENCH_KEY_ENV, BENCH_KEY = "DIFFSEARCH_BENCH_JUDGE_KEY", "sk-bench-loopback"
"""The loopback server's key, set in this process's environment only."""
JUDGE_NOTE = ("tiny random VLM: pipeline overhead (template, processor, generate loop), "
              "not a real judge's speed")
API_NOTE = ("loopback server with a tiny random VLM: client overhead (PNG, HTTP, JSON) and the "
            "tiny model, not a real endpoint's latency")


@dataclass
class Subject:
    """What one row times. ``judge()`` gives the verifier for one call: the same one when it is
    built once, a new one when each call must start from an empty or an on-disk cache.
    ``requests`` reads the server's request counter (API judges only)."""

    judge: Callable[[], Verifier]
    requests: Callable[[], int] | None = None
    note: str = ""


Builder = Callable[[str, ExitStack], Subject]
"""(device, resources) -> Subject; temporary folders, servers and patches go on the stack and
are undone when the row is done."""


def _random_open_clip(arch: str) -> tuple[torch.nn.Module, object]:
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model(arch, pretrained=None), open_clip.get_tokenizer(arch)


def build_clip(arch: str, device: str) -> Verifier:
    from diffsearch.verifiers.clip import ClipVerifier

    model, tokenizer = _random_open_clip(arch)
    return ClipVerifier.from_open_clip(model, tokenizer, device=device,
                                       weights=f"{arch} random init")


def build_aesthetic(device: str) -> Verifier:
    from diffsearch.verifiers.aesthetic import AestheticMlp, AestheticVerifier

    clip = build_clip("ViT-L-14", device)
    return AestheticVerifier.from_parts(clip, AestheticMlp(768).eval(),  # type: ignore[arg-type]
                                        "random init")


def build_hpsv2(device: str) -> Verifier:
    from diffsearch.verifiers.hpsv2 import HpsV2Verifier

    model, tokenizer = _random_open_clip("ViT-H-14")
    return HpsV2Verifier.from_open_clip(model, tokenizer, device=device,
                                        weights="ViT-H-14 random init")


def _clip_tokenizer_from_open_clip_bpe() -> object:
    """The real CLIP BPE tokenizer for transformers, from the merges file open_clip bundles:
    byte symbols, the same with an end-of-word mark, the merged pairs, then the two specials."""
    import open_clip.tokenizer as oc_tokenizer
    from transformers import CLIPTokenizer

    with gzip.open(oc_tokenizer.default_bpe(), "rt", encoding="utf-8") as handle:
        merges = handle.read().split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(oc_tokenizer.bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        vocab, merges_file = Path(folder) / "vocab.json", Path(folder) / "merges.txt"
        vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(vocab=str(vocab), merges=str(merges_file))


def build_pickscore(device: str) -> Verifier:
    """A CLIPModel with PickScore's (CLIP ViT-H/14) configuration."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffsearch.verifiers.pickscore import PickScoreVerifier

    config = CLIPConfig(
        text_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                     "num_attention_heads": 16, "vocab_size": 49408, "hidden_act": "gelu",
                     "max_position_embeddings": 77, "eos_token_id": 49407,
                     "bos_token_id": 49406, "pad_token_id": 1},
        vision_config={"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                       "num_attention_heads": 16, "patch_size": 14, "image_size": 224,
                       "hidden_act": "gelu"},
        projection_dim=1024,
    )
    torch.manual_seed(0)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(),
                              tokenizer=_clip_tokenizer_from_open_clip_bpe())
    return PickScoreVerifier.from_transformers(CLIPModel(config), processor, device=device,
                                               weights="CLIP ViT-H/14 config, random init")


def build_imagereward(device: str) -> Verifier:
    """BLIP ViT-L/16 + BERT-base with cross-attention + the MLP head, as in ImageReward.pt."""
    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    from diffsearch.verifiers.aesthetic import AestheticMlp
    from diffsearch.verifiers.imagereward import ImageRewardVerifier

    torch.manual_seed(0)
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=16, layer_norm_eps=1e-6))
    text = BlipTextModel(BlipTextConfig(
        vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, encoder_hidden_size=1024, is_decoder=True),
        add_pooling_layer=False)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *PROMPT.split()]
    with tempfile.TemporaryDirectory() as folder:
        vocab = Path(folder) / "vocab.txt"
        vocab.write_text("\n".join(words) + "\n")
        tokenizer = BertTokenizer(vocab=str(vocab))
    return ImageRewardVerifier.from_modules(vision, text, AestheticMlp(768), tokenizer,
                                            device=device, weights="random init")


def _tests_on_path() -> None:
    """Make the test helpers importable (after everything else, so they shadow nothing)."""
    if str(TESTS) not in sys.path:
        sys.path.append(str(TESTS))


def build_vlm(architecture: str, mode: str, device: str, stack: ExitStack) -> Subject:
    """A tiny random ``architecture`` judge in ``mode``, loaded from a folder by path."""
    _tests_on_path()
    from vlm_fixtures import write_tiny_vlm

    from diffsearch.verifiers import vlm

    folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    write_tiny_vlm(folder, architecture, seed=0)
    rubric = mode == "rubric"
    options = {"max_new_tokens": REPLY_TOKENS} if rubric else {}
    verifier = vlm.VlmVerifier(device=device, model=str(folder), mode=mode, **options)
    note = JUDGE_NOTE
    if rubric:
        verifier.model.generation_config.eos_token_id = None  # every reply REPLY_TOKENS long
        stack.enter_context(mock.patch.object(vlm, "parse_rubric", _grade_any_reply))
        note += f"; replies of {REPLY_TOKENS} tokens, graded by a stub"
    return Subject(lambda: verifier, note=note)


def _grade_any_reply(reply: str, aspects: list[str]) -> dict[str, float]:
    """Random weights write no JSON: every aspect of any reply gets 5."""
    return dict.fromkeys(aspects, 5.0)


def build_openai(mode: str, cache: str, device: str, stack: ExitStack) -> Subject:
    """The ``openai`` judge against a loopback server; ``cache`` is ``cold`` (a new empty cache
    each call) or ``warm`` (a new verifier each call over the on-disk cache of earlier calls)."""
    _tests_on_path()
    from openai_server import JudgeServer
    from vlm_fixtures import write_tiny_vlm

    from diffsearch.verifiers.openai_judge import OpenAIJudge

    model = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    server = JudgeServer(BENCH_KEY, write_tiny_vlm(model, "qwen2-vl", seed=0))
    stack.callback(server.close)
    stack.enter_context(mock.patch.dict(os.environ, {BENCH_KEY_ENV: BENCH_KEY}))
    folder = stack.enter_context(tempfile.TemporaryDirectory()) if cache == "warm" else None

    def judge() -> Verifier:
        return OpenAIJudge(device=device, model="loopback-judge", base_url=server.url,
                           api_key_env=BENCH_KEY_ENV, allow_network=True, mode=mode,
                           cache_dir=folder)

    return Subject(judge, requests=lambda: server.requests, note=f"{API_NOTE}; cache {cache}")


def _model(build: Callable[[str], Verifier]) -> Builder:
    """A builder of a verifier that is built once and scores every call."""
    def builder(device: str, stack: ExitStack) -> Subject:
        verifier = build(device)
        return Subject(lambda: verifier)

    return builder


BUILDERS: dict[str, Builder] = {
    "clip-vit-b-32": _model(lambda device: build_clip("ViT-B-32", device)),
    "clip-vit-l-14": _model(lambda device: build_clip("ViT-L-14", device)),
    "aesthetic-vit-l-14": _model(build_aesthetic),
    "imagereward-blip-l": _model(build_imagereward),
    "pickscore-vit-h-14": _model(build_pickscore),
    "hpsv2-vit-h-14": _model(build_hpsv2),
    **{f"vlm-{arch}-{mode}": partial(build_vlm, arch, mode)
       for arch in ("qwen2-vl", "idefics3", "llava-onevision")
       for mode in ("yes-probability", "rubric")},
    **{f"openai-{mode}-{cache}": partial(build_openai, mode, cache)
       for mode in ("rubric", "yes-probability") for cache in ("cold", "warm")},
}


def parameters(verifier: Verifier) -> int | None:
    """Weights the verifier holds on this machine (None for an API judge, which holds none)."""
    modules = [m for m in vars(verifier).values() if isinstance(m, torch.nn.Module)]
    for attr in ("clip",):  # aesthetic wraps a CLIP verifier
        inner = getattr(verifier, attr, None)
        if isinstance(inner, Verifier):
            modules += [m for m in vars(inner).values() if isinstance(m, torch.nn.Module)]
    return sum(p.numel() for m in modules for p in m.parameters()) if modules else None


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(name: str, device: str, batch: int, repeats: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, 512, 512, generator=generator)  # a typical SD decode size
    prompts = [PROMPT] * batch
    with ExitStack() as stack:
        started = time.perf_counter()
        subject = BUILDERS[name](device, stack)
        verifier = subject.judge()
        build_seconds = time.perf_counter() - started
        verifier.score(images, prompts)  # warm-up: kernels, prompt cache, a warm judge's cache
        times, requests = [], []
        for _ in range(repeats):
            verifier = subject.judge()
            sent = subject.requests() if subject.requests else 0
            _synchronize(device)
            start = time.perf_counter()
            scores = verifier.score(images, prompts)
            _synchronize(device)
            times.append(time.perf_counter() - start)
            if subject.requests:
                requests.append(subject.requests() - sent)
        assert scores.shape == (batch,) and torch.isfinite(scores).all()
        call = statistics.median(times)
        row = {
            "verifier": verifier.name, "config": name, "parameters": parameters(verifier),
            "input_size": verifier.input_size, "dtype": str(getattr(verifier, "dtype", "")),
            "build_seconds": round(build_seconds, 2),
            "seconds_per_batch": [round(t, 3) for t in times],
            "seconds_per_call": round(call, 4),
            "seconds_per_image": round(call / batch, 4),
            "images_per_second": round(batch / call, 2),
        }
        if subject.requests:
            row["requests_per_call"] = requests
        if subject.note:
            row["note"] = subject.note
    del verifier, subject
    gc.collect()
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width table; a row that failed shows its error."""
    width = max(len(row["config"]) for row in rows)
    lines = [f"{'config':<{width}} {'params':>8} {'s/call':>8} {'fastest':>8} {'s/image':>8} "
             f"{'images/s':>9}  requests/call"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['config']:<{width}} {row['error']}")
            continue
        params = row["parameters"]
        shown = "-" if params is None else f"{params / 1e6:.1f}M" if params >= 1e5 \
            else f"{params / 1e3:.0f}k"
        sent = ",".join(map(str, row.get("requests_per_call", []))) or "-"
        lines.append(f"{row['config']:<{width}} {shown:>8} {row['seconds_per_call']:>8.3f} "
                     f"{min(row['seconds_per_batch']):>8.3f} {row['seconds_per_image']:>8.4f} "
                     f"{row['images_per_second']:>9.2f}  {sent}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    args = parser.parse_args(argv)

    rows = []
    for name in args.only:
        try:
            row = measure(name, args.device, args.batch, args.repeats)
        except (RuntimeError, MemoryError) as error:  # e.g. out of memory on a small machine
            row = {"config": name, "error": f"{type(error).__name__}: {error}"[:300]}
        rows.append(row)
        print(f"{name}: {row.get('seconds_per_call', row.get('error'))}", file=sys.stderr,
              flush=True)
    report = {
        "device": args.device, "batch": args.batch, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_average_at_end": [round(load, 2) for load in os.getloadavg()],
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "python": sys.version.split()[0],
        "input_images": "random 512x512, resized by each verifier",
        "caveat": "vlm rows are tiny random VLMs and openai rows a loopback server: they "
                  "measure the verifiers' pipeline overhead, not a real judge's speed",
        "results": rows, "command": command_line(argv),
    }
    path = save_report(report, "verifier_speed", show=False)
    print(table(rows))
    print(f"\n{report['caveat']}.\nsaved {path}")
    return report


if __name__ == "__main__":
    main()
