"""The documentation holds together: the site (mkdocs.yml, docs/) builds strictly with every link and anchor
checked, README.md's links reach files and headings that exist, and every `science.md#anchor` that code,
scripts or docs cite names a heading of that page (anchors as GitHub derives them from a heading)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCIENCE = ROOT / "docs" / "science.md"


def anchor(heading: str) -> str:
    """GitHub's anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def cited_anchors() -> list[tuple[str, str]]:
    """(file:line, anchor) for every `science.md#…` in the tracked text of the project."""
    found = []
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "deepres").rglob("*.py"),
             *(ROOT / "scripts").rglob("*.py")]
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


needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="mkdocs and mkdocs-material are not installed (the `dev` extra installs them)")


def build_site(root: Path, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(out)], capture_output=True, text=True, env=env, cwd=root)


@needs_mkdocs
def test_site_builds_strictly_with_links_and_anchors_checked(tmp_path):
    built = build_site(ROOT, tmp_path / "site")
    assert built.returncode == 0, built.stderr[-4000:]
    assert "WARNING" not in built.stderr, built.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()
    for page in ("training", "configuration", "models", "memory", "scaling", "data", "slurm",
                 "dashboards", "science", "RESULTS", "scripts"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page


@needs_mkdocs
def test_a_broken_anchor_fails_the_build(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    index = copy / "docs" / "index.md"
    index.write_text(index.read_text() + "\n[gone](science.md#no-such-heading)\n")
    built = build_site(copy, tmp_path / "site")
    assert built.returncode != 0 and "no-such-heading" in built.stderr


def readme_links() -> list[tuple[str, str]]:
    text = re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(), flags=re.S)
    return [(target, anchor) for target, anchor in re.findall(r"\]\(([^)#\s]+)(?:#([\w\-]+))?\)", text)
            if "://" not in target]


def test_readme_links_reach_files_and_headings():
    links = readme_links()
    assert len(links) >= 10
    broken = []
    for target, name in links:
        path = ROOT / target
        if not path.exists():
            broken.append(target)
        elif name and path.suffix == ".md":
            headings = {anchor(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}
            if name not in headings:
                broken.append(f"{target}#{name}")
    assert not broken, f"README.md links to what does not exist: {broken}"
