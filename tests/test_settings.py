"""BudgetSettings (SPEC §3): a value valid as a Python argument is valid in the environment too,
and every invalid value names its variable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from budget_middleware import BudgetSettings, SettingsError
from budget_middleware import settings as settings_module
from budget_middleware.exceptions import ConfigurationError

# field: (the Python argument, the same value as an environment variable would spell it)
SAME_VALUE: dict[str, tuple[Any, str]] = {
    "database_url": ("sqlite:///./other.db", "sqlite:///./other.db"),
    "redis_url": ("redis://127.0.0.1:6379/3", "redis://127.0.0.1:6379/3"),
    "admin_key": ("secret", "secret"),
    "require_virtual_key": (True, "true"),
    "key_header": ("x-my-key", "x-my-key"),
    "key_prefix": ("sk-x-", "sk-x-"),
    "inference_paths": (("/generate", "/chat"), "/generate,/chat"),
    "exceeded_status": (429, "429"),
    "reserve": (False, "false"),
    "fail_open": (True, "1"),
    "cache_ttl_seconds": (0.5, "0.5"),
    "flush_interval_seconds": (2.5, "2.5"),
    "max_body_bytes": (1000, "1000"),
    "default_max_output_tokens": (0, "0"),
    "slot_ttl_seconds": (12.5, "12.5"),
    "unpriced_models": ("refuse", "refuse"),
    "redis_timeout_seconds": (0.25, "0.25"),
    "provider_hosts": ({"LLM.example.com": "openai"}, '{"llm.example.com": "openai"}'),
    "mode": ("shadow", "Shadow"),
    "alert_webhook_urls": (
        ["http://127.0.0.1:9/a", "https://hooks.example.com/b"],
        "http://127.0.0.1:9/a, https://hooks.example.com/b",
    ),
    "alert_secret": ("s3cret", "s3cret"),
    "alert_thresholds": ([0.9, 0.5, 1], "0.5,0.9,1.0"),
}


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("BUDGET_MODE", "dry-run", "enforce.*shadow"),
        ("BUDGET_ALERT_WEBHOOK_URLS", "hooks.example.com/x", "not an http"),
        ("BUDGET_ALERT_WEBHOOK_URLS", "http://127.0.0.1:99999/hook", "outside 1-65535"),
        ("BUDGET_ALERT_WEBHOOK_URLS", "http:///hook", "names no host"),
        ("BUDGET_ALERT_THRESHOLDS", "0.8,lots", "comma-separated fractions"),
        ("BUDGET_ALERT_THRESHOLDS", "0.8,0", "above 0 and at most 10"),
    ],
)
def test_alert_and_mode_settings_refuse_bad_values_naming_the_variable(
    variable: str, value: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=rf"{variable}.*{says}"):
        BudgetSettings()


def test_a_webhook_url_s_scheme_is_read_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """`HTTPS://…` is a valid URL (a scheme is case-insensitive): it was refused at start-up as
    "not an http:// or https:// URL"."""
    monkeypatch.setenv("BUDGET_ALERT_WEBHOOK_URLS", "HTTPS://hooks.example.com/a,Http://h:8080/b")
    urls = BudgetSettings().alert_webhook_urls
    print("read:", urls)
    assert urls == ("HTTPS://hooks.example.com/a", "Http://h:8080/b")
    monkeypatch.setenv("BUDGET_ALERT_WEBHOOK_URLS", "FTP://hooks.example.com/a")
    with pytest.raises(SettingsError, match="not an http"):
        BudgetSettings()


def test_every_field_is_covered_here() -> None:
    files = {"pricing_file", "config_file", "spill_dir"}  # paths: covered below
    assert set(BudgetSettings.model_fields) == set(SAME_VALUE) | files


def test_the_spill_folder_from_the_environment_and_its_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from budget_middleware.engine.engine import BudgetEngine

    monkeypatch.setenv("BUDGET_SPILL_DIR", str(tmp_path / "spill"))
    assert BudgetSettings().spill_dir == BudgetSettings(spill_dir=tmp_path / "spill").spill_dir
    monkeypatch.setenv("BUDGET_SPILL_DIR", " ")
    assert BudgetSettings().spill_dir is None  # empty: the default below
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    engine = BudgetEngine(BudgetSettings(database_url=f"sqlite:///{tmp_path}/b.db"))
    assert engine.spill is not None
    assert engine.spill.folder.parent == tmp_path / "state" / "budget-middleware" / "spill"
    engine.store.dispose()
    assert BudgetEngine(BudgetSettings(database_url="sqlite://")).spill is None  # in memory


def test_a_spill_folder_with_a_line_break_after_it_is_the_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A variable set from a file or a secret often ends with a line break: the spill folder was
    then created as `spill\\n`, beside the `spill` an operator looks in (the URLs were fixed so)."""
    monkeypatch.setenv("BUDGET_SPILL_DIR", f" {tmp_path / 'spill'}\n")
    print(repr(BudgetSettings().spill_dir))
    assert BudgetSettings().spill_dir == tmp_path / "spill"
    assert BudgetSettings(spill_dir=f"{tmp_path / 'spill'}\n").spill_dir == tmp_path / "spill"


def test_a_spill_folder_that_is_a_file_fails_at_start_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`BUDGET_SPILL_DIR` naming a file (a path copied from the config file's variable): no
    batch could ever be kept there, and start-up went on with one log line (`cannot read the
    spill folder …: Not a directory`); it now stops naming the variable, as a config file that
    is a folder does."""
    afile = tmp_path / "budget.yaml"
    afile.write_text("customers: []\n")
    monkeypatch.setenv("BUDGET_SPILL_DIR", str(afile))
    with pytest.raises(SettingsError) as caught:
        print("spill_dir:", BudgetSettings().spill_dir)
    message = str(caught.value)
    print(message)
    assert "BUDGET_SPILL_DIR" in message and "is a file, not a folder" in message
    monkeypatch.setenv("BUDGET_SPILL_DIR", str(afile / "spill"))  # no folder can be made there
    with pytest.raises(SettingsError, match="is a file, not a folder"):
        BudgetSettings()
    monkeypatch.setenv("BUDGET_SPILL_DIR", str(tmp_path / "not-yet"))  # made when first needed
    assert BudgetSettings().spill_dir == tmp_path / "not-yet"


@pytest.mark.parametrize("field", sorted(SAME_VALUE))
def test_a_value_valid_as_an_argument_is_valid_in_the_environment(
    field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    argument, text = SAME_VALUE[field]
    from_argument = getattr(BudgetSettings(**{field: argument}), field)
    monkeypatch.setenv(f"BUDGET_{field.upper()}", text)
    assert getattr(BudgetSettings(), field) == from_argument
    assert getattr(BudgetSettings(**{field: text}), field) == from_argument


@pytest.mark.parametrize("status", ["402", "429"])
def test_budget_exceeded_status_from_the_environment(
    status: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUDGET_EXCEEDED_STATUS", status)
    assert BudgetSettings().exceeded_status == int(status)


def test_exceeded_status_other_than_402_or_429_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BUDGET_EXCEEDED_STATUS", "403")
    with pytest.raises(SettingsError, match=r"BUDGET_EXCEEDED_STATUS.*402 or 429.*403"):
        BudgetSettings()
    with pytest.raises(SettingsError, match="BUDGET_EXCEEDED_STATUS"):
        BudgetSettings(exceeded_status="soon")


def test_exceeded_status_429_0_is_refused_as_an_argument_as_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`BudgetSettings(exceeded_status=429.0)` was taken as 429 while `BUDGET_EXCEEDED_STATUS=429.0`
    was refused: a value valid as an argument is valid as a variable, and the other way round."""
    monkeypatch.setenv("BUDGET_EXCEEDED_STATUS", "429.0")
    with pytest.raises(SettingsError, match=r"BUDGET_EXCEEDED_STATUS.*402 or 429") as raised:
        BudgetSettings()
    print("environment:", raised.value)
    monkeypatch.delenv("BUDGET_EXCEEDED_STATUS")
    for value in (429.0, 402.0, True):
        with pytest.raises(SettingsError, match=r"BUDGET_EXCEEDED_STATUS.*402 or 429") as raised:
            print(value, "->", BudgetSettings(exceeded_status=value).exceeded_status)
        print("argument:", raised.value)


def test_every_list_setting_takes_a_json_list_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What is valid as an argument is valid in the environment (SPEC §3): the JSON list that
    pydantic-settings reads for list settings, as well as comma-separated parts."""
    monkeypatch.setenv("BUDGET_ALERT_THRESHOLDS", "[0.9, 0.5]")
    monkeypatch.setenv("BUDGET_ALERT_WEBHOOK_URLS", '["http://a.example/x", "https://b.example"]')
    settings = BudgetSettings()
    assert settings.alert_thresholds == (0.5, 0.9)
    assert settings.alert_webhook_urls == ("http://a.example/x", "https://b.example")
    monkeypatch.setenv("BUDGET_ALERT_THRESHOLDS", "[0.5, 1")
    with pytest.raises(SettingsError, match=r"BUDGET_ALERT_THRESHOLDS.*neither a JSON list"):
        BudgetSettings()


def test_inference_paths_as_a_json_list_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGET_INFERENCE_PATHS", '["/generate", "/chat"]')
    assert BudgetSettings().inference_paths == ("/generate", "/chat")
    monkeypatch.setenv("BUDGET_INFERENCE_PATHS", '["generate"]')
    with pytest.raises(SettingsError, match=r"BUDGET_INFERENCE_PATHS.*must start with '/'"):
        BudgetSettings()


def test_file_settings_take_a_path_or_a_string_and_empty_means_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text('{"models": {}}')
    assert BudgetSettings(pricing_file=str(prices)).pricing_file == prices
    monkeypatch.setenv("BUDGET_PRICING_FILE", str(prices))
    assert BudgetSettings().pricing_file == prices
    for name in ("PRICING_FILE", "CONFIG_FILE", "REDIS_URL", "ADMIN_KEY"):
        monkeypatch.setenv(f"BUDGET_{name}", "")
    empty = BudgetSettings()  # `BUDGET_REDIS_URL=` in a compose file means "not set"
    assert (empty.pricing_file, empty.config_file, empty.redis_url, empty.admin_key) == (
        None,
        None,
        None,
        None,
    )


def test_case_and_spaces_of_choices_do_not_matter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGET_UNPRICED_MODELS", " Refuse ")
    assert BudgetSettings().unpriced_models == "refuse"
    assert BudgetSettings(unpriced_models="ALLOW").unpriced_models == "allow"
    monkeypatch.setenv("BUDGET_UNPRICED_MODELS", "deny")
    with pytest.raises(SettingsError, match=r"BUDGET_UNPRICED_MODELS.*'allow' or 'refuse'"):
        BudgetSettings()


def test_new_settings_have_the_documented_defaults() -> None:
    settings = BudgetSettings()
    assert settings.unpriced_models == "allow"
    assert settings.redis_timeout_seconds == 2.0


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf", "soon"])
def test_redis_timeout_must_be_a_positive_finite_number_of_seconds(
    bad: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUDGET_REDIS_TIMEOUT_SECONDS", bad)
    with pytest.raises(SettingsError, match="BUDGET_REDIS_TIMEOUT_SECONDS"):
        BudgetSettings()


def test_a_redis_timeout_longer_than_an_hour_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1e10 s was accepted, then every Redis call failed ("timestamp out of range for platform
    time_t"): every metered request a 503 for ever. Refused at start-up; an hour is still taken."""
    assert BudgetSettings(redis_timeout_seconds=3600).redis_timeout_seconds == 3600
    for bad in ("1e10", "3601"):
        monkeypatch.setenv("BUDGET_REDIS_TIMEOUT_SECONDS", bad)
        with pytest.raises(SettingsError, match=r"BUDGET_REDIS_TIMEOUT_SECONDS.*3600") as raised:
            print(bad, "->", BudgetSettings().redis_timeout_seconds)
        print(raised.value)


@pytest.mark.parametrize(
    "variable",
    ["BUDGET_CACHE_TTL_SECONDS", "BUDGET_FLUSH_INTERVAL_SECONDS", "BUDGET_SLOT_TTL_SECONDS"],
)
@pytest.mark.parametrize("bad", ["inf", "Infinity", "nan"])
def test_an_interval_must_be_a_finite_number_of_seconds(
    variable: str, bad: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `inf` as a flush interval wrote nothing until shutdown (a killed process lost every
    # charge), and as a cache TTL never re-read the counters other processes wrote (SPEC §11).
    monkeypatch.setenv(variable, bad)
    with pytest.raises(SettingsError, match=variable) as raised:
        BudgetSettings()
    print(raised.value)


NUMBERS = ["max_body_bytes", "default_max_output_tokens", "cache_ttl_seconds",
           "flush_interval_seconds", "slot_ttl_seconds", "redis_timeout_seconds"]  # fmt: skip


@pytest.mark.parametrize("field", NUMBERS)
def test_a_boolean_is_no_number_of_a_setting(field: str) -> None:
    """`BudgetSettings(max_body_bytes=True)` was a 1-byte body limit (every inference request a
    413), `redis_timeout_seconds=True` a 1 s timeout: a boolean is refused, naming the variable."""
    with pytest.raises(SettingsError, match=f"BUDGET_{field.upper()}.*boolean") as raised:
        print(field, "=", getattr(BudgetSettings(**{field: True}), field))
    print(raised.value)


def test_every_default_is_the_one_spec_3_documents() -> None:
    settings = BudgetSettings()  # the environment holds no BUDGET_* variable (conftest)
    documented = {
        "database_url": "sqlite:///./budget_middleware.db",
        "redis_url": None,
        "admin_key": None,
        "require_virtual_key": False,
        "key_header": "x-budget-key",
        "key_prefix": "sk-bm-",
        "inference_paths": (
            "/chat/completions",
            "/completions",
            "/embeddings",
            "/responses",
            "/messages",
        ),
        "exceeded_status": 402,
        "reserve": True,
        "fail_open": False,
        "pricing_file": None,
        "config_file": None,
        "cache_ttl_seconds": 5,
        "flush_interval_seconds": 1,
        "max_body_bytes": 33554432,
        "unpriced_models": "allow",
        "redis_timeout_seconds": 2,
        "mode": "enforce",
        "alert_webhook_urls": (),
        "alert_secret": None,
        "alert_thresholds": (0.8, 1.0),
    }
    found = {name: getattr(settings, name) for name in documented}
    print(found)
    assert found == documented


def test_every_configuration_error_shares_one_base() -> None:
    from budget_middleware.exceptions import PricingFileError
    from budget_middleware.manage.config_file import ConfigFileError

    for error in (SettingsError, ConfigFileError, PricingFileError):
        assert issubclass(error, ConfigurationError) and issubclass(error, ValueError)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("sk-bm-admin", "must not begin with BUDGET_KEY_PREFIX"),
        (" padded", "printable ASCII without spaces"),
        ("secret\n", "printable ASCII without spaces"),
        ("café-key", "printable ASCII without spaces"),
        ("two words", "printable ASCII without spaces"),
    ],
)
def test_an_admin_key_no_request_could_present_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, value: str, why: str
) -> None:
    """Such a key was taken at start-up and then met every call with a 401 (a bearer token is
    stripped, sent as latin-1, and read as a virtual key when it has the prefix). Refused now,
    naming the variable, and the error never shows the key."""
    monkeypatch.setenv("BUDGET_ADMIN_KEY", value)
    with pytest.raises(SettingsError) as caught:
        BudgetSettings()
    text = str(caught.value)
    print(text)
    assert "BUDGET_ADMIN_KEY" in text and why in text
    assert value.strip() not in text


@pytest.mark.parametrize("value", ["whsec-42\n", " whsec-42", "whsec-42\r\n"])
def test_an_alert_secret_with_a_blank_at_an_end_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """BUDGET_ALERT_SECRET read from a file that ends with a line break: every alert was signed
    with the line break, and a receiver checking with the secret as the operator knows it
    refused every signature. Refused at start-up, naming the variable, never showing it (as a
    BUDGET_ADMIN_KEY with a line break is)."""
    monkeypatch.setenv("BUDGET_ALERT_SECRET", value)
    with pytest.raises(SettingsError) as caught:
        BudgetSettings()
    text = str(caught.value)
    print(text)
    assert "BUDGET_ALERT_SECRET" in text and "begin or end with a blank" in text
    assert "whsec-42" not in text
    assert BudgetSettings(alert_secret="whsec 42").alert_secret == "whsec 42"  # inside: kept


def test_a_url_that_fails_its_check_is_not_shown_with_its_password() -> None:
    with pytest.raises(SettingsError) as caught:
        BudgetSettings(redis_url="http://user:hunter2@127.0.0.1:6379/0")
    print(caught.value)
    assert "BUDGET_REDIS_URL" in str(caught.value) and "hunter2" not in str(caught.value)


SLACK = "https://hooks.slack.com/services/T0000/B0000/XXXXhookSECRET"


def test_settings_shown_by_repr_or_str_hold_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """A traceback's locals, an error reporter, a debug log of the settings: `repr()` showed the
    admin key, the alert secret, the store's and Redis' passwords and a Slack webhook's path."""
    monkeypatch.setenv("BUDGET_ADMIN_KEY", "adminKEYsecret")
    monkeypatch.setenv("BUDGET_ALERT_SECRET", "hmacKEYsecret")
    monkeypatch.setenv("BUDGET_DATABASE_URL", "postgresql://bm:dbPASSsecret@db/budgets")
    monkeypatch.setenv("BUDGET_REDIS_URL", "redis://:redisPASSsecret@cache:6379/0")
    monkeypatch.setenv("BUDGET_ALERT_WEBHOOK_URLS", SLACK)
    settings = BudgetSettings()
    for shown in (repr(settings), str(settings)):
        print(shown[:180], "…")
        for secret in ("adminKEY", "hmacKEY", "dbPASS", "redisPASS", "hookSECRET"):
            assert secret not in shown
        assert "budgets" in shown and "hooks.slack.com" in shown  # still tells where
    assert settings.admin_key == "adminKEYsecret"  # the values themselves are untouched


def test_a_webhook_url_that_fails_its_check_is_not_shown() -> None:
    with pytest.raises(SettingsError) as caught:
        BudgetSettings(alert_webhook_urls=[SLACK, SLACK.replace("https", "ftp")])
    print(caught.value)
    assert "BUDGET_ALERT_WEBHOOK_URLS" in str(caught.value) and "URL 2" in str(caught.value)
    assert "hookSECRET" not in str(caught.value)


def test_a_misspelt_variable_is_named_with_the_setting_it_looks_like(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`BUDGET_RESERV=false` left reservations on without a word: the environment is shared
    with other programs, so such a name is not refused, but one this close to a setting's is
    named, once a process, with the setting it looks like."""
    monkeypatch.setattr(settings_module, "_warned", set())
    monkeypatch.setenv("BUDGET_RESERV", "false")
    monkeypatch.setenv("BUDGET_FAILOPEN", "true")
    monkeypatch.setenv("BUDGET_ADMIN_URL", "http://127.0.0.1:8000/budget-admin")  # the CLI's
    monkeypatch.setenv("BUDGET_SOMETHING_ELSE", "1")  # another program's, perhaps
    with caplog.at_level("WARNING", logger="budget_middleware"):
        settings = BudgetSettings()
        BudgetSettings(reserve=True)  # said once, not at every read of the settings
    assert settings.reserve is True and settings.fail_open is False  # ignored, as before
    assert sorted(r.getMessage() for r in caplog.records) == [
        "BUDGET_FAILOPEN is not a budget-middleware setting and is ignored: "
        "did you mean BUDGET_FAIL_OPEN?",
        "BUDGET_RESERV is not a budget-middleware setting and is ignored: "
        "did you mean BUDGET_RESERVE?",
    ]


@pytest.mark.parametrize(
    ("variable", "setting"),
    [
        ("BUDGET_REDIS", "BUDGET_REDIS_URL"),
        ("BUDGET_DATABASE", "BUDGET_DATABASE_URL"),
        ("BUDGET_CACHE_TTL", "BUDGET_CACHE_TTL_SECONDS"),
        ("BUDGET_REDIS_TIMEOUT", "BUDGET_REDIS_TIMEOUT_SECONDS"),
        ("BUDGET_ALERT_WEBHOOK", "BUDGET_ALERT_WEBHOOK_URLS"),
        ("BUDGET_CONFIG", "BUDGET_CONFIG_FILE"),
    ],
)
def test_a_setting_s_name_without_its_unit_is_named_with_the_setting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, variable: str, setting: str
) -> None:
    """`BUDGET_REDIS=redis://…` (the `_URL` left out) was ignored without a word, as a name
    too far from every setting's for the misspelling check: each instance of a shared
    deployment then kept counters of its own, and every limit held once per instance. A
    setting's name without its unit (`_URL`, `_URLS`, `_SECONDS`, `_FILE`) is named, as
    `BUDGET_RESERV` is."""
    monkeypatch.setattr(settings_module, "_warned", set())
    monkeypatch.setenv(variable, "x")
    with caplog.at_level("WARNING", logger="budget_middleware"):
        BudgetSettings()
    said = [r.getMessage() for r in caplog.records]
    print(f"{variable}: {len(said)} warning(s): {said}")
    assert said == [
        f"{variable} is not a budget-middleware setting and is ignored: did you mean {setting}?"
    ]


@pytest.mark.parametrize("value", [" sk-", "sk-bm- ", "clé-", "sk bm-", "sk-\t"])
def test_a_key_prefix_no_request_could_carry_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """Every generated key begins with BUDGET_KEY_PREFIX. One that begins with a space (a
    `.env` line `BUDGET_KEY_PREFIX= sk-`) was taken, and every key it made met a 401 in every
    header (a header's value is read trimmed, so no key could begin with it: 3 of 3 headers
    refused); a non-ASCII one made keys httpx and the SDKs cannot send at all ("'ascii' codec
    can't encode"); a space or tab inside is no bearer token (RFC 6750). Refused at start-up
    as BUDGET_ADMIN_KEY is, by the same rule."""
    monkeypatch.setenv("BUDGET_KEY_PREFIX", value)
    with pytest.raises(SettingsError) as caught:
        BudgetSettings()
    print(caught.value)
    assert "BUDGET_KEY_PREFIX" in str(caught.value)
    assert "printable ASCII without spaces" in str(caught.value)


@pytest.mark.parametrize(
    "value",
    ["/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01", "/generate#v2"],
)
def test_an_inference_path_with_a_query_or_fragment_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """A request's path never holds its query string or fragment (ASGI's `path`, WSGI's
    PATH_INFO), so such a suffix was taken and matched nothing: every request it was meant to
    meter passed unmetered, past every limit ($0 budget: 200, charged $0)."""
    monkeypatch.setenv("BUDGET_INFERENCE_PATHS", f"/chat/completions,{value}")
    with pytest.raises(SettingsError) as caught:
        BudgetSettings()
    print(caught.value)
    assert "BUDGET_INFERENCE_PATHS" in str(caught.value)
    assert "query string" in str(caught.value)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("Authorization", "already carries virtual keys"),
        ("x-budget-kéy", "not a valid header name"),
        ("x(budget)key", "not a valid header name"),
        ('"x-budget-key"', "not a valid header name"),
    ],
)
def test_a_key_header_no_key_could_be_read_from_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str, why: str
) -> None:
    """BUDGET_KEY_HEADER=Authorization was taken, and the whole header value was read as the
    key: every OpenAI SDK call (`Bearer sk-bm-…`, a valid virtual key) and every host
    credential got 401 `invalid_virtual_key` (2 of 2). A name that is no HTTP token (a non-ASCII
    letter, a parenthesis, quotes) was taken too, and no client can send such a header: the
    key it was meant to carry was never read."""
    monkeypatch.setenv("BUDGET_KEY_HEADER", value)
    with pytest.raises(SettingsError) as caught:
        BudgetSettings()
    print(caught.value)
    assert "BUDGET_KEY_HEADER" in str(caught.value) and why in str(caught.value)


@pytest.mark.parametrize(
    "host", ["https://llm.internal.example", "llm.internal.example/v1", "llm.internal.example:8443"]
)
def test_a_provider_host_written_as_a_url_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    """A call's host is compared as it is (`api.openai.com`): no scheme, path or port. Such an
    entry was taken and matched no call, so the calls it named got their provider from the
    model instead (`gpt-4o` on the internal gateway: `openai`, its limits and prices, never the
    provider the operator named)."""
    monkeypatch.setenv("BUDGET_PROVIDER_HOSTS", json.dumps({host: "internal"}))
    with pytest.raises(SettingsError) as caught:
        BudgetSettings()
    print(caught.value)
    assert "BUDGET_PROVIDER_HOSTS" in str(caught.value) and "not a host" in str(caught.value)


def test_an_empty_or_blank_alert_thresholds_is_the_default_and_an_empty_list_is_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`BUDGET_ALERT_THRESHOLDS=` (empty, as a compose file writes it) counted as unset, the
    default 0.8,1.0, but a blank one (`" "`, a line break from a secret's file), a lone `,` and
    `BudgetSettings(alert_thresholds="")` silently turned every threshold alert off: `()`.
    Empty or blank, in the environment or as an argument, is unset (0.8, 1.0); `[]` says "no
    threshold alerts" (budget.exhausted is still raised); text that names no fraction is refused."""
    found = {}
    for text in ("", " ", "\n", "\t "):
        monkeypatch.setenv("BUDGET_ALERT_THRESHOLDS", text)
        found[f"env {text!r}"] = BudgetSettings().alert_thresholds
        monkeypatch.delenv("BUDGET_ALERT_THRESHOLDS")
        found[f"argument {text!r}"] = BudgetSettings(alert_thresholds=text).alert_thresholds
    print(found)
    assert set(found.values()) == {(0.8, 1.0)}, found
    monkeypatch.setenv("BUDGET_ALERT_THRESHOLDS", "[]")
    assert BudgetSettings().alert_thresholds == ()
    assert BudgetSettings(alert_thresholds=[]).alert_thresholds == ()
    assert BudgetSettings(alert_thresholds="[]").alert_thresholds == ()
    for text in (",", " , ,"):
        monkeypatch.setenv("BUDGET_ALERT_THRESHOLDS", text)
        with pytest.raises(SettingsError, match=r"BUDGET_ALERT_THRESHOLDS.*names no fraction"):
            BudgetSettings()


@pytest.mark.parametrize(
    ("field", "bound"),
    [("flush_interval_seconds", 3600), ("cache_ttl_seconds", 86400), ("slot_ttl_seconds", 86400)],
)
def test_a_duration_past_its_bound_is_refused_naming_the_variable(
    field: str, bound: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`BUDGET_FLUSH_INTERVAL_SECONDS=1e10` was accepted: the flusher's first round in 317
    years, so charges reached the store (and other instances) only at shutdown;
    `BUDGET_SLOT_TTL_SECONDS=1e10`, a crashed instance's concurrency slots held for as long;
    `BUDGET_SLOT_TTL_SECONDS=1e300` made Redis refuse every admission (an expiry past its
    integers: 3 of 3 requests 503). Each duration has an upper bound, as
    BUDGET_REDIS_TIMEOUT_SECONDS has (3600): the bound is taken, past it is refused at start-up
    naming the variable and the bound, as a variable and as an argument."""
    variable = f"BUDGET_{field.upper()}"
    assert getattr(BudgetSettings(**{field: bound}), field) == bound
    monkeypatch.setenv(variable, str(bound))
    assert getattr(BudgetSettings(), field) == bound
    for bad in ("1e10", "1e300", str(bound + 1)):
        monkeypatch.setenv(variable, bad)
        with pytest.raises(SettingsError, match=rf"{variable}.*{bound}") as raised:
            print(bad, "->", getattr(BudgetSettings(), field))
        print(raised.value)
        monkeypatch.delenv(variable)
        with pytest.raises(SettingsError, match=rf"{variable}.*{bound}"):
            BudgetSettings(**{field: float(bad)})


@pytest.mark.parametrize(
    ("field", "least", "bad"),
    [
        ("flush_interval_seconds", 0.01, ["1e-9", "0.009"]),
        ("slot_ttl_seconds", 1, ["0.001", "0.5"]),
    ],
)
def test_a_duration_under_its_floor_is_refused_naming_the_variable(
    field: str, least: float, bad: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`BUDGET_FLUSH_INTERVAL_SECONDS=1e-9` was accepted, and an idle app spun half a core
    flushing nothing; `BUDGET_SLOT_TTL_SECONDS=0.001`, and slots expired before a heartbeat could
    refresh them: two instances on one Redis held 2 streams at once on a limit of 1 in flight.
    Each has a floor now (0.01 s, 1 s), taken, and under it refused naming the variable."""
    variable = f"BUDGET_{field.upper()}"
    assert getattr(BudgetSettings(**{field: least}), field) == least
    for text in bad:
        monkeypatch.setenv(variable, text)
        with pytest.raises(SettingsError, match=rf"{variable}.*greater than or equal to {least}"):
            print(text, "->", getattr(BudgetSettings(), field))
        monkeypatch.delenv(variable)


def test_a_config_file_that_is_a_folder_is_named_as_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Kubernetes ConfigMap mounted at the file's own path makes it a folder: start-up said the
    file `does not exist`, which `ls` contradicts. It now says what it is."""
    folder = tmp_path / "budget.yaml"
    folder.mkdir()
    for name in ("BUDGET_CONFIG_FILE", "BUDGET_PRICING_FILE"):
        monkeypatch.setenv(name, str(folder))
        with pytest.raises(SettingsError) as caught:
            BudgetSettings()
        monkeypatch.delenv(name)
        print(caught.value)
        assert "is a folder, not a file" in str(caught.value)
        assert "does not exist" not in str(caught.value)
    with pytest.raises(SettingsError, match="does not exist"):
        BudgetSettings(config_file=tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks example.com/alerts",  # a blank in the host (a typo)
        "http://127.0.0.1 :8080/hook",  # a blank before the port
        "http://hooks..example.com/alerts",  # an empty label
        "http://hooks%20example.com/alerts",
    ],
)
def test_a_webhook_url_whose_host_can_never_be_reached_fails_at_start_up(url: str) -> None:
    """SPEC §3: "Invalid settings fail at start-up with a message that names the variable";
    the brief: bad input fails loudly. A `BUDGET_ALERT_WEBHOOK_URLS` entry whose host holds a
    blank (`http://hooks example.com/alerts`) was accepted: httpx sends it to the host
    `hooks%20example.com`, which no resolver knows, so every alert's delivery fails, is
    retried for 10 minutes and given up, and the operator hears of it only from
    `budget_alert_deliveries_failed_total` and a log line, long after start-up."""
    with pytest.raises(SettingsError) as refused:
        BudgetSettings(alert_webhook_urls=url, database_url="sqlite://")
    message = str(refused.value)
    print(f"{url!r} refused: {message.splitlines()[-1]}")
    assert "BUDGET_ALERT_WEBHOOK_URLS" in message and "invalid host" in message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "https://hooks.slack.com/services/T000/B000/XXXX",
        "http://[::1]:8080/hook",
        "http://bücher.example/hook",
        "http://localhost./hook",
        "http://receiver_1.internal/hook",
    ],
)
def test_valid_webhook_urls_stay_accepted(url: str) -> None:
    """The fix must not refuse real receivers (IPv6, IDNA, a trailing dot, an underscore)."""
    settings = BudgetSettings(alert_webhook_urls=url, database_url="sqlite://")
    assert settings.alert_webhook_urls == (url,)


def test_provider_hosts_naming_a_host_twice_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`{"llm.example.com": "openai", "llm.example.com": "anthropic"}` was taken as anthropic
    alone: which provider's budgets meter that host was left to the last key (a fault hunt's)."""
    monkeypatch.setenv(
        "BUDGET_PROVIDER_HOSTS", '{"llm.example.com": "openai", "llm.example.com": "anthropic"}'
    )
    with pytest.raises(SettingsError, match=r"BUDGET_PROVIDER_HOSTS.*'llm.example.com'.*twice"):
        BudgetSettings()


@pytest.mark.parametrize("header", ["host", "Content-Type", "content-length"])
def test_a_key_header_every_request_carries_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, header: str
) -> None:
    """As `BUDGET_KEY_HEADER=authorization` is refused: with `host`, `content-type` or
    `content-length`, every metered request, a keyless one too, was answered 401
    `invalid_virtual_key` (its value, `application/json` say, read as a key; a fault hunt's)."""
    monkeypatch.setenv("BUDGET_KEY_HEADER", header)
    with pytest.raises(SettingsError, match=r"BUDGET_KEY_HEADER.*sent with every request"):
        BudgetSettings()


@pytest.mark.parametrize(
    "hosts",
    [
        '{"LLM.example.com": "openai", "llm.example.com": "anthropic"}',
        '{"llm.example.com": "openai", " llm.example.com": "anthropic"}',
        [("llm.example.com", "openai"), ("llm.example.com", "anthropic")],
    ],
)
def test_a_host_given_twice_in_provider_hosts_is_refused_in_any_spelling(hosts: Any) -> None:
    """The fix refuses `{"a": "openai", "a": "anthropic"}` (the last would silently win), but
    the table compares hosts lowercased and stripped: `LLM.example.com` and `llm.example.com`
    (or a blank in front) are one host, and the last still silently wins (HostTable's dict):
    every call to it metered as Anthropic's, OpenAI's provider budget never charged."""
    with pytest.raises(SettingsError, match="twice"):
        BudgetSettings(provider_hosts=hosts)


def test_a_password_in_a_url_s_query_is_hidden_in_repr_and_the_start_up_line() -> None:
    """libpq and redis-py take the password as `?password=` too: `repr()`, `str()` and the
    start-up line hid `user:password@` only, and showed the query's in clear (a fault hunt's).
    README: the start-up line names the store and Redis "(passwords hidden)"."""
    from budget_middleware import get_engine

    settings = BudgetSettings(
        database_url="postgresql+psycopg://u@127.0.0.1:1/x?password=DBSECRETQ9&sslmode=require",
        redis_url="redis://127.0.0.1:6379/1?password=REDISSECRETQ9",
    )
    line = get_engine(settings).describe("/budget-admin")
    print(line)
    for shown in (repr(settings), str(settings), line):
        assert "DBSECRETQ9" not in shown and "REDISSECRETQ9" not in shown, shown
        assert "password=***" in shown and "sslmode=require" in shown


def test_a_dot_env_file_shared_with_the_app_is_read_and_its_other_variables_left_alone(
    tmp_path: Path,
) -> None:
    """`BudgetSettings(_env_file=".env")` (pydantic-settings' own way): the app's `.env` holds
    its other variables too. Each was refused, named as a setting that does not exist
    ("BUDGET_OPENAI_API_KEY: Extra inputs are not permitted"), and the middleware could not
    start; the environment leaves them alone, and so does a `.env` now."""
    env = tmp_path / ".env"
    env.write_text("OPENAI_API_KEY=sk-proj-abc\nBUDGET_EXCEEDED_STATUS=429\n")
    settings = BudgetSettings(_env_file=env)  # type: ignore[call-arg]
    print(f"exceeded_status read from .env: {settings.exceeded_status}")
    assert settings.exceeded_status == 429
    env.write_text("OPENAI_API_KEY=sk-proj-abc\nBUDGET_EXCEEDED_STATUS=500\n")
    with pytest.raises(SettingsError) as caught:
        BudgetSettings(_env_file=env)  # type: ignore[call-arg]
    print(caught.value)
    assert "BUDGET_EXCEEDED_STATUS" in str(caught.value) and "OPENAI" not in str(caught.value)
    with pytest.raises(SettingsError, match="BUDGET_DATABSE_URL: is not a setting"):
        BudgetSettings(databse_url="sqlite://")  # type: ignore[call-arg]


def test_a_misspelt_keyword_argument_names_the_setting_it_looks_like() -> None:
    """`BudgetSettings(databse_url=...)` was refused naming `BUDGET_DATABSE_URL` alone, a
    variable the caller never set, with no hint of the argument meant (a misspelt variable
    gets "did you mean BUDGET_DATABASE_URL?"). The error names the argument and the setting."""
    with pytest.raises(SettingsError) as caught:
        BudgetSettings(databse_url="sqlite://", reserv=False)  # type: ignore[call-arg]
    text = str(caught.value)
    print(text)
    assert "BUDGET_DATABSE_URL: is not a setting" in text
    assert "databse_url=" in text and "did you mean database_url=?" in text
    assert "did you mean reserve=?" in text
