"""The library reference keeps its promises: runnable examples, ``__all__`` everywhere.

- every page of docs/reference/ about a module opens with a Python example, and the
  examples of each page run, in a fresh interpreter, as a reader would paste them;
- every public module of mepcore (docs/stability.md lists them) has an ``__all__`` of
  names it really has, and the reference documents exactly those modules.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference"
PAGES = sorted(p for p in REFERENCE.glob("*.md") if p.name != "index.md")
PUBLIC_MODULES = (
    "mepcore",
    "mepcore.errors",
    "mepcore.types",
    "mepcore.ports",
    "mepcore.testing",
    "mepcore.identity",
    "mepcore.authz",
    "mepcore.config",
    "mepcore.spawn",
    "mepcore.tasks",
    "mepcore.client",
    "mepcore.contrib",
    "mepcore.contrib.login",
    "mepcore.contrib.profiles",
    "mepcore.contrib.ood",
    "mepcore.contrib.jupyterhub",
)
# Imports JupyterHub, an optional extra: checked from its source when it is not installed.
NEEDS_EXTRA = {"mepcore.contrib.jupyterhub": "jupyterhub"}

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_DIRECTIVE = re.compile(r"^::: ([\w.]+)", re.MULTILINE)


def examples(page: Path) -> list[str]:
    return _BLOCK.findall(page.read_text())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_each_page_opens_with_an_example(page: Path) -> None:
    text = page.read_text()
    first_block = text.find("```python")
    first_directive = text.find("\n::: ")
    assert first_block != -1, f"{page.name} has no Python example"
    assert first_directive == -1 or first_block < first_directive
    # Only prose between the title and the example: no other code first.
    assert "```" not in text[:first_block]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_the_examples_run(page: Path, tmp_path: Path) -> None:
    script = tmp_path / f"{page.stem}_example.py"
    script.write_text("\n\n".join(examples(page)))
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{page.name}:\n{done.stdout}\n{done.stderr}"


def _declared_all(module: str) -> list[str]:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, module
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            assert node.value is not None
            names = ast.literal_eval(node.value)
            assert isinstance(names, list | tuple), f"{module}.__all__ is not a list"
            return list(names)
    pytest.fail(f"{module} has no __all__ at module level")


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_module_has_all(module: str) -> None:
    names = _declared_all(module)
    assert len(names) == len(set(names)), f"{module}.__all__ repeats a name"
    assert all(isinstance(n, str) and n for n in names)
    extra = NEEDS_EXTRA.get(module)
    if extra is not None and importlib.util.find_spec(extra) is None:
        # Without the extra the module cannot be imported: its names must at least be
        # defined (or imported) at its top level.
        tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())  # type: ignore[union-attr, arg-type]
        defined = {getattr(node, "name", None) for node in tree.body} | {
            t.id
            for node in tree.body
            if isinstance(node, ast.Assign | ast.AnnAssign)
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Name)
        }
        assert set(names) <= defined, f"{module}: {set(names) - defined} not defined"
        return
    loaded = importlib.import_module(module)
    missing = [n for n in names if not hasattr(loaded, n)]
    assert not missing, f"{module}.__all__ names what it does not have: {missing}"


def test_the_reference_documents_exactly_the_public_modules() -> None:
    documented = {m for page in PAGES for m in _DIRECTIVE.findall(page.read_text())}
    assert documented == set(PUBLIC_MODULES)


def test_the_stability_promise_names_every_public_module() -> None:
    promise = (ROOT / "docs" / "stability.md").read_text()
    for module in PUBLIC_MODULES:
        assert f"`{module}`" in promise, module
