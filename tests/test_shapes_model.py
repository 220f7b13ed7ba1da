"""The shipped shapes StableDiffusionPipeline and the trainers that make it."""

from __future__ import annotations

import json

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from diffsearch.pipelines.shapes import (
    bundled_defaults,
    bundled_model_path,
    clip_model,
    train_clip,
    train_sd,
    world,
)

MAX_BYTES = 30 * 1024 * 1024


def _load(path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(
        str(path), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_pipeline_loads_offline_and_generates() -> None:
    path = bundled_model_path()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= MAX_BYTES
    assert list(path.rglob("*.safetensors")) and not list(path.rglob("*.bin"))
    defaults = bundled_defaults()
    assert defaults["num_steps"] == 20 and defaults["height"] == defaults["width"] == world.SIZE
    pipe = _load(path)
    tokenizer = pipe.tokenizer
    assert tokenizer.eos_token_id == len(tokenizer) - 1
    assert pipe.text_encoder.config.eos_token_id == tokenizer.eos_token_id
    assert pipe.text_encoder.config.bos_token_id == tokenizer.bos_token_id
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    images = pipe(
        ["a red circle on the left", "two blue squares"],
        num_inference_steps=4,
        guidance_scale=defaults["guidance_scale"],
        height=world.SIZE,
        width=world.SIZE,
        generator=generators,
        output_type="np",
    ).images
    assert images.shape == (2, world.SIZE, world.SIZE, 3)
    assert np.isfinite(images).all() and 0.0 <= images.min() and images.max() <= 1.0
    assert images.std() > 0.05  # not a blank canvas


def test_sd_trainer_smoke_run_saves_a_loadable_pipeline(tmp_path) -> None:
    info = train_sd.train(tmp_path / "sd", 1.0, seed=0, cfg=train_sd.tiny_config(),
                          log=lambda m: None)
    assert info["vae_steps"] == 3 and info["unet_steps"] == 3
    defaults = json.loads((tmp_path / "sd" / train_sd.DEFAULTS_FILE).read_text())
    assert defaults == {"num_steps": 20, "guidance_scale": 4.0, "height": 32, "width": 32}
    pipe = _load(tmp_path / "sd")
    out = pipe(
        "two red circles", num_inference_steps=2, height=32, width=32, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 32, 32, 3)
    assert pipe.vae.config.scaling_factor != 0.18215  # measured from the cached latents


def test_sd_trainer_is_deterministic_for_a_seed(tmp_path) -> None:
    cfg = train_sd.tiny_config()
    for name in ("a", "b"):
        train_sd.train(tmp_path / name, 1.0, seed=7, cfg=cfg, log=lambda m: None)
    weights = "unet/diffusion_pytorch_model.safetensors"
    first, second = load_file(tmp_path / "a" / weights), load_file(tmp_path / "b" / weights)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_clip_trainer_smoke_run_saves_a_loadable_model(tmp_path) -> None:
    out = tmp_path / "clip"
    train_clip.train(out, 1.0, seed=0, steps=3, n_images=64, batch=8, tiny=True, log=lambda m: None)
    model, tokenizer = clip_model.load(out)
    ids = tokenizer(["a red circle on the left"])
    assert ids.shape == (1, 16) and int(ids.argmax()) == 7  # BOS + 6 words, then end of text
    with torch.no_grad():
        emb = model.encode_image(clip_model.normalise(torch.rand(2, 3, 32, 32)))
    assert emb.shape == (2, 32)


def test_contrastive_loss_treats_repeated_captions_as_positives() -> None:
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    captions = ["x", "x", "y"]
    scale = torch.tensor(3.0)
    loss = train_clip.contrastive_loss(emb, emb, captions, captions, scale)
    wrong = train_clip.contrastive_loss(emb, emb, ["x", "z", "y"], ["x", "z", "y"], scale)
    assert loss < wrong
