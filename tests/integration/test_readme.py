"""The README's user snippets run as written (blocks marked ``<!-- readme-test -->``, in order,
sharing one namespace), and its set-up stays the two fresh-machine commands."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
MARKED = re.compile(r"<!-- readme-test -->\s*```python\n(.*?)```", re.S)


def test_readme_has_exactly_the_two_setup_commands():
    text = README.read_text()
    bash = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert [b.strip() for b in bash] == ['pip install -e ".[demo]" && anonloader demo out', 'pip install -e ".[test]" && python -m pytest -q']


def test_readme_snippets_run(tmp_path, monkeypatch):
    blocks = MARKED.findall(README.read_text())
    assert len(blocks) >= 3, "the README lost its tested user snippets"
    monkeypatch.chdir(tmp_path)  # snippets may write files (the cache)
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"README.md snippet {number}", "exec"), namespace)  # noqa: S102 - the README is ours
    assert (tmp_path / "faces.lmdb").exists()
