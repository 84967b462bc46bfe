"""The project's own docs hold together: every cited path exists, no tracker numbers, every results table
says when, where and how it was measured. Offline and fast: plain file reads and regular expressions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# A repository-relative path: one of these top-level folders, then path characters. The look-behind skips
# paths inside longer ones (outputs/demo/..., saliency_lab/configs/...).
PATH = re.compile(r"(?<![\w./$-])((?:docs|configs|assets|benchmarks|experiments|tests|src)/[\w./-]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
ISSUE = re.compile(r"\b[Ii]ssues?\s*#?\d+|#\d+\s+issue")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
COMMIT = re.compile(r"\bcommit `?[0-9a-f]{7,40}\b")


def _files(patterns: list[str]) -> list[Path]:
    found: set[Path] = set()
    for pattern in patterns:
        found.update(p for p in ROOT.glob(pattern) if p.is_file())
    return sorted(found)


CITING = _files(["README.md", "Makefile", "pyproject.toml", "docs/**/*.md", "src/**/*.py", "src/**/*.yaml",
                 "benchmarks/*.py", "experiments/*.py"])
NO_ISSUES = _files(["README.md", "docs/**/*.md", "src/**/*", "tests/*.py", "benchmarks/*.py", "experiments/*.py"])
RESULTS = sorted((DOCS / "results").glob("*.md"))


def _placeholder(path: str, after: str) -> bool:
    """$VARS, <names> and stand-ins such as X.yaml or EXPERIMENT.yaml."""
    stem = Path(path).name.split(".")[0]
    return any(c in path + after for c in "$<>") or stem.isupper()


def _exists(path: str, after: str) -> bool:
    if after in ("*", "{"):  # a glob: the folder before its first wildcard must exist
        path = path.rsplit("/", 1)[0]
    return (ROOT / path).exists()


def _dangling(source: Path) -> list[str]:
    text = source.read_text(encoding="utf-8", errors="replace")
    missing = []
    for match in PATH.finditer(text):
        cited = match.group(1).rstrip(".,;:")
        after = text[match.end(1):match.end(1) + 1]
        if cited and not _placeholder(cited, after) and not _exists(cited, after):
            missing.append(cited)
    if source.suffix == ".md" and DOCS in source.parents:
        for target in LINK.findall(text):
            target = target.split("#")[0]
            if target and "://" not in target and not target.startswith("mailto:"):
                if not (source.parent / target).exists():
                    missing.append(f"link {target}")
    for path, name in TEST_REF.findall(text):
        test_file = ROOT / path
        if not test_file.exists() or not re.search(rf"def {name}\b", test_file.read_text(encoding="utf-8")):
            missing.append(f"{path}::{name}")
    return missing


def test_cited_paths_exist():
    dangling = {str(f.relative_to(ROOT)): d for f in CITING if (d := _dangling(f))}
    assert not dangling, f"cited paths that do not exist: {dangling}"


def test_no_tracker_numbers():
    hits = []
    for path in NO_ISSUES:
        if path.resolve() == Path(__file__).resolve() or path.suffix in {".pt", ".ckpt", ".png", ".pyc"}:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        hits += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in ISSUE.finditer(text)]
    assert not hits, hits


def _table_starts(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|"))]


@pytest.mark.parametrize("page", RESULTS, ids=lambda p: p.name)
def test_results_tables_have_a_header(page: Path):
    lines = page.read_text(encoding="utf-8").splitlines()
    bad = []
    for start in _table_starts(lines):
        above = []
        for line in reversed(lines[max(0, start - 15):start]):
            if line.startswith("|"):
                break
            above.append(line)
        header = "\n".join(above)
        if not (DATE.search(header) and COMMIT.search(header) and "machine" in header.lower()
                and "command" in header.lower()):
            bad.append(f"line {start + 1}: {lines[start][:60]}")
    assert not bad, f"{page.name}: tables without date, commit, machine and command above them: {bad}"


def test_results_pages_exist():
    names = {p.name for p in RESULTS}
    assert {"README.md", "demo.md", "claims.md", "table1.md", "predictor.md", "speed.md",
            "explain_export.md"} <= names
