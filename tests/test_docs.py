"""The README and docs/ say what the code does: the configuration page is generated from the
model, the CLI table lists every option, links resolve, and the README's code runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_readme_is_a_front_door():
    assert len(README.read_text().splitlines()) <= 250


def test_configuration_page_is_generated_from_the_model():
    from dq_ops.config import reference_markdown

    assert (ROOT / "docs" / "configuration.md").read_text() == reference_markdown(), (
        "docs/configuration.md is stale: python -m dq_ops.config > docs/configuration.md")


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(page: Path):
    for target in re.findall(r"\]\(([^)#\s]+)\)", page.read_text()):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_cli_table_lists_every_command_and_option():
    from flows.cli import build_parser

    table = README.read_text().split("## CLI", 1)[1].split("\n## ", 1)[0]
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, parser in commands.items():
        row = next((line for line in table.splitlines() if line.startswith(f"| `dq {name}")), None)
        assert row is not None, f"the README's CLI table has no row for dq {name}"
        for action in parser._actions:
            for option in (o for o in action.option_strings if o.startswith("--") and o != "--help"):
                assert option in row, f"the README's row for dq {name} misses {option}"


def test_library_example_runs(tmp_path):
    """The README's library example, as a user would paste it (the store example runs in
    tests/test_flow.py against a real run)."""
    block = next(b for b in python_blocks(README) if "generate_bins" in b)
    result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("300 samples")
