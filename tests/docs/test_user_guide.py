"""The user guide's code runs: every ```python block, in order, in one namespace.

Blocks whose first line is ``# not run: <reason>`` are skipped (they need a remote
scheduler). The blocks run against the session's small LocalCluster (the ``client``
fixture), which they find as the active client.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
GUIDE = DOCS / "user-guide.md"
NOT_RUN = "# not run:"

_FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line number, code)`` of each ```python block in ``path``."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _FENCE.finditer(text)]


def test_guide_has_runnable_blocks_in_each_section():
    text = GUIDE.read_text()
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    for section in sections:
        title = section.splitlines()[0]
        runnable = [c for _, c in python_blocks_in(section) if not c.startswith(NOT_RUN)]
        assert runnable, f"section {title!r} has no runnable python block"


def python_blocks_in(text: str) -> list[tuple[int, str]]:
    return [(0, m.group(1)) for m in _FENCE.finditer(text)]


def test_skipped_blocks_give_a_reason():
    for line, code in python_blocks(GUIDE):
        if code.startswith("# not run"):
            assert re.match(r"# not run: \S", code), f"line {line}: say why the block is not run"


@pytest.mark.timeout(240)
def test_user_guide_runs(client):
    # a module name that is not importable, so cloudpickle ships the guide's classes
    # and functions by value to the workers
    namespace: dict[str, object] = {"__name__": "daskinfer_user_guide"}
    ran = 0
    for line, code in python_blocks(GUIDE):
        if code.startswith(NOT_RUN):
            continue
        try:
            exec(compile(code, f"{GUIDE.name}:{line}", "exec"), namespace)  # noqa: S102
        except Exception as exc:
            raise AssertionError(f"the block at {GUIDE.name} line {line} failed: {exc!r}") from exc
        ran += 1
    assert ran >= 8
    # drop the guide's datasets (and any futures they hold) before the fixture's check
    namespace.clear()
