"""The shape of the package, checked from its source: no import cycle, arrows pointing inward (stages → config →
errors/reports), facts about stages in one module, and functions short enough to hold in one's head."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "swiftci"
LONGEST_FUNCTION = 80  # lines, signature and docstring included


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The swiftci modules a module imports, at its top or inside functions (not under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("swiftci")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("swiftci"):
            for alias in node.names:  # `from swiftci import train` imports the module swiftci.train
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file()
                          or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else node.module)
    return found - {"swiftci"}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_import_cycle():
    edges = graph()
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    done: set[str] = set()
    for start in sorted(edges):
        if start not in done:
            visit(start, [start])
    assert not cycles, " | ".join(" → ".join(c) for c in cycles)


def test_config_imports_no_stage_and_plumbing_no_pipeline():
    edges = graph()
    assert edges["swiftci.config"] <= {"swiftci.errors"}, edges["swiftci.config"]
    stage_modules = {"swiftci.train", "swiftci.evaluate", "swiftci.quantize", "swiftci.deploy", "swiftci.pipeline"}
    for plumbing in ("swiftci.stages", "swiftci.reports", "swiftci.errors", "swiftci.runinfo", "swiftci.models",
                     "swiftci.data", "swiftci.ghactions", "swiftci.notify"):
        assert not edges[plumbing] & stage_modules, (plumbing, edges[plumbing] & stage_modules)


def test_stage_facts_live_in_one_module():
    """Stage names in order and report file names are written in swiftci/stages.py only."""
    for path in PACKAGE.rglob("*.py"):
        if path.name == "stages.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple | ast.List) and [getattr(e, "value", None) for e in node.elts] == [
                    "train", "evaluate", "quantize", "deploy"]:
                raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno}: the stage list again")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(
                    ("_report.json", "_report.md")) and " " not in node.value:
                raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno}: report file name {node.value!r}")


def test_no_function_is_longer_than_it_can_be_read():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines >= LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_every_bench_script_reports_its_figures_to_make_bench():
    """`make bench` prints one table from the `RESULT` lines (bench/_result.py); a script without one would be run
    and then missing from the table."""
    silent = [p.name for p in sorted((ROOT / "bench").glob("*.py"))
              if not p.name.startswith("_") and "result(" not in p.read_text()]
    assert not silent, f"bench scripts that report no figure to `make bench`: {silent}"


def test_the_bench_table_marks_goals_met_and_missed():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "tools/bench_table.py")
    bench_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_table)
    text = bench_table.table([
        {"bench": "a", "measure": "speed ratio", "value": 1.04, "goal": ">= 1.0"},
        {"bench": "a", "measure": "start-up ratio", "value": 1.7, "goal": "<= 1.5"},
        {"bench": "b", "measure": "perplexity ratio", "value": 0.99, "goal": None},
        {"bench": "c", "measure": "(the script failed)", "value": "exit 1", "goal": None, "met": "NO"}])
    assert text.splitlines()[2:] == ["| a | speed ratio | 1.04 | >= 1.0 | yes |",
                                     "| a | start-up ratio | 1.7 | <= 1.5 | NO |",
                                     "| b | perplexity ratio | 0.99 |  |  |",
                                     "| c | (the script failed) | exit 1 |  | NO |"]
