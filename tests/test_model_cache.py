"""One copy of each model per device and dtype, and of each verifier, however many steps,
guidance scales and verifier sets the jobs of a process (a worker, the service) ask for; the
least recently used goes once the ``--max-loaded`` limit is passed.

The model here is a tiny Stable Diffusion pipeline whose text encoder has a 100 MB embedding
table: cheap to run, heavy to hold, so a second copy shows in the resident memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import adapter_checks as checks
import httpx
import pytest
import torch
from diffusers import StableDiffusionPipeline
from test_service_harness import TOKEN, wait_until_serving
from test_service_restart import free_port, poll, status_is
from transformers import CLIPTextConfig, CLIPTextModel

from diffsearch import model_cache, runtime
from diffsearch.job import Job
from diffsearch.runtime import RuntimeSpec, get_runtime
from tiny_pipelines import discrete_scheduler, tiny_unet, tiny_vae, write_clip_tokenizer

HIDDEN = 64
VOCAB = 400_000
"""Embedding rows: 400,000 x 64 float32 = 102 MB, almost all of the model's weight."""
PROMPT = "a red circle on the left"
VERIFIER_SETS = [{"verifier": "shapes-clip"}, {"verifier": "shapes-oracle"},
                 {"verifier": "shapes-clip", "eval_verifiers": ["shapes-oracle"]}]


@pytest.fixture(scope="module")
def heavy_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("heavy") / "heavy-sd"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokenizer = write_clip_tokenizer(folder / "tokenizer")
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, projection_dim=HIDDEN))
        pipe = StableDiffusionPipeline(
            vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
            unet=tiny_unet(cross_attention_dim=HIDDEN),
            scheduler=discrete_scheduler("ddim", "epsilon"), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    tokenizer.model_max_length = 16
    tokenizer.save_pretrained(folder / "tokenizer")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def job(model: Path, num_steps: int, verifiers: dict, **fields: object) -> Job:
    return Job(prompts=[PROMPT], model=str(model), budget="1x", num_steps=num_steps,
               guidance_scale=1.0, threads=1, executor="local", **verifiers, **fields)


def test_steps_guidance_and_verifier_sets_share_one_model_copy(heavy_model):
    models, verifiers = model_cache.MODELS.loads, model_cache.VERIFIERS.loads
    with checks.one_thread():
        runtimes = [get_runtime(RuntimeSpec.from_job(job(heavy_model, steps, verifier_set)))
                    for steps in range(1, 13) for verifier_set in VERIFIER_SETS]
        other_guidance = get_runtime(RuntimeSpec.from_job(
            job(heavy_model, 4, VERIFIER_SETS[0]).model_copy(update={"guidance_scale": 3.0})))
    assert model_cache.MODELS.loads == models + 1
    # shapes-clip and shapes-oracle at most (earlier tests in this process may hold them)
    assert model_cache.VERIFIERS.loads - verifiers <= 2
    pipes = {id(r.denoiser.pipe) for r in [*runtimes, other_guidance]}
    assert len(pipes) == 1
    assert [r.denoiser.num_steps for r in runtimes[::3]] == list(range(1, 13))
    assert other_guidance.denoiser.guidance_scale == 3.0
    for label in ("shapes-clip", "shapes-oracle"):
        copies = {id(r.verifiers[label]) for r in runtimes if label in r.verifiers}
        assert len(copies) == 1, label


def test_the_least_recently_used_model_goes_past_the_limit(heavy_model):
    """Another device or dtype is another copy; with a limit of one, loading it evicts the
    first, and the runtimes over the evicted copy go with it (so its memory is freed)."""
    limit = model_cache.MODELS.limit
    model_cache.set_limits(models=1)
    try:
        with checks.one_thread():
            first = RuntimeSpec.from_job(job(heavy_model, 2, VERIFIER_SETS[0]))
            get_runtime(first)
            loads = model_cache.MODELS.loads
            second = RuntimeSpec.from_job(job(heavy_model, 2, VERIFIER_SETS[0], device="cpu"))
            get_runtime(second)
        assert model_cache.MODELS.loads == loads + 1
        assert first.model_key not in model_cache.MODELS
        assert first not in runtime._RUNTIMES and second in runtime._RUNTIMES
        assert os.environ[model_cache.MAX_MODELS_ENV] == "1"  # worker processes inherit it
    finally:
        model_cache.set_limits(models=limit)


def test_a_limit_below_one_is_refused():
    with pytest.raises(ValueError, match="must be >= 1"):
        model_cache.set_limits(verifiers=0)


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_twelve_searches_keep_the_servers_memory_within_a_third_of_one_model(heavy_model,
                                                                             tmp_path):
    """A real ``diffsearch serve``: 12 searches with 12 different num_steps over 3 verifier
    sets. After the first three (the model and every verifier loaded), the other nine add
    less than 30% to the server's resident memory; a copy of the model per search would add
    about 9 x 100 MB."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSEARCH_")}
    env.update(DIFFSEARCH_TOKEN=TOKEN, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "diffsearch", "serve", "--port", str(port), "--data-dir",
         str(tmp_path / "data"), "--model", f"heavy={heavy_model}", "--verifier", "shapes-clip",
         "--verifier", "shapes-oracle", "--threads", "1", "--log-level", "warning"],
        env=env, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(process, base)
        with httpx.Client(base_url=base, timeout=120,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            memory = []
            for steps in range(1, 13):
                body = {"prompts": [PROMPT], "model": "heavy", "budget": "1x",
                        "num_steps": steps, "guidance_scale": 1.0,
                        **VERIFIER_SETS[(steps - 1) % 3]}
                answer = http.post("/v1/searches", json=body)
                assert answer.status_code == 202, answer.text
                done = poll(http, answer.json()["id"], status_is("done", "failed"))
                assert done["status"] == "done", done
                memory.append(resident_bytes(process.pid))
        loaded, final = memory[2], memory[-1]
        assert final < 1.3 * loaded, [m // 2**20 for m in memory]
        assert loaded > 100 * 2**20  # the model is in there
    finally:
        process.kill()
        process.communicate(timeout=30)
