"""Every Python snippet of the README runs as written (on the demo model and the bundled clips), in a fresh
interpreter from a folder that has the repository's `examples/` and nothing else."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
# A fenced block, possibly indented under a list item: its indentation, then its lines up to the closing fence.
FENCE = re.compile(r"^(?P<indent> *)```python\n(?P<code>.*?)^(?P=indent)```$", re.MULTILINE | re.DOTALL)


def python_snippets(markdown: str) -> list[str]:
    snippets = []
    for match in FENCE.finditer(markdown):
        indent = len(match["indent"])
        snippets.append("\n".join(line[indent:] for line in match["code"].splitlines()))
    return snippets


SNIPPETS = python_snippets((REPO / "README.md").read_text())


def test_the_readme_has_snippets_and_the_extractor_finds_indented_ones():
    assert len(SNIPPETS) >= 4
    assert python_snippets("- item\n\n  ```python\n  x = 1\n  ```\n") == ["x = 1"]


@pytest.mark.parametrize("number", range(len(SNIPPETS)))
def test_readme_snippet_runs(number, tmp_path):
    (tmp_path / "examples").symlink_to(REPO / "examples")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", SNIPPETS[number]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"README snippet {number + 1}:\n{SNIPPETS[number]}\n\n{result.stderr[-3000:]}"
