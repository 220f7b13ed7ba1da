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

``--samples`` adds what renders cannot teach: images from the SD pipeline itself, each labelled
against several captions by the oracle (``clip_samples.py``). They train a sigmoid loss on
``scale * cosine + bias`` with one bias for every prompt, so a right image scores above a wrong
one whatever their prompts: the pooled ranking a guide's AUC against the oracle measures.
``--init`` starts from a trained shapes-clip folder (its architecture and weights), so the
render-only phase is not paid twice. The shipped ``shapes-clip`` came from

    python -m diffsearch.pipelines.shapes.clip_samples --out runs/clip-samples.npz --n 2560
    python -m diffsearch.pipelines.shapes.train_clip --out pipelines/shapes/weights/clip \
        --init pipelines/shapes/weights/clip-small --samples runs/clip-samples.npz \
        --steps 1000 --minutes 32 --batch 64 --lr 3e-4

and ``shapes-clip-small`` from the renders-only form (``--steps 1500 --minutes 15``, 1030 steps
reached); see pipelines/shapes/README.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.stats import mannwhitneyu

from diffsearch.pipelines.shapes import world
from diffsearch.pipelines.shapes.clip_model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    model_config,
    normalise,
    write_config,
)
from diffsearch.pipelines.shapes.clip_samples import Samples, concat, mirrored
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


INFO_FILE = "training_info.json"
"""What a run did (steps, seconds, schedule, start and samples), saved beside the weights."""
GENERATED_BATCH = 64
"""Generated images per step when training on samples (each with all its labelled captions)."""
VALIDATION_SHARE = 0.05
"""The last share of the generated images, never trained on: the AUC the log reports."""


class SampleLoss(torch.nn.Module):
    """Binary cross-entropy of the oracle's verdict on ``scale * cosine + bias``.

    One scale and one bias for all prompts make the cosine itself calibrated across prompts;
    neither is part of the saved model (the verifier scores with the plain cosine, and a rank
    measure such as AUC does not see a monotone map).
    """

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))
        self.bias = torch.nn.Parameter(torch.tensor(-3.0))

    def forward(self, cosine: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = self.log_scale.exp() * cosine + self.bias
        return F.binary_cross_entropy_with_logits(logits, label.float())


class SampleBatches:
    """Seeded batches of generated images with their labelled (image, caption) pairs, and the
    held-back validation images. Training images come with their left-right mirrors
    (``clip_samples.mirrored``); a validated image's mirror is validated too, never trained on.
    """

    def __init__(self, samples: Samples, gen: torch.Generator) -> None:
        n = len(samples.prompts)
        n_train = n - max(1, int(round(n * VALIDATION_SHARE)))
        train = samples.subset(list(range(n_train)))
        valid = samples.subset(list(range(n_train, n)))
        self.train = concat([train, mirrored(train)])
        self.valid = concat([valid, mirrored(valid)])
        self.gen = gen

    @staticmethod
    def _pairs(part: Samples, images: list[int]) -> tuple[torch.Tensor, list[int], list[str],
                                                         torch.Tensor]:
        """(images, row of each pair, caption of each pair, label of each pair)."""
        pairs_of: dict[int, list[int]] = {i: [] for i in images}
        for pair, image in enumerate(part.pair_image.tolist()):
            if image in pairs_of:
                pairs_of[image].append(pair)
        rows, texts, labels = [], [], []
        for row, image in enumerate(images):
            for pair in pairs_of[image]:
                rows.append(row)
                texts.append(part.pair_text[pair])
                labels.append(bool(part.pair_label[pair]))
        pixels = torch.from_numpy(part.images[images].astype(np.float32)).permute(0, 3, 1, 2)
        return pixels, rows, texts, torch.tensor(labels)

    def batch(self, size: int) -> tuple[torch.Tensor, list[int], list[str], torch.Tensor]:
        picks = torch.randint(len(self.train.prompts), (size,), generator=self.gen).tolist()
        return self._pairs(self.train, picks)

    def validation(self) -> tuple[torch.Tensor, list[int], list[str], torch.Tensor]:
        return self._pairs(self.valid, list(range(len(self.valid.prompts))))


def pair_cosines(model, text_tokenizer, images: torch.Tensor, rows: list[int],
                 texts: list[str]) -> torch.Tensor:
    """The cosine of each (images[rows[k]], texts[k]) pair; each distinct text encoded once."""
    unique = list(dict.fromkeys(texts))
    column = {t: i for i, t in enumerate(unique)}
    image_emb = F.normalize(model.encode_image(normalise(images)), dim=-1)
    text_emb = F.normalize(model.encode_text(text_tokenizer(unique)), dim=-1)
    cols = torch.tensor([column[t] for t in texts])
    return (image_emb[torch.tensor(rows)] * text_emb[cols]).sum(-1)


def validation_auc(model, text_tokenizer, batches: SampleBatches) -> float:
    """AUC of the cosine for oracle-right against oracle-wrong held-back generated pairs."""
    images, rows, texts, labels = batches.validation()
    model.eval()
    with torch.no_grad():
        cosine = pair_cosines(model, text_tokenizer, images, rows, texts).numpy()
    model.train()
    right = labels.numpy()
    if right.all() or not right.any():
        return float("nan")
    u = mannwhitneyu(cosine[right], cosine[~right]).statistic
    return float(u / (right.sum() * (~right).sum()))


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
    init: Path | None = None,
    samples: Samples | None = None,
    generated_batch: int = GENERATED_BATCH,
    log=print,
) -> dict:
    """Train and save ``open_clip_config.json``, tokenizer and weights into ``out``.

    ``steps`` steps, unless ``minutes`` run out first (then the schedule follows the clock).
    ``by_step`` (and ``tiny``) runs are scheduled by step only, so they do not depend on the
    machine's load and are exactly reproducible; ``minutes`` is then only a cap. ``init`` is a
    shapes-clip folder to start from (its architecture, not ``tiny``'s); ``samples`` adds the
    generated-image loss (module docstring).
    """
    started = time.monotonic()
    torch.manual_seed(derive_seed(seed, "", 0, "shapes-clip-init") % 2**31)
    gen = torch_generator(derive_seed(seed, "", 0, "shapes-clip-train"))
    rng = numpy_rng(derive_seed(seed, "", 0, "shapes-clip-negatives"))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    tiny_sizes = dict(vision_width=32, vision_layers=1, text_width=32, text_layers=1, embed_dim=32)
    if init is not None:
        cfg = json.loads((init / CONFIG_FILE).read_text())["model_cfg"]
    else:
        cfg = model_config(out, len(tokenizer), **(tiny_sizes if tiny else {}))
    write_config(out, cfg)
    model = open_clip.create_model(f"local-dir:{out}")
    if init is not None:
        model.load_state_dict(load_file(str(init / WEIGHTS_FILE)))
    text_tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    captions, pixels = world.dataset(n_images, derive_seed(seed, "", 0, "shapes-clip-data"))
    specs = [world.parse(c) for c in captions]
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255.0)
    log(f"dataset: {len(captions)} pairs in {time.monotonic() - started:.0f}s")

    sample_loss = SampleLoss()
    batches = None
    if samples is not None:
        batches = SampleBatches(
            samples, torch_generator(derive_seed(seed, "", 0, "shapes-clip-sample-batches")))
        log(f"samples: {len(batches.train.prompts)} generated images (with mirrors) to train "
            f"on, {len(batches.valid.prompts)} held back; validation AUC "
            f"{validation_auc(model, text_tokenizer, batches):.4f}")
    params = list(model.parameters()) + (list(sample_loss.parameters()) if batches else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
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
        if batches is not None:
            gen_images, rows, pair_texts, labels = batches.batch(generated_batch)
            cosine = pair_cosines(model, text_tokenizer, gen_images, rows, pair_texts)
            loss = loss + sample_loss(cosine, labels)
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
        if batches is not None and step % 200 == 0:
            auc = validation_auc(model, text_tokenizer, batches)
            log(f"clip step {step} validation AUC {auc:.4f}")
    model.eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    info = {"steps": step, "seconds": round(time.monotonic() - started, 1), "seed": seed,
            "scheduled_by": "step" if tiny or by_step else "clock"}
    if init is not None:
        info["init"] = str(init)
    if batches is not None:
        info["samples"] = len(samples.prompts)
        info["validation_auc"] = round(validation_auc(model, text_tokenizer, batches), 4)
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
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
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    parser.add_argument("--batch", type=int, default=128,
                        help="rendered images per step (each with one near-miss caption)")
    parser.add_argument("--init", type=Path, default=None,
                        help="a shapes-clip folder to start from (architecture and weights)")
    parser.add_argument("--samples", type=Path, default=None,
                        help="generated, oracle-labelled images (.npz from clip_samples)")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke-test config")
    args = parser.parse_args(argv)
    if args.init is not None and not (args.init / WEIGHTS_FILE).is_file():
        parser.error(f"--init: no {WEIGHTS_FILE} in {args.init}")
    if args.samples is not None and not args.samples.is_file():
        parser.error(f"--samples: no file {args.samples}")
    if args.lr <= 0:
        parser.error("--lr must be positive")
    if args.batch < 2:
        parser.error("--batch must be at least 2")
    torch.set_num_threads(args.threads)
    samples = Samples.load(args.samples) if args.samples is not None else None

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    if args.tiny:
        train(args.out, args.minutes, args.seed, steps=3, n_images=64, batch=8, tiny=True,
              init=args.init, samples=samples, generated_batch=4, log=log)
    else:
        train(args.out, args.minutes, args.seed, steps=args.steps, batch=args.batch, lr=args.lr,
              by_step=args.by_step, init=args.init, samples=samples, log=log)


if __name__ == "__main__":
    main()
