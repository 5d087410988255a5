"""The import rules of docs/architecture.md, read from the source (no module is imported).

- `quintet/models/` and `quintet/kernels/` import no stage package; the kernels import no model either.
- The shared leaves (`LEAVES`: errors, io, config, chat, tokenizer, processes, ...) import only each other.
- The stages' libraries follow the lifecycle (`LIFECYCLE`): a stage imports only stages before it; only
  the command layer (each stage's `commands.py` and `__main__.py`, `quintet.cli`, `quintet.demo`) imports
  stages after it or another stage's commands.
- The runtime (`quintet.loading`, `quintet.generation`) imports leaves, kernels, models and, of the stages,
  only the FP4 folder format (`quintet.deploy.quantized_folder`, which every loader must read).
- No import circle among quintet's modules. Imports under `if TYPE_CHECKING:` do not count (they never
  run); imports inside functions do (they run when called).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "quintet"
STAGES = ("train", "align", "eval", "safety", "deploy", "data", "demo", "serve")
TOP_LEVEL_STAGES = ("cli", "commands", "loading", "generation", "__main__")
LEAVES = ("errors", "io", "config", "chat", "lr_schedule", "tokenizer", "processes", "die_with_parent")
LIFECYCLE = ("data", "eval", "train", "align", "safety", "deploy", "serve")
RUNTIME = ("quintet.loading", "quintet.generation")
RUNTIME_MAY_READ = ("quintet.deploy.quantized_folder",)
COMMAND_LAYER = ("quintet.cli", "quintet.demo", "quintet.__main__")


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LIFECYCLE else None


def is_command(module: str) -> bool:
    return any(_within(module, c) for c in COMMAND_LAYER) or module.rsplit(".", 1)[-1] in (
        "commands",
        "__main__",
    )


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Every `quintet...` name that `source` imports when it runs (module names, and module.attr for
    `from module import attr`, which may itself be a module)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return {n for n in found if n == "quintet" or n.startswith("quintet.")}


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """module -> the quintet modules it imports, from {module: (source, is_package)}."""

    def resolve(name: str) -> str | None:
        while name and name not in sources:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, (source, is_package) in sources.items():
        targets = {resolve(n) for n in imported_names(source, module, is_package)}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        circles.append(sorted(component))
    return circles


def forbidden_imports(graph: dict[str, set[str]]) -> list[str]:
    stage_prefixes = tuple(f"quintet.{s}" for s in (*STAGES, *TOP_LEVEL_STAGES))
    leaves = {f"quintet.{leaf}" for leaf in LEAVES}
    problems = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            in_stage = any(target == p or target.startswith(p + ".") for p in stage_prefixes)
            if module.startswith(("quintet.models", "quintet.kernels")) and in_stage:
                problems.append(f"{module} imports the stage module {target}")
            if module.startswith("quintet.kernels") and target.startswith("quintet.models"):
                problems.append(f"{module} (a kernel) imports the model module {target}")
            if module in leaves and target not in leaves:
                problems.append(f"{module} (a shared leaf) imports {target}")
            source_stage, target_stage = stage_of(module), stage_of(target)
            if not is_command(module):
                if is_command(target) and target != "quintet.commands":
                    problems.append(f"{module} (a library) imports the command module {target}")
                elif (
                    source_stage
                    and target_stage
                    and LIFECYCLE.index(target_stage) > LIFECYCLE.index(source_stage)
                ):
                    problems.append(f"{module} ({source_stage}) imports {target}, a later stage")
            if module in RUNTIME and target_stage and not any(_within(target, r) for r in RUNTIME_MAY_READ):
                problems.append(f"{module} (the runtime) imports the stage module {target}")
    return problems


def quintet_sources() -> dict[str, tuple[str, bool]]:
    return {
        module_name(p): (p.read_text(encoding="utf-8"), p.name == "__init__.py") for p in ROOT.rglob("*.py")
    }


@pytest.fixture(scope="module")
def graph():
    return import_graph(quintet_sources())


def test_models_and_kernels_import_no_stage(graph):
    assert len(graph) > 100  # the whole package was read
    assert forbidden_imports(graph) == []


def test_no_import_circle(graph):
    assert import_circles(graph) == []


def test_the_checks_catch_what_they_forbid():
    sources = {
        "quintet.models.m": ("from quintet.train import loop\n", False),
        "quintet.kernels.k": ("import quintet.models.m\n", False),
        "quintet.train": ("from . import loop\n", True),
        "quintet.train.loop": ("from quintet.models import m\n", False),
        "quintet.models": ("", True),
        "quintet.chat": ("def f():\n    from quintet.train import loop\n", False),
        "quintet.deploy.a": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from quintet.models.m import X\n"
            "from .b import y\n",
            False,
        ),
        "quintet.deploy.b": ("from quintet.deploy.a import z\n", False),
        "quintet.deploy": ("", True),
        "quintet.data.reader": ("from quintet.align import pairs\n", False),
        "quintet.align": ("", True),
        "quintet.align.pairs": (
            "from quintet.data import reader\nfrom quintet.eval.commands import x\n",
            False,
        ),
        "quintet.align.commands": ("from quintet.serve import app\n", False),
        "quintet.eval.commands": ("", False),
        "quintet.serve.app": ("", False),
        "quintet.loading": (
            "from quintet.deploy.quantized_folder import f\nfrom quintet.deploy.b import y\n",
            False,
        ),
        "quintet.deploy.quantized_folder": ("", False),
    }
    graph = import_graph(sources)
    assert graph["quintet.train.loop"] == {"quintet.models", "quintet.models.m"}
    assert "quintet.models.m" not in graph["quintet.deploy.a"]  # TYPE_CHECKING only
    problems = forbidden_imports(graph)
    assert any("quintet.models.m imports the stage module quintet.train" in p for p in problems)
    assert any("quintet.kernels.k (a kernel) imports the model" in p for p in problems)
    assert any("quintet.chat (a shared leaf) imports quintet.train" in p for p in problems)
    assert "quintet.data.reader (data) imports quintet.align.pairs, a later stage" in problems
    assert "quintet.align.pairs (a library) imports the command module quintet.eval.commands" in problems
    assert not any(p.startswith("quintet.align.commands") for p in problems)  # the command layer may
    assert "quintet.loading (the runtime) imports the stage module quintet.deploy.b" in problems
    assert not any("quantized_folder" in p for p in problems)
    circles = import_circles(graph)
    assert ["quintet.deploy.a", "quintet.deploy.b"] in circles
    assert any("quintet.models.m" in c and "quintet.train.loop" in c for c in circles)
