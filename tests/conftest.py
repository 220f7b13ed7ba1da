"""Test-wide settings: no network, deterministic CPU math, helpers importable."""

from __future__ import annotations

import os

# No test may reach the Hugging Face Hub (DESIGN.md): fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
