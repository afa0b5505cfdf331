"""The layout's rules, read from the source: no import circles between tfrobust's
modules, no module reaching into another module's private names, and the
AutoAttack package keeps its public names.

Imports are read from the syntax tree (also those inside functions), so the
checks need no TensorFlow and do not depend on import order.
"""

import ast
import importlib
import pathlib

import pytest

import tfrobust

ROOT = pathlib.Path(tfrobust.__file__).parent

def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(source: str) -> list:
    """``(line, "module.name")`` for every private name of a tfrobust module that ``source`` imports or reads."""
    tree = ast.parse(source)
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("tfrobust")):
            for alias in node.names:
                if _private(alias.name):
                    found.append((node.lineno, f"{node.module}.{alias.name}"))
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tfrobust"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                found.append((node.lineno, ".".join([base.id] + chain[::-1])))
    return sorted(found)


def test_the_check_finds_private_imports_and_attribute_reads():
    source = ("from tfrobust.rundir import _remove, atomic_write\n"
              "from tfrobust import autoattack as aa\n"
              "import tfrobust.flatness\n"
              "x = aa._call_model\n"
              "y = tfrobust.flatness._seed\n"
              "z = aa.run_autoattack\n"
              "own = _helper\n")
    assert private_uses(source) == [(1, "tfrobust.rundir._remove"), (4, "aa._call_model"),
                                    (5, "tfrobust.flatness._seed")]


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py")))
def test_no_module_uses_a_private_name_of_another(path):
    assert private_uses((ROOT / path).read_text()) == []


def test_autoattack_is_a_package_with_one_module_per_attack():
    import tfrobust.autoattack as aa

    assert pathlib.Path(aa.__file__).name == "__init__.py"
    owners = {"apgd": ("apgd", "apgd_targeted"), "fab": ("fab", "fab_targeted"), "square": ("square",),
              "ensemble": ("run_autoattack", "VERSIONS", "VERSION_ATTACKS", "ALL_ATTACKS", "ATTACKS"),
              "core": ("project", "perturbation_norms", "NORMS")}
    for module, names in owners.items():
        mod = importlib.import_module(f"tfrobust.autoattack.{module}")
        for name in names:
            assert getattr(aa, name) is getattr(mod, name), f"autoattack.{name} is not {module}.{name}"
    assert set(aa.__all__) <= set(dir(aa))


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imported_modules(name: str, source: str) -> set:
    """The tfrobust modules that module ``name`` imports anywhere in ``source`` (a package's
    ``__init__`` importing its own submodules does not count)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tfrobust"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
    return {m for m in found if m in MODULES and m != name and not m.startswith(name + ".")}


def import_circles(edges: dict) -> list:
    """Groups of modules that import each other, directly or round a longer circle (Tarjan's
    strongly connected components with more than one member)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return circles


def test_the_circle_check_reads_imports_and_finds_circles():
    assert "tfrobust.attacks" in imported_modules("tfrobust.trainer", MODULES["tfrobust.trainer"].read_text())
    # A lazy import inside a function counts: it still ties the two modules together.
    lazy = "def f():\n    from tfrobust.experiment import train\n"
    assert imported_modules("tfrobust.cli", lazy) == {"tfrobust.experiment"}
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    edges = {name: imported_modules(name, path.read_text()) for name, path in MODULES.items()}
    assert import_circles(edges) == []
