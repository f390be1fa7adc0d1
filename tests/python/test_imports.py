"""Every module of python/smp imports first, in a fresh interpreter: no import
circle is held together by imports inside functions (see docs/design.md)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "python"
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "smp").rglob("*.py"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("module", MODULES)
def test_imports_fresh(module):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                       env=env, timeout=100)
    assert r.returncode == 0, f"import {module} in a fresh interpreter failed:\n{r.stderr}"
