"""The documentation site builds with ``mkdocs build --strict`` (warnings are errors).

The same build as ``make docs`` (which CI runs), into a temporary directory, and a look
at what came out: every reference page with its example and the API of its modules.
Needs the ``docs`` extra (``pip install -e '.[docs]'``, which ``make`` installs).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(f"{module} is not installed: pip install -e '.[docs]'")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert warnings == []

    identity = (site / "reference" / "identity.html").read_text()
    assert "IdentityMapper.from_documents" in identity  # the example
    assert 'id="mepcore.identity.check_account"' in identity  # the generated reference
    contrib = (site / "reference" / "contrib.html").read_text()
    assert 'id="mepcore.contrib.jupyterhub.MepAuthenticatorMixin"' in contrib
    assert (site / "stability.html").is_file()
    assert (site / "integrations.html").is_file()
