"""The package's shape (rexmoe_jax/__init__.py): its layers, read from the modules' import
statements. A module imports only from its own layer or lower ones, no two modules import each
other (directly or round a circle), imports of the package sit at the top of a module, and each
subpackage's docstring lists its modules. Every command a user types, `python -m rexmoe_jax.X`,
still starts."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rexmoe_jax"

# Lowest first; a module belongs to the longest entry that names it or its package.
LAYERS = [
    ["cli", "reuse"],
    ["config"],
    ["runtime", "targets", "sharding", "tokenizer", "sources", "outputs", "data", "trackers"],
    ["model"],
    ["optimizer", "trainer", "checkpoint", "runlog"],
    ["inference"],
    ["loop"],
    ["compile", "study", "hf", "plot"],
    ["evaluate", "generate", "lm_eval", "launch"],  # the command modules (rexmoe_jax/__init__.py)
]
COMMANDS = ["data", "evaluate", "generate", "hf", "launch", "lm_eval", "plot", "study"]
# Modules that are a command's code and nothing else: only their command module imports them.
COMMAND_CODE = {"rexmoe_jax.inference.evaluate": "rexmoe_jax.evaluate",
                "rexmoe_jax.inference.lm_eval": "rexmoe_jax.lm_eval",
                "rexmoe_jax.runtime.launch": "rexmoe_jax.launch"}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, bool]]:
    """(module of the package imported, whether at the module's top) for each import of `name`."""
    tree = ast.parse(MODULES[name].read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                       for alias in node.names]
        else:
            continue
        found += [(target, id(node) in top) for target in targets if target.split(".")[0] == "rexmoe_jax"]
    return found


def _layer(name: str) -> int:
    parts = name.split(".")[1:]
    for size in range(len(parts), 0, -1):
        for index, layer in enumerate(LAYERS):
            if ".".join(parts[:size]) in layer:
                return index
    raise AssertionError(f"{name} is in no layer of tests/test_structure.py")


def test_every_module_has_a_layer_and_imports_none_above_it():
    upward = [f"{name} -> {target}" for name in MODULES if name != "rexmoe_jax"
              for target, _ in _imports(name) if target != "rexmoe_jax" and _layer(target) > _layer(name)]
    assert upward == []


def test_command_code_is_imported_by_its_command_only():
    found = [f"{name} -> {target}" for name in MODULES for target, _ in _imports(name)
             if target in COMMAND_CODE and COMMAND_CODE[target] != name]
    assert found == []


def test_no_import_circles():
    graph = {name: {target for target, _ in _imports(name) if target != name} for name in MODULES}
    circles = []

    def visit(name, path):
        for target in graph.get(name, ()):
            if target in path:
                circles.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, path + [target])
        done.add(name)

    done: set[str] = set()
    for name in MODULES:
        if name not in done:
            visit(name, [name])
    assert circles == []


def test_the_package_is_imported_at_the_top_of_modules():
    inside = [f"{name} imports {target}" for name in MODULES for target, at_top in _imports(name) if not at_top]
    assert inside == []


def test_every_subpackage_docstring_lists_its_modules():
    """README's reading order sends a reader to each subpackage's docstring for its modules."""
    unlisted = []
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        named = set(re.findall(r"[\w]+\.py\b", doc))
        unlisted += [f"{init.parent.name}/{m.name}" for m in sorted(init.parent.glob("*.py"))
                     if m.name not in ("__init__.py", "__main__.py") and m.name not in named]
    assert unlisted == []


@pytest.mark.e2e
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_starts_under_its_name(command):
    done = subprocess.run([sys.executable, "-m", f"rexmoe_jax.{command}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower()
