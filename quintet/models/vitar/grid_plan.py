"""Which tokens the Adaptive Token Merger puts in which cell: pure functions on integers.

Per axis with n tokens and target G (the paper, section 3.2 and Appendix A):

    n <= G        cells of 1: n cells, nothing merges (a grid below G stays below G)
    G < n < 2G    pad to 2G: G cells of 2, 2G - n of them hold one pad token
    n >= 2G       ceil(n / 2) cells of 2, one pad token if n is odd

Rows and columns are planned independently, so non-square inputs work. A pad token sits in the
right/bottom slot of its cell, and the cells that get one are spread evenly over the axis (cell
floor((i + 0.5) * cells / pads) gets the i-th pad), so every cell holds at least one real token.
ATM repeats its (shared-weight) block with a fresh plan per pass until both axes are at most G; it runs
at least once.
"""

from __future__ import annotations

from dataclasses import dataclass

PAD = -1


@dataclass(frozen=True)
class AxisPlan:
    """One axis of one merge pass.

    `index` has `cells * cell_size` entries: slot `c * cell_size + s` holds the input token index of slot s
    of cell c, or PAD.
    """

    n: int
    cells: int
    cell_size: int
    index: tuple[int, ...]

    @property
    def pads(self) -> int:
        return self.cells * self.cell_size - self.n

    def spans(self, starts: list[int], ends: list[int]) -> tuple[list[int], list[int]]:
        """Map the [start, end) extent of each input token to the extent of each output cell."""
        out_starts, out_ends = [], []
        for c in range(self.cells):
            members = [t for t in self.index[c * self.cell_size : (c + 1) * self.cell_size] if t != PAD]
            out_starts.append(starts[members[0]])
            out_ends.append(ends[members[-1]])
        return out_starts, out_ends


def plan_axis(n: int, grid_size: int) -> AxisPlan:
    """The cells of one merge pass along one axis of `n` tokens, for target `grid_size` (G)."""
    if n < 1 or grid_size < 1:
        raise ValueError(f"plan_axis(n={n}, grid_size={grid_size}): both must be positive")
    if n <= grid_size:
        return AxisPlan(n=n, cells=n, cell_size=1, index=tuple(range(n)))
    cells = grid_size if n < 2 * grid_size else (n + 1) // 2
    pads = 2 * cells - n
    pad_cells = {((2 * i + 1) * cells) // (2 * pads) for i in range(pads)}
    index: list[int] = []
    token = 0
    for c in range(cells):
        if c in pad_cells:
            index += [token, PAD]
            token += 1
        else:
            index += [token, token + 1]
            token += 2
    return AxisPlan(n=n, cells=cells, cell_size=2, index=tuple(index))


def merge_schedule(height: int, width: int, grid_size: int) -> list[tuple[AxisPlan, AxisPlan]]:
    """The (row plan, column plan) of every ATM pass for a `height` x `width` token grid."""
    passes = []
    while True:
        rows, cols = plan_axis(height, grid_size), plan_axis(width, grid_size)
        passes.append((rows, cols))
        height, width = rows.cells, cols.cells
        if height <= grid_size and width <= grid_size:
            return passes


def merged_grid(height: int, width: int, grid_size: int) -> tuple[int, int]:
    """The token grid after ATM: G x G when both sides reach G, else the smaller side stays as it is."""
    rows, cols = merge_schedule(height, width, grid_size)[-1]
    return rows.cells, cols.cells


def token_spans(n: int, grid_size: int, token_extent: int = 1) -> list[tuple[int, int]]:
    """For each merged token along an axis, the [start, end) range of input positions it covers.

    With `token_extent` = patch size this gives pixel ranges; merged tokens tile the axis without gaps.
    """
    starts = [i * token_extent for i in range(n)]
    ends = [(i + 1) * token_extent for i in range(n)]
    passes = merge_schedule(n, n, grid_size)
    for rows, _ in passes:
        starts, ends = rows.spans(starts, ends)
    return list(zip(starts, ends, strict=True))
