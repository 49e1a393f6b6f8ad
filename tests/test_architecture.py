"""docs/architecture.md's import rules hold: no import cycles in the package, no package imports
hidden inside functions, and the modules it calls leaves import nothing from the package."""

import ast
import re

from tests.helpers import REPO

PACKAGE = REPO / "llm_finetune"


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports() -> dict[str, set[str]]:
    """Each module of the package: the package modules it imports at module level."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        graph[module_name(path)] = {
            node.module for node in tree.body
            if isinstance(node, ast.ImportFrom) and node.module
            and node.module.startswith("llm_finetune.")}
    return graph


def test_no_import_cycles():
    graph = package_imports()

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    # a package's __init__ importing its own modules is not a cycle through them
    cycles = [m for m in graph
              if any(m in reachable(d) and not d.startswith(m + ".") for d in graph[m])]
    assert not cycles, f"import cycles through {cycles}"


def test_no_package_imports_inside_functions():
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden += [f"{module_name(path)}.{node.name} imports {inner.module}"
                           for inner in ast.walk(node)
                           if isinstance(inner, ast.ImportFrom) and inner.module
                           and inner.module.startswith("llm_finetune")]
    assert not hidden, hidden


def test_the_documented_leaves_import_nothing_from_the_package():
    text = (REPO / "docs" / "architecture.md").read_text()
    bullet = re.search(r"\*\*Leaves\*\*.*?(?=\n- \*\*)", text, re.DOTALL).group(0)
    leaves = {name.removesuffix(".py").removesuffix("/").replace("/", ".")
              for name in re.findall(r"`([\w/]+(?:\.py|/))`", bullet)}
    assert {"errors", "configs", "checkpoint_files", "data.rows"} <= leaves
    graph = package_imports()
    for leaf in leaves:
        modules = [m for m in graph if m == f"llm_finetune.{leaf}"
                   or m.startswith(f"llm_finetune.{leaf}.")]
        assert modules, f"docs/architecture.md names a leaf that does not exist: {leaf}"
        inside = f"llm_finetune.{leaf}"
        outside = {d for m in modules for d in graph[m]  # ConfigError: their settings checks
                   if d != inside and not d.startswith(inside + ".") and d != "llm_finetune.errors"}
        assert not outside, f"{leaf} is documented as a leaf but imports {outside}"
