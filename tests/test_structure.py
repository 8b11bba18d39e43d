"""The package layering of docs/DESIGN.md holds: no import cycle between edgeseg's top-level packages, counting
every import (module level or inside a function), and the target tables live only in the profiles."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "edgeseg"


def _top(module: str) -> str | None:
    """The layer a module belongs to: edgeseg's top-level package or module, and each target package
    (`edgeseg.targets.<name>`) on its own, above the generic code it builds on."""
    parts = module.split(".")
    if parts[:2] == ["edgeseg", "targets"] and len(parts) > 2:
        return ".".join(parts[:3])
    return ".".join(parts[:2]) if parts[0] == "edgeseg" and len(parts) > 1 else None


def package_edges() -> dict[str, dict[str, str]]:
    """{package: {imported package: 'file:line' of the first such import}} for edgeseg's top-level packages and
    modules."""
    edges: dict[str, dict[str, str]] = defaultdict(dict)
    for f in PKG.rglob("*.py"):
        mod = ".".join(f.relative_to(REPO).with_suffix("").parts)
        src = _top(mod.removesuffix(".__init__"))
        if src is None:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                dst = _top(name)
                if dst and dst != src:
                    edges[src].setdefault(dst, f"{f.relative_to(REPO)}:{node.lineno}")
    return edges


def cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_packages():
    edges = package_edges()
    assert edges["edgeseg.export"] and edges["edgeseg.train"]  # the scan sees imports at all
    found = cycles(edges)
    detail = [f"{a} -> {b} ({edges[a][b]})" for comp in found for a in comp for b in comp if b in edges.get(a, {})]
    assert not found, "import cycles: " + "; ".join(detail)


def test_target_packages_import_no_other_target_package_undeclared():
    """A target package builds on generic code; where it builds on another target package (jetson-tensorrt's
    ONNX), its __init__ declares it in BUILDS_ON."""
    import importlib

    edges = package_edges()
    targets = sorted(p.name for p in (PKG / "targets").iterdir() if (p / "exporter.py").is_file())
    assert len(targets) >= 6
    undeclared = []
    for t in targets:
        declared = set(getattr(importlib.import_module(f"edgeseg.targets.{t}"), "BUILDS_ON", ()))
        for dst, where in edges.get(f"edgeseg.targets.{t}", {}).items():
            other = dst.removeprefix("edgeseg.targets.")
            if other != dst and other not in declared:
                undeclared.append(f"{t} -> {other} ({where})")
    assert not undeclared, undeclared


def test_the_cycle_check_can_fail():
    assert cycles({"a": {"b": "x"}, "b": {"c": "y"}, "c": {"a": "z"}}) == [["a", "b", "c"]]


def test_target_names_only_in_profiles_exporters_and_sessions():
    """A target's facts live in its profile: no other module lists target names (help texts and docstrings
    aside, which are not code)."""
    names = [p.stem for p in (REPO / "export_targets").glob("*.toml")]
    allowed = ("edgeseg/targets/", "edgeseg/extras.py")
    hits = []
    for f in PKG.rglob("*.py"):
        rel = str(f.relative_to(REPO))
        if rel.startswith(allowed):
            continue
        tree = ast.parse(f.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(
            n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.body and isinstance(
            n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                    and node.value in names:
                hits.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not hits, hits


# the vendor tools of the targets, by top-level module
VENDOR_MODULES = {"executorch", "onnx", "onnxruntime", "onnxscript", "openvino", "nncf", "coremltools", "litert_torch",
                  "ai_edge_litert", "ai_edge_quantizer", "tensorrt"}
# module -> why it may import a vendor tool outside a target package
VENDOR_IMPORT_EXCEPTIONS = {
    "edgeseg/quant/pt2e_specs.py": "executorch's XNNPACKQuantizer: the PT2E scheme the ExecuTorch, ONNX and "
                                   "jetson-tensorrt QAT schemes share",
}


def test_vendor_tools_are_imported_only_inside_target_packages():
    hits = []
    for f in PKG.rglob("*.py"):
        rel = str(f.relative_to(REPO))
        if rel.startswith("edgeseg/targets/") and rel.count("/") >= 3:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            hits += [f"{rel}:{node.lineno} {n}" for n in names
                     if n.split(".")[0] in VENDOR_MODULES and rel not in VENDOR_IMPORT_EXCEPTIONS]
    assert not hits, hits
    assert all((REPO / m).is_file() for m in VENDOR_IMPORT_EXCEPTIONS)  # no stale exception
