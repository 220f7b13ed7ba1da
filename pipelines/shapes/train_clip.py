"""Train the shapes-world CLIP (``clip_model.py``) contrastively on CPU, time-boxed.

    python -m diffsearch.pipelines.shapes.train_clip --out pipelines/shapes/weights/clip \
        --steps 1500

Each batch holds rendered training-split images, their captions and one near-miss caption per
image (one edit away: another colour, shape, position, count or relation, or the objects'
colours swapped). The near misses are what make the score sensitive to binding and layout,
which is what a verifier needs; plain in-batch negatives mostly differ in everything at once.
Captions repeat within a batch (the grammar has ~900 training combinations), so every text
identical to an image's caption is a positive for it (a multi-positive InfoNCE), not a negative.

Images get mild blur and noise so that scores stay meaningful on generated images, which are
never as crisp as renders.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffsearch.pipelines.shapes import world
from diffsearch.pipelines.shapes.clip_model import (
    WEIGHTS_FILE,
    model_config,
    normalise,
    write_config,
)
from diffsearch.pipelines.shapes.schedule import Plan
from diffsearch.pipelines.shapes.tokenizer import build_tokenizer
from diffsearch.seeding import derive_seed, numpy_rng, torch_generator


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur half the images with a random 3x3 kernel and add small Gaussian noise."""
    b = images.shape[0]
    strength = torch.rand(b, 1, 1, 1, generator=gen) * (torch.rand(b, 1, 1, 1, generator=gen) < 0.5)
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
    blurred = F.conv2d(
        F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3
    )
    mixed = images + strength * (blurred - images)
    noise = torch.randn(images.shape, generator=gen) * 0.04 * torch.rand(b, 1, 1, 1, generator=gen)
    return (mixed + noise).clamp(0.0, 1.0)


def _positive_nll(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per row, -log of the total softmax probability of its positive columns."""
    masked = logits.masked_fill(~positive, float("-inf"))
    return torch.logsumexp(logits, dim=1) - torch.logsumexp(masked, dim=1)


def contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    captions: list[str],
    texts: list[str],
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE: text j is a positive of image i iff
    texts[j] == captions[i]; the loss is -log of the probability mass on all positives, so
    duplicates never compete.

    ``texts`` starts with ``captions`` (one per image) and may go on with extra negatives; the
    text-to-image direction uses only those first texts.
    """
    logits = logit_scale.exp() * image_emb @ text_emb.T
    same = torch.tensor([[c == t for t in texts] for c in captions])
    n = len(captions)
    image_to_text = _positive_nll(logits, same)
    text_to_image = _positive_nll(logits[:, :n].T, same[:, :n].T)
    return (image_to_text.mean() + text_to_image.mean()) / 2


def train(
    out: Path,
    minutes: float,
    seed: int,
    steps: int = 1500,
    n_images: int = 30_000,
    batch: int = 128,
    lr: float = 1e-3,
    tiny: bool = False,
    by_step: bool = False,
    log=print,
) -> dict:
    """Train and save ``open_clip_config.json``, tokenizer and weights into ``out``.

    ``steps`` steps, unless ``minutes`` run out first (then the schedule follows the clock).
    ``by_step`` (and ``tiny``) runs are scheduled by step only, so they do not depend on the
    machine's load and are exactly reproducible; ``minutes`` is then only a cap.
    """
    started = time.monotonic()
    torch.manual_seed(derive_seed(seed, "", 0, "shapes-clip-init") % 2**31)
    gen = torch_generator(derive_seed(seed, "", 0, "shapes-clip-train"))
    rng = numpy_rng(derive_seed(seed, "", 0, "shapes-clip-negatives"))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    tiny_sizes = dict(vision_width=32, vision_layers=1, text_width=32, text_layers=1, embed_dim=32)
    cfg = model_config(out, len(tokenizer), **(tiny_sizes if tiny else {}))
    write_config(out, cfg)
    model = open_clip.create_model(f"local-dir:{out}")
    text_tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    captions, pixels = world.dataset(n_images, derive_seed(seed, "", 0, "shapes-clip-data"))
    specs = [world.parse(c) for c in captions]
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255.0)
    log(f"dataset: {len(captions)} pairs in {time.monotonic() - started:.0f}s")

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    budget = minutes * 60.0 - (time.monotonic() - started) - 20.0
    plan = Plan(budget, 100, steps, follow_clock=not (tiny or by_step))
    step, recent = 0, []
    model.train()
    while not plan.done(step):
        for group in opt.param_groups:
            group["lr"] = lr * plan.lr_factor(step)
        idx = torch.randint(len(captions), (batch,), generator=gen).tolist()
        batch_captions = [captions[i] for i in idx]
        negatives = [world.prompt_of(world.near_miss(specs[i], rng)) for i in idx]
        texts = batch_captions + negatives
        x = normalise(augment(images[idx], gen))
        image_emb = F.normalize(model.encode_image(x), dim=-1)
        text_emb = F.normalize(model.encode_text(text_tokenizer(texts)), dim=-1)
        loss = contrastive_loss(image_emb, text_emb, batch_captions, texts, model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        step += 1
        recent.append(loss.item())
        if step % 50 == 0:
            log(f"clip step {step} ({plan.progress(step):.0%}) loss {np.mean(recent):.4f}")
            recent = []
    model.eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    info = {"steps": step, "seconds": round(time.monotonic() - started, 1), "seed": seed,
            "scheduled_by": "step" if tiny or by_step else "clock"}
    if step < steps:
        log(f"WARNING: the {minutes}-minute cap stopped training at {step}/{steps} steps")
    log(f"saved to {out}: {info}")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the model")
    parser.add_argument("--steps", type=int, default=1500, help="training steps")
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock cap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads; 1 because on a shared CPU threads that wait for each "
        "other at every op's barrier lose far more than a second core gains",
    )
    parser.add_argument(
        "--by-step", action="store_true",
        help="schedule the learning rate by step, not clock: exactly --steps steps, "
        "reproducible whatever the load (--minutes is then only a cap)",
    )
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke-test config")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    if args.tiny:
        train(args.out, args.minutes, args.seed, steps=3, n_images=64, batch=8, tiny=True, log=log)
    else:
        train(args.out, args.minutes, args.seed, steps=args.steps, by_step=args.by_step, log=log)


if __name__ == "__main__":
    main()
