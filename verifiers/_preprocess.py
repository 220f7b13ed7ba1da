"""Input preparation shared by the CLIP-family verifiers (clip, aesthetic, pickscore, hpsv2).

Images reach a verifier as float32 (B, 3, H, W) in [0, 1] on the CPU. CLIP models were trained on
PIL images resized (shortest side, bicubic, antialiased) and centre-cropped, then normalised with
per-channel mean/std; :func:`clip_pixels` does the same on tensors, so no round trip through PIL
and 8-bit pixels is needed.

:func:`encode_fixed_chunks` is how these verifiers keep the contract that a score does not depend
on batch-mates: CPU (and cuDNN) kernels choose their blocking by batch shape, so the same row can
come out a few ULPs apart alone and batched. Running the model only ever on chunks of one fixed
size (padding the last one) makes the arithmetic per row identical, hence bit-identical scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from diffsearch.verifiers.base import VerifierError

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP's normalisation, also used by open_clip's LAION models, HPS and BLIP."""
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_CHUNK = 8
"""Rows per model call; matches the engine's default compute batch so padding is rarely needed."""


def check_batch(name: str, images: torch.Tensor, prompts: Sequence[str] | None) -> None:
    """Reject malformed input with a message that names the verifier and the problem."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise VerifierError(f"verifier {name!r}: images must be (B, 3, H, W), "
                            f"got {tuple(images.shape)}")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise VerifierError(f"verifier {name!r}: {images.shape[0]} images but "
                            f"{len(prompts)} prompts")


def resolve_dtype(device: torch.device, dtype: str | None) -> torch.dtype:
    """The compute dtype: float16 on CUDA and float32 elsewhere unless the option names one."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise VerifierError(f"dtype must be one of {', '.join(table)}, got {dtype!r}")
    return table[dtype]


def clip_pixels(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    interpolation: str = "bicubic",
    resize_to: int | None = None,
    squash: bool = False,
) -> torch.Tensor:
    """Resize the shortest side to ``resize_to`` (default ``size``; antialiased), centre-crop a
    ``size`` square, normalise. ``squash`` resizes straight to the square instead (open_clip's
    ``resize_mode: squash``, used by e.g. SigLIP), distorting rather than cropping.

    Works in float32 on the images' device and clamps to [0, 1] first, because bicubic
    overshoot on decoded images would otherwise push values outside what the model saw.
    """
    x = images.detach().float().clamp(0, 1)
    resize_to = resize_to or size
    if resize_to < size:
        raise VerifierError(f"cannot crop {size} pixels out of a {resize_to}-pixel resize")
    height, width = x.shape[-2:]
    if squash and (height, width) != (size, size):
        x = F.interpolate(x, size=(size, size), mode=interpolation, antialias=True,
                          align_corners=False).clamp(0, 1)
        height = width = size
    if min(height, width) != resize_to:
        # torchvision's conventions (truncated long side, rounded crop offsets), so a tensor
        # takes the same pixels as the PIL pipeline the models were evaluated with
        short, long = min(height, width), max(height, width)
        new_long = max(resize_to, int(resize_to * long / short))
        new_h, new_w = (resize_to, new_long) if height <= width else (new_long, resize_to)
        x = F.interpolate(x, size=(new_h, new_w), mode=interpolation, antialias=True,
                          align_corners=False).clamp(0, 1)
        height, width = new_h, new_w
    if (height, width) != (size, size):
        top, left = round((height - size) / 2), round((width - size) / 2)
        x = x[..., top:top + size, left:left + size]
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def encode_fixed_chunks(
    encode: Callable[..., torch.Tensor], inputs: torch.Tensor | tuple[torch.Tensor, ...],
    chunk: int,
) -> torch.Tensor:
    """``encode`` applied to ``inputs`` in chunks of exactly ``chunk`` rows (the last one padded
    by repeating its final row), so each row's result is independent of the other rows.

    ``inputs`` is one tensor, or a tuple of tensors with the same number of rows (an image and
    its prompt's tokens) that are chunked together and passed to ``encode`` as arguments.
    """
    if chunk < 1:
        raise VerifierError(f"chunk must be a positive number of rows, got {chunk}")
    parts = inputs if isinstance(inputs, tuple) else (inputs,)
    rows = parts[0].shape[0]
    outputs = []
    with torch.no_grad():
        for begin in range(0, rows, chunk):
            real = min(chunk, rows - begin)
            args = []
            for tensor in parts:
                piece = tensor[begin:begin + real]
                if real < chunk:
                    piece = torch.cat([piece, piece[-1:].expand(chunk - real, *piece.shape[1:])])
                args.append(piece)
            outputs.append(encode(*args)[:real])
    return torch.cat(outputs)
