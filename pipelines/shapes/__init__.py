"""The bundled shapes model: a synthetic world, its exact oracle, and the models trained on it.

``bundled_model_path()`` is the StableDiffusionPipeline folder every default points at; see
``README.md`` in this folder for how the weights were trained and how well they do.
"""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"


def bundled_model_path() -> Path:
    """Folder of the shipped diffusers StableDiffusionPipeline (``weights/sd``)."""
    return WEIGHTS / "sd"


def bundled_defaults(path: str | Path | None = None) -> dict:
    """The recommended sampling settings shipped beside a shapes pipeline
    (``diffsearch_defaults.json``: num_steps, guidance_scale, height, width)."""
    folder = Path(path) if path is not None else bundled_model_path()
    return json.loads((folder / "diffsearch_defaults.json").read_text())
