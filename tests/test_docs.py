"""Links into docs/science.md resolve: every `science.md#anchor` that code, scripts or docs cite names
a heading of that page (anchors as GitHub derives them from a heading)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
SCIENCE = ROOT / "docs" / "science.md"


def anchor(heading: str) -> str:
    """GitHub's anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def cited_anchors() -> list[tuple[str, str]]:
    """(file:line, anchor) for every `science.md#…` in the tracked text of the project."""
    found = []
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "deepres").rglob("*.py"),
             *(ROOT / "scripts").glob("*.py")]
    for path in files:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            found += [(f"{path.relative_to(ROOT)}:{i}", m) for m in re.findall(r"science\.md#([\w\-]+)", line)]
    return found


def test_anchor_follows_github():
    assert anchor("The Highway transform-gate bias") == "the-highway-transform-gate-bias"
    assert anchor("He initialisation") == "he-initialisation"


def test_every_cited_section_of_science_md_exists():
    headings = {anchor(line.lstrip("#")) for line in SCIENCE.read_text().splitlines() if line.startswith("## ")}
    cited = cited_anchors()
    assert len(cited) >= 10  # the code does cite the page; a broken regex would find nothing
    missing = [f"{where}: #{name}" for where, name in cited if name not in headings]
    assert not missing, "links to sections docs/science.md does not have:\n" + "\n".join(missing)
