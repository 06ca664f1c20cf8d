"""The package's shape: no public name hides a module, and the command line starts without torch."""
import importlib
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
