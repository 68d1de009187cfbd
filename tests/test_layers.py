"""The package's layers import only downwards (the README's layout map):

    lsh, data -> moe -> models -> training -> tools -> projection

`compat` and `device` sit under everything; `data` sits beside the bottom and imports neither
`lsh` nor anything above it. Every import counts, also one inside a function body.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_lsh"

# What each part of the package may import from megatron_lsh (besides itself).
BASE = {"compat", "device"}
MAY_IMPORT = {
    "compat": set(),
    "device": set(),
    "lsh": BASE,
    "data": BASE,
    "moe": BASE | {"lsh"},
    "models": BASE | {"lsh", "moe"},
    "training": BASE | {"lsh", "data", "moe", "models"},
    "tools": BASE | {"lsh", "data", "moe", "models", "training"},
    "projection": BASE | {"lsh", "data", "moe", "models", "training", "tools"},
}


def part_of(module: str) -> str:
    """'megatron_lsh.moe.dispatcher' -> 'moe'; the package itself -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported_modules(path: Path, module: str):
    """(line, module) of every megatron_lsh import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            for alias in node.names:  # `from megatron_lsh import compat` imports a part
                yield node.lineno, f"{name}.{alias.name}" if name == "megatron_lsh" else name


def modules(package=PACKAGE):
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package.parent).with_suffix("")
        parts = list(relative.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts)


def upward_imports(package=PACKAGE):
    found = []
    for path, module in modules(package):
        own = part_of(module)
        if own == "":  # megatron_lsh/__init__.py applies compat and nothing else
            allowed = {"compat"}
        else:
            assert own in MAY_IMPORT, f"{module}: a part of the package the layer map does not know"
            allowed = MAY_IMPORT[own] | {own}
        for line, imported in imported_modules(path, module):
            if imported.split(".")[0] != "megatron_lsh":
                continue
            target = part_of(imported)
            if target and target not in allowed:
                found.append(f"{path.relative_to(package.parent)}:{line} ({own}) imports {imported} ({target})")
    return found


def test_every_part_of_the_package_has_a_layer():
    parts = {part_of(module) for _, module in modules()} - {""}
    assert parts == set(MAY_IMPORT)


def test_no_module_imports_from_a_layer_above_it():
    assert upward_imports() == []


def test_the_layer_check_catches_an_upward_import(tmp_path):
    fake = tmp_path / "megatron_lsh"
    (fake / "moe").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "moe" / "__init__.py").write_text("")
    (fake / "moe" / "bad.py").write_text("def f():\n    from megatron_lsh.training.loop import Trainer\n")
    assert upward_imports(fake) == ["megatron_lsh/moe/bad.py:2 (moe) imports megatron_lsh.training.loop (training)"]
