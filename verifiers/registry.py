"""Find verifiers by name: built-ins, installed plugins, and verifier folders.

Names resolve in this order:

1. **A verifier folder**: a directory (path given as the name) holding ``diffsearch-verifier.json``.
   This is how trained verifiers (e.g. TTSnap's noise-aware distilled students) are shipped::

       my-verifier/
         diffsearch-verifier.json   {"verifier": "clip",
                                     "options": {"arch": "ViT-B-32", "pretrained": "student.pt"},
                                     "meta": {"trained_at_step": 6}}
         student.pt

   ``verifier`` is a registered name (built-in or plugin, not another folder); ``options`` go to
   its constructor; ``meta`` is free-form and ignored here (training notes, provenance). A string
   option (at any depth of lists/dicts) that names a file or folder existing relative to the
   folder is replaced by its absolute path, so the folder can be moved or copied as a whole.
   Options given with the name in a job file (``{name: ./my-verifier, chunk: 4}``) override the
   folder's.
2. **Built-ins**: :data:`BUILTINS`, imported only when used (each pulls in its own libraries).
3. **Plugins**: entry points in the group ``diffsearch.verifiers`` of installed distributions,
   each naming a :class:`~diffsearch.verifiers.base.Verifier` subclass::

       [project.entry-points."diffsearch.verifiers"]
       redness = "my_package:RednessVerifier"

   A built-in name cannot be taken over by a plugin (the plugin is listed with an error), so a
   job means the same thing wherever it runs.

A plugin that fails to import or to construct is reported under its name with its error; it never
stops the others from being listed or used.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from diffsearch.verifiers.base import Verifier, VerifierError

ENTRY_POINT_GROUP = "diffsearch.verifiers"
FOLDER_MANIFEST = "diffsearch-verifier.json"

BUILTINS: dict[str, str] = {
    "clip": "diffsearch.verifiers.clip:ClipVerifier",
    "aesthetic": "diffsearch.verifiers.aesthetic:AestheticVerifier",
    "pickscore": "diffsearch.verifiers.pickscore:PickScoreVerifier",
    "hpsv2": "diffsearch.verifiers.hpsv2:HpsV2Verifier",
    "imagereward": "diffsearch.verifiers.imagereward:ImageRewardVerifier",
    "vlm": "diffsearch.verifiers.vlm:VlmVerifier",
    "openai": "diffsearch.verifiers.openai_judge:OpenAIJudge",
    "ensemble": "diffsearch.verifiers.ensemble:EnsembleVerifier",
    "shift-average": "diffsearch.verifiers.shift_average:ShiftAverageVerifier",
    "shapes-oracle": "diffsearch.verifiers.shapes:ShapesOracleVerifier",
    "shapes-clip": "diffsearch.verifiers.shapes:ShapesClipVerifier",
    "shapes-clip-small": "diffsearch.verifiers.shapes:ShapesClipSmallVerifier",
    "shapes-video": "diffsearch.verifiers.video:ShapesVideoVerifier",
    "shapes-video-oracle": "diffsearch.verifiers.video:ShapesVideoOracleVerifier",
    "frames": "diffsearch.verifiers.frames:FramesVerifier",
    "temporal-consistency": "diffsearch.verifiers.temporal:TemporalConsistencyVerifier",
    "video-reward": "diffsearch.verifiers.video_reward:VideoRewardVerifier",
}
"""Built-in name -> ``"module:Class"``."""
WRAPPED_OPTIONS: dict[str, str] = {"ensemble": "members", "shift-average": "verifier",
                                   "frames": "verifier"}
"""Built-ins that wrap other verifiers -> the option holding their spec (or list of specs),
which :func:`check_verifier_spec` checks as well."""

BUILTIN_SOURCE = "built-in"
_JOB_ONLY_KEYS = ("name", "label", "device")
"""Spec keys the job layer uses; they are not constructor options."""


class UnknownVerifierError(VerifierError):
    """No built-in, plugin or verifier folder has this name."""


@dataclass(frozen=True)
class VerifierInfo:
    """One row of ``diffsearch verifiers list``."""

    name: str
    source: str
    """``built-in``, or the plugin's distribution as ``name version``."""
    target: str
    """``module:Class`` the name points to."""
    status: str
    """``ok`` when the class imports and is a Verifier subclass, else ``error``."""
    message: str = ""
    """Why the status is ``error`` (one line); empty when ok."""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class _Entry:
    name: str
    source: str
    target: str
    conflict: str = ""
    """Set when this entry cannot be used under its name (a built-in or another plugin has it)."""


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _entries() -> list[_Entry]:
    """Built-ins first, then plugins in a stable order (distribution, then name)."""
    entries = [_Entry(name, BUILTIN_SOURCE, target) for name, target in BUILTINS.items()]
    taken = {name: BUILTIN_SOURCE for name in BUILTINS}
    plugins = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        source = f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"
        plugins.append((source, ep.name, ep.value))
    for source, name, target in sorted(plugins):
        if name in taken:
            entries.append(_Entry(name, source, target,
                                  conflict=f"name already taken by {taken[name]}"))
            continue
        taken[name] = source
        entries.append(_Entry(name, source, target))
    return entries


def _load_class(entry: _Entry) -> type[Verifier]:
    """Import the class an entry names; any failure becomes a VerifierError naming the entry."""
    if entry.conflict:
        raise VerifierError(f"verifier {entry.name!r} from {entry.source} is unusable: "
                            f"{entry.conflict}")
    module_name, _, attr = entry.target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except Exception as error:  # a plugin may raise anything while importing
        raise VerifierError(f"verifier {entry.name!r} ({entry.source}, {entry.target}) cannot "
                            f"be imported: {_one_line(error)}") from error
    if not (isinstance(obj, type) and issubclass(obj, Verifier)):
        raise VerifierError(f"verifier {entry.name!r} ({entry.source}): {entry.target} is not "
                            f"a subclass of diffsearch.verifiers.base.Verifier")
    return obj


def available_verifiers() -> list[VerifierInfo]:
    """Every registered name with its source and whether its class can be imported.

    Importing checks the code, not the weights: a verifier listed ``ok`` can still raise
    MissingWeightsError when built.
    """
    infos = []
    for entry in _entries():
        try:
            _load_class(entry)
        except VerifierError as error:
            infos.append(VerifierInfo(entry.name, entry.source, entry.target, "error", str(error)))
        else:
            infos.append(VerifierInfo(entry.name, entry.source, entry.target, "ok"))
    return infos


def _spec_parts(spec: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if not isinstance(spec, dict):
        raise VerifierError(f"a verifier spec is a name or a mapping with 'name', got "
                            f"{type(spec).__name__}")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise VerifierError(f"a verifier mapping needs a 'name' string, got keys: "
                            f"{', '.join(sorted(map(str, spec))) or 'none'}")
    return name, {k: v for k, v in spec.items() if k not in _JOB_ONLY_KEYS}


def _resolve_paths(value: Any, folder: Path) -> Any:
    """Strings naming an existing path relative to ``folder`` become absolute paths."""
    if isinstance(value, str):
        candidate = folder / value
        if value and not Path(value).is_absolute() and candidate.exists():
            return str(candidate.resolve())
        return value
    if isinstance(value, list):
        return [_resolve_paths(v, folder) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_paths(v, folder) for k, v in value.items()}
    return value


def _read_folder(folder: Path) -> tuple[str, dict[str, Any]]:
    """The registered name and options a verifier folder's manifest asks for."""
    manifest = folder / FOLDER_MANIFEST
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise VerifierError(f"{manifest}: cannot read it: {_one_line(error)}") from error
    if not isinstance(data, dict):
        raise VerifierError(f"{manifest}: must hold a JSON object")
    unknown = sorted(set(data) - {"verifier", "options", "meta"})
    if unknown:
        raise VerifierError(f"{manifest}: unknown key(s) {', '.join(unknown)}; "
                            f"allowed: verifier, options, meta")
    name, options = data.get("verifier"), data.get("options", {})
    if not isinstance(name, str) or not name:
        raise VerifierError(f"{manifest}: 'verifier' must name a registered verifier")
    if not isinstance(options, dict):
        raise VerifierError(f"{manifest}: 'options' must be a JSON object")
    return name, _resolve_paths(options, folder)


def create_verifier(spec: str | dict[str, Any], device: str | torch.device = "cpu") -> Verifier:
    """Build the verifier ``spec`` names: ``"clip"``, ``{"name": "clip", "arch": "ViT-B-32"}``,
    or a verifier folder's path. A dict's ``device`` overrides ``device``; ``label`` is ignored
    (the job layer stores scores under it)."""
    name, options = _resolve_spec(spec)
    if isinstance(spec, dict) and "device" in spec:
        device = spec["device"]
    return _construct(_entry(name), options, device)


def check_verifier_spec(spec: str | dict[str, Any]) -> None:
    """Raise the error :func:`create_verifier` would for an unknown name or a broken folder
    manifest, without importing or building the verifier (the driver's check before a run)."""
    name, options = _resolve_spec(spec)
    _entry(name)
    option = WRAPPED_OPTIONS.get(name)
    wrapped = options.get(option) if option else None
    inner_specs = wrapped if isinstance(wrapped, list) else [] if wrapped is None else [wrapped]
    for index, inner in enumerate(inner_specs):
        try:
            check_verifier_spec(inner)  # an ensemble member's extra keys are not looked at
        except VerifierError as error:
            where = f"{option}[{index}]" if isinstance(wrapped, list) else option
            raise type(error)(f"{name}: {where}: {error}") from None


def _resolve_spec(spec: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registered name and constructor options a spec means (a folder's manifest read)."""
    name, options = _spec_parts(spec)
    folder = Path(name).expanduser()
    if (folder / FOLDER_MANIFEST).is_file():
        registered, folder_options = _read_folder(folder)
        return registered, folder_options | options
    return name, options


def _entry(name: str) -> _Entry:
    entries = {e.name: e for e in _entries() if not e.conflict}
    entry = entries.get(name)
    if entry is None:
        raise UnknownVerifierError(f"unknown verifier {name!r}; available: "
                                   f"{', '.join(entries)} (or a folder with {FOLDER_MANIFEST})")
    return entry


def _construct(entry: _Entry, options: dict[str, Any], device: str | torch.device) -> Verifier:
    name = entry.name
    cls = _load_class(entry)
    try:
        return cls(device=device, **options)
    except VerifierError:
        raise
    except TypeError as error:  # mostly a wrong option name or type from a job file
        raise VerifierError(f"verifier {name!r}: bad options: {_one_line(error)}") from error
    except Exception as error:  # a plugin's constructor may raise anything
        raise VerifierError(f"verifier {name!r} ({entry.source}) failed to load: "
                            f"{_one_line(error)}") from error
