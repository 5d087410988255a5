"""The Adaptive Token Merger (ATM) and the average-pooling merger of the paper's ablation.

ATM (section 3.2): the token grid is cut into cells of at most 2 x 2 (`grid_plan`); in each cell
GridAttention takes the cell's mean as the only query and the cell's tokens as keys and values:

    x_avg = mean(real tokens of the cell)
    y     = x_avg + Attn(q = LN(x_avg), k = v = LN(cell))      pad tokens masked out
    y     = y + FFN(LN(y))

One such block, its weights shared, runs pass after pass until the grid is G x G (at least once).
Shapes: token grids are (B, h, w, dim); cells are (B, cells_h, cells_w, K, dim) with K <= 4 slots and a
(cells_h, cells_w, K) boolean mask of real (True) versus pad (False) slots.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from quintet.models.vitar.blocks import Mlp
from quintet.models.vitar.grid_plan import PAD, AxisPlan, merge_schedule


@functools.lru_cache(maxsize=256)
def _cached_schedule(height: int, width: int, grid_size: int) -> tuple[tuple[AxisPlan, AxisPlan], ...]:
    return tuple(merge_schedule(height, width, grid_size))


def _axis_index(plan: AxisPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index along one axis (PAD -> n, the appended zero token) and its real-slot mask."""
    index = torch.tensor([plan.n if t == PAD else t for t in plan.index], device=device)
    real = torch.tensor([t != PAD for t in plan.index], device=device)
    return index, real.view(plan.cells, plan.cell_size)


def gather_cells(x: torch.Tensor, rows: AxisPlan, cols: AxisPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut a (B, h, w, dim) grid into (B, cells_h, cells_w, K, dim) cells.

    Pad slots hold zeros. The mask is (cells_h, cells_w, K), True for real tokens, or None when the pass
    has no pad token at all.
    """
    b, h, w, d = x.shape
    if (h, w) != (rows.n, cols.n):
        raise ValueError(f"gather_cells: grid is {h} x {w}, the plan is for {rows.n} x {cols.n}")
    if rows.pads or cols.pads:
        x = F.pad(x, (0, 0, 0, int(cols.pads > 0), 0, int(rows.pads > 0)))
    row_index, row_real = _axis_index(rows, x.device)
    col_index, col_real = _axis_index(cols, x.device)
    if rows.pads:
        x = x.index_select(1, row_index)
    if cols.pads:
        x = x.index_select(2, col_index)
    kh, kw = rows.cell_size, cols.cell_size
    cells = x.reshape(b, rows.cells, kh, cols.cells, kw, d).permute(0, 1, 3, 2, 4, 5)
    cells = cells.reshape(b, rows.cells, cols.cells, kh * kw, d)
    if not (rows.pads or cols.pads):
        return cells, None
    mask = row_real[:, None, :, None] & col_real[None, :, None, :]
    return cells, mask.reshape(rows.cells, cols.cells, kh * kw)


class GridAttention(nn.Module):
    """Per-cell attention with the cell mean as the one query: y = x_avg + Attn(LN x_avg, LN cell).

    Written with einsum and a masked softmax: with at most 4 keys per query, this beats SDPA on CPU, and
    `torch.utils.flop_counter` counts einsum (it does not count CPU SDPA).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"GridAttention: num_heads = {num_heads} must divide dim = {dim}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_kv = nn.LayerNorm(dim, eps=eps)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, cells: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """cells (..., K, dim), mask broadcastable to (..., K) or None -> (..., dim).

        With `return_weights`, also the attention weights (..., heads, K); pad slots get exactly 0.
        """
        heads = self.num_heads
        if cells.shape[-2] == 1 and mask is None and not torch.is_grad_enabled():
            # Inference with one key per cell (1 x 1 cells): its weight is exactly 1, so the query and the
            # key do not matter: no query, no scores. The fused kv projection is called as a module (so a
            # swapped, e.g. quantized, Linear works) and its value half is used. (Training keeps the general
            # path, so q and k receive their zero gradients as any other step would give them.)
            x = cells[..., 0, :]
            v = self.kv(self.norm_kv(x))[..., x.shape[-1] :]
            y = x + self.proj(v)
            return (
                (y, torch.ones(*y.shape[:-1], heads, 1, dtype=y.dtype, device=y.device))
                if return_weights
                else y
            )
        if mask is None:
            mean = cells.mean(-2)
        else:
            cells = cells.masked_fill(~mask[..., None], 0.0)
            count = mask.sum(-1, keepdim=True).to(cells.dtype)
            mean = cells.sum(-2) / count
        q = self.q(self.norm_q(mean)).unflatten(-1, (heads, -1))
        k, v = self.kv(self.norm_kv(cells)).unflatten(-1, (2, heads, -1)).unbind(-3)
        scores = torch.einsum("...hd,...khd->...hk", q, k) * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask[..., None, :], float("-inf"))
        weights = scores.softmax(-1)
        out = torch.einsum("...hk,...khd->...hd", weights, v).flatten(-2)
        y = mean + self.proj(out)
        return (y, weights) if return_weights else y


class GridAttentionBlock(nn.Module):
    """GridAttention then a standard pre-norm FFN: one ATM pass over the cells."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.attn = GridAttention(dim, num_heads, qkv_bias, eps)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, cells: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.attn(cells, mask)
        return y + self.mlp(self.norm(y))


class AdaptiveTokenMerger(nn.Module):
    """(B, h, w, dim) -> (B, min(h, G) or G, min(w, G) or G, dim) by repeated shared-weight passes."""

    def __init__(
        self,
        dim: int,
        grid_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.block = GridAttentionBlock(dim, num_heads, mlp_ratio, qkv_bias, eps)

    def schedule(self, height: int, width: int) -> tuple[tuple[AxisPlan, AxisPlan], ...]:
        return _cached_schedule(height, width, self.grid_size)

    def num_passes(self, height: int, width: int) -> int:
        return len(self.schedule(height, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for rows, cols in self.schedule(x.shape[1], x.shape[2]):
            cells, mask = gather_cells(x, rows, cols)
            x = self.block(cells, mask)
        return x


class AveragePoolMerger(nn.Module):
    """The ablation: one adaptive average pooling of the token grid to G x G (sides below G stay)."""

    def __init__(self, grid_size: int) -> None:
        super().__init__()
        self.grid_size = grid_size

    def num_passes(self, height: int, width: int) -> int:
        return 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1], x.shape[2]
        out = (min(h, self.grid_size), min(w, self.grid_size))
        if out == (h, w):
            return x
        return F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), out).permute(0, 2, 3, 1)
