"""The README stays short and its links, and the docs' links, lead somewhere: every relative file and
every `#anchor` named in README.md and docs/*.md exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        name, _, anchor = target.partition("#")
        linked = (page.parent / name) if name else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with that anchor")
    return broken


def test_readme_fits_in_450_lines():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 450, f"README.md has {lines} lines; move detail into a docs/ page it links to"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_exists(page):
    assert broken_links(page) == [], f"{page.name} links to what is not there"


def test_the_check_finds_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n[ok](#top) [gone](#nowhere) [file](b.md)\n")
    assert broken_links(tmp_path / "a.md") == ["#nowhere: no heading with that anchor", "b.md: no such file"]


def test_slug_matches_githubs_anchors():
    assert slug("Models that do not fit on one GPU: `parallelism: fsdp`") == (
        "models-that-do-not-fit-on-one-gpu-parallelism-fsdp"
    )
    assert slug("Queue, experiments and several machines") == "queue-experiments-and-several-machines"
