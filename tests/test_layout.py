"""The package's shape, as rules a newcomer can rely on: imports only go down the layers, no module
outgrows a screenful of concerns, and every import deferred into a function says why.

These read the source (ast); nothing is imported, so they run in milliseconds and fail with the
offending lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "neox_train"

# Bottom to top. A unit (a top-level module or a sub-package) imports only units of lower layers,
# and its own modules; two units of one layer never import each other. This is the order the
# README's layout tour gives.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "log", "units", "health", "run_presets", "lm_loss"),
    ("model", "distributed"),
    ("config_rules",),
    ("config",),
    ("ds_config", "flags"),
    ("remote", "data", "track"),
    ("checkpoint.local",),  # tags, save/load, the local commit: knows nothing of buckets
    # the prefix's owner, the journal, the protocol, the upload process, the Publisher
    ("checkpoint.publish",),
    ("checkpoint",),  # resume, which reads both
    ("train", "convert", "launch"),
    ("eval",),  # downstream evaluations: a converted checkpoint, lm-eval, the run's trackers
    ("cli",),
)
MAX_LINES = 400


def _modules(repo: Path = REPO) -> list[tuple[str, Path]]:
    out = []
    for path in sorted((repo / "neox_train").rglob("*.py")):
        parts = path.relative_to(repo).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, path))
    return out


# Sub-packages that are units of their own (a layer apart from the package around them).
SUB_UNITS = ("checkpoint.local", "checkpoint.publish")


def _unit(module: str) -> str:
    parts = module.split(".")
    for sub in SUB_UNITS:
        if ".".join(parts[1:3]) == sub:
            return sub
    return parts[1] if len(parts) > 1 else ""


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every neox_train import, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "neox_train":
                found += [(node.lineno, f"neox_train.{a.name}") for a in node.names]
            elif node.module.startswith("neox_train."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("neox_train")]
    return found


def upward_imports(repo: Path = REPO) -> list[str]:
    rank = {u: i for i, layer in enumerate(LAYERS) for u in layer}
    wrong = []
    for module, path in _modules(repo):
        me, where = _unit(module), path.relative_to(repo)
        for line, target in _imported(ast.parse(path.read_text())):
            there = _unit(target)
            if target == module:
                wrong.append(f"{where}:{line} imports itself")
            elif me and not there:
                wrong.append(f"{where}:{line} imports the package root ({target})")
            elif me and there != me and rank.get(there, len(LAYERS)) >= rank.get(me, -1):
                wrong.append(f"{where}:{line} ({me}, layer {rank.get(me)}) imports {target} "
                             f"({there}, layer {rank.get(there)})")
    return wrong


def oversized(repo: Path = REPO) -> dict[str, int]:
    sizes = {path.relative_to(repo).as_posix(): len(path.read_text().splitlines())
             for _, path in _modules(repo)}
    return {p: n for p, n in sizes.items() if n > MAX_LINES}


def _module_names(repo: Path) -> set[str]:
    return {name for name, _ in _modules(repo)}


def misnamed_imports(repo: Path = REPO) -> list[str]:
    """A module imported under another name (`import a.b as c`, `from a import b as c`), and a
    private name (`_x`) imported from another module: both make a reader look in the wrong place."""
    modules, wrong = _module_names(repo), []
    for _, path in _modules(repo):
        where = path.relative_to(repo)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                wrong += [f"{where}:{node.lineno} imports {a.name} as {a.asname}"
                          for a in node.names
                          if a.asname and a.name in modules]
            elif (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.startswith("neox_train")):
                for a in node.names:
                    if f"{node.module}.{a.name}" in modules and a.asname and a.asname != a.name:
                        wrong.append(
                            f"{where}:{node.lineno} imports {node.module}.{a.name} as {a.asname}")
                    elif a.name.startswith("_"):
                        wrong.append(f"{where}:{node.lineno} imports the private {a.name} from "
                                     f"{node.module}")
    return wrong


def _deferred(tree: ast.AST):
    """For each function with imports in its own body (not in nested functions): its first such
    import."""
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        nested = {id(n) for inner in ast.walk(fn) if inner is not fn
                  and isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(inner)}
        imports = [n for n in ast.walk(fn)
                   if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in nested]
        if imports:
            yield fn, min(imports, key=lambda n: n.lineno)


def silent_deferred_imports(repo: Path = REPO) -> list[str]:
    silent = []
    for _, path in _modules(repo):
        lines = path.read_text().splitlines()
        for fn, first in _deferred(ast.parse("\n".join(lines))):
            here, above = (lines[first.lineno - 1],
                           lines[first.lineno - 2].strip() if first.lineno > 1 else "")
            if "#" not in here and not above.startswith("#"):
                silent.append(
                    f"{path.relative_to(repo)}:{first.lineno} in {fn.name}(): {here.strip()}")
    return silent


def test_every_unit_has_a_layer():
    units = {_unit(m) for m, _ in _modules()} - {""}
    layered = {u for layer in LAYERS for u in layer}
    assert units <= layered, \
        f"give {sorted(units - layered)} a place in LAYERS (and in the README's layout)"


def test_imports_only_go_down():
    assert upward_imports() == []


def test_modules_go_by_their_own_names_and_privates_stay_home():
    assert misnamed_imports() == []


def test_no_module_is_over_the_size_limit():
    assert oversized() == {}, f"split the modules over {MAX_LINES} lines by concern"


def test_every_deferred_import_says_why():
    """An import inside a function is there to buy start-up time or to break a cycle; the comment on
    its line or the line above says which. One comment covers the function's other imports."""
    assert silent_deferred_imports() == []


def test_the_rules_catch_what_they_describe(tmp_path):
    """The same checks on a made-up package: each must see its offence, and only that."""
    remote = tmp_path / "neox_train" / "remote"
    remote.mkdir(parents=True)
    (tmp_path / "neox_train" / "errors.py").write_text("X = 1\n")
    (remote / "ok.py").write_text(
        "from neox_train.errors import X\n\n\ndef f():\n    import torch  # deferred: 1 s\n")
    (remote / "up.py").write_text("from neox_train.cli.sync import main\n")
    (remote / "me.py").write_text(
        "def f():\n    # deferred: breaks a cycle\n    from neox_train.remote.me import g\n")
    (remote / "quiet.py").write_text("def f():\n    import torch\n" + "\n" * MAX_LINES)
    (remote / "alias.py").write_text("from neox_train.remote import ok as engine\n"
                                     "from neox_train.remote.up import _x\n"
                                     "from neox_train.errors import X as Y\n")
    rank = {u: i for i, layer in enumerate(LAYERS) for u in layer}
    assert upward_imports(tmp_path) == [
        "neox_train/remote/me.py:3 imports itself",
        f"neox_train/remote/up.py:1 (remote, layer {rank['remote']}) imports neox_train.cli.sync "
        f"(cli, layer {rank['cli']})",
    ]
    assert silent_deferred_imports(tmp_path) == [
        "neox_train/remote/quiet.py:2 in f(): import torch"]
    assert oversized(tmp_path) == {"neox_train/remote/quiet.py": MAX_LINES + 2}
    assert misnamed_imports(tmp_path) == [
        "neox_train/remote/alias.py:1 imports neox_train.remote.ok as engine",
        "neox_train/remote/alias.py:2 imports the private _x from neox_train.remote.up",
    ]
