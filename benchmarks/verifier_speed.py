"""How long does each built-in verifier take per image, at its real size?

Builds every model-based verifier at the size of its published weights but with random weights
(no downloads: timing does not depend on the values), scores batches of ``--batch`` images after
one warm-up call and reports the median seconds per image over ``--repeats`` calls. Prompt
embeddings are cached after the first call, as in a search (one prompt, many candidates), so the
CLIP-family figures are image-encoder time; ImageReward fuses text and image for every pair.

Tokenizers: open_clip's bundled BPE (the real CLIP vocabulary, also used to build PickScore's
transformers tokenizer); ImageReward gets a stand-in WordPiece vocabulary because bert-base-uncased
is not on disk (its prompts are always padded to 35 tokens, so the timing is the same).

Prints and saves JSON (``benchmarks/results/verifier_speed.json``)::

    nice -n 10 python benchmarks/verifier_speed.py [--batch 8] [--repeats 3] [--device cpu]
        [--only clip-vit-b-32 clip-vit-l-14 ...]
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffsearch.verifiers.base import Verifier

from _report import RESULTS

PROMPT = "a red circle on the left of two blue squares"


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


BUILDERS: dict[str, Callable[[str], Verifier]] = {
    "clip-vit-b-32": lambda device: build_clip("ViT-B-32", device),
    "clip-vit-l-14": lambda device: build_clip("ViT-L-14", device),
    "aesthetic-vit-l-14": build_aesthetic,
    "imagereward-blip-l": build_imagereward,
    "pickscore-vit-h-14": build_pickscore,
    "hpsv2-vit-h-14": build_hpsv2,
}


def parameters(verifier: Verifier) -> int:
    modules = [m for m in vars(verifier).values() if isinstance(m, torch.nn.Module)]
    for attr in ("clip",):  # aesthetic wraps a CLIP verifier
        inner = getattr(verifier, attr, None)
        if isinstance(inner, Verifier):
            modules += [m for m in vars(inner).values() if isinstance(m, torch.nn.Module)]
    return sum(p.numel() for m in modules for p in m.parameters())


def measure(name: str, device: str, batch: int, repeats: int) -> dict:
    started = time.perf_counter()
    verifier = BUILDERS[name](device)
    build_seconds = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, 512, 512, generator=generator)  # a typical SD decode size
    prompts = [PROMPT] * batch
    verifier.score(images, prompts)  # warm-up: kernels, prompt cache
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        scores = verifier.score(images, prompts)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    assert scores.shape == (batch,) and torch.isfinite(scores).all()
    row = {
        "verifier": verifier.name, "config": name, "parameters": parameters(verifier),
        "input_size": verifier.input_size, "dtype": str(getattr(verifier, "dtype", "")),
        "build_seconds": round(build_seconds, 2),
        "seconds_per_batch": [round(t, 3) for t in times],
        "seconds_per_image": round(statistics.median(times) / batch, 4),
    }
    del verifier
    gc.collect()
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="+", choices=sorted(BUILDERS), default=list(BUILDERS))
    parser.add_argument("--out", type=Path, default=RESULTS / "verifier_speed.json")
    args = parser.parse_args(argv)

    rows = []
    for name in args.only:
        try:
            row = measure(name, args.device, args.batch, args.repeats)
        except (RuntimeError, MemoryError) as error:  # e.g. out of memory on a small machine
            row = {"config": name, "error": f"{type(error).__name__}: {error}"[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "device": args.device, "batch": args.batch, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0],
        "input_images": "random 512x512, resized by each verifier", "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out}")
    return report


if __name__ == "__main__":
    main()
