"""The specification in docs/algorithms.md is what code and tests cite: every cited anchor must exist there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "algorithms.md"
CITATION = re.compile(r"docs/algorithms\.md#([a-z0-9-]+)")


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    headings = re.findall(r"^#{1,6} (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_cited_anchor_of_the_specification_exists():
    known = anchors(SPEC.read_text(encoding="utf-8"))
    assert {"notation", "lora", "ffa-lora", "rolora", "deer", "deer-noise-regulator", "la-lora"} <= known
    assert {"unit-one-example", "unit-one-client", "neighbouring-relation", "what-the-guarantee-assumes"} <= known
    cited: dict[str, set[str]] = {}
    for path in ROOT.rglob("*"):
        if path.suffix not in (".py", ".md") or {".git", ".venv", "__pycache__"} & set(path.parts):
            continue
        for anchor in CITATION.findall(path.read_text(encoding="utf-8", errors="replace")):
            cited.setdefault(anchor, set()).add(str(path.relative_to(ROOT)))
    assert cited, "nothing cites docs/algorithms.md"
    missing = {anchor: sorted(paths) for anchor, paths in cited.items() if anchor not in known}
    assert not missing, f"anchors cited but not headings of docs/algorithms.md: {missing}"
    internal = set(re.findall(r"\]\(#([a-z0-9-]+)\)", SPEC.read_text(encoding="utf-8")))
    assert internal <= known, f"links inside docs/algorithms.md to missing headings: {internal - known}"
