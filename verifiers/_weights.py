"""Finding verifier weights on disk: a local path, else the local Hugging Face cache.

Verifiers never reach the network unless their ``allow_download`` option is true (no network at
run time unless the user asks: docs/architecture.md, "Errors"). When weights are missing the
error names the exact file and the command that fetches it, because "model not found" alone
sends users searching.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffsearch.verifiers.base import MissingWeightsError, VerifierError


def local_file(path: str, what: str, where: str) -> str:
    """``path`` (``~`` expanded) if it is a file, else a MissingWeightsError naming it."""
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise MissingWeightsError(f"{what} not found: {resolved} (get it from {where})")
    return str(resolved)


def hub_file(repo_id: str, filename: str, allow_download: bool = False) -> str:
    """The path of ``repo_id/filename`` in the local Hugging Face cache (downloaded first only
    when ``allow_download``), else a MissingWeightsError with the command that fetches it.

    The cache is read with ``try_to_load_from_cache``, a pure file-system lookup: even
    ``hf_hub_download(local_files_only=True)`` contacts the Hub (huggingface_hub 2.x looks up
    its agent registry) unless HF_HUB_OFFLINE is set, and workers may not have it set.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return cached
    if not allow_download:
        raise MissingWeightsError(
            f"{filename} of {repo_id} is not in the local Hugging Face cache; fetch it with "
            f"`hf download {repo_id} {filename}` or set the option allow_download: true"
        )
    try:
        return hf_hub_download(repo_id, filename)
    except Exception as error:  # network, auth, missing repo: keep the hub's reason, one line
        raise MissingWeightsError(
            f"cannot download {filename} of {repo_id}: {type(error).__name__}: "
            f"{' '.join(str(error).split())}"[:400]
        ) from error


def open_clip_checkpoint(arch: str, pretrained: str, allow_download: bool = False) -> str:
    """A local checkpoint file for an open_clip ``arch`` and ``pretrained`` (a tag such as
    ``openai`` or ``laion2b_s32b_b79k``, or a file path).

    Tags are looked up where open_clip itself would store them (the Hugging Face cache, or
    ``~/.cache/clip`` for URL-only tags) without letting open_clip download anything.
    """
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if Path(pretrained).expanduser().is_file():
        return str(Path(pretrained).expanduser())
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        if os.sep in pretrained or Path(pretrained).suffix:
            raise MissingWeightsError(f"open_clip checkpoint file not found: {pretrained}")
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise VerifierError(f"{pretrained!r} is neither a file nor an open_clip pretrained tag "
                            f"of {arch}; its tags: {tags}")
    if cfg.get("file"):
        return local_file(cfg["file"], f"open_clip checkpoint for {arch} {pretrained}",
                          "the path in open_clip's pretrained config")
    hub = cfg.get("hf_hub", "")
    if hub:
        # open_clip's convention: "org/repo/" means the default file, "org/repo/file" a file
        if hub.endswith("/"):
            repo_id, filename = hub.rstrip("/"), HF_WEIGHTS_NAME
        else:
            repo_id, filename = hub.rsplit("/", 1)
        names = [filename]
        if filename == HF_WEIGHTS_NAME:
            names.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            try:
                return hub_file(repo_id, name, allow_download=False)
            except MissingWeightsError:
                continue
        if allow_download:
            return hub_file(repo_id, filename, allow_download=True)
        raise MissingWeightsError(
            f"open_clip weights {arch} {pretrained!r} not found: {filename} of {repo_id} is not in "
            f"the local Hugging Face cache; fetch it with `hf download {repo_id} {filename}`, "
            f"set allow_download: true, or give a checkpoint file as `pretrained`"
        )
    url = cfg.get("url", "")
    cached = Path("~/.cache/clip").expanduser() / os.path.basename(url)
    if cached.is_file():
        return str(cached)
    if allow_download:
        return str(open_clip.download_pretrained(cfg))
    raise MissingWeightsError(
        f"open_clip weights {arch} {pretrained!r} not found: {cached} is missing; download {url} "
        f"there, set allow_download: true, or give a checkpoint file as `pretrained`"
    )


_SNAPSHOT_PROBES = ("config.json", "preprocessor_config.json", "processor_config.json",
                    "tokenizer_config.json")
"""Files one of which every transformers model/processor/tokenizer repo has at its root."""


def _cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of a hub repo, found without any network call."""
    from huggingface_hub import try_to_load_from_cache

    for probe in _SNAPSHOT_PROBES:
        cached = try_to_load_from_cache(repo_id, probe)
        if isinstance(cached, str):
            return str(Path(cached).parent)
    return None


def from_pretrained_local(what: str, loader: Any, source: str, allow_download: bool) -> Any:
    """``loader.from_pretrained`` of a local folder or of a hub id's snapshot in the local cache
    (the network only when ``allow_download``); a missing one becomes a MissingWeightsError
    naming it and the command that fetches it."""
    path = Path(source).expanduser()
    if path.is_dir():
        folder: str | None = str(path)
    elif source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise MissingWeightsError(f"{what} folder not found: {path}")
    else:
        folder = _cached_snapshot(source)
    if folder is None and not allow_download:
        raise MissingWeightsError(
            f"{what} {source!r} is not in the local Hugging Face cache; fetch it with "
            f"`hf download {source}`, pass a local folder, or set allow_download: true"
        )
    try:
        return loader.from_pretrained(folder or source, local_files_only=folder is not None)
    except OSError as error:  # a folder or snapshot missing some of its files
        reason = " ".join(str(error).split())[:240]
        raise MissingWeightsError(f"{what} {source!r} is incomplete: {reason}") from error


def check_tokenizer(tokenizer: Any, what: str, source: str) -> Any:
    """Refuse a tokenizer that knows only its special tokens. transformers 5 builds such an
    empty tokenizer, without an error, when a folder lacks its vocabulary files; every prompt
    would then score as a row of [UNK]s."""
    if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
        raise MissingWeightsError(f"{what} {source!r} has no vocabulary (only special tokens); "
                                  f"its vocab/tokenizer files are missing")
    return tokenizer
