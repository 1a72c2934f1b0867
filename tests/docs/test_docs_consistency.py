"""The README and the docs keep their promises: the fresh-machine commands, and links."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

MAIN_JOB = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
    'pip install -e ".[examples]" && HF_HUB_OFFLINE=1 python examples/embed_minilm.py'
)
TESTS = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
    'pip install -e ".[test]" && python -m pytest -q'
)


def test_readme_has_the_two_fresh_machine_commands_verbatim():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert MAIN_JOB in lines
    assert TESTS in lines


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_relative_links_resolve():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for md in _markdown_files():
        for target in link.findall(md.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            if not (md.parent / target).exists():
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_examples_named_in_docs_exist():
    named = set()
    for md in _markdown_files():
        named.update(re.findall(r"examples/([a-z_]+\.py)", md.read_text()))
    missing = sorted(n for n in named if not (ROOT / "examples" / n).exists())
    assert not missing, missing


def test_porting_table_names_real_verbs():
    """Every Ray name a row marks "same" exists in daskinfer (as a verb or an argument)."""
    import inspect

    import daskinfer as di

    arguments = set(inspect.signature(di.Dataset.map_batches).parameters)
    text = (ROOT / "docs" / "porting-from-ray.md").read_text()
    checked = 0
    for row in text.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[1].startswith("same"):
            continue
        for name in re.findall(r"`([a-z_]+)", cells[0]):
            assert hasattr(di.Dataset, name) or hasattr(di, name) or name in arguments, name
            checked += 1
    assert checked > 30
