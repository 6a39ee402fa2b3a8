"""The front page and docs/ link only to what exists: every relative link of README.md and
docs/*.md names a file of the repository, and every #anchor a heading of its target (GitHub's
anchor rule: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats).

docs/retrieval.md may be missing in a branch where it is not written yet; the lead's merge
brings it, and then its links are checked like the others."""
import glob
import os
import re
from typing import Dict, List, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
PENDING = {os.path.join(ROOT, "docs", "retrieval.md")}  # written by another branch


def _outside_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading's text."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(path: str) -> Set[str]:
    seen: Dict[str, int] = {}
    found = set()
    text = re.sub(r"^```.*?^```", "", open(path, encoding="utf-8").read(), flags=re.S | re.M)
    for match in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M):
        base = anchor(match.group(1))
        n = seen.get(base, 0)
        found.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return found


def links_of(path: str) -> List[Tuple[str, str]]:
    """(target file, anchor or '') of every relative link of ``path``."""
    out = []
    for target in LINK.findall(_outside_code(open(path, encoding="utf-8").read())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here (no network in CI)
        file_part, _, frag = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        out.append((resolved, frag))
    return out


def test_anchor_rule():
    assert anchor("The synthetic LbA demo (`make demo`)") == "the-synthetic-lba-demo-make-demo"
    assert anchor("Reproducible numbers (CPU) and determinism (GPU)") == "reproducible-numbers-cpu-and-determinism-gpu"


def test_the_pages_exist():
    names = {os.path.basename(p) for p in PAGES}
    assert {"README.md", "methods.md", "benchmarks.md", "gpu.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[os.path.relpath(p, ROOT) for p in PAGES])
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target, frag in links_of(page):
        if not os.path.exists(target):
            if target not in PENDING:
                broken.append(f"{os.path.relpath(target, ROOT)} (missing file)")
            continue
        if frag and (not target.endswith(".md") or frag not in anchors_of(target)):
            broken.append(f"{os.path.relpath(target, ROOT)}#{frag} (no such heading)")
    assert not broken, f"{os.path.relpath(page, ROOT)}: broken links: {broken}"


def test_front_page_is_short_and_starts_with_the_quick_start():
    text = open(PAGES[0], encoding="utf-8").read()
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings[:3] == ["Quick start", "Drop CMAlign into existing LbA-style code", "What is in the library"]
    assert len(text.splitlines()) < 250
