"""`import pynorm` at the root of a source checkout, after `pip install .`.

Python puts the current directory first on sys.path, so a command run at the
repository's root (the README's `python3 -m pynorm`) imports the checkout's
pynorm/, which holds no built library. It loads the installed distribution's
library then, and refuses with a message naming the fix when that library was
built from another pynorm.h than the checkout's.

Each case runs in a subprocess from a scratch checkout: a copy of the installed
package's Python files next to a c_src/include/pynorm.h.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pynorm
import pynorm._lib

INSTALLED = Path(pynorm.__file__).resolve().parent
INSTALLED_LIB = INSTALLED / "lib"


def installed_distribution_lib():
    try:
        dist = importlib.metadata.distribution("pynorm")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file("pynorm/lib")).resolve()


pytestmark = pytest.mark.skipif(
    not (INSTALLED_LIB / "pynorm.h").exists() or installed_distribution_lib() != INSTALLED_LIB.resolve(),
    reason="needs pynorm installed with pip (its library inside the package)")

PROBE = """
import numpy as np, pynorm, pynorm._lib
print(pynorm.__file__)
print(pynorm._lib.library_path)
print(float(pynorm.layer_norm(np.arange(8, dtype=np.float32).reshape(2, 4)).sum()))
"""


def make_checkout(root, header_text):
    shutil.copytree(INSTALLED, root / "pynorm", ignore=shutil.ignore_patterns("lib", "__pycache__"))
    (root / "c_src" / "include").mkdir(parents=True)
    (root / "c_src" / "include" / "pynorm.h").write_text(header_text)


def run_probe(cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYNORM_LIBRARY")}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_checkout_root_loads_the_installed_library(tmp_path):
    make_checkout(tmp_path, (INSTALLED_LIB / "pynorm.h").read_text())
    proc = run_probe(tmp_path)
    assert proc.returncode == 0, proc.stderr
    module_file, library, total = proc.stdout.splitlines()
    assert Path(module_file).resolve().is_relative_to(tmp_path.resolve()), \
        f"the checkout's pynorm/ should be the one imported, got {module_file}"
    assert Path(library).resolve() == Path(pynorm._lib.library_path).resolve()
    assert abs(float(total)) < 1e-5


def test_checkout_with_another_header_is_refused(tmp_path):
    make_checkout(tmp_path, (INSTALLED_LIB / "pynorm.h").read_text() + "\n/* changed */\n")
    proc = run_probe(tmp_path)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "different pynorm.h" in proc.stderr, proc.stderr
    assert "pip install ." in proc.stderr, proc.stderr
