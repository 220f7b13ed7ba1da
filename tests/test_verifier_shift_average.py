"""``shift-average``: a verifier's mean score over the image and its shifted copies, with the
shift counted in the inner verifier's input pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffsearch.pipelines.shapes.world import render_prompt
from diffsearch.verifiers.base import VerifierError
from diffsearch.verifiers.registry import UnknownVerifierError, check_verifier_spec, create_verifier
from diffsearch.verifiers.shapes import ShapesClipVerifier
from diffsearch.verifiers.shift_average import ShiftAverageVerifier, shifted

PROMPTS = ["a red circle to the left of a blue square", "two yellow circles",
           "a green triangle at the top"]


def _renders(prompts: list[str], seed: int = 0) -> torch.Tensor:
    images = np.stack([render_prompt(p, seed + i) for i, p in enumerate(prompts)])
    return torch.from_numpy(images.astype(np.float32) / 255).permute(0, 3, 1, 2)


def _moved(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """The shift written out by concatenation, independently of the module's padding."""
    if dx > 0:
        x = torch.cat([x[..., :1].expand(*x.shape[:-1], dx), x[..., :-dx]], dim=-1)
    elif dx < 0:
        x = torch.cat([x[..., -dx:], x[..., -1:].expand(*x.shape[:-1], -dx)], dim=-1)
    if dy > 0:
        x = torch.cat([x[..., :1, :].expand(*x.shape[:-2], dy, x.shape[-1]), x[..., :-dy, :]],
                      dim=-2)
    elif dy < 0:
        x = torch.cat([x[..., -dy:, :], x[..., -1:, :].expand(*x.shape[:-2], -dy, x.shape[-1])],
                      dim=-2)
    return x


@pytest.mark.parametrize("dx, dy", [(1, 0), (-2, 0), (0, 1), (0, -3), (2, -1)])
def test_shifted_moves_the_content_and_repeats_the_edge(dx: int, dy: int) -> None:
    x = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted(x, dx, dy), _moved(x, dx, dy), rtol=0, atol=0)


def test_a_shift_larger_than_the_image_is_refused() -> None:
    with pytest.raises(VerifierError, match="does not fit a 4x4 image"):
        shifted(torch.zeros(1, 3, 4, 4), 4, 0)


def test_the_score_is_the_mean_over_the_image_and_its_shifts() -> None:
    verifier = create_verifier({"name": "shift-average", "verifier": "shapes-clip",
                                "offsets": [1, 2]})
    assert isinstance(verifier, ShiftAverageVerifier) and verifier.views == 9
    inner = ShapesClipVerifier()
    images = _renders(PROMPTS)
    views = [images] + [_moved(images, dx, dy) for offset in (1, 2)
                        for dx, dy in ((offset, 0), (-offset, 0), (0, offset), (0, -offset))]
    expected = torch.stack([inner.score(v, PROMPTS).double() for v in views]).mean(0).float()
    torch.testing.assert_close(verifier.score(images, PROMPTS), expected)
    assert not torch.equal(expected, inner.score(images, PROMPTS))  # the shifts count


def test_offsets_are_in_the_inner_verifiers_input_pixels() -> None:
    """A 64-pixel image for a 32-pixel verifier moves by 2 image pixels per offset: the same
    content moves by the same share of the image whatever its resolution."""
    verifier = ShiftAverageVerifier(verifier="shapes-clip", offsets=[1])
    assert verifier._moves(64, 64) == [(0, 0), (2, 0), (-2, 0), (0, 2), (0, -2)]
    assert verifier._moves(32, 32) == [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]


def test_scores_do_not_depend_on_batch_mates() -> None:
    verifier = ShiftAverageVerifier(verifier="shapes-clip")
    images = _renders(PROMPTS, seed=5)
    together = verifier.score(images, PROMPTS)
    for row in range(len(PROMPTS)):
        assert torch.equal(verifier.score(images[row:row + 1], PROMPTS[row:row + 1])[0],
                           together[row])


def test_it_costs_one_inner_call_per_view_and_takes_the_inners_traits() -> None:
    verifier = ShiftAverageVerifier(verifier="shapes-oracle", offsets=[1, 2, 3])
    assert verifier.calls_per_score == 13
    assert verifier.needs_prompt and verifier.input_size == 32
    described = verifier.describe()
    assert described["offsets"] == [1, 2, 3]
    assert described["verifier"]["name"] == "shapes-oracle"


@pytest.mark.parametrize("offsets", [[], [0], [1.5], "1", [True], 2])
def test_bad_offsets_are_refused_by_name(offsets: object) -> None:
    with pytest.raises(VerifierError, match="shift-average: offsets must be a non-empty list"):
        ShiftAverageVerifier(verifier="shapes-oracle", offsets=offsets)


def test_the_inner_verifier_is_required_and_checked_before_a_run() -> None:
    with pytest.raises(VerifierError, match="shift-average: verifier is required"):
        ShiftAverageVerifier()
    with pytest.raises(UnknownVerifierError, match="shift-average: verifier: unknown verifier "
                                                   "'shapes-clp'"):
        check_verifier_spec({"name": "shift-average", "verifier": "shapes-clp"})
    with pytest.raises(UnknownVerifierError, match=r"ensemble: members\[1\]: unknown verifier"):
        check_verifier_spec({"name": "ensemble",
                             "members": ["shapes-clip", {"name": "nope", "weight": 2}]})
    check_verifier_spec({"name": "shift-average",
                         "verifier": {"name": "ensemble", "members": ["shapes-clip"]}})
