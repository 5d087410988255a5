"""A memory plan for one engine step, from its symbolic shape graph (`shapes.py`).

Every storage a step allocates and frees inside itself (an activation) is assigned to a buffer. Two
activations share a buffer only if their lifetimes, [op that allocates it, last op that reads or writes it
or any view of it], are disjoint: the graph's op order makes this exact for every size, so the reuse is
safe whatever b, L and P are. A buffer is as large as its largest member, `Max(...)` of their byte
formulas; the planned peak is the sum of the buffers, against the naive sum of every activation (no
reuse). Which free buffer a new activation takes (best fit) is decided at reference sizes; that choice only
affects how tight the plan is, never its safety.

Outputs of the step (logits, the new Mamba states) outlive it and are not planned; inputs (weights, the KV
buffers and states) exist before it. In a MoE layer the tokens of expert e, n_<layer>_<e>, are data: a
buffer is sized for the worst routing, n <= b * L (a token picks distinct experts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch

from quintet.deploy.shapes import KINDS, ShapeGraph, StorageRecord, trace_step

REFERENCE = {"b": 1, "L": 256, "P": 1024}


@dataclass
class Buffer:
    index: int
    members: list[int] = field(default_factory=list)  # storage ids, in order of allocation
    size: sympy.Expr = sympy.Integer(0)
    last: int = -1  # last op that uses the current member
    ref_bytes: int = 0


@dataclass
class MemoryPlan:
    graph: ShapeGraph
    buffers: list[Buffer]
    assignment: dict[int, int]  # storage id -> buffer index
    bounds: dict[int, sympy.Expr]  # storage id -> bytes, routing at its worst
    peak: sympy.Expr
    naive: sympy.Expr
    outputs: sympy.Expr

    def offsets(self) -> list[sympy.Expr]:
        """Byte offset of each buffer in one arena (buffers laid end to end)."""
        out, total = [], sympy.Integer(0)
        for buf in self.buffers:
            out.append(total)
            total = total + buf.size
        return out

    def complete(self, sizes: dict[str, int]) -> dict[str, int]:
        """`sizes` with b = 1 when not given; every other symbol of the step must be given."""
        out = {"b": 1, **sizes} if "b" in self.graph.symbols else dict(sizes)
        missing = [s for s in ("L", "P") if s in self.graph.symbols and s not in out]
        if missing:
            raise ValueError(
                f"{self.graph.kind} step: give {' and '.join(missing)} (e.g. --at b=1,L=1,P=1024)"
            )
        return out

    def evaluate(self, sizes: dict[str, int]) -> dict[str, int]:
        """Bytes at concrete sizes: planned arena, naive sum, the live lower bound (the most bytes alive at
        any one op, which no plan can beat), step outputs."""
        subs = _subs(self.graph, self.complete(sizes))
        live = [0] * (len(self.graph.ops) + 1)
        for sid, expr in self.bounds.items():
            st = self.graph.storages[sid]
            nbytes = int(expr.subs(subs))
            for i in range(st.first, st.last + 1):
                live[i] += nbytes
        return {
            "planned": int(self.peak.subs(subs)),
            "naive": int(self.naive.subs(subs)),
            "live_lower_bound": max(live),
            "outputs": int(self.outputs.subs(subs)),
        }

    def to_dict(self, sizes: list[dict[str, int]] | None = None) -> dict[str, Any]:
        g = self.graph
        return {
            "kind": g.kind,
            "symbols": sorted(g.symbols),
            "ops": len(g.ops),
            "activations": len(self.assignment),
            "guards": [str(x) for x in g.guards],
            "peak": str(self.peak),
            "naive": str(self.naive),
            "buffers": [
                {"index": b.index, "bytes": str(b.size), "members": len(b.members)} for b in self.buffers
            ],
            "at": [{"sizes": s, **self.evaluate(s)} for s in sizes or [] if fits(g.kind, s)],
        }


def _subs(graph: ShapeGraph, sizes: dict[str, int]) -> dict[sympy.Symbol, int]:
    return {graph.symbols[k]: v for k, v in sizes.items() if k in graph.symbols}


def _worst_routing(graph: ShapeGraph, expr: sympy.Expr) -> sympy.Expr:
    """Bound expert token counts by b * L (sizes grow with them: a polynomial with positive terms)."""
    b = graph.symbols.get("b", sympy.Integer(1))
    L = graph.symbols.get("L", sympy.Integer(1))
    repl = {graph.symbols[n]: b * L for n in graph.routing}
    return sympy.sympify(expr).xreplace(repl) if repl else sympy.sympify(expr)


def _reference(graph: ShapeGraph, reference: dict[str, int]) -> dict[sympy.Symbol, int]:
    return _subs(graph, reference)


def _max(exprs: list[sympy.Expr]) -> sympy.Expr:
    unique = list(dict.fromkeys(exprs))
    return unique[0] if len(unique) == 1 else sympy.Max(*unique)


def plan_memory(graph: ShapeGraph, reference: dict[str, int] | None = None) -> MemoryPlan:
    """Assign the step's activations to buffers: greedy by size (largest first at `reference`), each into
    the smallest existing buffer none of whose members is alive at the same time, else a new buffer."""
    ref = _reference(graph, {**REFERENCE, **(reference or {})})
    acts: list[StorageRecord] = graph.activations()
    bounds = {s.id: _worst_routing(graph, s.nbytes) for s in acts}
    need = {s.id: int(bounds[s.id].subs(ref)) for s in acts}
    buffers: list[Buffer] = []
    assignment: dict[int, int] = {}
    for st in sorted(acts, key=lambda s: (-need[s.id], s.first)):
        free = [
            b
            for b in buffers
            if all(st.last < graph.storages[m].first or graph.storages[m].last < st.first for m in b.members)
        ]
        if free:
            buf = min(free, key=lambda b: (b.ref_bytes, b.index))
        else:
            buf = Buffer(len(buffers))
            buffers.append(buf)
        buf.members.append(st.id)
        buf.ref_bytes = max(buf.ref_bytes, need[st.id])
        assignment[st.id] = buf.index
    for buf in buffers:
        buf.members.sort(key=lambda m: graph.storages[m].first)
        buf.last = max(graph.storages[m].last for m in buf.members)
        buf.size = _max([bounds[s] for s in buf.members])
    peak = sympy.Add(*[b.size for b in buffers]) if buffers else sympy.Integer(0)
    naive = sympy.Add(*bounds.values()) if bounds else sympy.Integer(0)
    outputs = sympy.Add(
        *[_worst_routing(graph, s.nbytes) for s in graph.storages.values() if s.kind == "output"]
    )
    return MemoryPlan(graph, buffers, assignment, bounds, peak, naive, sympy.sympify(outputs))


def check_plan(plan: MemoryPlan, sizes: dict[str, int]) -> list[str]:
    """Overlaps between activations alive at the same time, at concrete sizes (empty: none)."""
    subs = _subs(plan.graph, sizes)
    offsets = [int(o.subs(subs)) for o in plan.offsets()]
    spans = {}
    for sid, buf in plan.assignment.items():
        nbytes = int(plan.bounds[sid].subs(subs))
        if nbytes > int(plan.buffers[buf].size.subs(subs)):
            return [f"storage {sid} needs {nbytes} bytes, its buffer {buf} has fewer"]
        spans[sid] = (offsets[buf], offsets[buf] + nbytes)
    problems = []
    items = sorted(spans.items())
    storages = plan.graph.storages
    for i, (a, (a0, a1)) in enumerate(items):
        for b, (b0, b1) in items[i + 1 :]:
            live_together = storages[a].first <= storages[b].last and storages[b].first <= storages[a].last
            if live_together and a0 < b1 and b0 < a1 and a1 > a0 and b1 > b0:
                problems.append(f"storages {a} and {b} are alive together and overlap")
    return problems


# ---------------------------------------------------------------------------------------------- models
def load_engine_for_plan(model_dir: str | os.PathLike):
    """The engine a folder runs with: the FP4 engine for a quantized folder, else the float32 engine."""
    from quintet.deploy.engine import JambaEngine, to_engine
    from quintet.loading import load_model

    model = load_model(model_dir)
    return model if isinstance(model, JambaEngine) else to_engine(model)


def _tensors(model: torch.nn.Module) -> dict[int, tuple[str, torch.Tensor]]:
    """Every parameter and buffer the model holds, once per memory region (merged or shared tensors count
    once), by the address of its first byte."""
    out: dict[int, tuple[str, torch.Tensor]] = {}
    for name, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        if t is not None and t.device.type != "meta":
            out.setdefault(t.data_ptr(), (name, t))
    return out


def _held_bytes(tensors: dict[int, tuple[str, torch.Tensor]]) -> dict[int, int]:
    """Bytes each tensor accounts for: its whole storage when it is the storage's only tensor (slack
    included), its own bytes when several share one storage (the engine's huge-page arena)."""
    by_storage: dict[int, list[int]] = {}
    for ptr, (_, t) in tensors.items():
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(ptr)
    held = {}
    for ptrs in by_storage.values():
        for ptr in ptrs:
            t = tensors[ptr][1]
            held[ptr] = t.untyped_storage().nbytes() if len(ptrs) == 1 else t.nbytes
    return held


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a loaded model holds in memory (parameters and buffers, each once)."""
    return sum(_held_bytes(_tensors(model)).values())


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decoded token reads: every tensor, but only the chosen experts' share of the
    expert weights (top-k of the experts) and one row of the token embedding."""
    config = model.config
    share = config.num_experts_per_tok / max(config.num_experts, 1)
    tensors = _tensors(model)
    total = 0.0
    for ptr, n in _held_bytes(tensors).items():
        name, t = tensors[ptr]
        if ".experts." in name:
            n *= share
        elif "embed_tokens" in name:
            n /= t.shape[0]
        total += n
    return int(total)


def format_weights(model: torch.nn.Module, model_dir: str | os.PathLike) -> str:
    """Weights in memory against the folder's weight files, and the bytes a decoded token reads."""
    from quintet.deploy.quantized_folder import file_bytes

    held, on_disk = weight_bytes(model), file_bytes(model_dir)
    return (
        f"weights: {_mib(held)} in memory, {_mib(on_disk)} in the folder's files ({held / on_disk:.2f}x); "
        f"a decoded token reads {_mib(weight_bytes_per_token(model))} of them"
    )


def plan_model(
    model_dir: str | os.PathLike,
    kinds: tuple[str, ...] = ("decode", "prefill"),
    batch: int | None = None,
    engine: torch.nn.Module | None = None,
) -> list[MemoryPlan]:
    """Trace and plan each step kind of the model in `model_dir` (or of `engine`, loaded from it). Decode
    fixes b = 1 unless `batch` is given; prefill and chunk keep b symbolic unless `batch` is given."""
    engine = load_engine_for_plan(model_dir) if engine is None else engine
    plans = []
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kind = {kind!r}: must be one of {', '.join(KINDS)}")
        b = batch if batch is not None else (1 if kind == "decode" else None)
        plans.append(plan_memory(trace_step(engine, kind, b)))
    return plans


def parse_sizes(text: str) -> dict[str, int]:
    """`b=1,L=1,P=1024` -> {"b": 1, "L": 1, "P": 1024}."""
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("b", "L", "P") or not value.strip().isdigit():
            raise ValueError(f"--at {text!r}: expected comma-separated b=, L=, P= with integer values")
        out[key.strip()] = int(value)
    return out


def fits(kind: str, sizes: dict[str, int]) -> bool:
    """Whether sizes describe a step of `kind` (missing sizes fit anything)."""
    L, P = sizes.get("L"), sizes.get("P")
    if kind == "decode":
        return L in (None, 1) and P != 0
    if kind == "prefill":
        return P in (None, 0) and L != 1
    return L != 1 and P != 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_plan(plan: MemoryPlan, sizes: list[dict[str, int]] | None = None, verbose: bool = False) -> str:
    g = plan.graph
    fixed = {"decode": "L = 1", "prefill": "P = 0", "chunk": ""}[g.kind]
    syms = ", ".join(s for s in ("b", "L", "P") if s in g.symbols)
    lines = [
        f"{g.kind} step ({fixed + '; ' if fixed else ''}symbols: {syms}; b batch, L new tokens, P past)",
        f"  {len(g.ops)} ops; {len(plan.assignment)} activations in {len(plan.buffers)} buffers; "
        f"{sum(s.kind == 'output' for s in g.storages.values())} outputs kept after the step",
        "  valid where: " + ("; ".join(str(x) for x in g.guards) or "always"),
    ]
    if g.routing:
        layers = sorted({lay for lay, _, _ in g.routing.values()})
        lines.append(
            f"  MoE routing enters as n_<layer>_<expert> (layers {layers}), sized at its worst: n <= b*L"
        )
    lines.append(f"  peak (planned)  = {plan.peak}")
    lines.append(f"  naive (no reuse) = {plan.naive}")
    if verbose:
        lines.append("  buffers:")
        for buf in plan.buffers:
            lines.append(f"    buffer {buf.index}: {buf.size}  ({len(buf.members)} tensors)")
        lines.append("  ops (index, op, module, output shapes -> buffer):")
        for op in g.ops:
            outs = []
            for t in op.outputs:
                rec = g.tensors[t]
                where = plan.assignment.get(rec.storage)
                tag = f"buf {where}" if where is not None else g.storages[rec.storage].kind
                outs.append(f"{tuple(rec.shape)} -> {tag}")
            lines.append(f"    {op.index:4d} {op.name} [{op.module}] " + ", ".join(outs))
    applicable = [s for s in sizes or [] if fits(g.kind, s)]
    if sizes and not applicable:
        lines.append(f"  (no --at size is a {g.kind} step: decode has L = 1 and P >= 1, prefill P = 0)")
    for s in applicable:
        values = plan.evaluate(s)
        at = ", ".join(f"{k}={v}" for k, v in plan.complete(s).items() if k in g.symbols) or "(no symbols)"
        lines.append(
            f"  at {at}: planned {_mib(values['planned'])}, naive {_mib(values['naive'])} "
            f"({values['naive'] / max(values['planned'], 1):.1f}x), live lower bound "
            f"{_mib(values['live_lower_bound'])}, outputs {_mib(values['outputs'])}"
        )
    return "\n".join(lines)
