"""The structure the architecture promises (README, Layout): no import cycle between the
library's modules, no import from the library up into a command-line module or a benchmark,
and no library module over 450 lines. Read from the source with `ast`, so a violation is
found whether or not the import runs."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dllm_jax", "controllers", "checkpoints_convert")
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Library modules that `path` imports (anywhere in the file, lazy imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _is_front(name: str) -> bool:
    """Command-line modules and benchmarks: the top layer, imported by nothing below."""
    last = name.split(".")[-1]
    return (last in ("cli", "cli_options") or last.endswith("_cli") or name.startswith("dllm_jax.bench")
            or name.endswith("__main__"))


def test_no_import_cycle_and_no_upward_imports() -> None:
    mods = _modules()
    known = set(mods)
    graph = {m: _imports(p, m, known) for m, p in mods.items()}
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() if not _is_front(m)
                    for d in deps if _is_front(d))
    assert not upward, f"library modules import command-line / bench modules: {upward}"
    # package __init__ files re-export their children: an edge parent -> child is not a
    # cycle of jobs, so cycles are looked for between modules that are not each other's
    # package
    def related(a: str, b: str) -> bool:
        return a.startswith(b + ".") or b.startswith(a + ".")

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if related(m, d):
                continue
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_library_modules_are_small() -> None:
    big = {m: n for m, p in _modules().items()
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_the_reader_sees_relative_and_lazy_imports(tmp_path: Path) -> None:
    """The import reader resolves relative and lazy imports (else the tests above are blind)."""
    f = tmp_path / "a.py"
    f.write_text("def g():\n    from .b import x\n    import dllm_jax.session\n")
    got = _imports(f, "pkg.a", {"pkg.a", "pkg.b", "dllm_jax.session", "dllm_jax"})
    assert {"pkg.b", "dllm_jax.session"} <= got
    assert "pkg.a" not in got
