"""The layout's rules, read from the source: no import circles between tfrobust's
modules nor between its packages, no module importing one of a layer above its
own, no module reaching into another module's private names, no module,
class or function past its size, and the AutoAttack package keeps its public
names.

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
    assert import_circles(MODULE_EDGES) == []


def package_of(module: str) -> str:
    """The node of ``module`` in the package graph: a subpackage (``tfrobust.autoattack``) stands for all its modules."""
    parts = module.split(".")
    return ".".join(parts[:2])


def package_edges(edges: dict) -> dict:
    """The module graph ``edges`` with every subpackage merged into one node (imports inside a package dropped)."""
    merged = {}
    for module, imported in edges.items():
        node = package_of(module)
        merged.setdefault(node, set()).update(package_of(m) for m in imported if package_of(m) != node)
    return merged


MODULE_EDGES = {name: imported_modules(name, path.read_text()) for name, path in MODULES.items()}


def test_the_package_check_sees_a_circle_through_a_subpackage():
    # integrity imports autoattack.core and autoattack.ensemble imports integrity: no circle between
    # modules, one between the package tfrobust.autoattack and the module tfrobust.integrity.
    edges = {"tfrobust.integrity": {"tfrobust.autoattack.core"}, "tfrobust.autoattack.core": set(),
             "tfrobust.autoattack.ensemble": {"tfrobust.integrity", "tfrobust.autoattack.core"}}
    assert import_circles(edges) == []
    assert import_circles(package_edges(edges)) == [["tfrobust.autoattack", "tfrobust.integrity"]]


def test_no_import_circles_between_packages():
    assert import_circles(package_edges(MODULE_EDGES)) == []


# tfrobust's modules and packages from the bottom up: each may import only from its own layer or below.
LAYERS = (
    ("errors", "seeds", "registration"),
    ("attack_names", "defense_names", "config_files", "config_values"),
    ("config", "rundir", "user_code", "export", "multiworker", "network_checks", "runtime"),
    ("data", "data_sources", "extra_data", "models", "loading", "weight_space", "placement", "zoo"),
    ("attacks",),
    ("autoattack", "defenses", "flatness", "callbacks", "runner_attacks"),
    ("integrity", "step", "trainer", "landscape", "collapse"),
    ("evaluation",),
    ("experiment",),
    ("cli", "commands", "__main__", ""),
)


def layer_violations(edges: dict, layers=LAYERS) -> list:
    """``(importer, imported)`` for every import of a node from a layer above the importer's."""
    level = {("tfrobust." + name if name else "tfrobust"): i for i, names in enumerate(layers) for name in names}
    return sorted((a, b) for a, imported in edges.items() for b in imported if level[b] > level[a])


def test_the_layer_check_finds_an_import_from_above():
    edges = {"tfrobust.attacks": {"tfrobust.errors"}, "tfrobust.errors": {"tfrobust.attacks"}}
    assert layer_violations(edges) == [("tfrobust.errors", "tfrobust.attacks")]


def test_every_module_has_a_layer_and_imports_only_from_its_layer_or_below():
    edges = package_edges(MODULE_EDGES)
    placed = {("tfrobust." + name if name else "tfrobust") for names in LAYERS for name in names}
    assert set(edges) == placed, "put a new module or package into LAYERS"
    assert layer_violations(edges) == []


# The most lines a module, a class and a function may have: past these a piece has more than one job.
SIZE_LIMITS = {"module": 600, "class": 400, "function": 100}


def oversized(source: str, name: str) -> list:
    """``(kind, name, lines)`` for the module and each class or function of ``source`` past its limit."""
    found = []
    lines = len(source.splitlines())
    if lines > SIZE_LIMITS["module"]:
        found.append(("module", name, lines))
    for node in ast.walk(ast.parse(source)):
        kind = {ast.ClassDef: "class", ast.FunctionDef: "function", ast.AsyncFunctionDef: "function"}.get(type(node))
        if kind:
            length = node.end_lineno - node.lineno + 1
            if length > SIZE_LIMITS[kind]:
                found.append((kind, f"{name}:{node.name}", length))
    return found


def test_the_size_check_counts_the_lines_of_functions_classes_and_modules():
    body = "\n".join(f"        x{i} = {i}" for i in range(100))
    source = f"class A:\n    def f(self):\n{body}\n\n\ndef g():\n    return 1\n"
    assert oversized(source, "m") == [("function", "m:f", 101)]
    source = "class A:\n" + "\n".join(f"    x{i} = {i}" for i in range(400)) + "\n"
    assert oversized(source, "m") == [("class", "m:A", 401)]
    assert oversized("x = 1\n" * 601, "m") == [("module", "m", 601)]


def test_no_module_class_or_function_is_past_its_size():
    found = [hit for path in sorted(ROOT.rglob("*.py"))
             for hit in oversized(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []
