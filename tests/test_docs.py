"""Docs that users rely on stay in step with the code."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from istioctl_proxy.config import add_serve_flags
from istioctl_proxy.policy import DEBUG_PATHS

ROOT = Path(__file__).resolve().parents[1]


def test_every_serve_flag_is_documented() -> None:
    p = argparse.ArgumentParser()
    add_serve_flags(p, {})
    documented = set(re.findall(r"\| `(--[a-z0-9-]+)` \|", (ROOT / "docs" / "flags.md").read_text()))
    flags = {a.option_strings[0] for a in p._actions if a.option_strings and a.option_strings[0] != "-h"}
    assert flags == documented, "run scripts/gen-flags-doc"


def test_every_debug_path_rule_is_documented() -> None:
    text = (ROOT / "docs" / "merge-rules.md").read_text()
    assert all(f"`{path}`" in text for path in DEBUG_PATHS)


def test_readme_opens_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```sh") + 1 : lines.index("```")]
    assert [line.split()[0] for line in block] == ["scripts/demo", "scripts/test"]
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()
