"""The source root is called ssl/, which must never shadow Python's ssl module."""

import subprocess
import sys

from conftest import ROOT


def test_import_ssl_from_repo_root_is_the_standard_module():
    out = subprocess.run([sys.executable, "-c", "import ssl, selfsup; print(ssl.__file__); "
                          "print(hasattr(ssl, \"create_default_context\")); print(selfsup.__file__)"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert not out[0].startswith(str(ROOT)), out[0]
    assert out[1] == "True"  # only the real module has it
    assert out[2].startswith(str(ROOT / "ssl" / "selfsup"))


def test_no_init_in_source_roots():
    assert not (ROOT / "ssl" / "__init__.py").exists()
    assert not (ROOT / "eval" / "__init__.py").exists()
