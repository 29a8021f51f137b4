"""configs/README.md, the per-config results index, stays complete and honest: every YAML under
configs/ has exactly one row, every status is one of the allowed verdicts, and every section it
cites is really in BENCHMARKS.md (or MODEL_CARD.md). Pure text checks: no torch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
INDEX = CONFIGS / "README.md"
HEADER = ["config", "what it is", "status", "result"]
STATUSES = {"default recipe", "shipped model", "reference", "measured, not adopted", "rejected"}
CITED_DOCS = ("BENCHMARKS.md", "MODEL_CARD.md")
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")


def cells(line: str) -> list[str]:
    """The cells of one Markdown table row (no cell of the index contains a '|')."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def index_rows(text: str) -> list[dict[str, str]]:
    """Every body row of every table whose header is HEADER, as {column: cell}."""
    rows: list[dict[str, str]] = []
    in_table = False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        row = cells(line)
        if row == HEADER:
            in_table = True
        elif in_table and not set("".join(row)) <= set("-: "):
            assert len(row) == len(HEADER), f"row with {len(row)} cells, expected {len(HEADER)}: {line}"
            rows.append(dict(zip(HEADER, row, strict=True)))
    return rows


def yaml_configs() -> list[str]:
    """Every configs/**/*.yaml, as a path relative to configs/ (what the index links to)."""
    return sorted(path.relative_to(CONFIGS).as_posix() for path in CONFIGS.rglob("*.yaml"))


def unlisted_and_repeated(configs: list[str], targets: list[str]) -> tuple[list[str], list[str]]:
    """Configs with no link in the index, and configs linked more than once."""
    unlisted = [name for name in configs if targets.count(name) == 0]
    repeated = sorted({name for name in targets if targets.count(name) > 1})
    return unlisted, repeated


@pytest.fixture(scope="module")
def text() -> str:
    return INDEX.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def rows(text: str) -> list[dict[str, str]]:
    found = index_rows(text)
    assert found, "configs/README.md has no table with the columns " + ", ".join(HEADER)
    return found


def test_every_yaml_listed_exactly_once(text: str, rows: list[dict[str, str]]) -> None:
    configs = yaml_configs()
    assert configs, "no configs/**/*.yaml found"
    targets = [target for _, target in LINK.findall(text) if target.endswith((".yaml", ".yml"))]
    unlisted, repeated = unlisted_and_repeated(configs, targets)
    assert not unlisted, f"configs without a row in configs/README.md: {unlisted}"
    assert not repeated, f"configs linked more than once in configs/README.md: {repeated}"
    # The helper really catches a YAML added without a row.
    assert unlisted_and_repeated([*configs, "cpu/new-config.yaml"], targets)[0] == ["cpu/new-config.yaml"]
    # Each row's config cell is one link, named after the file it points to.
    for row in rows:
        links = LINK.findall(row["config"])
        assert len(links) == 1, f"config cell is not exactly one link: {row['config']}"
        name, target = links[0]
        assert name == Path(target).name, f"link text {name!r} is not the file name of {target!r}"
    assert len(rows) == len(configs), f"{len(rows)} rows for {len(configs)} YAML files"


def test_every_link_target_exists(text: str) -> None:
    missing = [target for _, target in LINK.findall(text)
               if "://" not in target and not (CONFIGS / target.split("#")[0]).exists()]
    assert not missing, f"links in configs/README.md to files that do not exist: {missing}"


def test_status_is_an_allowed_verdict(rows: list[dict[str, str]]) -> None:
    bad = {row["config"]: row["status"] for row in rows if row["status"] not in STATUSES}
    assert not bad, f"status not in {sorted(STATUSES)}: {bad}"


def test_result_cites_real_sections(rows: list[dict[str, str]]) -> None:
    documents = {doc: (REPO / doc).read_text(encoding="utf-8") for doc in CITED_DOCS}
    for row in rows:
        result = row["result"]
        assert result, f"empty result for {row['config']}"
        for doc, document in documents.items():
            for title in re.findall(re.escape(doc) + r', "([^"]+)"', result):
                assert title in document, f"{row['config']}: section {title!r} is not in {doc}"


def test_no_stale_candidate_header(rows: list[dict[str, str]]) -> None:
    """A config the index calls measured or rejected must not open with "CANDIDATE"."""
    stale = []
    for row in rows:
        if row["status"] not in {"measured, not adopted", "rejected"}:
            continue
        target = LINK.findall(row["config"])[0][1]
        first = (CONFIGS / target).read_text(encoding="utf-8").splitlines()[0]
        if re.match(r"#\s*candidate", first, re.IGNORECASE):
            stale.append(target)
    assert not stale, f"first header line still says CANDIDATE, the index says otherwise: {stale}"
