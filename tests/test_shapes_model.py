"""The shipped shapes StableDiffusionPipeline and the trainers that make it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from diffsearch.pipelines.shapes import (
    bundled_defaults,
    bundled_model_path,
    clip_model,
    clip_samples,
    oracle,
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


def _render_samples(n: int, seed: int) -> clip_samples.Samples:
    """Renders standing in for generated images, labelled the way clip_samples labels them."""
    prompts, pixels = world.dataset(n, seed)
    images = pixels.astype(np.float32) / 255.0
    index, texts, labels = clip_samples.label(images, prompts, seed)
    return clip_samples.Samples(images.astype(np.float16), prompts, np.array(index), texts,
                                np.array(labels, dtype=bool))


def test_sample_labels_come_from_the_oracle_and_skip_heldout_captions() -> None:
    samples = _render_samples(60, seed=4)
    by_image = {}
    for image, text, right in zip(samples.pair_image, samples.pair_text, samples.pair_label,
                                  strict=True):
        assert not world.is_heldout(world.parse(text))
        by_image.setdefault(int(image), []).append((text, bool(right)))
    for image, pairs in by_image.items():
        # a render is right for its own prompt, and each caption is labelled once
        assert (samples.prompts[image], True) in pairs
        assert len({t for t, _ in pairs}) == len(pairs)
    assert 0.1 < samples.pair_label.mean() < 0.6  # near misses are mostly wrong


def test_describe_names_what_a_render_shows() -> None:
    rng = np.random.default_rng(0)
    for spec in world.sample_specs(40, rng):
        image = world.render(spec, rng)[0]
        shown = clip_samples.describe(oracle.detect(image))
        assert shown is not None and oracle.judge(image, world.prompt_of(shown)).correct
        if isinstance(spec, world.Single):
            assert shown == spec
    assert clip_samples.describe([]) is None


def test_mirrored_samples_are_relabelled_for_their_mirrored_captions() -> None:
    samples = _render_samples(40, seed=6)
    mirrors = clip_samples.mirrored(samples)
    assert np.array_equal(mirrors.images, samples.images[:, :, ::-1])
    assert clip_samples.mirror(world.parse("a red circle on the left")) == world.parse(
        "a red circle on the right")
    assert clip_samples.mirror(world.parse("a red circle to the left of a blue square")) == \
        world.parse("a red circle to the right of a blue square")
    for image, text, right in zip(mirrors.pair_image, mirrors.pair_text, mirrors.pair_label,
                                  strict=True):
        assert not world.is_heldout(world.parse(text))
        assert right == oracle.judge(mirrors.images[image].astype(np.float32), text).correct
    # a mirrored render is right for its mirrored prompt
    own = [r for i, t, r in zip(mirrors.pair_image, mirrors.pair_text, mirrors.pair_label,
                                strict=True) if t == mirrors.prompts[i]]
    assert own and all(own)
    joined = clip_samples.concat([samples, mirrors])
    assert len(joined.prompts) == 80 and joined.pair_image.max() >= 40


def test_samples_round_trip_through_npz(tmp_path) -> None:
    samples = _render_samples(8, seed=1)
    samples.save(tmp_path / "s.npz")
    loaded = clip_samples.Samples.load(tmp_path / "s.npz")
    assert loaded.prompts == samples.prompts and loaded.pair_text == samples.pair_text
    assert np.array_equal(loaded.images, samples.images)
    assert np.array_equal(loaded.pair_label, samples.pair_label)


def test_sample_generation_is_seeded_and_stops_on_its_cap(tmp_path) -> None:
    train_sd.train(tmp_path / "sd", 1.0, seed=0, cfg=train_sd.tiny_config(), log=lambda m: None)
    full = clip_samples.generate(tmp_path / "sd", 6, seed=3, batch=3, log=lambda m: None)
    capped = clip_samples.generate(tmp_path / "sd", 6, seed=3, minutes=1e-9, batch=3,
                                   log=lambda m: None)
    assert len(full.prompts) == 6 and full.images.shape == (6, world.SIZE, world.SIZE, 3)
    assert capped.prompts == full.prompts[:3]  # the first batch of the full run, exactly
    assert np.array_equal(capped.images, full.images[:3])


def test_sample_loss_prefers_right_pairs_above_wrong_ones() -> None:
    loss = train_clip.SampleLoss()
    labels = torch.tensor([True, False, True, False])
    ordered = loss(torch.tensor([0.6, 0.1, 0.5, 0.0]), labels)
    reversed_ = loss(torch.tensor([0.1, 0.6, 0.0, 0.5]), labels)
    assert ordered < reversed_


def test_clip_trainer_with_samples_and_init(tmp_path) -> None:
    first = tmp_path / "first"
    samples = _render_samples(40, seed=2)
    info = train_clip.train(first, 1.0, seed=0, steps=3, n_images=64, batch=8, tiny=True,
                            samples=samples, generated_batch=4, log=lambda m: None)
    assert info["samples"] == 40 and 0.0 <= info["validation_auc"] <= 1.0
    start = load_file(first / clip_model.WEIGHTS_FILE)
    second = tmp_path / "second"
    info = train_clip.train(second, 1.0, seed=1, steps=1, n_images=64, batch=8, lr=1e-12,
                            tiny=True, init=first, log=lambda m: None)
    assert info["init"] == str(first)
    after = load_file(second / clip_model.WEIGHTS_FILE)
    # started from first's weights (a fresh seed-1 init would differ everywhere)
    assert all(torch.allclose(start[k], after[k], atol=1e-6) for k in start)


def test_benchmark_auc_intervals_are_paired_and_resample_prompts() -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import shapes_model  # benchmarks/ is a folder of scripts, not a package

    rng = np.random.default_rng(0)
    prompts = [f"p{i % 30}" for i in range(120)]
    correct = rng.random(120) < 0.5
    good = correct + rng.normal(0, 0.6, 120)
    noise = rng.normal(0, 1, 120)
    report = shapes_model.bootstrap_auc({"good": good, "same": good.copy(), "noise": noise},
                                        correct, prompts, seed=0)
    assert report["difference"]["good - same"] == [0.0, 0.0]  # paired: identical scores
    low, high = report["auc"]["good"]
    assert low < shapes_model.roc_auc(good, correct) < high
    assert report["difference"]["good - noise"][0] > 0
    # resampling whole prompts: one prompt's 4 images move together, so a prompt-level effect
    # widens the interval compared with the same scores spread over distinct prompts
    shared = rng.normal(0, 1, 30)[np.arange(120) % 30]  # image i shows prompt i % 30
    clustered = shapes_model.bootstrap_auc({"x": shared}, correct, prompts, seed=0)["auc"]["x"]
    distinct = shapes_model.bootstrap_auc(
        {"x": shared}, correct, [f"q{i}" for i in range(120)], seed=0)["auc"]["x"]
    assert clustered[1] - clustered[0] > distinct[1] - distinct[0]
