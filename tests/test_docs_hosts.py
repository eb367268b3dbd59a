"""docs/hosts.md is the host reference the code cites: every cited section must exist, and nothing may cite a host
reference outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOSTS_DOC = ROOT / "docs" / "hosts.md"

# Where code and tests cite the document, and which of those are the product (shipped to users).
CITING = ("lib_optim", "scripts", "preload.py", "install.py", "tools", "tests")
PRODUCT = ("lib_optim", "scripts", "preload.py", "install.py", "tools")
TEXT_SUFFIXES = {".py", ".md", ".sh", ".js", ".ini", ".toml", ".txt"}

HEADING_RE = re.compile(r"^(#{2,3}) (\d+)(?:\.(\d+))?(\.?) (\S.*)$")
# "docs/hosts.md §3.2", "docs/hosts.md §1.3, §6", "docs/hosts.md §2.1 and §2.4", also wrapped onto a comment line
CITATION_RE = re.compile(r"docs/hosts\.md((?:[\s,#]*(?:and\s+)?§\d+(?:\.\d+)?)+)")
SECTION_RE = re.compile(r"§(\d+(?:\.\d+)?)")
# Any spelling of a hosts.md path; only the exact "docs/hosts.md" is this repository's file.
ANY_HOSTS_MD_RE = re.compile(r"[\w./\\-]*hosts\.md", re.IGNORECASE)


def sections(text: str) -> dict[str, str]:
    """Section id ("3" for "## 3. Attention", "3.2" for "### 3.2 …") → title, in document order."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = HEADING_RE.match(line)
        if match is None:
            continue
        hashes, major, minor, dot, title = match.groups()
        if len(hashes) == 2:
            assert minor is None and dot == ".", f"top-level heading must read '## N. Title': {line!r}"
            key = major
        else:
            assert minor is not None and dot == "", f"subsection heading must read '### N.M Title': {line!r}"
            key = f"{major}.{minor}"
        assert key not in found, f"docs/hosts.md: section §{key} appears twice"
        found[key] = title
    return found


def cited_sections(text: str) -> list[str]:
    return [section for match in CITATION_RE.finditer(text) for section in SECTION_RE.findall(match.group(1))]


def text_files(*roots: str) -> list[Path]:
    files: list[Path] = []
    for name in roots:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts
            )
    return files


def test_sections_are_numbered_in_order_under_their_parent():
    keys = list(sections(HOSTS_DOC.read_text(encoding="utf-8")))
    assert keys, "docs/hosts.md has no numbered sections"
    current_major = None
    for key in keys:
        major, _, minor = key.partition(".")
        if not minor:
            current_major = major
        else:
            assert major == current_major, f"§{key} is not under '## {major}.'"


def test_cross_references_inside_the_document_resolve():
    text = HOSTS_DOC.read_text(encoding="utf-8")
    known = sections(text)
    missing = sorted({ref for ref in SECTION_RE.findall(text) if ref not in known})
    assert missing == [], f"docs/hosts.md refers to sections it does not have: {missing}"


def test_every_cited_section_exists():
    known = sections(HOSTS_DOC.read_text(encoding="utf-8"))
    cited: dict[str, list[str]] = {}
    for path in text_files(*CITING):
        if path == Path(__file__).resolve():
            continue  # this file's examples are not citations
        for section in cited_sections(path.read_text(encoding="utf-8", errors="replace")):
            cited.setdefault(section, []).append(str(path.relative_to(ROOT)))
    assert cited, "no 'docs/hosts.md §N' citation found at all: the pattern or the tree changed"
    missing = {section: files for section, files in cited.items() if section not in known}
    assert missing == {}, f"cited sections missing from docs/hosts.md: {missing}"


def test_citation_pattern_reads_lists_and_wrapped_comments():
    text = "see docs/hosts.md §1.3, §6 and docs/hosts.md\n    # §7.3; not docs/hosts.md (no section)"
    assert cited_sections(text) == ["1.3", "6", "7.3"]


def hosts_md_mentions_outside_the_repository(text: str) -> list[str]:
    return [m.group(0) for m in ANY_HOSTS_MD_RE.finditer(text) if m.group(0) != "docs/hosts.md"]


def test_outside_reference_detector():
    assert hosts_md_mentions_outside_the_repository("(HOSTS.md §2.1) ../notes/HOSTS.md docs/HOSTS.md") == [
        "HOSTS.md",
        "../notes/HOSTS.md",
        "docs/HOSTS.md",
    ]
    assert hosts_md_mentions_outside_the_repository("docs/hosts.md §2.1") == []


def test_product_cites_no_host_reference_outside_the_repository():
    offenders = {
        str(path.relative_to(ROOT)): mentions
        for path in text_files(*PRODUCT)
        if (mentions := hosts_md_mentions_outside_the_repository(path.read_text(encoding="utf-8", errors="replace")))
    }
    assert offenders == {}
