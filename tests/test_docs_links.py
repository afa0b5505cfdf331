"""Every relative link in README.md and docs/*.md points to a file that exists, and every
#anchor to a heading of that file (GitHub's heading ids)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text):
    """The text outside fenced code blocks and inline code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path):
    """GitHub's ids of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    seen = {}
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", prose(path.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        yield slug if count == 0 else f"{slug}-{count}"


def links(path):
    for target in LINK.findall(prose(path.read_text())):
        if not re.match(r"[a-z]+:", target):
            yield target


def test_the_docs_have_pages_and_links():
    names = {p.name for p in PAGES}
    assert {"guide.md", "training.md", "evaluation.md", "reliability.md", "architecture.md",
            "algorithms.md"} <= names
    readme = set(links(ROOT / "README.md"))
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    for target in links(page):
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        assert resolved.exists(), f"{page.name}: {target} points to a missing file"
        if anchor and resolved.suffix == ".md":
            assert anchor in set(anchors(resolved)), f"{page.name}: {target} names no heading"
