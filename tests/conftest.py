"""Test-wide settings: no network, deterministic CPU math, helpers importable."""

from __future__ import annotations

import os

# No test may reach the Hugging Face Hub (nothing downloads unless asked; docs/architecture.md):
# fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment is set)

# Tests build tiny models: one intra-op thread is fastest for them and keeps the suite from
# oversubscribing the CPU. Jobs that pin other counts (WorkerRuntime.load) set their own.
torch.set_num_threads(1)
