"""The Adaptive Token Merger: cell plans, merge schedule, padding, GridAttention against a per-cell loop."""

from __future__ import annotations

import pytest
import torch

from quintet.models.vitar import (
    AdaptiveTokenMerger,
    GridAttention,
    build_model,
    gather_cells,
    merge_schedule,
    merged_grid,
    plan_axis,
    preset_config,
)
from quintet.models.vitar.grid_plan import PAD, token_spans


def _cells_of(plan):
    k = plan.cell_size
    return [plan.index[c * k : (c + 1) * k] for c in range(plan.cells)]


@pytest.mark.parametrize("grid_size", [1, 2, 3, 7, 8, 14])
def test_plan_axis_follows_the_paper_rules(grid_size):
    for n in range(1, 5 * grid_size + 3):
        plan = plan_axis(n, grid_size)
        if n <= grid_size:
            assert (plan.cells, plan.cell_size, plan.index) == (n, 1, tuple(range(n)))
            continue
        expected_cells = grid_size if n < 2 * grid_size else (n + 1) // 2
        assert plan.cells == expected_cells and plan.cell_size == 2
        assert plan.pads == 2 * expected_cells - n
        # every real token exactly once, in order; every cell has a real token in its first slot
        assert [t for t in plan.index if t != PAD] == list(range(n))
        cells = _cells_of(plan)
        assert all(cell[0] != PAD for cell in cells)
        # pads sit in the right/bottom slot and are spread evenly: gaps between pad cells differ by <= 1
        pad_cells = [c for c, cell in enumerate(cells) if cell[1] == PAD]
        assert len(pad_cells) == plan.pads
        if len(pad_cells) > 1:
            gaps = [b - a for a, b in zip(pad_cells, pad_cells[1:], strict=False)]
            assert max(gaps) - min(gaps) <= 1
            assert pad_cells[0] <= plan.cells / plan.pads


def test_paper_sequences_at_16px_and_g14():
    # 4032 px: 252 -> 126 -> 63 -> 32 -> 16 -> 14; 384 px: 24 -> (pad to 28) -> 14
    sizes = [252]
    for rows, _ in merge_schedule(252, 252, 14):
        sizes.append(rows.cells)
    assert sizes == [252, 126, 63, 32, 16, 14]
    ((rows, _),) = merge_schedule(24, 24, 14)
    assert (rows.cells, rows.pads) == (14, 4)


@pytest.mark.parametrize(
    ("resolutions", "passes"),
    [
        ((224, 256, 320, 384, 448), 1),
        ((512, 640, 768, 896), 2),
        ((1120, 1344, 1568, 1792), 3),
        ((2240, 2688, 3136, 3360), 4),
        ((4032,), 5),
    ],
)
def test_number_of_passes_matches_the_paper_schedule(resolutions, passes):
    for r in resolutions:
        assert len(merge_schedule(r // 16, r // 16, 14)) == passes, r
        assert merged_grid(r // 16, r // 16, 14) == (14, 14)


def test_merger_runs_its_shared_block_once_per_scheduled_pass():
    merger = AdaptiveTokenMerger(dim=8, grid_size=14, num_heads=2)
    calls = []
    merger.block.register_forward_hook(lambda *_: calls.append(1))
    for r, passes in [(224, 1), (448, 1), (512, 2), (1120, 3), (2240, 4), (4032, 5)]:
        calls.clear()
        with torch.no_grad():
            out = merger(torch.randn(1, r // 16, r // 16, 8))
        assert len(calls) == passes, r
        assert out.shape == (1, 14, 14, 8)


@pytest.mark.parametrize(
    "size",
    [
        (32, 32),
        (33, 33),
        (36, 36),
        (44, 44),
        (60, 60),
        (64, 200),
        (200, 64),
        (100, 36),
        (37, 201),
        (576, 576),
    ],
)
def test_merged_grid_is_exactly_g_by_g(size):
    model = build_model(preset_config("vitar-tiny")).eval()
    with torch.no_grad():
        tokens = model.embed(torch.rand(1, 3, *size))
    assert tokens.shape == (1, 8, 8, 64)
    assert model.merged_grid(*size) == (8, 8)


def test_inputs_below_the_base_grid_keep_their_grid():
    model = build_model(preset_config("vitar-tiny")).eval()
    with torch.no_grad():
        assert model.embed(torch.rand(1, 3, 16, 48)).shape == (1, 4, 8, 64)
        assert model(torch.rand(2, 3, 5, 7)).shape == (2, 10)


def test_every_cell_has_a_real_token():
    for h in range(1, 70):
        for w in (1, 5, 9, 15, 16, 17, 31, 33, 64):
            x = torch.zeros(1, h, w, 1)
            for rows, cols in merge_schedule(h, w, 8):
                cells, mask = gather_cells(x, rows, cols)
                if mask is not None:
                    assert bool(mask.any(-1).all()), (h, w)
                x = torch.zeros(1, rows.cells, cols.cells, 1)


def test_gather_cells_puts_each_token_in_its_planned_cell():
    h, w = 23, 10
    x = torch.arange(h * w, dtype=torch.float32).view(1, h, w, 1)
    (rows, cols), *_ = merge_schedule(h, w, 8)
    cells, mask = gather_cells(x, rows, cols)
    for ci in range(rows.cells):
        for cj in range(cols.cells):
            r_slots = rows.index[ci * rows.cell_size : (ci + 1) * rows.cell_size]
            c_slots = cols.index[cj * cols.cell_size : (cj + 1) * cols.cell_size]
            expected = [float(r * w + c) if r != PAD and c != PAD else None for r in r_slots for c in c_slots]
            got = cells[0, ci, cj, :, 0].tolist()
            real = mask[ci, cj].tolist()
            for e, g, is_real in zip(expected, got, real, strict=True):
                assert is_real == (e is not None)
                assert g == (e if e is not None else 0.0)


def test_pad_tokens_get_zero_weight_and_do_not_enter_the_mean():
    torch.manual_seed(0)
    attn = GridAttention(dim=16, num_heads=4)
    cells = torch.randn(3, 5, 4, 4, 16)
    mask = torch.rand(5, 4, 4) > 0.4
    mask[..., 0] = True
    out, weights = attn(cells, mask, return_weights=True)
    assert torch.all(weights.masked_select(~mask[None, :, :, None, :].expand_as(weights)) == 0)
    garbage = cells.masked_fill(~mask[..., None], 1e4)
    out_garbage = attn(garbage, mask)
    torch.testing.assert_close(out, out_garbage, rtol=0, atol=0)
    # the mean over real tokens only is the residual stream the attention adds to
    with torch.no_grad():
        attn.proj.weight.zero_()
        attn.proj.bias.zero_()
    expected_mean = (cells * mask[..., None]).sum(-2) / mask.sum(-1, keepdim=True)
    torch.testing.assert_close(attn(garbage, mask), expected_mean)


def _reference_merge(merger: AdaptiveTokenMerger, x: torch.Tensor) -> torch.Tensor:
    """Slow and obvious: loop over cells, take the real tokens, attend with plain matmuls."""
    block = merger.block
    attn = block.attn
    heads = attn.num_heads
    for rows, cols in merge_schedule(x.shape[1], x.shape[2], merger.grid_size):
        out = torch.zeros(x.shape[0], rows.cells, cols.cells, x.shape[3])
        for ci, r_slots in enumerate(_cells_of(rows)):
            for cj, c_slots in enumerate(_cells_of(cols)):
                rs = [r for r in r_slots if r != PAD]
                cs = [c for c in c_slots if c != PAD]
                tokens = x[:, rs][:, :, cs].reshape(x.shape[0], len(rs) * len(cs), -1)
                mean = tokens.mean(1)
                q = attn.q(attn.norm_q(mean))
                k, v = attn.kv(attn.norm_kv(tokens)).chunk(2, dim=-1)
                d = q.shape[-1] // heads
                head_outs = []
                for hd in range(heads):
                    qh, kh, vh = (t[..., hd * d : (hd + 1) * d] for t in (q, k, v))
                    w = torch.softmax((kh @ qh[:, :, None]).squeeze(-1) / d**0.5, dim=-1)
                    head_outs.append((w[:, None, :] @ vh).squeeze(1))
                y = mean + attn.proj(torch.cat(head_outs, dim=-1))
                out[:, ci, cj] = y + block.mlp(block.norm(y))
        x = out
    return x


@pytest.mark.parametrize("size", [(3, 4), (4, 9), (8, 8), (9, 9), (12, 20), (17, 33), (40, 7)])
def test_grid_attention_matches_a_per_cell_loop(size):
    torch.manual_seed(1)
    merger = AdaptiveTokenMerger(dim=16, grid_size=4, num_heads=2)
    x = torch.randn(2, *size, 16)
    with torch.no_grad():
        torch.testing.assert_close(merger(x), _reference_merge(merger, x), rtol=1e-5, atol=1e-5)


def test_atm_parameters_do_not_depend_on_resolution():
    model = build_model(preset_config("vitar-tiny"))
    before = {k: v.shape for k, v in model.state_dict().items()}
    atm_params = sum(p.numel() for p in model.merger.parameters())
    for r in (32, 96, 160, 320):
        model.zero_grad()
        model(torch.rand(1, 3, r, r)).sum().backward()
        assert all(p.grad is not None for p in model.merger.parameters()), r
    assert {k: v.shape for k, v in model.state_dict().items()} == before
    assert sum(p.numel() for p in model.merger.parameters()) == atm_params


def test_token_spans_tile_the_axis():
    for n in (8, 9, 12, 24, 40, 63, 144):
        spans = token_spans(n, 8, token_extent=4)
        assert spans[0][0] == 0 and spans[-1][1] == 4 * n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert len(spans) == min(n, 8)


def test_one_key_cells_take_the_inference_shortcut_exactly():
    torch.manual_seed(2)
    attn = GridAttention(dim=16, num_heads=4)
    cells = torch.randn(2, 3, 5, 1, 16)
    general = attn(cells, torch.ones(3, 5, 1, dtype=torch.bool))
    with torch.no_grad():
        shortcut, weights = attn(cells, return_weights=True)
    torch.testing.assert_close(shortcut, general.detach(), rtol=0, atol=0)
    assert torch.equal(weights, torch.ones(2, 3, 5, 4, 1))
