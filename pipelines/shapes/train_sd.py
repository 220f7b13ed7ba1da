"""Train the bundled shapes StableDiffusionPipeline from scratch on CPU, time-boxed.

    python -m diffsearch.pipelines.shapes.train_sd --out pipelines/shapes/weights/sd \
        --steps 2458 --seed 0

Phases:

1. tokenizer: generated from the grammar (``tokenizer.py``);
2. VAE (AutoencoderKL, 32x32x3 -> 8x8x4): L1 + L2 reconstruction and a tiny KL term, a fixed
   number of steps (capped at a share of the time box);
3. the whole training set is encoded ONCE (posterior mean and std cached), and the latent
   scaling factor is set so scaled latents have unit variance;
4. UNet + CLIP text encoder trained jointly on the cached latents (a fresh posterior sample per
   step) for the rest of the time box: v-prediction on a cosine schedule (a 4-channel 8x8
   latent is so small that the standard linear schedule leaves visible signal at t = T), 10%
   empty captions so classifier-free guidance works, and an EMA of both networks, which is what
   gets saved.

Two ways to bound the UNet phase. ``--steps N`` (the way to reproduce a model) takes exactly
N steps with a step-scheduled learning rate: the result does not depend on the machine's load,
and the same seed, steps and thread count give the same weights. Without it the phase fills the
``--minutes`` time box and its learning-rate schedule follows the clock (see ``schedule.Plan``),
which ends on time on a CPU whose speed comes and goes, at the price of a result that depends
on the load. Either way the steps taken are recorded in ``training_info.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffsearch.pipelines.shapes import world
from diffsearch.pipelines.shapes.schedule import Plan
from diffsearch.pipelines.shapes.tokenizer import MAX_LENGTH, build_tokenizer
from diffsearch.pipelines.sources import DEFAULTS_FILE
from diffsearch.seeding import derive_seed, torch_generator

INFO_FILE = "training_info.json"


@dataclass
class SDConfig:
    """Architecture and schedule of one training run (the defaults are the shipped model)."""

    n_images: int = 40_000
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 128)
    unet_layers: int = 1
    attention_head_dim: int = 8
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    vae_steps: int = 800
    """VAE steps: a fixed count, since every later phase builds on its reconstructions..."""
    vae_max_share: float = 0.35
    """...unless the shared CPU is so slow that they would take this share of the time box."""
    vae_batch: int = 32
    vae_lr: float = 1e-3
    unet_batch: int = 64
    unet_lr: float = 6e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    guidance_scale: float = 4.0
    num_steps: int = 20
    kl_weight: float = 1e-6
    unet_steps: int | None = None
    """Exactly this many UNet steps, every phase scheduled by step (reproducible); None fills
    the time box and follows the clock."""
    extra: dict = field(default_factory=dict)


def tiny_config() -> SDConfig:
    """A config that trains in seconds, for the smoke test."""
    return SDConfig(
        n_images=64,
        vae_channels=(8, 16, 16),
        unet_channels=(16, 32),
        text_width=16,
        text_layers=1,
        text_heads=2,
        vae_batch=8,
        unet_batch=8,
        warmup_steps=1,
        vae_steps=3,
        unet_steps=3,
    )


# ---- models ---------------------------------------------------------------------------------
def make_vae(cfg: SDConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(cfg.vae_channels[0], 16) // 2 * 2 or 1,
        sample_size=world.SIZE,
    )


def make_text_encoder(cfg: SDConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_width,
        intermediate_size=cfg.text_width * 4,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=cfg.text_width,
    )
    return CLIPTextModel(config)


def make_unet(cfg: SDConfig) -> UNet2DConditionModel:
    n = len(cfg.unet_channels)
    latent_side = world.SIZE // 2 ** (len(cfg.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=latent_side,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cfg.text_width,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=min(cfg.unet_channels[0], 16),
    )


def make_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
    )


# ---- training helpers -----------------------------------------------------------------------
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(
    cfg: SDConfig, images: torch.Tensor, budget_s: float, gen: torch.Generator, log
) -> tuple[AutoencoderKL, dict]:
    vae = make_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    plan = Plan(budget_s, 100, cfg.vae_steps, follow_clock=cfg.unet_steps is None)
    step, recent = 0, []
    while not plan.done(step):
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * plan.lr_factor(step)
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=gen
        )
        recon = vae.decode(z).sample
        err = recon - x
        loss = err.abs().mean() + err.pow(2).mean() + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        recent.append(loss.item())
        if step % 100 == 0:
            log(f"vae step {step} ({plan.progress(step):.0%}) loss {np.mean(recent):.4f}")
            recent = []
    vae.eval().requires_grad_(False)
    return vae, {"vae_steps": step, "vae_seconds": round(time.monotonic() - plan.start, 1)}


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image, computed once."""
    means, stds = [], []
    for chunk in images.split(512):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_denoiser(
    cfg: SDConfig,
    tokenizer: CLIPTokenizer,
    latents: tuple[torch.Tensor, torch.Tensor],
    captions: list[str],
    scaling: float,
    budget_s: float,
    gen: torch.Generator,
    log,
) -> tuple[UNet2DConditionModel, CLIPTextModel, dict]:
    unet, text = make_unet(cfg), make_text_encoder(cfg, tokenizer)
    ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text)
    ema_unet.requires_grad_(False)
    ema_text.requires_grad_(False)
    params = [*unet.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    noise_schedule = DDPMScheduler.from_config(make_scheduler().config)
    ids = tokenizer(
        captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
        return_tensors="pt",
    ).input_ids
    empty = tokenizer(
        [""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt"
    ).input_ids
    mean, std = latents
    plan = Plan(budget_s, cfg.warmup_steps, cfg.unet_steps, follow_clock=cfg.unet_steps is None)
    step, recent = 0, []
    while not plan.done(step):
        for group in opt.param_groups:
            group["lr"] = cfg.unet_lr * plan.lr_factor(step)
        idx = torch.randint(len(mean), (cfg.unet_batch,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        batch_ids = ids[idx].clone()
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout
        batch_ids[drop] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=gen)
        noisy = noise_schedule.add_noise(x0, noise, t)
        target = noise_schedule.get_velocity(x0, noise, t)
        cond = text(batch_ids).last_hidden_state
        pred = unet(noisy, t, cond).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text, decay)
        recent.append(loss.item())
        if step % 100 == 0:
            log(f"unet step {step} ({plan.progress(step):.0%}) loss {np.mean(recent):.4f}")
            recent = []
    info = {"unet_steps": step, "unet_seconds": round(time.monotonic() - plan.start, 1)}
    return ema_unet.eval(), ema_text.eval(), info


def save_pipeline(
    out: Path,
    vae: AutoencoderKL,
    text: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    cfg: SDConfig,
    info: dict,
) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    defaults = {
        "num_steps": cfg.num_steps,
        "guidance_scale": cfg.guidance_scale,
        "height": world.SIZE,
        "width": world.SIZE,
    }
    (out / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")
    (out / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return pipe


def train(out: Path, minutes: float, seed: int, cfg: SDConfig, log=print) -> dict:
    """Run every phase within ``minutes`` and save the pipeline to ``out``; returns the info."""
    started = time.monotonic()
    torch.manual_seed(derive_seed(seed, "", 0, "shapes-sd-init") % 2**31)
    gen = torch_generator(derive_seed(seed, "", 0, "shapes-sd-train"))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out / "tokenizer")
    captions, pixels = world.dataset(cfg.n_images, seed)
    images = to_tensor(pixels)
    log(f"dataset: {len(captions)} pairs in {time.monotonic() - started:.0f}s")

    budget = minutes * 60.0 - (time.monotonic() - started)
    vae, info = train_vae(cfg, images, budget * cfg.vae_max_share, gen, log)
    cache_start = time.monotonic()
    mean, std = encode_all(vae, images)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        recon = vae.decode(mean[:256]).sample.clamp(-1, 1)
    info["vae_recon_mse"] = round(float((recon - images[:256]).pow(2).mean()), 5)
    info["cache_seconds"] = round(time.monotonic() - cache_start, 1)
    log(f"latents cached: scaling {scaling:.3f}, VAE recon mse {info['vae_recon_mse']}")

    remaining = minutes * 60.0 - (time.monotonic() - started) - 15.0
    unet, text, unet_info = train_denoiser(
        cfg, tokenizer, (mean, std), captions, scaling, remaining, gen, log
    )
    info |= unet_info
    if cfg.unet_steps is not None and (
        info["unet_steps"] < cfg.unet_steps or info["vae_steps"] < cfg.vae_steps
    ):
        log(f"WARNING: the {minutes}-minute cap cut the step-scheduled run short "
            f"({info['vae_steps']}/{cfg.vae_steps} VAE, {info['unet_steps']}/{cfg.unet_steps} "
            f"UNet steps): this model is not the reproducible one")
    info |= {
        "seed": seed,
        "minutes": minutes,
        "scheduled_by": "clock" if cfg.unet_steps is None else "step",
        "torch_threads": torch.get_num_threads(),
        "total_seconds": round(time.monotonic() - started, 1),
        "config": asdict(cfg),
    }
    save_pipeline(out, vae, text, tokenizer, unet, cfg, info)
    log(f"saved to {out} after {time.monotonic() - started:.0f}s")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the pipeline")
    parser.add_argument(
        "--steps", type=int,
        help="exactly this many UNet steps, scheduled by step: reproducible whatever the load "
        "(--minutes is then only a cap)",
    )
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock time box")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads; 1 because on a shared CPU threads that wait for each "
        "other at every op's barrier lose far more than a second core gains",
    )
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke-test config")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = tiny_config() if args.tiny else SDConfig(unet_steps=args.steps)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    train(args.out, args.minutes, args.seed, cfg, log)


if __name__ == "__main__":
    main()
