"""The README's Python management snippet works as written, on a fresh database."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from budget_middleware import BudgetSettings, get_engine

README = Path(__file__).resolve().parent.parent / "README.md"


def management_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    found = [b for b in blocks if "m.create_customer(" in b]
    assert len(found) == 1, "the README has one Python management snippet"
    return found[0]


def test_the_readme_management_snippet_works_on_a_fresh_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the default store, ./budget_middleware.db, does not exist yet
    assert not (tmp_path / "budget_middleware.db").exists()
    exec(compile(management_snippet(), "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("sk-bm-")
    m = get_engine(BudgetSettings()).manager
    key_id = m.find_virtual_key(printed)
    assert key_id is not None and m.get_virtual_key(key_id).name == "alice"
    assert [c.name for c in m.list_customers()] == ["acme"]
    assert [p.provider for p in m.list_providers()] == ["openai"]
    assert [t.tag for t in m.list_tags()] == ["product:chat"]


def test_the_management_api_creates_the_schema_of_a_fresh_database(tmp_path: Path) -> None:
    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/fresh.db")
    m = get_engine(settings).manager  # the engine has not started: nothing created the tables
    assert m.list_customers() == []
    assert m.create_team(name="research").name == "research"


def test_no_sentence_of_the_readme_is_written_twice() -> None:
    # An edit that pastes a new version of a passage beside the old one leaves the README saying
    # both (the service tiers' paragraph once said its last three sentences twice, mid-sentence).
    prose = re.sub(r"```.*?```", "", README.read_text(encoding="utf-8"), flags=re.S)
    sentences = [s for s in re.split(r"(?<=[.;:])\s+", re.sub(r"\s+", " ", prose)) if len(s) >= 60]
    repeated = sorted({s for s in sentences if sentences.count(s) > 1})
    assert repeated == []
