"""Every ```python block of the README and docs/ runs as written (each on its own, in a fresh namespace)."""
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks():
    for path in DOCS:
        for number, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.DOTALL)):
            yield pytest.param(block, id=f"{path.name}-{number}")


def test_readme_has_runnable_code():
    assert any(p.id.startswith("README.md") for p in python_blocks())


@pytest.mark.parametrize("code", list(python_blocks()))
def test_code_block_runs(code, monkeypatch):
    # A real module, as a reader's script would be (torch.compile looks its globals' module up by name).
    module = types.ModuleType("doc_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "<doc>", "exec"), module.__dict__)
