"""Fuzzy Positional Encoding: zero offset is bilinear interpolation; offsets stay within half a token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quintet.models.vitar import FuzzyPositionalEncoding
from quintet.models.vitar.fpe import token_grid_coordinates


@pytest.mark.parametrize(("h", "w"), [(8, 8), (3, 5), (14, 14), (16, 16), (37, 21), (64, 64), (1, 9)])
def test_fpe_without_offsets_equals_bilinear_interpolation(h, w):
    torch.manual_seed(0)
    fpe = FuzzyPositionalEncoding(dim=6, grid_size=8)
    expected = F.interpolate(fpe.pos_map, size=(h, w), mode="bilinear", align_corners=False)
    expected = expected.permute(0, 2, 3, 1)
    sampled = fpe.sample(token_grid_coordinates(h, w))
    torch.testing.assert_close(sampled, expected, rtol=1e-5, atol=1e-6)
    fpe.eval()
    torch.testing.assert_close(fpe(4, h, w), expected)
    zero = torch.zeros(2, h, w, 2)
    torch.testing.assert_close(
        fpe.sample(token_grid_coordinates(h, w, zero)), expected.expand(2, -1, -1, -1), rtol=1e-5, atol=1e-6
    )


def test_offsets_are_per_token_uniform_within_half_a_token():
    # A map that is linear in x (map units): sampling it returns the x coordinate read, so we can see
    # where each token read the map.
    g, h, w = 8, 16, 16
    fpe = FuzzyPositionalEncoding(dim=2, grid_size=g)
    with torch.no_grad():
        ramp = torch.arange(g, dtype=torch.float32)
        fpe.pos_map[0, 0] = ramp[None, :].expand(g, g)
        fpe.pos_map[0, 1] = ramp[:, None].expand(g, g)
    torch.manual_seed(0)
    fpe.train()
    fuzzy = fpe(64, h, w)
    exact = fpe.interpolate(h, w)
    assert not torch.equal(fuzzy[0], fuzzy[1])  # drawn per image
    assert fuzzy.shape == (64, h, w, 2)
    # interior tokens: the read position moved by at most 0.5 token = 0.5 * g / w map units
    shift = (fuzzy - exact)[:, 2:-2, 2:-2]
    assert shift.abs().max() <= 0.5 * g / w + 1e-5
    assert shift.abs().max() > 0.4 * g / w  # the offsets do use the range
    assert abs(shift.mean().item()) < 0.01  # and are centred


def test_fpe_training_is_deterministic_under_a_seed_and_off_in_eval():
    fpe = FuzzyPositionalEncoding(dim=4, grid_size=8)
    torch.manual_seed(3)
    a = fpe(2, 12, 12)
    torch.manual_seed(3)
    b = fpe(2, 12, 12)
    torch.testing.assert_close(a, b)
    fpe.eval()
    torch.testing.assert_close(fpe(2, 12, 12), fpe(2, 12, 12))
    fpe.train()
    fpe.offset = 0.0
    torch.testing.assert_close(fpe(2, 12, 12), fpe.interpolate(12, 12))
