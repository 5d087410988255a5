"""Symbolic shapes of engine steps against real runs, and the memory planner's safety."""

import argparse
import random

import pytest
import sympy
import torch

from quintet.deploy.commands import add_deploy_parser
from quintet.deploy.engine import to_engine
from quintet.deploy.memory_plan import MemoryPlan, check_plan, parse_sizes, plan_memory
from quintet.deploy.quantize import QuantConfig, quantize
from quintet.deploy.shapes import ShapeGraph, StorageRecord, compare, guards_hold, record_step, trace_step
from quintet.kernels.m0e4_cpu import gemv_max_rows
from quintet.models.jamba import JambaConfig, JambaForCausalLM
from quintet.models.jamba.create import create_model


def _engine(quantized: bool = False):
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_preset("jamba-tiny")).eval()
    if quantized:
        quantize(model, QuantConfig(group_size=32))
    return to_engine(model, dtype=torch.float32, max_cache_length=512)


@pytest.fixture(scope="module")
def engine():
    return _engine()


@pytest.fixture(scope="module")
def graphs(engine):
    return {
        ("decode", 1): trace_step(engine, "decode", 1),
        ("decode", None): trace_step(engine, "decode"),
        ("prefill", None): trace_step(engine, "prefill"),
        ("chunk", None): trace_step(engine, "chunk"),
    }


GRID = {
    ("decode", 1): [(1, 1, p) for p in (1, 63, 64, 130)],
    ("decode", None): [(2, 1, 1), (3, 1, 64), (4, 1, 100)],
    ("prefill", None): [(1, 2, 0), (2, 7, 0), (3, 64, 0), (1, 65, 0)],
    ("chunk", None): [(1, 2, 1), (3, 9, 60), (2, 2, 200)],
}


@pytest.mark.parametrize("key", list(GRID))
def test_symbolic_shapes_equal_actual_shapes_over_a_grid(engine, graphs, key):
    graph = graphs[key]
    assert {"b", "L", "P"} & set(graph.symbols)
    for b, L, P in GRID[key]:
        actual = record_step(engine, key[0], b, L, P)
        assert guards_hold(graph, actual.values), (b, L, P, graph.guards)
        assert compare(graph, actual) == [], (b, L, P)


def test_guards_say_where_a_trace_holds(graphs):
    """Decode steps run the 4-bit GEMV up to gemv_max_rows() tokens: beyond, the step is another graph."""
    graph = graphs[("decode", None)]
    assert guards_hold(graph, {"b": gemv_max_rows(), "P": 10})
    assert not guards_hold(graph, {"b": gemv_max_rows() + 1, "P": 10})
    assert not guards_hold(graph, {"b": 2, "P": 600})  # past the cache's 512 slots


def test_shapes_are_formulas_in_the_step_sizes(graphs):
    graph = graphs[("chunk", None)]
    b, L, P = (graph.symbols[s] for s in ("b", "L", "P"))
    logits = graph.ops[-1]
    assert graph.shape_of(logits.outputs[0]) == (b, 1, 1024)
    shapes = {graph.shape_of(t) for op in graph.ops for t in op.outputs}
    assert (b, 2, 64 * sympy.ceiling((L + P) / 64), 32) in shapes  # the padded K/V view attention reads
    assert any(any(s.free_symbols & {L} for s in shape) for shape in shapes)
    moe = [n for n in graph.symbols if n.startswith("n_")]
    assert moe and all(graph.routing[n][2] == 2 for n in moe)


def test_quantized_engine_decode_shapes(engine):
    q = _engine(quantized=True)
    graph = trace_step(q, "decode", 1)
    assert any("quintet_m0e4.gemv" in op.name for op in graph.ops)  # the 4-bit GEMV, no float weight
    for P in (3, 64, 90):
        actual = record_step(q, "decode", 1, 1, P)
        assert compare(graph, actual) == []


@pytest.mark.parametrize("key", list(GRID))
def test_planner_never_overlaps_live_tensors(graphs, key):
    plan = plan_memory(graphs[key])
    assert len(plan.buffers) < len(plan.assignment)  # it does reuse
    for b, L, P in GRID[key][:4] + [(7, 1 if key[0] == "decode" else 300, 0 if key[0] == "prefill" else 400)]:
        sizes = {"b": b, "L": L, "P": P}
        assert check_plan(plan, sizes) == []
        values = plan.evaluate(sizes)
        assert values["live_lower_bound"] <= values["planned"] <= values["naive"]


def _random_graph(rng: random.Random, n: int) -> ShapeGraph:
    b, L = sympy.symbols("b L", integer=True, positive=True)
    graph = ShapeGraph("prefill", {"b": b, "L": L})
    graph.ops = [None] * 60
    for sid in range(n):
        first = rng.randrange(0, 55)
        size = rng.choice(
            [b * L * rng.randint(1, 64), b * rng.randint(1, 4096), sympy.Integer(rng.randint(1, 999))]
        )
        graph.storages[sid] = StorageRecord(sid, size, "activation", first, first + rng.randrange(0, 6))
    return graph


def test_planner_on_random_lifetimes():
    rng = random.Random(0)
    for _ in range(10):
        plan: MemoryPlan = plan_memory(_random_graph(rng, 30), reference={"b": rng.randint(1, 8), "L": 64})
        for sizes in ({"b": 1, "L": 1}, {"b": 3, "L": 1000}, {"b": 64, "L": 7}):
            assert check_plan(plan, sizes) == []
            live_pairs = [
                (a, c)
                for a in plan.assignment
                for c in plan.assignment
                if a < c
                and plan.graph.storages[a].first <= plan.graph.storages[c].last
                and plan.graph.storages[c].first <= plan.graph.storages[a].last
            ]
            assert all(plan.assignment[a] != plan.assignment[c] for a, c in live_pairs)


def test_plan_command(tmp_path, capsys):
    create_model("jamba-tiny", tmp_path / "m", seed=0)
    parser = argparse.ArgumentParser(prog="quintet")
    add_deploy_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["deploy", "plan", str(tmp_path / "m"), "--at", "b=1,L=1,P=1000", "--at", "L=128,P=0"]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "decode step" in out and "prefill step" in out
    assert "peak (planned)  =" in out and "naive (no reuse) =" in out
    assert "at P=1000: planned" in out and "at b=1, L=128: planned" in out
    with pytest.raises(ValueError, match="expected comma-separated b=, L=, P="):
        parse_sizes("b=1,Q=2")
