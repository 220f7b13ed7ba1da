"""A CLIP BPE tokenizer generated from the shapes grammar.

Why generate one: the stock CLIP vocabulary has 49,408 tokens, so its embedding table alone
(49408 x width) would dwarf the tiny text encoder. This one has every byte symbol (with and
without the end-of-word mark, so any text still tokenizes, letter by letter) plus merges that
build each grammar word into one token, so prompts are short and the table is ~600 rows.

``<|startoftext|>`` and ``<|endoftext|>`` take the last two ids: end-of-text has the largest id,
which is what CLIP pooling (``argmax`` over ids, in open_clip and in transformers when
``eos_token_id`` is 2) uses to find the end of the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

from diffsearch.pipelines.shapes.world import vocabulary

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 16
"""Context length: the longest grammar prompt is 10 words, 12 tokens with BOS/EOS."""


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    table = dict(zip(printable, codes, strict=True))
    return [chr(table[b]) for b in range(256)]


def _segment(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE of one word under ``ranks``: repeatedly merge the lowest-ranked adjacent pair."""
    parts = list(word[:-1]) + [word[-1] + END_OF_WORD]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        known = [(r, i) for r, i in pairs if r is not None]
        if not known:
            break
        _, i = min(known)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges that turn each of ``words`` into a single token.

    Merges for a word join its current segmentation left to right. New merges rank after all
    earlier ones, so they never change how an earlier word is split (each step of the earlier
    word's merging still finds one of its own, lower-ranked pairs).
    """
    symbols = _byte_symbols()
    tokens = symbols + [s + END_OF_WORD for s in symbols]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(words)):
        parts = _segment(word, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
            parts[0:2] = [pair[0] + pair[1]]
    unique = list(dict.fromkeys(tokens))
    vocab = {token: i for i, token in enumerate(unique)}
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def write_tokenizer_files(directory: str | Path) -> Path:
    """Write vocab.json and merges.txt for the grammar's words into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(vocabulary())
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def build_tokenizer(directory: str | Path) -> CLIPTokenizer:
    """A CLIPTokenizer over freshly generated grammar files in ``directory``.

    Raises RuntimeError if some grammar word is not a single token (a broken merge table).
    """
    path = write_tokenizer_files(directory)
    tokenizer = CLIPTokenizer.from_pretrained(str(path), model_max_length=MAX_LENGTH)
    tokenizer.save_pretrained(str(path))
    for word in vocabulary():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"grammar word {word!r} tokenizes to {len(ids)} tokens, not 1")
    return tokenizer
