"""Symbolic shapes of one engine step, derived from the ops the step actually runs.

`trace_step(engine, kind)` runs the engine's forward once on fake tensors (`FakeTensorMode`) whose sizes
are symbols of a `ShapeEnv`: b (batch), L (new tokens), P (past length). Every aten op the step dispatches
is recorded with its inputs and outputs, so each intermediate tensor's shape comes out as a sympy
expression in b, L, P, with the storage it lives in (views and in-place ops share their input's storage).
The step kinds:

    decode   L = 1, P >= 1          one new token per row
    prefill  P = 0, L >= 2          a prompt into an empty cache
    chunk    P >= 1, L >= 2         a prompt piece after earlier pieces (chunked prefill)

What the data decides enters as symbols too: in a MoE layer the number of tokens routed to expert e is
n_<layer>_<e> (the routing is read, not traced; sum over e = top_k * b * L). Conditions the trace relied on
(e.g. `b <= 8` for the GEMV decode path, `P + L <= capacity`) are the ShapeEnv's guards, kept in
`ShapeGraph.guards`: the shapes hold wherever the guards do.

`record_step(engine, kind, b, L, P)` runs the same step on real tensors with the same recorder, so
`compare(graph, actual)` can check every op's output shapes against the formulas.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import sympy
import torch
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils._sympy.functions import FloorDiv

from quintet.deploy.engine import JambaEngine
from quintet.models.jamba.tracing import TraceHooks, tracing

KINDS = ("decode", "prefill", "chunk")
_SKIP_OPS = ("prim.", "aten.sym_", "aten._local_scalar_dense")


@dataclass
class TensorRecord:
    id: int
    shape: tuple[sympy.Expr, ...]
    dtype: torch.dtype
    storage: int


@dataclass
class OpRecord:
    index: int
    name: str
    module: str
    inputs: list[int]
    outputs: list[int]


@dataclass
class StorageRecord:
    """One allocation. kind: "activation" (made and freed inside the step), "input" (weights, cache
    buffers, states: exist before the step) or "output" (made by the step, kept after it: logits, new
    Mamba states). first / last: index of the op that allocates it / last reads or writes it."""

    id: int
    nbytes: sympy.Expr
    kind: str
    first: int
    last: int


@dataclass
class ShapeGraph:
    kind: str
    symbols: dict[str, sympy.Symbol]
    ops: list[OpRecord] = field(default_factory=list)
    tensors: dict[int, TensorRecord] = field(default_factory=dict)
    storages: dict[int, StorageRecord] = field(default_factory=dict)
    guards: list[sympy.Basic] = field(default_factory=list)
    routing: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # n symbol -> (layer, expert, k)
    routed: dict[int, sympy.Expr] = field(default_factory=dict)  # MoE layer -> (token, expert) pairs

    def shape_of(self, tensor: int) -> tuple[sympy.Expr, ...]:
        return self.tensors[tensor].shape

    def activations(self) -> list[StorageRecord]:
        return [s for s in self.storages.values() if s.kind == "activation"]


def _expr(size: int | torch.SymInt) -> sympy.Expr:
    return sympy.sympify(size.node.expr) if isinstance(size, torch.SymInt) else sympy.Integer(size)


class Recorder(TorchDispatchMode):
    """Records every dispatched op: name, the module running it, input and output tensors, storages."""

    def __init__(self, graph: ShapeGraph, module_stack: list[str]):
        super().__init__()
        self.graph = graph
        self.module_stack = module_stack
        self.keep: list[torch.Tensor] = []  # keeps recorded tensors alive, so their ids stay unique
        self._storage_ids: dict[StorageWeakRef, int] = {}
        self.paused = False

    def _storage(self, t: torch.Tensor, index: int, kind: str) -> int:
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in self._storage_ids:
            sid = len(self._storage_ids)
            self._storage_ids[ref] = sid
            nbytes = _expr(t.untyped_storage().nbytes())
            self.graph.storages[sid] = StorageRecord(sid, nbytes, kind, index, index)
        return self._storage_ids[ref]

    def _tensor(self, t: torch.Tensor, index: int, kind: str) -> int:
        if id(t) not in self.graph.tensors:
            self.keep.append(t)
            sid = self._storage(t, index, kind)
            self.graph.tensors[id(t)] = TensorRecord(id(t), tuple(_expr(s) for s in t.shape), t.dtype, sid)
        return id(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if self.paused or name.startswith(_SKIP_OPS):
            return out
        ins = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if not outs:
            return out
        index = len(self.graph.ops)
        in_ids = [self._tensor(t, -1, "input") for t in ins]
        out_ids = [self._tensor(t, index, "activation") for t in outs]
        for tid in in_ids + out_ids:
            st = self.graph.storages[self.graph.tensors[tid].storage]
            st.last = max(st.last, index)
        module = self.module_stack[-1] if self.module_stack else ""
        self.graph.ops.append(OpRecord(index, name, module, in_ids, out_ids))
        return out

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def mark_outputs(self, tensors: list[torch.Tensor]) -> None:
        end = len(self.graph.ops)
        for t in tensors:
            ref = StorageWeakRef(t.untyped_storage())
            sid = self._storage_ids.get(ref)
            if sid is not None and self.graph.storages[sid].kind == "activation":
                self.graph.storages[sid].kind = "output"
                self.graph.storages[sid].last = end


@contextlib.contextmanager
def _module_names(engine: torch.nn.Module, stack: list[str]) -> Iterator[None]:
    def enter(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            stack.append(name)

        return hook

    def leave(module: torch.nn.Module, args: tuple, output: object) -> None:
        stack.pop()

    handles = []
    for name, module in engine.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _SymbolicRouting(TraceHooks):
    """Routing as data: n_<layer>_<e> tokens for expert e are unbacked symbols (sizes no guard may inspect),
    constrained by n >= 0 and sum_e n_<layer>_<e> = top_k * b * L."""

    def __init__(self, env: ShapeEnv, graph: ShapeGraph, top_k: int):
        self.env, self.graph, self.top_k = env, graph, top_k

    def expert_counts(self, layer: int, flat_experts: torch.Tensor, num_experts: int) -> list:
        counts = []
        for e in range(num_experts):
            n = self.env.create_unbacked_symint()
            torch._check(n >= 0)
            name = f"n_{layer}_{e}"
            self.graph.routing[name] = (layer, e, self.top_k)
            self.graph.symbols[name] = n.node.expr
            counts.append(n)
        torch._check(sum(counts) == flat_experts.shape[0])
        self.graph.routed[layer] = _expr(flat_experts.shape[0])
        return counts

    def decode_experts(self, layer: int, experts: torch.Tensor) -> list:
        return list(range(experts.shape[-1]))  # which experts is data; every expert has the same shapes


class _RealRouting(TraceHooks):
    """The routing of a real run, read with the recorder paused and kept for substitution."""

    def __init__(self, recorder: Recorder):
        self.recorder, self.counts = recorder, {}

    def expert_counts(self, layer: int, flat_experts: torch.Tensor, num_experts: int) -> list:
        with self.recorder.pause():
            counts = torch.bincount(flat_experts, minlength=num_experts).tolist()
        self.counts.update({f"n_{layer}_{e}": c for e, c in enumerate(counts)})
        return counts

    def decode_experts(self, layer: int, experts: torch.Tensor) -> list:
        with self.recorder.pause():
            return experts[0].tolist()


def _check_kind(kind: str, b: int, L: int, P: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind = {kind!r}: must be one of {', '.join(KINDS)}")
    if (kind == "decode" and L != 1) or (kind != "decode" and L < 2):
        raise ValueError(f"{kind}: L = {L} new tokens does not fit (decode: L = 1; prefill, chunk: L >= 2)")
    if (kind == "prefill" and P != 0) or (kind != "prefill" and P < 1):
        raise ValueError(f"{kind}: P = {P} past tokens does not fit (prefill: P = 0; decode, chunk: P >= 1)")


def _fill_cache(engine: JambaEngine, cache, b, P) -> None:
    """Make `cache` look like one that already holds P tokens (buffers allocated, states present)."""
    cfg = engine.config
    d, kvh = cfg.head_dim, cfg.num_key_value_heads
    for i, kind in enumerate(cfg.layers_block_type):
        if kind == "attention":
            cache.keys[i] = torch.zeros(b, kvh, cache.capacity, d, dtype=cache.dtype)
            cache.values[i] = torch.zeros(b, kvh, cache.capacity, d, dtype=cache.dtype)
        else:
            cache.conv_states[i] = torch.zeros(b, cfg.mamba_d_inner, cfg.mamba_d_conv - 1, dtype=engine.dtype)
            cache.ssm_states[i] = torch.zeros(b, cfg.mamba_d_inner, cfg.mamba_d_state, dtype=torch.float32)
    cache.seq_length = P
    cache.buffers_changed()


def _step_outputs(logits: torch.Tensor, cache) -> list[torch.Tensor]:
    """What outlives the step: the logits, the cache's states and (when the step allocated them) buffers."""
    kept = cache.conv_states + cache.ssm_states + cache.keys + cache.values
    return [logits] + [t for t in kept if t is not None]


@torch.inference_mode()
def trace_step(
    engine: JambaEngine,
    kind: str = "decode",
    batch: int | None = None,
    hints: tuple[int, int, int] = (2, 16, 100),
) -> ShapeGraph:
    """The symbolic shape graph of one engine step of `kind`; `batch` fixes b (else it is a symbol)."""
    env = ShapeEnv()  # sizes range over >= 2 (0 and 1 would be specialised): see `trace_step`
    graph = ShapeGraph(kind, {})

    def symbol(name: str, hint: int) -> torch.SymInt:
        sym = env.create_symbol(hint, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
        graph.symbols[name] = sym
        return env.create_symintnode(sym, hint=hint)

    b = batch if batch is not None else symbol("b", hints[0])
    L = 1 if kind == "decode" else symbol("L", hints[1])
    P = 0 if kind == "prefill" else symbol("P", hints[2])
    _check_kind(kind, 1, 1 if kind == "decode" else 2, 0 if kind == "prefill" else 1)
    stack: list[str] = []
    recorder = Recorder(graph, stack)
    fake = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True, static_shapes=True)
    with (
        fake,
        _module_names(engine, stack),
        tracing(_SymbolicRouting(env, graph, engine.config.num_experts_per_tok)),
    ):
        ids = torch.zeros((b, L), dtype=torch.long)
        cache = engine.new_cache()
        if kind != "prefill":
            _fill_cache(engine, cache, b, P)
        with recorder:
            logits = engine(ids, cache=cache, logits_to_keep=1).logits
        recorder.mark_outputs(_step_outputs(logits, cache))
    _rename_graph(graph, env)
    return graph


def readable(expr: sympy.Basic) -> sympy.Basic:
    """torch's FloorDiv as sympy floor/ceiling (-k*floor(-x/k) reads k*ceiling(x/k)); products expanded."""

    def floor_of(x: sympy.Basic) -> sympy.Basic:
        inner = sympy.together(sympy.expand(x.args[0] / x.args[1]))
        if sympy.expand(inner).could_extract_minus_sign():
            return -sympy.ceiling(sympy.together(sympy.expand(-inner)))
        return sympy.floor(inner)

    expr = sympy.sympify(expr).replace(lambda x: isinstance(x, FloorDiv), floor_of)
    return sympy.expand(expr) if not expr.is_Relational else expr


def _rename(expr: sympy.Basic, graph: ShapeGraph) -> sympy.Basic:
    names = {
        sym: sympy.Symbol(name, integer=True, positive=True)
        for name, sym in graph.symbols.items()
        if isinstance(sym, sympy.Symbol)
    }
    return sympy.sympify(expr).xreplace(names)


def _rename_graph(graph: ShapeGraph, env: ShapeEnv) -> None:
    """ShapeEnv symbols (s0, s1, ...) -> b, L, P, n_<layer>_<e>, after the env's own substitutions."""

    sums = {}
    for layer, total in graph.routed.items():
        ns = [graph.symbols[n] for n, (lay, _, _) in graph.routing.items() if lay == layer]
        sums[sympy.Add(*ns)] = total

    def fix(e: sympy.Expr) -> sympy.Expr:
        e = env.replace(sympy.sympify(e))
        for total_n, total in sums.items():  # the concatenation of every expert's tokens: top_k * b * L
            e = e.subs(total_n, total)
        return readable(_rename(e, graph))

    for t in graph.tensors.values():
        t.shape = tuple(fix(s) for s in t.shape)
    for s in graph.storages.values():
        s.nbytes = fix(s.nbytes)
    graph.routed = {layer: _rename(total, graph) for layer, total in graph.routed.items()}
    graph.guards = [fix(g.expr) for g in env.guards]
    graph.symbols = {name: sympy.Symbol(name, integer=True, positive=True) for name in graph.symbols}


@dataclass
class ActualStep:
    ops: list[tuple[str, list[tuple[int, ...]]]]
    values: dict[str, int]


@torch.inference_mode()
def record_step(engine: JambaEngine, kind: str, b: int, L: int, P: int, seed: int = 0) -> ActualStep:
    """Run one real step of `kind` (after a real prefill of P tokens) and record every op's output shapes."""
    _check_kind(kind, b, L, P)
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.config.vocab_size
    cache = engine.new_cache()
    if P:
        engine(torch.randint(0, vocab, (b, P), generator=gen), cache=cache)
    graph = ShapeGraph(kind, {})
    recorder = Recorder(graph, [])
    routing = _RealRouting(recorder)
    ids = torch.randint(0, vocab, (b, L), generator=gen)
    with tracing(routing), recorder:
        engine(ids, cache=cache, logits_to_keep=1)
    ops = [(op.name, [tuple(int(d) for d in graph.tensors[t].shape) for t in op.outputs]) for op in graph.ops]
    return ActualStep(ops, {"b": b, "L": L, "P": P, **routing.counts})


def compare(graph: ShapeGraph, actual: ActualStep) -> list[str]:
    """Differences between the symbolic graph at the actual sizes and the actual step (empty: equal)."""
    subs = {graph.symbols[k]: v for k, v in actual.values.items() if k in graph.symbols}
    problems = []
    if len(graph.ops) != len(actual.ops):
        problems.append(f"{len(graph.ops)} ops traced, {len(actual.ops)} run")
    for op, (name, shapes) in zip(graph.ops, actual.ops, strict=False):
        if op.name != name:
            problems.append(f"op {op.index}: traced {op.name}, ran {name}")
            break
        want = [tuple(int(sympy.sympify(d).subs(subs)) for d in graph.shape_of(t)) for t in op.outputs]
        if want != shapes:
            problems.append(
                f"op {op.index} {op.name} in {op.module or 'engine'}: formula gives {want}, ran {shapes}"
            )
    return problems


def guards_hold(graph: ShapeGraph, values: dict[str, int]) -> bool:
    subs = {graph.symbols[k]: v for k, v in values.items() if k in graph.symbols}
    return all(bool(sympy.sympify(g).subs(subs)) for g in graph.guards)
