"""The docs name only what exists: every relative link in README.md, docs/ and bench/ resolves to
a file of the repository (and its #anchor to a heading there), every repository path a doc or
module docstring names in backticks exists, and nothing points outside the repository.

A reader who follows a link to a page that is not there, or to a design note that only one
machine has, is lost; these checks fail the build instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

DOCS: list[Path] = sorted(
    [PROJECT_ROOT / "README.md", *(PROJECT_ROOT / "docs").glob("*.md"), *(PROJECT_ROOT / "bench").glob("*.md")]
)
SOURCES: list[Path] = sorted((PROJECT_ROOT / "sluice").rglob("*.py"))
LINK = re.compile(r"\]\(([^)\s]+)\)")
# A path inside the repository, named in backticks or bare: docs/x.md, sluice/a/b.py, examples/c.yaml ...
REPO_PATH = re.compile(r"(?<![\w./-])((?:docs|sluice|tests|examples|bench)/[\w./-]*\w\.(?:md|py|yaml|json))")
# Places that are not in the repository: the shared design folder, notes kept elsewhere.
OUTSIDE = re.compile(r"(\.\./shared|/work/shared|\bDESIGN\.md\b|\bnotes/[\w.-]+\.md\b)")


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to dashes."""
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", markdown, re.MULTILINE)
    }


def _name(path: Path) -> str:
    return str(path.relative_to(PROJECT_ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_every_relative_link_resolves(doc: Path) -> None:
    text = doc.read_text()
    broken: list[str] = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.is_relative_to(PROJECT_ROOT):
            broken.append(f"{target} (outside the repository)")
        elif not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
            broken.append(f"{target} (no heading #{anchor} in {_name(file)})")
    assert not broken, f"{_name(doc)}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCS + SOURCES, ids=_name)
def test_named_repository_files_exist_and_nothing_points_outside(doc: Path) -> None:
    text = doc.read_text()
    missing = sorted({p for p in REPO_PATH.findall(text) if not (PROJECT_ROOT / p).exists()})
    outside = sorted(set(OUTSIDE.findall(text)))
    assert not missing, f"{_name(doc)} names files that do not exist: {', '.join(missing)}"
    assert not outside, f"{_name(doc)} points outside the repository: {', '.join(outside)}"
