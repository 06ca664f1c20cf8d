"""The package's shape: no public name hides a module, and the command line starts without torch."""
import ast
import importlib
import os
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import saeuron

ROOT = Path(__file__).resolve().parents[1]


def _submodules():
    for info in pkgutil.walk_packages(saeuron.__path__, "saeuron."):
        yield info.name


def test_no_attribute_hides_a_submodule():
    """After importing every submodule, ``saeuron.<name>`` (and ``saeuron.x.<name>``) is that module or absent."""
    names = [n for n in _submodules() if not n.endswith("__main__")]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:  # triton may be missing on a user's machine; this machine has it
            raise AssertionError(f"{name} does not import: {e}") from e
    hidden = []
    for name in names:
        parent, _, child = name.rpartition(".")
        value = getattr(importlib.import_module(parent), child, None)
        if value is not None and value is not sys.modules[name]:
            hidden.append(f"{name} is hidden by {type(value).__name__} {value!r:.60}")
    assert not hidden, hidden


def test_public_api_is_lazy_and_complete():
    for name in saeuron.__all__:
        assert getattr(saeuron, name) is not None
    assert callable(saeuron.patch) and not isinstance(saeuron.patch, types.ModuleType)
    assert callable(saeuron.train) and callable(saeuron.collect)
    assert set(saeuron.__all__) <= set(dir(saeuron))


def test_the_command_line_parser_imports_no_torch():
    """``saeuron --help`` must be instant: building the parser may not import torch, diffusers or transformers."""
    code = ("import sys\nfrom saeuron.cli import build_parser\nbuild_parser().format_help()\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'triton') if m in sys.modules)\n"
            "print('HEAVY', heavy)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "HEAVY []" in r.stdout, r.stdout


# (importing file, module imported from, name): private imports in files another change is rewriting now; to clear.
PRIVATE_IMPORTS_TO_CLEAR: set = set()  # (file, module, name) pairs still to clear: none left


def _module_files():
    """``(path, path relative to the repository, dotted module name, its package)`` of every module of saeuron/."""
    base = ROOT / "saeuron"
    for folder, dirs, files in os.walk(base, followlinks=True):  # saeuron/kernels links to kernels/
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            parts = ("saeuron",) + Path(folder, f).relative_to(base).with_suffix("").parts
            package = parts[:-1]
            if parts[-1] == "__init__":
                parts = package = parts[:-1]
            yield Path(folder, f), Path(folder, f).relative_to(ROOT).as_posix(), ".".join(parts), ".".join(package)


def test_no_module_imports_another_modules_private_name():
    """No ``from X import _name`` (relative or absolute) where X is another saeuron module: shared names are public."""
    found = set()
    for path, rel, module, package in _module_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source != "saeuron" and not source.startswith("saeuron."):
                continue
            for alias in node.names:
                private = alias.name.startswith("_") and not (alias.name.startswith("__") and alias.name.endswith("__"))
                if private and source != module:
                    found.add((rel, source, alias.name))
    unexpected = sorted(found - PRIVATE_IMPORTS_TO_CLEAR)
    assert not unexpected, [f"{rel} imports {name} from {source}" for rel, source, name in unexpected]
    cleared = sorted(PRIVATE_IMPORTS_TO_CLEAR - found)
    assert not cleared, f"no longer imported: remove from PRIVATE_IMPORTS_TO_CLEAR: {cleared}"


def test_setup_lists_every_package():
    """A wheel holds only the packages setup.py names: every folder of saeuron/ with an ``__init__.py`` is there."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = next(ast.literal_eval(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call)
                  for k in n.keywords if k.arg == "packages")
    found = {"saeuron"} | {"saeuron." + ".".join(p.parent.relative_to(ROOT / "saeuron").parts)
                           for p in (ROOT / "saeuron").rglob("__init__.py") if p.parent != ROOT / "saeuron"}
    assert found <= set(listed), sorted(found - set(listed))
