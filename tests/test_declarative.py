"""BUDGET_CONFIG_FILE (SPEC §10): declared entities are created, updated when their entry
changes, and left alone (with their manual edits) when it does not."""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from budget_middleware import BudgetSettings
from budget_middleware.manage.config_file import (
    ConfigFileError,
    check_config_file,
    load_config_file,
)
from budget_middleware.manage.manager import BudgetManager
from budget_middleware.store.database import Store

CONFIG = """
customers:
  - name: acme
    budgets: [{max_limit: 100, reset_duration: 1M}]
teams:
  - name: research
    customer: acme
    budget: {max_limit: 10, reset_duration: 1d}
virtual_keys:
  - name: alice
    team: research
    value: ${ALICE_KEY}
    budgets: [{max_limit: 1, reset_duration: 1d}]
providers:
  - provider: openai
    rate_limit: {request_max_limit: 100, request_reset_duration: 1m}
model_configs:
  - model_name: gpt-4o
    provider: openai
    budgets: [{max_limit: 5, reset_duration: 1w}]
tags:
  - tag: product:chat
    budgets: [{max_limit: 2}]
"""


def _start(tmp_path: Path, text: str, name: str = "budget.yaml") -> BudgetManager:
    path = tmp_path / name
    path.write_text(text)
    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db", config_file=path)
    store = Store(settings.database_url)
    store.create_schema()
    load_config_file(store, settings)
    return BudgetManager(store, settings)


def test_declared_entities_are_created_on_first_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALICE_KEY", "sk-bm-alice-from-env")
    m = _start(tmp_path, CONFIG)
    team = m.list_teams()[0]
    assert team.customer_id == m.list_customers()[0].id and team.source == "config"
    key_id = m.find_virtual_key("sk-bm-alice-from-env")
    assert key_id is not None and m.get_virtual_key(key_id).team_id == team.id
    paths = {b.user_path: b.source for b in m.list_budgets()}
    assert paths == {"/acme": "config", "/acme/research": "config",
                     "/acme/research/alice": "config", "/model/openai/gpt-4o": "config",
                     "/tag/product:chat": "config"}  # fmt: skip
    assert m.list_providers()[0].rate_limit is not None


def test_an_edited_entry_is_applied_on_restart_and_keeps_usage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALICE_KEY", "sk-bm-alice-from-env")
    m = _start(tmp_path, CONFIG)
    before = m.list_budgets(owner_type="team")[0]
    m = _start(tmp_path, CONFIG.replace("max_limit: 10,", "max_limit: 20,"))
    after = m.list_budgets(owner_type="team")[0]
    assert after.id == before.id and after.max_limit == 20.0


def test_a_manual_edit_survives_a_restart_while_the_entry_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALICE_KEY", "sk-bm-alice-from-env")
    m = _start(tmp_path, CONFIG)
    customer = m.list_customers()[0]
    m.update_customer(customer.id, budgets=[{"max_limit": 500, "reset_duration": "1M"}])
    m = _start(tmp_path, CONFIG)
    assert m.get_customer(customer.id).budgets[0].max_limit == 500.0
    m = _start(tmp_path, CONFIG.replace("max_limit: 100,", "max_limit: 150,"))
    assert m.get_customer(customer.id).budgets[0].max_limit == 150.0


def test_json_files_work_too(tmp_path: Path) -> None:
    text = json.dumps({"customers": [{"name": "acme"}], "tags": [{"tag": "t"}]})
    m = _start(tmp_path, text, "budget.json")
    assert [c.name for c in m.list_customers()] == ["acme"]


def test_bad_files_fail_loudly_naming_the_variable_and_the_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigFileError, match=r"BUDGET_CONFIG_FILE.*teams\[0\] \(research\)"):
        _start(tmp_path, "teams:\n  - name: research\n    customer: nobody\n")
    with pytest.raises(ConfigFileError, match=r"customers\[0\].*max_limit"):
        _start(tmp_path, "customers:\n  - name: a\n    budgets: [{max_limit: -1}]\n")
    monkeypatch.delenv("MISSING_KEY", raising=False)
    with pytest.raises(ConfigFileError, match="MISSING_KEY"):
        _start(tmp_path, "virtual_keys:\n  - name: k\n    value: ${MISSING_KEY}\n")
    with pytest.raises(ConfigFileError, match="unknown section"):
        _start(tmp_path, "users: []\n")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (  # a reference to nothing, after a valid entry
            "customers:\n  - name: good\nteams:\n  - name: t\n    customer: nobody\n",
            r"teams\[0\] \(t\): customer 'nobody' is neither a name nor an id",
        ),
        (  # a key value another key holds
            "customers:\n  - name: good\n"
            "virtual_keys:\n  - name: bob\n    value: sk-bm-held-by-alice-0001\n",
            r"virtual_keys\[0\] \(bob\): this key value is already in use",
        ),
        (  # one name twice: the second would overwrite the first
            "customers:\n  - name: good\n  - name: acme\n    budgets: [{max_limit: 10}]\n"
            "  - name: acme\n    budgets: [{max_limit: 20}]\n",
            r"customers\[2\] \(acme\): the same customer as customers\[1\] \(acme\)",
        ),
        (  # two budgets of one duration
            "customers:\n  - name: good\n"
            "teams:\n  - name: t\n    budgets: [{max_limit: 1, reset_duration: 1d},"
            " {max_limit: 2, reset_duration: 1d}]\n",
            r"teams\[0\] \(t\): two budgets of one team have reset_duration 1d",
        ),
        (  # a customer by name and another by id: the name won, the id was dropped unsaid
            "customers:\n  - name: good\n  - name: other\n"
            "teams:\n  - name: t\n    customer: good\n    customer_id: other\n",
            r"teams\[0\] \(t\): give 'customer' \(a name or an id\) or 'customer_id', not both",
        ),
    ],
    ids=[
        "unknown-reference",
        "key-value-in-use",
        "duplicate-name",
        "duplicate-duration",
        "name-and-id",
    ],
)
def test_an_invalid_file_writes_nothing(tmp_path: Path, text: str, error: str) -> None:
    """SPEC §3, §10: an invalid file fails naming the entry, and nothing of it is written (a
    valid entry before an invalid one used to be; a name twice was applied twice, the last
    winning, where the API answers 409)."""
    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db")
    store = Store(settings.database_url)
    store.create_schema()
    manager = BudgetManager(store, settings)
    manager.create_virtual_key(name="alice", value="sk-bm-held-by-alice-0001")
    with pytest.raises(ConfigFileError, match=error) as raised:
        _start(tmp_path, text)
    print("refused:", raised.value)
    assert [c.name for c in manager.list_customers()] == []
    assert [t.name for t in manager.list_teams()] == []
    assert [k.name for k in manager.list_virtual_keys()] == ["alice"]


def test_workers_starting_together_apply_the_file_one_after_the_other(store_url: str) -> None:
    """Workers that start at once each apply the file in one transaction: one at a time (the
    second found the first's rows uncommitted, then collided with them: an IntegrityError on
    PostgreSQL, and that worker's start failed). Each entry exists once."""
    settings = BudgetSettings(database_url=store_url)
    reader = Store(store_url)
    reader.create_schema()
    path = Path(tempfile.mkdtemp()) / "budget.yaml"
    path.write_text(
        "customers:\n" + "".join(f"  - name: c{i}\n" for i in range(40))
        + "teams:\n" + "".join(f"  - {{name: t{i}, customer: c{i}}}\n" for i in range(40))
    )  # fmt: skip
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker() -> None:
        store = Store(store_url)
        try:
            start.wait()
            load_config_file(store, settings.model_copy(update={"config_file": path}))
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.dispose()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    manager = BudgetManager(reader, settings)
    customers, teams = manager.list_customers(), manager.list_teams()
    reader.dispose()
    print(f"4 workers at once: errors {errors}, {len(customers)} customers")
    assert errors == []
    assert sorted(c.name for c in customers) == sorted(f"c{i}" for i in range(40))
    assert len(teams) == 40


@pytest.mark.parametrize(
    "text",
    [
        "customers: [{name: good}]\nteams: [{name: t, customer_id: nope}]\n",
        "customers: [{name: good}]\nvirtual_keys: [{name: k, team_id: nope}]\n",
        "customers: [{name: good}]\nvirtual_keys: [{name: k, provider_configs: "
        "[{provider: openai}, {provider: openai}]}]\n",
        "customers: [{name: good}]\n"
        "model_configs: [{model_name: gpt-4o, scope: virtual_key, scope_id: nope}]\n",
    ],
    ids=["customer-id", "team-id", "provider-twice", "scope-id"],
)
def test_a_file_that_fails_while_being_applied_writes_nothing(store_url: str, text: str) -> None:
    """What only the writes find wrong (a reference by id to nothing, one provider configured
    twice on a key): the file is applied in one transaction, rolled back (the entries before
    the wrong one were written, on start-up, `POST /config/apply` and `config apply`)."""
    settings = BudgetSettings(database_url=store_url, config_file=None)
    store = Store(store_url)
    store.create_schema()
    manager = BudgetManager(store, settings)
    manager.create_virtual_key(name="alice")
    path = Path(tempfile.mkdtemp()) / "budget.yaml"
    path.write_text(text)
    with pytest.raises(ConfigFileError) as raised:
        load_config_file(store, settings.model_copy(update={"config_file": path}))
    print("refused:", raised.value)
    assert [c.name for c in manager.list_customers()] == []
    assert [t.name for t in manager.list_teams()] == []
    assert [k.name for k in manager.list_virtual_keys()] == ["alice"]
    # and a valid file is applied whole, through the same transaction
    path.write_text(text.split("\n")[0] + "\nteams: [{name: t, customer: good}]\n")
    load_config_file(store, settings.model_copy(update={"config_file": path}))
    assert [(t.name, t.customer_id) for t in manager.list_teams()] == [
        ("t", manager.list_customers()[0].id)
    ]
    store.dispose()


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        (
            "budget.yaml",
            "customers:\n  - name: acme\ncustomers:\n  - name: globex\n",
            r"(?s)invalid YAML: while reading a mapping.*'customers' is given twice.*line 3",
        ),
        (
            "budget.yaml",
            "customers:\n  - name: acme\n    name: globex\n",
            r"(?s)the key 'name' is given twice.*line 3",
        ),
        (
            "budget.json",
            '{"customers": [{"name": "acme"}], "customers": [{"name": "globex"}]}',
            r"invalid JSON: the key 'customers' is given twice in one object",
        ),
    ],
    ids=["yaml-section", "yaml-field", "json-section"],
)
def test_a_key_given_twice_is_refused_not_silently_dropped(
    tmp_path: Path, name: str, text: str, error: str
) -> None:
    """YAML and JSON parsers keep the last of a key given twice: a second `customers:` dropped
    the first section, and `config check` called the file valid."""
    with pytest.raises(ConfigFileError, match=error) as raised:
        _start(tmp_path, text, name)
    print("refused:", raised.value)


SECRET = "sk-bm-literal-secret-0001"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (f'virtual_keys:\n  - name: alice\n    value: "{SECRET}\n', "line 3, column 12"),
        (f"virtual_keys:\n  - name: alice\n   value: {SECRET}\n", "line 3, column 4"),
        (f"virtual_keys:\n  - name: alice\n    value: x\n    value: {SECRET}\n",
         "line 4, column 5"),
        (f"virtual_keys:\n  - {{name: alice, value: {SECRET}, team: [t}}\n",
         "line 2, column 61"),
    ],
    ids=["unclosed-quote", "bad-indent", "field-twice", "flow"],
)  # fmt: skip
def test_a_yaml_error_names_the_line_but_never_quotes_a_key_value(
    tmp_path: Path, text: str, line: str
) -> None:
    """SPEC §8: a virtual key never appears in an error. PyYAML quotes the lines around its
    error, and a literal key `value` stood on them: in the start-up log, `config check`'s output
    and the answer of `POST /config/apply` (which any admin client may log)."""
    from budget_middleware.manage.config_file import apply_config_text, check_config_file

    with pytest.raises(ConfigFileError) as at_start:
        _start(tmp_path, text)
    with pytest.raises(ConfigFileError) as checked:
        check_config_file(tmp_path / "budget.yaml")
    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db")
    store = Store(settings.database_url)
    with pytest.raises(ConfigFileError) as sent:
        apply_config_text(store, settings, text, "yaml")
    store.dispose()
    for raised in (at_start, checked, sent):
        message = str(raised.value)
        print("refused:", message.replace("\n", " | "))
        assert "invalid YAML" in message and line in message
        assert "literal-secret" not in message  # not even the part of a line PyYAML shows


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('customers:\n  - name: "a\\0b"\n',
         r"customers\[0\] \(.*\): name: must not contain U\+0000"),
        ('tags:\n  - tag: "t\\0"\n', r"tags\[0\] \(.*\): tag: must not contain U\+0000"),
        ('virtual_keys:\n  - name: k\n    value: "sk-bm-abcdefgh\\0"\n',
         r"virtual_keys\[0\] \(k\): value: must not contain U\+0000"),
        ('virtual_keys:\n  - name: k\n    tags: [ok, "x\\0"]\n',
         r"virtual_keys\[0\] \(k\): tags.1: must not contain U\+0000"),
    ],
    ids=["customer-name", "tag", "key-value", "key-tag"],
)  # fmt: skip
def test_a_nul_character_in_an_entry_is_refused_as_the_api_refuses_it(
    tmp_path: Path, text: str, error: str
) -> None:
    """SPEC §10: each entry is a create body of §9, and the admin API refuses U+0000 in a body
    (PostgreSQL cannot store it). A file, and `POST /config/apply`, stored it on SQLite: a name,
    a tag, a key's value and tags the API itself would refuse with 422."""
    from budget_middleware.manage.config_file import apply_config_text

    with pytest.raises(ConfigFileError, match=error) as at_start:
        _start(tmp_path, text)
    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db")
    store = Store(settings.database_url)
    with pytest.raises(ConfigFileError, match=error) as sent:
        apply_config_text(store, settings, text, "yaml")
    print("refused:", repr(str(at_start.value)), "|", repr(str(sent.value)))
    manager = BudgetManager(store, settings)
    stored = manager.list_customers() + manager.list_tags() + manager.list_virtual_keys()
    assert stored == []
    store.dispose()


def test_an_anchored_mapping_with_its_own_merge_is_merged_again(tmp_path: Path) -> None:
    """An anchor that overrides a merged key, merged again through an alias: PyYAML flattens the
    anchored mapping in place first, so a check made when mappings are built saw its keys twice
    (refused as given twice); keys are now checked as each mapping is read."""
    text = (
        "customers:\n  - name: acme\n    rate_limit: &rl\n"
        "      <<: {request_max_limit: 100, request_reset_duration: 1m}\n"
        "      request_max_limit: 50\n"
        "teams:\n  - <<: {name: research, customer: acme}\n    rate_limit: *rl\n"
    )
    manager = _start(tmp_path, text)
    (team,) = manager.list_teams()
    (customer,) = manager.list_customers()
    for owner in (team, customer):
        assert owner.rate_limit is not None
        limits = (owner.rate_limit.request_max_limit, owner.rate_limit.request_reset_duration)
        assert limits == (50, "1m")


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    """A merged mapping's keys are defaults, meant to be overridden: not a key given twice."""
    text = (
        "customers:\n  - name: acme\n    budgets:\n      - &d {max_limit: 5, reset_duration: 1d}\n"
        "teams:\n  - name: t\n    customer: acme\n    budgets:\n      - {<<: *d, max_limit: 7}\n"
    )
    manager = _start(tmp_path, text)
    (team,) = manager.list_teams()
    assert [(b.max_limit, b.reset_duration) for b in team.budgets] == [(7, "1d")]


def test_a_file_in_utf_16_is_read_and_one_in_another_encoding_is_named(tmp_path: Path) -> None:
    """Windows editors and PowerShell's `>` write UTF-16 with a byte-order mark: read. Bytes
    that are no UTF-8 (latin-1, say) fail start-up naming the file and the encoding (a bare
    UnicodeDecodeError named neither)."""
    text = "customers:\n  - name: caf\u00e9\n"
    (tmp_path / "utf16.yaml").write_bytes(text.encode("utf-16"))
    settings = BudgetSettings(
        database_url=f"sqlite:///{tmp_path}/b.db", config_file=tmp_path / "utf16.yaml"
    )
    store = Store(settings.database_url)
    store.create_schema()
    load_config_file(store, settings)
    assert [c.name for c in BudgetManager(store, settings).list_customers()] == ["caf\u00e9"]
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigFileError) as raised:
        load_config_file(store, settings.model_copy(update={"config_file": latin}))
    print("refused:", raised.value)
    assert str(raised.value).startswith(f"BUDGET_CONFIG_FILE '{latin}': not UTF-8 text")


def test_only_a_key_s_value_is_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC §10: `${VAR}` stands for a key's value. Anywhere else it is text as written: a file
    sent to `POST /config/apply` could otherwise read the server's variables (its database
    password, a provider's API key) into a name the API shows. And the key's value is no part
    of the `config_hash` its answers show (that hash checked a guess of the value offline)."""
    import hashlib

    monkeypatch.setenv("SECRET_URL", "postgresql://admin:hunter2@db/prod")
    monkeypatch.setenv("ALICE_KEY", "sk-bm-alice-from-env-0001")
    text = (
        "customers:\n  - name: leak-${SECRET_URL}\n"
        "tags:\n  - tag: ${SECRET_URL}\n"
        "virtual_keys:\n  - name: alice\n    value: ${ALICE_KEY}\n"
    )
    manager = _start(tmp_path, text)
    names = [c.name for c in manager.list_customers()] + [t.tag for t in manager.list_tags()]
    key = manager.list_virtual_keys()[0]
    print("names:", names, "; key hash shown:", key.config_hash)
    assert names == ["leak-${SECRET_URL}", "${SECRET_URL}"]
    assert not any("hunter2" in name for name in names)
    guess = json.dumps(
        {"name": "alice", "value": "sk-bm-alice-from-env-0001"},
        sort_keys=True,
        separators=(",", ":"),
    )
    assert key.config_hash != hashlib.sha256(guess.encode()).hexdigest()
    # the value still comes from the environment, and a new one there reaches the key
    store = manager.store
    assert store.load_key(hashlib.sha256(b"sk-bm-alice-from-env-0001").hexdigest()) is not None
    monkeypatch.setenv("ALICE_KEY", "sk-bm-alice-rotated-0002")
    again = _start(tmp_path, text)
    assert again.store.load_key(hashlib.sha256(b"sk-bm-alice-rotated-0002").hexdigest())


def test_a_model_list_taken_out_of_the_file_is_taken_out_of_the_store(tmp_path: Path) -> None:
    """The file is the whole declaration: a key's provider config without `allowed_models` is
    all models, also after the file named some (an update through the API that leaves the list
    out keeps it; the file's next start must not)."""
    narrow = (
        "virtual_keys:\n  - name: k\n    provider_configs:\n"
        "      - {provider: openai, allowed_models: [gpt-4o], blocked_models: [gpt-4o-mini]}\n"
    )
    manager = _start(tmp_path, narrow)
    (config,) = manager.list_virtual_keys()[0].provider_configs
    assert (config.allowed_models, config.blocked_models) == (["gpt-4o"], ["gpt-4o-mini"])
    manager = _start(tmp_path, "virtual_keys:\n  - name: k\n    provider_configs:\n"
                               "      - {provider: openai}\n")  # fmt: skip
    (config,) = manager.list_virtual_keys()[0].provider_configs
    assert (config.allowed_models, config.blocked_models) == (["*"], [])


def test_a_changed_entry_declares_all_of_its_entity_not_only_what_it_names(
    tmp_path: Path,
) -> None:
    """An entry is a create body (SPEC §10): once it changes, the file wins, and what it leaves
    out is the create body's default, not what the store held (an admin API edit, an earlier
    entry). Applied as a partial update, a team taken out of its customer stayed in it, limits
    taken out of the file stayed enforced and a route kept an edited strategy."""
    text = """
customers:
  - name: acme
teams:
  - name: research
    customer: acme
    budgets: [{max_limit: 10, reset_duration: 1d}]
    rate_limit: {request_max_limit: 5, request_reset_duration: 1m}
routes:
  - name: gpt-4o
    targets: [openai/gpt-4o]
"""
    manager = _start(tmp_path, text)
    manager.update_route(manager.list_routes()[0].id, strategy="most_remaining")
    edited = (
        text.replace("    customer: acme\n", "")
        .replace("    budgets: [{max_limit: 10, reset_duration: 1d}]\n", "")
        .replace("    rate_limit: {request_max_limit: 5, request_reset_duration: 1m}\n", "")
        .replace("[openai/gpt-4o]", "[openai/gpt-4o, azure/gpt-4o]")
    )
    manager = _start(tmp_path, edited)
    team, route = manager.list_teams()[0], manager.list_routes()[0]
    measured = {
        "team's customer": team.customer_id,
        "team's budgets": [b.max_limit for b in team.budgets],
        "team's rate limit": team.rate_limit and team.rate_limit.request_max_limit,
        "route": (route.targets, route.strategy),
    }
    print(measured)
    assert measured == {
        "team's customer": None,
        "team's budgets": [],
        "team's rate limit": None,
        "route": (["openai/gpt-4o", "azure/gpt-4o"], "ordered"),
    }, measured


def test_an_entry_s_hash_is_the_same_in_yaml_and_in_json(tmp_path: Path) -> None:
    """`config_hash` is the entry's, whatever the file's format (SPEC §10): a YAML time was a
    datetime to PyYAML, hashed as `2027-01-01 00:00:00+00:00`, the JSON one as written, so the
    same file switched to JSON applied its keys again (over their admin API edits)."""
    entry = {
        "name": "alice",
        "expires_at": "2027-01-01T00:00:00Z",
        "budgets": [{"max_limit": 1, "reset_duration": "1d"}],
    }
    yaml_text = (
        "virtual_keys:\n  - name: alice\n    expires_at: 2027-01-01T00:00:00Z\n"
        "    budgets: [{max_limit: 1, reset_duration: 1d}]\n"
    )
    manager = _start(tmp_path, yaml_text)
    key = manager.list_virtual_keys()[0]
    manager.update_virtual_key(key.id, tags=["edited"])
    manager = _start(tmp_path, json.dumps({"virtual_keys": [entry]}), "budget.json")
    after = manager.list_virtual_keys()[0]
    measured = (key.config_hash == after.config_hash, after.tags, after.expires_at)
    print(measured)
    assert measured[:2] == (True, ["edited"]), measured
    # A time is checked as JSON's is: with its offset.
    with pytest.raises(ConfigFileError, match=r"expires_at: .*RFC 3339"):
        _start(tmp_path, yaml_text.replace("00:00:00Z", "00:00:00"))


def test_a_key_rotated_through_the_api_is_not_given_its_file_value_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC §10: a change made through the API stands until the file's entry changes. A key
    rotated through the API (its old value leaked, say) got the file's value back at the next
    start-up: the old value worked again, the new one no more (a fault hunt's). The file's value
    applies when it changes (the `${ALICE_KEY}` the operator set anew)."""
    import hashlib

    def works(m: BudgetManager, value: str) -> bool:
        return m.store.load_key(hashlib.sha256(value.encode()).hexdigest()) is not None

    monkeypatch.setenv("ALICE_KEY", "sk-bm-alice-leaked-0001")
    m = _start(tmp_path, CONFIG)
    key_id = m.find_virtual_key("sk-bm-alice-leaked-0001")
    assert key_id is not None
    rotated = m.rotate_virtual_key(key_id).value
    assert rotated is not None
    m = _start(tmp_path, CONFIG)  # restarted, the file unchanged
    after_restart = works(m, "sk-bm-alice-leaked-0001"), works(m, rotated)
    monkeypatch.setenv("ALICE_KEY", "sk-bm-alice-new-0002")
    m = _start(tmp_path, CONFIG)  # the file's value changed
    after_change = works(m, rotated), works(m, "sk-bm-alice-new-0002")
    print(f"after a restart: leaked, rotated work {after_restart}; after the file's new value: "
          f"rotated, new work {after_change}")  # fmt: skip
    assert after_restart == (False, True)
    assert after_change == (False, True)


def test_a_provider_is_found_by_its_one_name_however_the_file_spells_it(tmp_path: Path) -> None:
    """`provider: Google` is the `gemini` provider (SPEC §13's name): stored so, found so on
    the next start (an edit through the API survives it, SPEC §10), and a second entry
    spelling it `gemini` is the same provider twice."""
    text = "providers:\n  - provider: Google\n    budgets: [{max_limit: 5, reset_duration: 1d}]\n"
    m = _start(tmp_path, text)
    m.put_provider("gemini", budgets=[{"max_limit": 7, "reset_duration": "1d"}])
    m = _start(tmp_path, text)
    kept = [(p.provider, p.budgets[0].max_limit) for p in m.list_providers()]
    twice = text + "  - provider: gemini\n    budgets: [{max_limit: 9}]\n"
    with pytest.raises(ConfigFileError) as refused:
        _start(tmp_path, twice, "twice.yaml")
    print(f"providers after a restart: {kept}; {refused.value}")
    assert kept == [("gemini", 7.0)]
    assert "the same provider as providers[0] (Google)" in str(refused.value)


def test_a_number_in_exponent_form_is_a_number_in_yaml_as_in_json(tmp_path: Path) -> None:
    """`max_limit: 1e-9` (LiteLLM's one-nano-dollar budget, SPEC §6) is a number in JSON and in
    YAML 1.2; PyYAML's YAML 1.1 read it as the text '1e-9' without a dot, and start-up refused
    the entry: "budgets.0.max_limit: Value error, must be a JSON number"."""
    yaml_text = (
        "customers:\n  - name: acme\n    budgets: [{max_limit: 1e-9, reset_duration: 1d}]\n"
        "    rate_limit: {request_max_limit: 1E3, request_reset_duration: 1m}\n"
    )
    entry = {
        "name": "acme",
        "budgets": [{"max_limit": 1e-9, "reset_duration": "1d"}],
        "rate_limit": {"request_max_limit": 1e3, "request_reset_duration": "1m"},
    }
    for folder in ("json", "quoted"):
        (tmp_path / folder).mkdir()
    from_json = _start(tmp_path / "json", json.dumps({"customers": [entry]}), "budget.json")
    expected = from_json.list_customers()[0]
    try:
        customer = _start(tmp_path, yaml_text).list_customers()[0]
    except ConfigFileError as exc:
        pytest.fail(f"refused: {exc}")
    assert customer.rate_limit is not None
    measured = (customer.budgets[0].max_limit, customer.rate_limit.request_max_limit)
    print("yaml:", measured, "json:", expected.budgets[0].max_limit)
    assert measured == (1e-9, 1000)
    assert customer.config_hash == expected.config_hash
    # A name that only looks like a number stays text when quoted, as in JSON.
    quoted = _start(tmp_path / "quoted", "tags:\n  - tag: '2e5'\n    budgets: [{max_limit: 1}]\n")
    assert [t.tag for t in quoted.list_tags()] == ["2e5"]


def test_an_entity_renamed_through_the_api_is_still_its_unchanged_entry_s(tmp_path: Path) -> None:
    """SPEC §10: a change made through the admin API stands until the file's entry changes; a
    rename is one. Entities were found by name only: after a rename (the dashboard, the CLI)
    the next start-up made each entry anew (a second customer, team and route, fresh budgets
    beside the spent ones) or failed outright, the key's file value being the renamed key's."""
    text = """
customers:
  - name: acme
    budgets: [{max_limit: 100, reset_duration: 1M}]
teams:
  - name: research
    customer: acme
virtual_keys:
  - name: alice
    team: research
    value: sk-bm-alice-renamed-0001
  - name: bob
    customer: acme
model_configs:
  - model_name: gpt-4o
    provider: openai
    budgets: [{max_limit: 5, reset_duration: 1d}]
routes:
  - name: gpt-4o
    targets: [openai/gpt-4o]
"""
    m = _start(tmp_path, text)
    m.update_customer(m.list_customers()[0].id, name="Acme Corp")
    m.update_team(m.list_teams()[0].id, name="Research")
    for key in m.list_virtual_keys():
        m.update_virtual_key(key.id, name=key.name.title())
    m.update_model_config(m.list_model_configs()[0][0].id, model_name="gpt-4o-2024-*")
    m.update_route(m.list_routes()[0].id, name="smart")

    def names(m: BudgetManager) -> dict[str, list[str]]:
        return {
            "customers": [c.name for c in m.list_customers()],
            "teams": [t.name for t in m.list_teams()],
            "keys": sorted(k.name for k in m.list_virtual_keys()),
            "model_configs": [c.model_name for c in m.list_model_configs()[0]],
            "routes": [r.name for r in m.list_routes()],
        }

    before = names(m)
    try:
        after: Any = names(_start(tmp_path, text))  # restarted, the file unchanged
    except ConfigFileError as exc:
        after = f"start-up failed: {exc}"
    print(f"renamed: {before}\nafter a restart: {after}")
    assert after == before
    key_id = m.find_virtual_key("sk-bm-alice-renamed-0001")
    assert key_id is not None and m.get_virtual_key(key_id).name == "Alice"
    customer, team = m.list_customers()[0], m.list_teams()[0]
    assert team.customer_id == customer.id
    assert {k.name: (k.team_id, k.customer_id) for k in m.list_virtual_keys()} == {
        "Alice": (team.id, None), "Bob": (None, customer.id)}  # fmt: skip
    # Once a key's entry changes, the file declares it again: the key it gave its value to.
    edited = text.replace("    value: sk-bm-alice-renamed-0001\n",
                          "    value: sk-bm-alice-renamed-0001\n    tags: [edited]\n")  # fmt: skip
    m = _start(tmp_path, edited)
    keys = {k.name: (k.id, k.tags) for k in m.list_virtual_keys()}
    print(f"after the entry changed: {keys}")
    assert keys == {"alice": (key_id, ["edited"]), "Bob": (keys["Bob"][0], [])}


def test_an_entity_deleted_through_the_api_stays_deleted_while_its_entry_is_unchanged(
    tmp_path: Path,
) -> None:
    """SPEC §10: a change made through the admin API stands until the file's entry changes; a
    deletion is one. The next start-up made every deleted entity again: a key deleted because
    its value leaked answered 200 again with that value, a customer came back at $0."""
    text = """
customers:
  - name: acme
    budgets: [{max_limit: 100, reset_duration: 1M}]
teams:
  - name: research
virtual_keys:
  - name: alice
    team: research
    value: sk-bm-alice-leaked-00001
  - name: bob
model_configs:
  - model_name: gpt-4o
    provider: openai
    budgets: [{max_limit: 5, reset_duration: 1d}]
routes:
  - name: smart
    targets: [openai/gpt-4o]
providers:
  - provider: openai
    budgets: [{max_limit: 50, reset_duration: 1d}]
tags:
  - tag: product:chat
    budgets: [{max_limit: 20, reset_duration: 1d}]
"""

    def found(m: BudgetManager) -> dict[str, list[str]]:
        return {
            "customers": [c.name for c in m.list_customers()],
            "teams": [t.name for t in m.list_teams()],
            "keys": sorted(k.name for k in m.list_virtual_keys()),
            "model_configs": [c.model_name for c in m.list_model_configs()[0]],
            "routes": [r.name for r in m.list_routes()],
            "providers": [p.provider for p in m.list_providers() if p.budgets],
            "tags": [t.tag for t in m.list_tags() if t.budgets],
        }

    m = _start(tmp_path, text)
    assert found(m)["keys"] == ["alice", "bob"]
    m.delete_customer(m.list_customers()[0].id)
    m.delete_team(m.list_teams()[0].id)
    leaked = m.find_virtual_key("sk-bm-alice-leaked-00001")
    assert leaked is not None
    m.delete_virtual_key(leaked)
    m.delete_model_config(m.list_model_configs()[0][0].id)
    m.delete_route(m.list_routes()[0].id)
    m.delete_provider("openai")
    m.delete_tag("product:chat")
    deleted = found(m)
    after = found(_start(tmp_path, text))  # restarted, the file unchanged
    print(f"deleted through the API: {deleted}\nafter a restart: {after}")
    assert after == deleted == {
        "customers": [], "teams": [], "keys": ["bob"], "model_configs": [], "routes": [],
        "providers": [], "tags": []}  # fmt: skip
    m = _start(tmp_path, text)
    assert m.find_virtual_key("sk-bm-alice-leaked-00001") is None
    # Once an entry changes, the file declares its entity again.
    edited = text.replace(
        "  - name: research\n", "  - name: research\n    calendar_aligned: true\n"
    )
    m = _start(tmp_path, edited)
    print(f"after the team's entry changed: {found(m)['teams']}")
    assert found(m)["teams"] == ["research"]


def test_a_key_value_written_litellm_s_way_is_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`value: os.environ/BOT_KEY`, as a LiteLLM config names a secret, is the variable's value:
    it was taken as written, and the key's value was the text `os.environ/BOT_KEY`, which anyone
    reading the file (or LiteLLM's docs) could present."""
    import hashlib

    monkeypatch.setenv("BOT_KEY", "sk-bm-bot-from-env-0001")
    manager = _start(tmp_path, "virtual_keys:\n  - name: bot\n    value: os.environ/BOT_KEY\n")
    literal = manager.store.load_key(hashlib.sha256(b"os.environ/BOT_KEY").hexdigest())
    real = manager.store.load_key(hashlib.sha256(b"sk-bm-bot-from-env-0001").hexdigest())
    print("literal text is a key:", literal is not None, "; the variable's value is:", real)
    assert literal is None and real is not None
    monkeypatch.delenv("BOT_KEY")
    with pytest.raises(ConfigFileError, match="BOT_KEY is not set"):
        _start(tmp_path, "virtual_keys:\n  - name: bot\n    value: os.environ/BOT_KEY\n")


def test_a_key_value_read_from_the_environment_has_no_blanks_around_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variable set from a secret file keeps its line break (`echo key > secret`): the key's
    value ended in it, and no request could present that key (a header's value is read without
    blanks around it), so every request with the right key was refused as unknown."""
    import hashlib

    monkeypatch.setenv("BOT_KEY", "sk-bm-bot-from-file-0001\n")
    manager = _start(tmp_path, "virtual_keys:\n  - name: bot\n    value: ${BOT_KEY}\n")
    found = manager.store.load_key(hashlib.sha256(b"sk-bm-bot-from-file-0001").hexdigest())
    print("the key as a request presents it:", found)
    assert found is not None


def test_an_entry_taken_out_of_the_file_is_named_as_still_in_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The file deletes nothing: a key taken out of it (its value leaked, say) still works after
    the restart. That used to pass without a word, so the operator believed it revoked; the
    start-up now names every entity the file made and no longer declares."""
    import logging

    monkeypatch.setenv("ALICE_KEY", "sk-bm-alice-from-env")
    _start(tmp_path, CONFIG)
    without = CONFIG.replace(
        "  - name: alice\n    team: research\n    value: ${ALICE_KEY}\n"
        "    budgets: [{max_limit: 1, reset_duration: 1d}]\n",
        "",
    ).replace("tags:\n  - tag: product:chat\n    budgets: [{max_limit: 2}]\n", "")
    assert "alice" not in without and "product:chat" not in without
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        m = _start(tmp_path, without)
    assert m.find_virtual_key("sk-bm-alice-from-env") is not None  # kept, as documented
    said = [r.getMessage() for r in caplog.records if "no longer declares" in r.getMessage()]
    print("warnings:", said)
    assert len(said) == 1
    assert "virtual key 'alice'" in said[0] and "tag 'product:chat'" in said[0]
    assert "customer 'acme'" not in said[0] and "team 'research'" not in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        _start(tmp_path, CONFIG)  # everything declared again: nothing to name
    assert not [r for r in caplog.records if "no longer declares" in r.getMessage()]


def test_a_key_value_from_an_empty_variable_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`BOT_KEY=` in a compose file sets the variable empty: start-up failed with `value: String
    should have at least 8 characters`, naming neither the variable nor why. An empty variable
    counts as unset, as it does for the BUDGET_* settings."""
    monkeypatch.setenv("BOT_KEY", " \n")
    with pytest.raises(ConfigFileError) as caught:
        _start(tmp_path, "virtual_keys:\n  - name: bot\n    value: ${BOT_KEY}\n")
    print(caught.value)
    assert "virtual_keys[0] (bot): environment variable BOT_KEY is not set" in str(caught.value)


@pytest.mark.parametrize(
    ("written", "read_as"),
    [("customer: no", "False"), ("customer: 007", "7"), ("customer: off", "False")],
)
def test_a_name_yaml_reads_as_no_text_is_refused_by_the_check_asking_for_quotes(
    tmp_path: Path, written: str, read_as: str
) -> None:
    """YAML 1.1 reads `no` and `off` as false and `007` as 7. A team's `customer: no` passed
    `config check` (the name became 'False') and start-up then failed on a customer 'False'
    nobody wrote, or, were there one named '7', joined the wrong customer. The check now names
    the field and asks for quotes, before the store is touched."""
    from budget_middleware.manage.config_file import check_config_file

    name = written.split(": ", 1)[1]
    path = tmp_path / "budget.yaml"
    path.write_text(f"customers:\n  - name: '{name}'\nteams:\n  - name: t\n    {written}\n")
    with pytest.raises(ConfigFileError) as caught:
        check_config_file(path)
    print(caught.value)
    assert "teams[0] (t): customer is not text" in str(caught.value)
    assert "write it in quotes" in str(caught.value) and read_as in str(caught.value)
    quoted = path.read_text().replace(written, f"customer: '{name}'")
    path.write_text(quoted)
    check_config_file(path)  # in quotes: valid
    manager = _start(tmp_path, quoted)
    assert manager.list_teams()[0].customer_id == manager.list_customers()[0].id


def test_yaml_1_1_s_octal_and_sexagesimal_numbers_are_read_as_yaml_1_2_reads_them(
    tmp_path: Path,
) -> None:
    """YAML 1.1 read `max_limit: 050` as octal, a budget of $40 for the $50 written, without a
    word, and `1:30` as 90 (base 60). As YAML 1.2 and JSON read them: 050 is 50, and `1:30` is
    the text it is (a name, or a duration refused by name)."""
    m = _start(
        tmp_path,
        "customers:\n  - name: 1:30\n    budgets: [{max_limit: 050, reset_duration: 1d}]\n"
        "teams:\n  - name: t\n    customer: 1:30\n    rate_limit: {request_max_limit: 0100, "
        "request_reset_duration: 1m}\n",
    )
    limit = m.list_budgets(owner_type="customer")[0].max_limit
    team = m.list_teams()[0]
    print("max_limit: 050 ->", limit, "; request_max_limit: 0100 ->", team.rate_limit)
    assert limit == 50.0
    assert team.rate_limit is not None and team.rate_limit.request_max_limit == 100
    assert [c.name for c in m.list_customers()] == ["1:30"]
    assert team.customer_id == m.list_customers()[0].id
    with pytest.raises(ConfigFileError, match="invalid duration '1:30'"):
        _start(tmp_path, "tags:\n  - tag: x\n    budgets: [{max_limit: 5, reset_duration: 1:30}]\n")


def test_a_key_value_without_the_key_prefix_is_named_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Bearer and API-key headers count only with BUDGET_KEY_PREFIX (`sk-bm-`): a declared
    `value: sk-alice-…` sent by an SDK as `Authorization: Bearer` is not read as the key, and
    the request is served as one without a key, outside the key's budgets. That passed without
    a word; start-up now names the entry (the value itself is never logged)."""
    import logging

    monkeypatch.setenv("ALICE_KEY", "sk-alice-0123456789")
    text = (
        "virtual_keys:\n  - name: alice\n    value: ${ALICE_KEY}\n"
        "  - name: bob\n    value: sk-bm-bob-0123456789\n"
    )
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        _start(tmp_path, text)
    said = [r.getMessage() for r in caplog.records if "BUDGET_KEY_PREFIX" in r.getMessage()]
    print(said)
    assert len(said) == 1 and "virtual_keys[0] (alice)" in said[0]
    assert "sk-alice-0123456789" not in caplog.text


def test_warnings_of_a_config_sent_to_the_api_do_not_name_a_temporary_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`POST /config/apply` (and `config apply --url`) applies the text from a temporary file:
    its errors say `(the config sent)`, but its warnings named `BUDGET_CONFIG_FILE
    '/tmp/budget-config-…/config.yaml'`, a file that is gone and that nobody wrote."""
    import logging

    from budget_middleware.manage.config_file import apply_config_text

    settings = BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db")
    store = Store(settings.database_url)
    store.create_schema()
    apply_config_text(store, settings, "tags:\n  - tag: a\n  - tag: b\n", "yaml")
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        apply_config_text(store, settings, "tags:\n  - tag: a\n", "yaml")
    said = [r.getMessage() for r in caplog.records]
    print(said)
    assert said and all("budget-config-" not in m for m in said)
    assert any("(the config sent) no longer declares tag 'b'" in m for m in said)


def _laughs(levels: int, indent: str) -> str:
    """Billion laughs: each anchor a list of ten aliases of the one before (10^levels leaves)."""
    lines = [f"{indent}l0: &l0 [{', '.join(['lol'] * 10)}]"]
    lines += [f"{indent}l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines)


@pytest.mark.parametrize(
    ("text", "fmt", "error"),
    [
        ("customers:\n  - name: acme\n    junk:\n" + _laughs(9, "      ") + "\n", "yaml",
         "aliases"),
        ("customers:\n  - name: acme\n    junk: &a [*a]\n", "yaml", "refers to itself"),
        ("customers:\n  - name: acme\n    junk: " + "[" * 5000 + "]" * 5000 + "\n", "yaml",
         "nested too deeply"),
        ('{"customers": [{"name": "acme", "junk": ' + "[" * 5000 + "]" * 5000 + "}]}", "json",
         "nested too deeply"),
    ],
    ids=["billion-laughs", "self-reference", "deep-yaml", "deep-json"],
)  # fmt: skip
async def test_a_config_that_expands_without_bound_is_refused_at_once(
    tmp_path: Path, text: str, fmt: str, error: str
) -> None:
    """A few hundred bytes of YAML aliases stand for 10^9 strings: `POST /config/apply` (any
    admin client) walked them all (10^7 took 12 s of a worker thread; 10^9 hours), and an alias
    of its own list never ended, its memory growing; a deeply nested list was a 500
    (RecursionError). Each is a 422 at once, and the same file stops start-up by name."""
    import asyncio
    import time

    from admin_support import ADMIN, admin_client, admin_settings

    async with admin_client(admin_settings(tmp_path)) as http:
        began = time.perf_counter()
        sent = http.post("/config/apply", json={"text": text, "format": fmt}, headers=ADMIN)
        answer = await asyncio.wait_for(sent, 20)
        took = time.perf_counter() - began
    print(f"{answer.status_code} in {took:.2f}s: {answer.text[:300]}")
    assert answer.status_code == 422 and error in answer.json()["error"]["message"]
    assert took < 5
    raised: list[BaseException] = []

    def start() -> None:
        try:
            _start(tmp_path / "start", text, f"budget.{fmt}")
        except BaseException as exc:  # what start-up raised, checked below
            raised.append(exc)

    (tmp_path / "start").mkdir()
    starting = threading.Thread(target=start, daemon=True)
    starting.start()
    starting.join(20)
    assert not starting.is_alive() and isinstance(raised[0], ConfigFileError)
    assert "BUDGET_CONFIG_FILE" in str(raised[0]) and error in str(raised[0])


def test_a_config_file_longer_than_the_api_takes_stops_start_up_by_name(tmp_path: Path) -> None:
    """`POST /config/apply` takes 4,000,000 characters; a file at start-up had no bound (a
    file of any size was read whole into memory, then parsed). The same bound, by name."""
    text = "tags:\n  - tag: a\n" + "#" * 4_000_000 + "\n"
    with pytest.raises(ConfigFileError) as raised:
        _start(tmp_path, text)
    print(raised.value)
    assert "BUDGET_CONFIG_FILE" in str(raised.value) and "4,000,000 characters" in str(raised.value)
    assert _start(tmp_path, "tags:\n  - tag: a\n" + "#" * 3_000_000 + "\n").list_tags()


def test_a_config_file_s_key_that_has_expired_since_is_still_declared(tmp_path: Path) -> None:
    """A key created already expired is a 422 from the API; a file's key is not refused for
    it: the file was valid when written, and a fresh store must still start from it (the key
    is made, and refused 403 `virtual_key_expired` as any expired key)."""
    m = _start(tmp_path, "virtual_keys:\n  - name: k\n    expires_at: 2020-01-01T00:00:00Z\n")
    [key] = m.list_virtual_keys()
    assert key.expires_at is not None and key.expires_at.year == 2020


def test_an_entity_renamed_in_the_file_is_a_new_one_and_the_warning_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The file finds its entities by name (SPEC §10 names no other way): a team renamed in
    the file is a new team, with no spend, and the old one stays with its limits and spend.
    The start-up warning named the old one as "no longer declared" without a word of why, so a
    rename read as done; it now says that a renamed entry declares a new entity, and how to
    rename one (through the API, then the file)."""
    import logging

    team = "teams:\n  - name: {}\n    budgets: [{{max_limit: 10, reset_duration: 1d}}]\n"
    _start(tmp_path, team.format("research"))
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        m = _start(tmp_path, team.format("lab"))
    said = [r.getMessage() for r in caplog.records if "no longer declares" in r.getMessage()]
    print("teams:", sorted(t.name for t in m.list_teams()), "warnings:", said)
    assert sorted(t.name for t in m.list_teams()) == ["lab", "research"]
    assert len(said) == 1 and "team 'research'" in said[0]
    message = said[0].split("budget.yaml'", 1)[1]  # not the test's folder, which says "renamed"
    assert "renamed in the file" in message and "rename through the admin API" in message
    # The way the warning gives: renamed through the API, then in the file: one team, kept.
    [lab] = [t for t in m.list_teams() if t.name == "lab"]
    m.update_team(lab.id, name="studio")
    m = _start(tmp_path, team.format("studio").replace("10", "12"))
    [studio] = [t for t in m.list_teams() if t.name == "studio"]
    assert studio.id == lab.id and studio.budgets[0].max_limit == 12
    assert sorted(t.name for t in m.list_teams()) == ["research", "studio"]


@pytest.mark.parametrize(
    ("text", "fmt"),
    [('tags:\n  - tag: "x\\ud800"\n', "yaml"),
     ('customers:\n  - name: "x\\ud800"\n', "yaml"),
     ('{"customers": [{"name": "x\\ud800"}]}', "json"),
     ('routes:\n  - name: "r\\udfff"\n    targets: [openai/gpt-4o]\n', "yaml"),
     ('router_settings:\n  provider_budget_config:\n    "o\\ud800": {budget_limit: 1}\n',
      "yaml")],
    ids=["tag", "customer", "json", "route", "litellm-provider"],
)  # fmt: skip
async def test_a_name_that_is_no_unicode_text_is_a_422_naming_the_entry(
    tmp_path: Path, text: str, fmt: str
) -> None:
    """YAML's `\\ud800` (and JSON's) is a lone surrogate: no text UTF-8 can hold. The entry was
    refused, but its error named it by that name, and the 422 could not be written:
    `POST /config/apply` raised UnicodeEncodeError (a 500 in a server). The name is shown
    escaped."""
    from admin_support import ADMIN, admin_client, admin_settings

    async with admin_client(admin_settings(tmp_path)) as http:
        answer = await http.post("/config/apply", json={"text": text, "format": fmt}, headers=ADMIN)
    print(answer.status_code, answer.text[:300])
    assert answer.status_code == 422
    assert "\\ud800" in answer.text or "\\udfff" in answer.text  # escaped, as it was written


@pytest.mark.parametrize(
    ("text", "problem"),
    [('tags:\n  - tag: " research"\n', "no space at either end"),
     ('providers:\n  - provider: "open\\nai"\n', "no control character"),
     ("tags:\n  - tag: " + "t" * 101 + "\n", "1 to 100 characters"),
     ('litellm_settings:\n  tag_budget_config:\n    "a\\tb": {max_budget: 1}\n',
      "no control character")],
    ids=["tag-space", "provider-line-break", "tag-too-long", "litellm-tag"],
)  # fmt: skip
def test_a_provider_or_tag_name_no_request_carries_is_found_by_config_check(
    tmp_path: Path, text: str, problem: str
) -> None:
    """`config check` (and the check the engine runs before applying anything) let a tag or
    provider name pass that the store's write then refused (`' research'`, a line break, 101
    characters): the check said the file was fine and start-up failed on it. The check now
    refuses it, naming the entry, as the write does."""
    from budget_middleware.manage.config_file import check_config_file

    path = tmp_path / "budget.yaml"
    path.write_text(text)
    with pytest.raises(ConfigFileError, match=problem) as raised:
        check_config_file(path)
    print(raised.value)


def test_a_key_renamed_in_the_file_with_its_value_kept_is_the_same_key(tmp_path: Path) -> None:
    """What docs/admin-api.md says of renaming in the file: a key is found by its declared
    value, so renaming its entry renames it (its id and budgets kept), where a team is new."""
    entry = "virtual_keys:\n  - name: {}\n    value: sk-bm-aaaaaaaaaaaaaaaaaaaaaaaa\n"
    before = _start(tmp_path, entry.format("alice")).list_virtual_keys()
    after = _start(tmp_path, entry.format("alice2")).list_virtual_keys()
    assert [(k.id, k.name) for k in after] == [(before[0].id, "alice2")]


@pytest.mark.parametrize("number", ["9" * 5000, "0x" + "f" * 5000], ids=["decimal", "hexadecimal"])
async def test_an_integer_of_thousands_of_digits_is_a_422_naming_the_file(
    tmp_path: Path, number: str
) -> None:
    """Python reads at most 4,300 digits into an int: a YAML `max_limit` of 5,000 digits raised
    ValueError out of the YAML reader, a 500 from `POST /config/apply` and a start-up error
    naming neither the file nor the line."""
    from admin_support import ADMIN, admin_client, admin_settings

    text = f"customers:\n  - name: a\n    budgets: [{{max_limit: {number}}}]\n"
    async with admin_client(admin_settings(tmp_path)) as http:
        answer = await http.post("/config/apply", json={"text": text}, headers=ADMIN)
    print(answer.status_code, answer.text[:300])
    assert answer.status_code == 422 and "line 3" in answer.json()["error"]["message"]
    (tmp_path / "start").mkdir()
    with pytest.raises(ConfigFileError, match=r"(?s)BUDGET_CONFIG_FILE .*line 3"):
        _start(tmp_path / "start", text)


def test_a_team_made_again_from_its_changed_entry_has_the_file_s_keys_again(
    tmp_path: Path,
) -> None:
    """A team deleted through the API stays deleted while its entry is unchanged, and its keys
    answer to no team. Once its entry changed, the team was made again, but the keys whose
    unchanged entries put them in it stayed without a team: the file said `team: research`,
    and the team's $10 a day applied to none of them (nor did a customer's made again to its
    teams). They are in it again; a key moved elsewhere through the API stays where it is."""
    text = (
        "customers:\n  - name: acme\n    budgets: [{{max_limit: {0}, reset_duration: 1M}}]\n"
        "teams:\n  - name: research\n    customer: acme\n"
        "    budgets: [{{max_limit: {0}, reset_duration: 1d}}]\n"
        "  - name: other\n"
        "virtual_keys:\n  - name: k\n    team: research\n  - name: moved\n    team: research\n"
    )
    m = _start(tmp_path, text.format(10))
    teams = {t.name: t.id for t in m.list_teams()}
    m.update_virtual_key(m.list_virtual_keys()[1].id, team_id=teams["other"])
    m.delete_team(teams["research"])
    m.delete_customer(m.list_customers()[0].id)
    m = _start(tmp_path, text.format(20))  # both entries changed: made again
    research = next(t for t in m.list_teams() if t.name == "research")
    keys = {k.name: k.team_id for k in m.list_virtual_keys()}
    print("research", research.id, "customer", research.customer_id, "keys", keys)
    assert keys == {"k": research.id, "moved": teams["other"]}
    assert research.customer_id == m.list_customers()[0].id


@pytest.mark.parametrize("by", ["name", "id"])
def test_a_customer_the_file_names_and_the_api_deleted_refers_to_none(
    tmp_path: Path, by: str
) -> None:
    """A customer made through the API, named by the file's team (by name or id), then deleted
    through the API: the next start-up, the file unchanged, leaves the team without it, as the
    delete did. It stopped ("customer 'acme' is neither a name nor an id"): the API's change
    made the unchanged file unusable. A name never made, or a changed entry, is still refused."""
    store = Store(f"sqlite:///{tmp_path}/b.db")
    store.create_schema()
    acme = BudgetManager(store, BudgetSettings(database_url=store.url)).create_customer(name="acme")
    ref = "acme" if by == "name" else acme.id
    text = f"teams:\n  - name: research\n    customer: {ref}\n"
    m = _start(tmp_path, text)
    assert m.list_teams()[0].customer_id == acme.id
    m.delete_customer(acme.id)
    m = _start(tmp_path, text)  # the next start-up, the file unchanged
    teams = [(t.name, t.customer_id) for t in m.list_teams()]
    print(f"after the customer's delete and a restart: {teams}")
    assert teams == [("research", None)]
    with pytest.raises(ConfigFileError, match="'nobody' is neither a name nor an id"):
        _start(tmp_path, text.replace(ref, "nobody"))
    # A changed entry naming what is gone is refused, as one naming what never was: the team
    # would otherwise be left out of limits its entry, as written now, says it is under.
    with pytest.raises(ConfigFileError, match=f"'{ref}' is neither a name nor an id"):
        _start(tmp_path, text + "    calendar_aligned: true\n")


def test_an_entity_deleted_and_made_again_through_the_api_keeps_the_api_s_terms(
    tmp_path: Path,
) -> None:
    """A customer and a tag the file made, deleted through the API and made again through it
    with other budgets: the next start-up, the file unchanged, leaves them as the API made
    them (SPEC §10: the API's change stands until the entry changes). The file took them back,
    at its own terms ($100 a month and $20 a day where the API had set $5 a day and $1 an
    hour); a changed entry still applies."""
    text = """
customers:
  - name: acme
    budgets: [{max_limit: 100, reset_duration: 1M}]
tags:
  - tag: chat
    budgets: [{max_limit: 20, reset_duration: 1d}]
"""

    def terms(m: BudgetManager) -> list[tuple[str, str, float, str | None]]:
        customers = [(c.name, c.source, c.budgets[0]) for c in m.list_customers()]
        tags = [(t.tag, t.source, t.budgets[0]) for t in m.list_tags()]
        return [(n, src, b.max_limit, b.reset_duration) for n, src, b in customers + tags]

    m = _start(tmp_path, text)
    m.delete_customer(m.list_customers()[0].id)
    m.create_customer(name="acme", budgets=[{"max_limit": 5, "reset_duration": "1d"}])
    m.delete_tag("chat")
    m.put_tag("chat", budgets=[{"max_limit": 1, "reset_duration": "1h"}])
    made = terms(m)
    after = terms(_start(tmp_path, text))  # restarted, the file unchanged
    print(f"made again through the API: {made}\nafter a restart: {after}")
    assert after == made == [("acme", "manual", 5.0, "1d"), ("chat", "manual", 1.0, "1h")]
    edited = terms(_start(tmp_path, text.replace("max_limit: 100", "max_limit: 150")))
    assert edited[0] == ("acme", "config", 150.0, "1M")


def test_a_model_config_for_any_provider_is_found_again_once_its_entry_changes(
    tmp_path: Path,
) -> None:
    """`provider: ""` (any provider) is stored as none: the file's entry, once changed, finds
    it as none, not as "" (start-up stopped: "a model config for 'gpt-4o' with this provider
    and scope already exists")."""
    text = (
        "model_configs:\n  - model_name: gpt-4o\n    provider: ''\n    budgets: [{max_limit: 5}]\n"
    )
    m = _start(tmp_path, text)
    m = _start(tmp_path, text.replace("max_limit: 5", "max_limit: 7"))
    configs = [
        (c.model_name, c.provider, c.budgets[0].max_limit) for c in m.list_model_configs()[0]
    ]
    print(f"after the entry changed: {configs}")
    assert configs == [("gpt-4o", None, 7.0)]


def test_a_value_added_to_a_key_the_file_made_without_one_is_applied(tmp_path: Path) -> None:
    """SPEC §10: a key's entry declares its value. A key the file made without one (its value
    generated) that the file then gives a value kept the generated one: the declared value
    answered 401, with a warning that the key was "rotated through the API" (it never was),
    until the file's value changed a second time."""
    import hashlib

    def works(m: BudgetManager, value: str) -> bool:
        return m.store.load_key(hashlib.sha256(value.encode()).hexdigest()) is not None

    _start(tmp_path, "virtual_keys:\n  - name: bob\n    budgets: [{max_limit: 1}]\n")
    m = _start(tmp_path, "virtual_keys:\n  - name: bob\n    value: sk-bm-bob-declared-01\n"
                         "    budgets: [{max_limit: 1}]\n")  # fmt: skip
    added = works(m, "sk-bm-bob-declared-01")
    m = _start(tmp_path, "virtual_keys:\n  - name: bob\n    value: sk-bm-bob-declared-01\n"
                         "    budgets: [{max_limit: 1}]\n")  # fmt: skip
    print(f"the value the file added works: {added}; after a restart: "
          f"{works(m, 'sk-bm-bob-declared-01')}; keys: {len(m.list_virtual_keys())}")  # fmt: skip
    assert added and works(m, "sk-bm-bob-declared-01")
    assert len(m.list_virtual_keys()) == 1


@pytest.mark.parametrize(
    "text",
    [
        "virtual_keys: [{name: k, team: [research]}]",
        "teams: [{name: t, customer: {name: acme}}]",
        "model_configs: [{model_name: gpt-4o, virtual_key: [alice]}]",
    ],
)
def test_a_reference_that_is_a_list_or_a_mapping_is_refused_by_name(
    tmp_path: Path, text: str
) -> None:
    """A team, customer or key named by a list or a mapping passed `config check` and then
    failed start-up, `config apply` and `POST /config/apply` with `TypeError: unhashable type`
    (a traceback, no entry named): refused as the file is checked, naming the entry."""
    path = tmp_path / "refs.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigFileError) as checked:
        check_config_file(path)
    try:
        _start(tmp_path, text + "\n")
        applied = "applied"
    except Exception as exc:
        applied = f"{type(exc).__name__}: {exc}"
    print(f"config check: {checked.value}; start-up: {applied}")
    assert "is not text but a" in str(checked.value)
    assert applied.startswith("ConfigFileError") and "is not text but a" in applied
