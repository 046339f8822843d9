"""Prices and costs (SPEC §7): pricing file, genai-prices catalog, integer nano-dollars."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import pytest
from genai_prices import types as gp

from budget_middleware.core.money import (
    MAX_CHARGE_NANOS,
    charge_nanos,
    limit_nanos,
    nanos_from_usd,
    usd_from_nanos,
    usd_header,
    usd_text,
)
from budget_middleware.core.pricing import (
    DeploymentPrice,
    ModelPrice,
    cost_nanos,
    cost_usd,
    estimate_nanos,
    in_force,
)
from budget_middleware.core.usage import TokenUsage
from budget_middleware.engine.prices import PriceBook
from budget_middleware.exceptions import PricingFileError


def write_prices(tmp_path: Path, content: Any) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def catalog_nanos(provider: str | None, model: str, usage: TokenUsage) -> Decimal:
    """What genai-prices itself charges for `usage`, in nano-dollars (exact Decimal)."""
    gp_usage = genai_prices.Usage(
        input_tokens=usage.input_tokens,
        cache_read_tokens=usage.cached_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        output_tokens=usage.output_tokens,
    )
    calc = genai_prices.calc_price(gp_usage, model, provider_id=provider)
    return calc.total_price * 1_000_000_000


USAGES = [
    TokenUsage(input_tokens=1, output_tokens=1),
    TokenUsage(input_tokens=1234, output_tokens=567),
    TokenUsage(input_tokens=10_000, output_tokens=0, cached_tokens=8_192),
    TokenUsage(input_tokens=150_000, output_tokens=4_000, cached_tokens=100_000),
    TokenUsage(input_tokens=3, output_tokens=7, cached_tokens=1),
]
CACHE_WRITE_USAGES = [
    TokenUsage(
        input_tokens=20_000, output_tokens=900, cached_tokens=5_000, cache_write_tokens=12_000
    ),
    TokenUsage(input_tokens=777, output_tokens=11, cache_write_tokens=777),
]


# --- the pricing file -----------------------------------------------------------------------


def test_pricing_file_prices_win_over_the_catalog(tmp_path: Path) -> None:
    path = write_prices(
        tmp_path, {"models": {"openai/gpt-4o": {"input_per_mtok": 1, "output_per_mtok": 2}}}
    )
    price = PriceBook(path).price("openai", "gpt-4o")
    assert price == ModelPrice(1.0, 2.0, source="pricing_file")


def test_provider_model_key_wins_over_bare_model_key(tmp_path: Path) -> None:
    path = write_prices(
        tmp_path,
        {
            "models": {
                "my-model": {"input_per_mtok": 1, "output_per_mtok": 1},
                "acme/my-model": {
                    "input_per_mtok": 5,
                    "output_per_mtok": 6,
                    "cached_input_per_mtok": 0.5,
                },
            }
        },
    )
    book = PriceBook(path)
    assert book.price("acme", "my-model") == ModelPrice(5, 6, 0.5, source="pricing_file")
    assert book.price("other", "my-model") == ModelPrice(1, 1, source="pricing_file")


def test_pricing_file_accepts_cache_write_prices_and_matches_keys_case_insensitively(
    tmp_path: Path,
) -> None:
    entry = {"input_per_mtok": 3, "output_per_mtok": 15, "cache_write_per_mtok": 3.75}
    book = PriceBook(write_prices(tmp_path, {"models": {"Acme/Big-Model": entry}}))
    assert book.price("acme", "big-model") == ModelPrice(3, 15, None, 3.75, "pricing_file")


INVALID_FILES: list[tuple[str, Any, str]] = [
    ("not_json", "{models: ", "not valid JSON"),
    ("top_level_list", [1, 2], '"models" object'),
    ("no_models", {"prices": {}}, '"models" object'),
    ("models_not_object", {"models": ["gpt-4o"]}, '"models" object'),
    (
        "negative_price",
        {"models": {"m": {"input_per_mtok": -1, "output_per_mtok": 1}}},
        "input_per_mtok",
    ),
    (
        "string_price",
        {"models": {"m": {"input_per_mtok": "2.5", "output_per_mtok": 1}}},
        "valid number",
    ),
    (
        "bool_price",
        {"models": {"m": {"input_per_mtok": True, "output_per_mtok": 1}}},
        "valid number",
    ),
    ("nan_price", '{"models": {"m": {"input_per_mtok": NaN, "output_per_mtok": 1}}}', "finite"),
    ("missing_output_price", {"models": {"m": {"input_per_mtok": 1}}}, "output_per_mtok"),
    ("unknown_model_field", {"models": {"m": {"input": 1, "output_per_mtok": 1}}}, "unknown field"),
    ("unknown_top_field", {"models": {}, "currency": "EUR"}, "unknown field"),
    # not "a valid dictionary or instance of _FilePrice": a class of ours the user never wrote
    ("model_not_an_object", {"models": {"m": 5}}, "m: must be an object of prices (input_per_mtok"),
    (
        "empty_model_key",
        {"models": {"/": {"input_per_mtok": 1, "output_per_mtok": 1}}},
        "model name",
    ),
]


@pytest.mark.parametrize(
    ("content", "problem"), [c[1:] for c in INVALID_FILES], ids=[c[0] for c in INVALID_FILES]
)
def test_an_invalid_pricing_file_is_refused_naming_the_variable_the_file_and_the_problem(
    tmp_path: Path, content: Any, problem: str
) -> None:
    path = write_prices(tmp_path, content)
    with pytest.raises(PricingFileError) as info:
        PriceBook(path)
    message = str(info.value)
    assert "BUDGET_PRICING_FILE" in message
    assert str(path) in message
    assert problem in message and "_" + "FilePrice" not in message
    assert isinstance(info.value, ValueError)


def test_a_missing_pricing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PricingFileError, match=r"BUDGET_PRICING_FILE.*cannot be read"):
        PriceBook(tmp_path / "nope.json")


# --- the genai-prices catalog ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "model", "usages"),
    [
        ("openai", "gpt-4o", USAGES),
        ("openai", "gpt-4o-mini", USAGES),
        ("anthropic", "claude-sonnet-4-5", USAGES + CACHE_WRITE_USAGES),
        ("anthropic", "claude-3-5-sonnet-latest", USAGES + CACHE_WRITE_USAGES),
        ("openai", "text-embedding-3-small", [TokenUsage(input_tokens=n) for n in (1, 99, 8191)]),
    ],
)
def test_catalog_costs_match_genai_prices_to_the_nanodollar(
    provider: str, model: str, usages: list[TokenUsage]
) -> None:
    book = PriceBook()
    for asked_provider in (provider, "unknown"):
        price = book.price(asked_provider, model)
        assert price is not None and price.source == "catalog"
        for usage in usages:
            assert abs(cost_nanos(price, usage) - catalog_nanos(provider, model, usage)) <= 1, usage


def test_genai_prices_input_price_applies_to_input_tokens_less_cache_reads() -> None:
    # genai-prices counts cache reads in input_tokens, as TokenUsage does:
    # 600k uncached at $2.50 + 400k cached at $1.25 per million
    usage = TokenUsage(input_tokens=1_000_000, cached_tokens=400_000)
    assert catalog_nanos("openai", "gpt-4o", usage) == 2_000_000_000
    price = PriceBook().price("openai", "gpt-4o")
    assert price is not None and cost_nanos(price, usage) == 2_000_000_000


def test_long_context_requests_are_priced_at_their_tier() -> None:
    price = PriceBook().price("anthropic", "claude-sonnet-4-5")
    above = ModelPrice(6.0, 22.5, 0.6, 7.5, cache_write_1h_per_mtok=12.0, web_search_per_k=10.0)
    base = ModelPrice(3.0, 15.0, 0.3, 3.75, cache_write_1h_per_mtok=6.0, web_search_per_k=10.0)
    assert price == replace(base, tiers=((200_000, above),))
    assert in_force(price, 200_000) is price and in_force(price, 200_001) == above
    # a reservation of a long request is one at the tier's prices
    assert estimate_nanos(price, 300_000, 1000) == 300_000 * 6_000 + 1000 * 22_500


def test_provider_aliases_and_unknown_providers_still_find_the_model() -> None:
    book = PriceBook()
    gemini = book.price("gemini", "gemini-2.5-pro")
    assert gemini is not None and gemini == book.price("google", "gemini-2.5-pro")
    assert book.price("unknown", "gpt-4o") == book.price("openai", "gpt-4o")
    assert book.price("my-gateway", "gpt-4o") == book.price("openai", "gpt-4o")


def test_an_unknown_model_has_no_price_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    book = PriceBook()
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        for _ in range(3):
            assert book.price("unknown", "no-such-model-xyz") is None
        book.note_unpriced("unknown", "no-such-model-xyz")
    warnings = [r for r in caplog.records if "no-such-model-xyz" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING and warnings[0].name == "budget_middleware"
    assert ("unknown", "no-such-model-xyz") in book.unpriced


@pytest.mark.parametrize("model", ["gpt-4o", "no-such-model-xyz"])
def test_a_repeat_lookup_does_not_ask_genai_prices_again(
    monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    calls: list[str] = []
    original = gp.Provider.find_model

    def spy(self: gp.Provider, model_ref: str, **kwargs: Any) -> gp.ModelInfo | None:
        calls.append(model_ref)
        return original(self, model_ref, **kwargs)

    monkeypatch.setattr(gp.Provider, "find_model", spy)
    book = PriceBook()
    first = book.price("openai", model)
    assert calls
    calls.clear()
    for _ in range(5):
        assert book.price("openai", model) is first
    assert calls == []


# --- guessing a provider --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("gpt-4o", "openai"),
        ("gpt-4o-mini", "openai"),
        ("text-embedding-3-small", "openai"),
        ("claude-3-5-sonnet-latest", "anthropic"),
        ("claude-sonnet-4-5", "anthropic"),
        ("gemini-2.5-pro", "google"),
        ("no-such-model-xyz", None),
    ],
)
def test_guess_provider_names_the_catalog_provider_of_a_bare_model(
    model: str, provider: str | None
) -> None:
    assert PriceBook().guess_provider(model) == provider


def test_guess_provider_knows_the_pricing_files_provider_keys(tmp_path: Path) -> None:
    path = write_prices(
        tmp_path, {"models": {"acme/rocket-1": {"input_per_mtok": 1, "output_per_mtok": 1}}}
    )
    book = PriceBook(path)
    assert book.guess_provider("rocket-1") == "acme"
    assert book.guess_provider("rocket-1") == "acme"  # cached


# --- cost arithmetic ------------------------------------------------------------------------


def test_cost_prices_uncached_input_cache_reads_cache_writes_and_output_separately() -> None:
    price = ModelPrice(3.0, 15.0, 0.3, 3.75)
    usage = TokenUsage(
        input_tokens=1000, output_tokens=100, cached_tokens=200, cache_write_tokens=300
    )
    # 500 x $3 + 200 x $0.30 + 300 x $3.75 + 100 x $15 per million tokens
    assert cost_nanos(price, usage) == 500 * 3000 + 200 * 300 + 300 * 3750 + 100 * 15000
    assert cost_usd(price, usage) == pytest.approx(0.004185)


def test_cache_tokens_without_their_own_price_cost_the_input_price() -> None:
    usage = TokenUsage(input_tokens=1000, cached_tokens=400, cache_write_tokens=100)
    assert cost_nanos(ModelPrice(2.0, 8.0), usage) == 1000 * 2000


def test_cost_is_never_negative_even_for_inconsistent_usage() -> None:
    price = ModelPrice(2.0, 8.0, 1.0)
    assert cost_nanos(price, TokenUsage(input_tokens=10, cached_tokens=50)) == 50 * 1000
    assert cost_nanos(price, TokenUsage(input_tokens=-5, output_tokens=-5, cached_tokens=-1)) == 0


def test_cost_rounds_half_up_to_whole_nanodollars() -> None:
    half_a_nano_per_token = ModelPrice(0.0005, 0.0)
    assert cost_nanos(half_a_nano_per_token, TokenUsage(input_tokens=1)) == 1
    assert cost_nanos(half_a_nano_per_token, TokenUsage(input_tokens=3)) == 2
    assert cost_nanos(ModelPrice(0.0004, 0.0), TokenUsage(input_tokens=1)) == 0


def test_an_estimate_is_the_cost_of_that_usage_all_input_uncached() -> None:
    """The reservation's arithmetic is the charge's: the same rounding, cache rates unused."""
    prices = [ModelPrice(2.5, 10.0, 1.25, 3.75), ModelPrice(0.0005, 0.0015), ModelPrice(0.15, 0.6)]
    checked = 0
    for price in prices:
        for inp in (0, 1, 3, 26, 999, 123_457):
            for out in (0, 1, 7, 4096):
                expected = cost_nanos(price, TokenUsage(input_tokens=inp, output_tokens=out))
                assert estimate_nanos(price, inp, out) == expected, (price, inp, out)
                checked += 1
    assert estimate_nanos(prices[0], -5, -5) == 0  # never below zero, like a charge
    print(f"estimate == cost of the same usage in {checked} cases")


def test_prices_must_be_finite_and_not_negative() -> None:
    with pytest.raises(ValueError):
        ModelPrice(-1.0, 1.0)
    with pytest.raises(ValueError):
        ModelPrice(1.0, float("inf"))


def test_estimate_reserves_all_input_at_the_input_price_and_output_at_the_output_price() -> None:
    book = PriceBook()
    gpt_4o = book.price("openai", "gpt-4o")
    assert estimate_nanos(gpt_4o, 1000, 500) == 1000 * 2500 + 500 * 10_000
    assert estimate_nanos(book.price("unknown", "no-such-model-xyz"), 1000, 500) == 0


@pytest.mark.parametrize(
    ("usd", "nanos"),
    [
        (0.0, 0),
        (1.0, 1_000_000_000),
        (2.5e-9, 3),
        (1.4999e-9, 1),
        (1.5e-9, 2),
        (0.1234567895, 123_456_790),
        (0.1, 100_000_000),
        (-3.0, 0),
    ],
)
def test_nanos_from_usd_rounds_half_up_and_clamps_negatives(usd: float, nanos: int) -> None:
    assert nanos_from_usd(usd) == nanos


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nanos_from_usd_rejects_nan_and_infinity(bad: float) -> None:
    with pytest.raises(ValueError):
        nanos_from_usd(bad)


def test_usd_from_nanos_is_the_inverse() -> None:
    assert usd_from_nanos(1_500_000_000) == 1.5
    assert usd_from_nanos(nanos_from_usd(0.004185)) == 0.004185


def test_noise_below_a_ten_thousandth_of_a_nanodollar_is_dropped_before_rounding() -> None:
    # Amounts are rounded to 4 decimals of a nano-dollar first (binary noise), then half up.
    assert nanos_from_usd(1.49996e-9) == 2
    assert nanos_from_usd(1.49994e-9) == 1
    assert nanos_from_usd(7e-10) == 1
    assert nanos_from_usd(4e-10) == 0


def test_a_positive_limit_is_never_zero_nanodollars() -> None:
    assert limit_nanos(1e-12) == 1  # LiteLLM's smallest limit: the first request passes
    assert limit_nanos(4e-10) == 1
    assert limit_nanos(0.0) == 0
    assert limit_nanos(-1.0) == 0
    assert limit_nanos(1e-9) == 1
    assert limit_nanos(2.0) == 2_000_000_000
    assert limit_nanos(0.5) == 500_000_000


def test_a_reported_charge_is_capped_at_a_million_dollars() -> None:
    assert MAX_CHARGE_NANOS == 10**15
    assert charge_nanos(999_999.0) == 999_999_000_000_000
    assert charge_nanos(1_000_000.0) == 10**15
    assert charge_nanos(1e7) == 10**15
    assert charge_nanos(1e300) == 10**15
    assert charge_nanos(0.25) == 250_000_000
    assert charge_nanos(-2.0) == 0
    with pytest.raises(ValueError):
        charge_nanos(float("nan"))


def test_amounts_are_shown_in_dollars_to_four_decimals_and_in_headers_exactly() -> None:
    """Headers show six decimals, or nine when an amount holds part of a micro-dollar: exact,
    so the smallest positive limit (SPEC §6: LiteLLM's 0.000000000001 is $0.000000001) never
    reads 0.000000."""
    assert usd_text(10_010_000_000) == "$10.0100"
    assert usd_text(0) == "$0.0000"
    # Under a cent, what four decimals would round is written exactly (a budget of a fraction
    # of a cent read `$0.0000 spent of $0.0000`); a cent and over, four decimals as before.
    assert usd_text(123_456) == "$0.000123456"
    assert usd_text(1) == "$0.000000001"
    assert usd_text(20_000) == "$0.00002"
    assert usd_text(-20_000) == "-$0.00002"  # the sign first, as the dashboard writes it
    assert usd_text(100_000) == "$0.0001"  # four decimals hold it
    assert usd_text(100_001) == "$0.000100001"
    assert usd_text(1_000_000) == "$0.0010"  # held by four decimals: written with four
    assert usd_text(9_999_999) == "$0.009999999"
    assert usd_text(10_000_001) == "$0.0100"  # a cent and over: four decimals
    assert usd_text(-10_000_001) == "-$0.0100"
    assert usd_header(10_010_000_000) == b"10.010000"
    assert usd_header(0) == b"0.000000"
    assert usd_header(1_234_567) == b"0.001234567"
    assert usd_header(1) == b"0.000000001"
    assert usd_header(10**15 + 1) == b"1000000.000000001"  # no float: exact at any size
    # A negative amount keeps its sign on the magnitude (divmod alone floors: -1.998500).
    assert usd_header(-1_500_000) == b"-0.001500"
    assert usd_header(-1) == b"-0.000000001"
    # Nine decimals asked for (beside an amount that needs them): the same amount, as exactly.
    assert usd_header(1_000_000, nine=True) == b"0.001000000"
    assert usd_header(-1_500_000, nine=True) == b"-0.001500000"


def test_negative_cache_counts_are_no_tokens_at_any_rate() -> None:
    price = ModelPrice(1.0, 2.0, cached_input_per_mtok=0.5, cache_write_per_mtok=4.0)
    k = 1000  # 1 $/Mtok is 1000 nano-dollars a token
    assert cost_nanos(price, TokenUsage(input_tokens=10, cache_write_tokens=-5)) == 10 * k
    assert cost_nanos(price, TokenUsage(input_tokens=10, cached_tokens=-5)) == 10 * k
    assert cost_nanos(price, TokenUsage(input_tokens=10, cache_write_tokens=4)) == (6 + 16) * k
    assert cost_nanos(price, TokenUsage(input_tokens=10, cache_write_tokens=1)) == (9 + 4) * k
    assert cost_nanos(price, TokenUsage(input_tokens=10, cached_tokens=1)) == 9 * k + k // 2
    assert cost_nanos(price, TokenUsage(input_tokens=1, output_tokens=1)) == (1 + 2) * k
    assert estimate_nanos(price, 1, 1) == (1 + 2) * k
    assert cost_nanos(price, TokenUsage(input_tokens=10, cached_tokens=4)) == (6 + 2) * k
    assert cost_nanos(price, TokenUsage(output_tokens=-3, input_tokens=1)) == 1 * k
    assert estimate_nanos(price, -10, 5) == 10 * k
    assert estimate_nanos(price, 10, -5) == 10 * k


def test_each_kind_with_a_rate_of_its_own_adds_only_what_it_holds() -> None:
    """A web search alone adds its price and nothing for the 1-hour writes, audio it does not
    have (each kind taken as 0, not as 1 token); audio alone adds no search."""
    price = ModelPrice(
        3.0,
        15.0,
        0.3,
        3.75,
        cache_write_1h_per_mtok=6.0,
        input_audio_per_mtok=40.0,
        output_audio_per_mtok=80.0,
        web_search_per_k=10.0,
    )
    tokens = {"input_tokens": 1000, "output_tokens": 100, "cache_write_tokens": 300}
    base = 700 * 3000 + 300 * 3750 + 100 * 15000  # nano-dollars: input, 5-minute writes, output
    searched = cost_nanos(price, TokenUsage(**tokens, web_searches=2))
    assert searched == base + 2 * 10_000_000  # $10 a thousand searches: 1 cent each
    heard = cost_nanos(price, TokenUsage(**tokens, input_audio_tokens=10))
    assert heard == base + 10 * (40_000 - 3000)  # no search, no 1-hour write, no output audio
    spoken = cost_nanos(price, TokenUsage(**tokens, output_audio_tokens=10))
    assert spoken == base + 10 * (80_000 - 15_000)
    print(f"base {base}, 2 searches {searched}, input audio {heard}, output audio {spoken} n$")


def test_reasoning_and_citations_at_their_own_rates_add_only_what_they_hold() -> None:
    """Sonar Deep Research's prices ($2 input, $8 output, $3 reasoning, $2 citations a million
    tokens): reasoning alone adds nothing for citations, citations alone nothing for reasoning
    (a kind absent is 0 tokens, not 1)."""
    price = ModelPrice(2.0, 8.0, output_reasoning_per_mtok=3.0, output_citation_per_mtok=2.0)
    base = 1000 * 2000 + 100 * 8000  # nano-dollars: 1,000 input and 100 output tokens
    cited = cost_nanos(price, TokenUsage(input_tokens=1000, output_tokens=100, citation_tokens=40))
    assert cited == base + 40 * (2000 - 8000) == 2_560_000
    thought = cost_nanos(
        price, TokenUsage(input_tokens=1000, output_tokens=100, reasoning_tokens=40)
    )
    assert thought == base + 40 * (3000 - 8000) == 2_600_000
    print(f"base {base}, 40 citation tokens {cited}, 40 reasoning tokens {thought} n$")


@pytest.mark.parametrize(
    ("audio", "reasoning", "citations", "expected"),
    [
        # 60 of 100 output tokens audio: 40 left for reasoning, of its 80
        (60, 80, 0, 100 * 8000 + 60 * (80_000 - 8000) + 40 * (3000 - 8000)),
        # 60 reasoning: 40 left for citations, of their 70
        (0, 60, 70, 100 * 8000 + 60 * (3000 - 8000) + 40 * (2000 - 8000)),
        # 50 audio: 50 left for citations, of their 80
        (50, 0, 80, 100 * 8000 + 50 * (80_000 - 8000) + 50 * (2000 - 8000)),
    ],
)
def test_reasoning_and_citations_are_priced_within_the_output_left_beside_audio(
    audio: int, reasoning: int, citations: int, expected: int
) -> None:
    """Output audio, reasoning and citations are each within the output, in that order: more
    than the output holds is priced as the output's rest, not as the count reported."""
    price = ModelPrice(
        2.0,
        8.0,
        output_audio_per_mtok=80.0,
        output_reasoning_per_mtok=3.0,
        output_citation_per_mtok=2.0,
    )
    usage = TokenUsage(
        output_tokens=100,
        output_audio_tokens=audio,
        reasoning_tokens=reasoning,
        citation_tokens=citations,
    )
    cost = cost_nanos(price, usage)
    print(f"100 output, {audio} audio, {reasoning} reasoning, {citations} citations: {cost} n$")
    assert cost == expected


def test_web_searches_cost_nothing_on_a_model_without_a_search_price() -> None:
    """A model without `web_search_per_k` charges no search, however many: a million searches
    add not even a nano-dollar to 1,000 input tokens at $3/Mtok."""
    price = ModelPrice(3.0, 15.0)
    cost = cost_nanos(price, TokenUsage(input_tokens=1000, web_searches=1_000_000))
    print(f"1,000 input tokens and 1,000,000 unpriced searches: {cost} n$")
    assert cost == 1000 * 3000


@pytest.mark.parametrize(
    ("start", "end"),
    [(3600, 14_400), (59_400, 1_800), (7200, 7200)],
    ids=["01-04", "16:30-00:30", "empty"],
)
def test_hours_priced_apart_are_in_force_as_genai_prices_says(start: int, end: int) -> None:
    """`at_time` against genai-prices' own rule (`TimeOfDateConstraint.active`), at each edge
    of the hours and a second either side: the start is in, the end is out, hours that cross
    midnight hold on both sides of it, and hours that end where they start hold never."""
    from datetime import UTC, datetime, time

    from budget_middleware.core.pricing import at_time

    def clock(second: int) -> time:
        return time(second // 3600, second // 60 % 60, second % 60)

    peak = ModelPrice(2.0, 8.0)
    base = replace(ModelPrice(1.0, 4.0), daily=((float(start), float(end), peak),))
    rule = gp.TimeOfDateConstraint(clock(start), clock(end))
    day = datetime(2026, 12, 3, tzinfo=UTC).timestamp()
    seconds = sorted({0, 86_399, *(t + d for t in (start, end) for d in (-1, 0, 1))})
    found = [(s, at_time(base, day + s) is peak) for s in seconds if 0 <= s < 86_400]
    want = [(s, rule.active(datetime.fromtimestamp(day + s, UTC))) for s, _ in found]
    print(f"{clock(start)}-{clock(end)}:", found)
    assert found == want


def test_a_fee_a_request_is_charged_and_reserved_once_whatever_the_tokens(tmp_path: Path) -> None:
    """`request_per_k` (a pricing file's, or the catalog's `requests_kcount`): USD a thousand
    requests, added once to a request's cost and to its reservation, whatever its tokens or
    choices; a model without one adds nothing."""
    entry = {"input_per_mtok": 1, "output_per_mtok": 1, "request_per_k": 5}
    price = PriceBook(write_prices(tmp_path, {"models": {"acme/sonar": entry}})).price(
        "acme", "sonar"
    )
    assert price is not None and price.request_per_k == 5
    fee = 5_000_000  # $5 a thousand requests: half a cent each
    alone = cost_nanos(price, TokenUsage())
    tokens = cost_nanos(price, TokenUsage(input_tokens=1000, output_tokens=2000))
    reserved = estimate_nanos(price, 1000, 3 * 2000)  # three choices of 2,000 tokens at most
    print(f"fee alone {alone}, with 3,000 tokens {tokens}, reserved {reserved} n$")
    assert (alone, tokens, reserved) == (fee, fee + 3000 * 1000, fee + 7000 * 1000)
    assert cost_nanos(ModelPrice(1.0, 1.0), TokenUsage()) == 0


def test_a_reservation_prices_its_output_and_input_at_the_dearest_they_may_be() -> None:
    """`estimate_nanos`: a text answer's output at the text price, one that may be speech at
    the dearer audio price; an input that may be cached at the dearer of the input and the
    5-minute writes, or (1-hour writes asked) of those and the 1-hour writes. Each kind's rate
    taken apart, so that a mutant reading the wrong one is told (rates 1, 2, 3, 5, 10, 40)."""
    price = ModelPrice(1.0, 10.0, 0.5, 2.0, cache_write_1h_per_mtok=3.0,
                       output_audio_per_mtok=40.0)  # fmt: skip
    k = 1000  # nano-dollars a token at $1/Mtok
    cheap_audio = ModelPrice(1.0, 10.0, output_audio_per_mtok=5.0)
    cases = {
        "text": estimate_nanos(price, 100, 10),
        "speech": estimate_nanos(price, 100, 10, spoken=True),
        "cached": estimate_nanos(price, 100, 10, caches=1),
        "cached 1h": estimate_nanos(price, 100, 10, caches=2),
        "speech, cheaper audio": estimate_nanos(cheap_audio, 100, 10, spoken=True),
    }
    print(cases)
    assert cases == {
        "text": (100 * 1 + 10 * 10) * k,
        "speech": (100 * 1 + 10 * 40) * k,
        "cached": (100 * 2 + 10 * 10) * k,
        "cached 1h": (100 * 3 + 10 * 10) * k,
        "speech, cheaper audio": (100 * 1 + 10 * 10) * k,
    }


def test_a_pricing_file_naming_a_key_twice_is_refused_naming_the_file(tmp_path: Path) -> None:
    """openai/gpt-4o priced 2.5/10 $/Mtok and then 0/0 in one object started, and a chat of 11 in
    and 10 out was charged $0 where the first prices make $0.0001275: the last key silently won
    (a fault hunt's). SPEC §3: an invalid pricing file fails start-up naming the file and the
    entry."""
    path = write_prices(
        tmp_path,
        '{"models": {"openai/gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10,'
        ' "output_per_mtok": 0}}}',
    )
    with pytest.raises(PricingFileError) as info:
        PriceBook(path)
    print(info.value)
    assert "BUDGET_PRICING_FILE" in str(info.value) and str(path) in str(info.value)
    assert "the key 'output_per_mtok' is given twice in one object" in str(info.value)


def test_a_tool_loop_s_turns_are_summed_then_rounded_once() -> None:
    """A tool loop's turns are each priced at their own long-context tier, and the charge is
    rounded once (README): rounded turn by turn, three turns of 0.3 nano-dollars each were
    charged 0 where they cost 0.9, rounded to 1."""
    above = ModelPrice(input_per_mtok=0.0006, output_per_mtok=0.0006)  # 0.6 nano-USD a token
    price = ModelPrice(input_per_mtok=0.0003, output_per_mtok=0.0003, tiers=((200_000, above),))
    turn = TokenUsage(1, 0)
    loop = turn.plus(turn).plus(turn)
    print("3 turns of 0.3 nano-USD:", cost_nanos(price, loop), "nano-USD")
    assert len(loop.turns) == 3
    assert cost_nanos(price, turn) == 0 and cost_nanos(price, loop) == 1
    big = TokenUsage(210_000, 0)  # one turn above the tier: 126,000 nano-USD; 2 below: 0.6
    assert cost_nanos(price, turn.plus(big).plus(turn)) == 126_001


def test_a_tiered_price_charges_the_searches_of_an_answer_without_tokens() -> None:
    """An answer of one request that counts no tokens but two web searches, and one file search,
    on a model with long-context tiers: the searches are charged ($10 a thousand web searches:
    1 cent each; $2.50 a thousand file searches: 0.25 cent), as they are without tiers. A
    request's usage has no turns: it is not a tool loop whose turns, summed, add to nothing."""
    above = ModelPrice(input_per_mtok=2, output_per_mtok=2, web_search_per_k=10)
    price = ModelPrice(
        input_per_mtok=1,
        output_per_mtok=1,
        web_search_per_k=10,
        file_search_per_k=2.5,
        tiers=((200_000, above),),
    )
    searched = TokenUsage(0, 0, web_searches=2, file_searches=1)
    cost = cost_nanos(price, searched)
    print("2 web searches and 1 file search, no tokens, tiered price:", cost, "nano-USD")
    assert cost == 2 * 10_000_000 + 2_500_000
    fee = ModelPrice(input_per_mtok=1, output_per_mtok=1, request_per_k=5, tiers=((9, above),))
    print(
        "a request's fee ($5 a thousand), no tokens, tiered price:",
        cost_nanos(fee, TokenUsage(0, 0)),
    )
    assert cost_nanos(fee, TokenUsage(0, 0)) == 5_000_000


@pytest.mark.parametrize(
    "grown", ["input_tokens", "output_tokens", "cached_tokens", "cache_write_tokens"]
)
def test_a_tool_loop_grown_past_its_turns_is_priced_whole_at_its_largest_turn_s_tier(
    grown: str,
) -> None:
    """A tool loop's usage grown to an estimate of a cut stream (one count no longer its turns'
    sum, the others still theirs) is priced whole at its largest turn's tier (`_adds_up`), not
    turn by turn, which would leave the growth out. $1/$1 a million tokens (cache reads and
    writes too), $2/$2 above 200,000 input tokens: 1,000 and 2,000 nano-USD a token."""
    above = ModelPrice(
        input_per_mtok=2, output_per_mtok=2, cached_input_per_mtok=2, cache_write_per_mtok=2
    )
    price = ModelPrice(
        input_per_mtok=1,
        output_per_mtok=1,
        cached_input_per_mtok=1,
        cache_write_per_mtok=1,
        tiers=((200_000, above),),
    )
    big = TokenUsage(210_000, 10, cached_tokens=100, cache_write_tokens=100)
    small = TokenUsage(1_000, 10, cached_tokens=100, cache_write_tokens=100)
    loop = big.plus(small)
    turn_by_turn = cost_nanos(price, loop)
    print("turn by turn:", turn_by_turn, "nano-USD")
    assert turn_by_turn == 210_010 * 2_000 + 1_010 * 1_000  # each at its own tier
    cut = replace(loop, **{grown: getattr(loop, grown) + 1_000})
    assert cut.turns == loop.turns  # grown, its turns kept
    whole = cost_nanos(price, cut)
    print(f"{grown} grown by 1,000:", whole, "nano-USD")
    # all at 2,000 nano-USD a token: 211,000 input (cache reads and writes within it, so more of
    # them leave the input's whole as it is) and 20 output, and the growth of either
    tokens = {"input_tokens": 212_020, "output_tokens": 212_020}.get(grown, 211_020)
    assert whole == tokens * 2_000


def test_a_price_without_a_fee_or_a_file_search_price_adds_nothing_for_them() -> None:
    """A price that names no request fee and no file search price charges neither, not even a
    femto-dollar: a token at 499,999 femto-USD ($0.000499999 a million) rounds down to 0
    nano-USD, with a file search or without, for the charge and the estimate alike."""
    price = ModelPrice(input_per_mtok=0.000499999, output_per_mtok=0)
    charged = cost_nanos(price, TokenUsage(1, 0))
    searched = cost_nanos(price, TokenUsage(1, 0, file_searches=1))
    reserved = estimate_nanos(price, 1, 0)
    print("1 token at 499,999 femto-USD:", charged, searched, reserved, "nano-USD")
    assert (charged, searched, reserved) == (0, 0, 0)
    assert cost_nanos(price, TokenUsage(1, 0), femto_only=True) == 499_999


def test_an_estimate_for_1_hour_cache_writes_takes_the_dearest_of_the_three_rates() -> None:
    """`caches=2` reserves the input at the dearest of the input's, the writes' and the 1-hour
    writes' rates, whichever that is: 100 input tokens and 10 output at $1/$10 a million, cache
    writes $4 and 1-hour writes $2 (a price file may set them so): 100 x 4,000 + 10 x 10,000
    nano-USD; 1-hour writes $5: 100 x 5,000 + 10 x 10,000."""
    price = ModelPrice(
        input_per_mtok=1, output_per_mtok=10, cache_write_per_mtok=4, cache_write_1h_per_mtok=2
    )
    dearer_hour = replace(price, cache_write_1h_per_mtok=5)
    figures = (
        estimate_nanos(price, 100, 10, caches=2),
        estimate_nanos(dearer_hour, 100, 10, caches=2),
    )
    print("caches=2, writes $4 / 1h $2, then 1h $5:", figures, "nano-USD")
    assert figures == (500_000, 600_000)
    assert estimate_nanos(price, 100, 10, caches=1) == 500_000


def test_a_deployment_priced_by_its_own_rates_alone_charges_nothing_for_what_they_leave_out() -> (
    None
):
    """A configured deployment whose base model has no price, with a custom price for one of
    input and output only (LiteLLM's `input_cost_per_token` alone): the other costs nothing,
    as LiteLLM's custom prices do. 1,000 input and 100 output tokens: at $3 a million input
    3,000,000 nano-USD; at $15 a million output 1,500,000."""
    usage = TokenUsage(1_000, 100)
    inputs = DeploymentPrice(("hosted_vllm", "llama-3"), (("input_per_mtok", 3.0),)).priced(None)
    outputs = DeploymentPrice(("hosted_vllm", "llama-3"), (("output_per_mtok", 15.0),)).priced(None)
    assert inputs is not None and outputs is not None
    figures = (cost_nanos(inputs, usage), cost_nanos(outputs, usage))
    print("input priced alone, output priced alone:", figures, "nano-USD")
    assert figures == (3_000_000, 1_500_000)


def test_kinds_priced_apart_that_overlap_are_each_token_priced_once() -> None:
    """An answer whose counts of audio, images, reasoning and citations add up to more than
    their whole (an upstream's bug, or a client's forgery through a gateway) prices each token
    once: of 1,000 uncached input tokens 800 audio, then at most the 200 left as images; of
    1,000 output tokens 300 audio, 500 images, then 200 reasoning and no citations: 30,600,000
    nano-USD. (Three mutants of the caps' subtractions survived the test suite before this
    test.)"""
    price = ModelPrice(
        input_per_mtok=1,
        output_per_mtok=2,
        input_audio_per_mtok=10,
        output_audio_per_mtok=20,
        input_image_per_mtok=5,
        output_image_per_mtok=30,
        output_reasoning_per_mtok=3,
        output_citation_per_mtok=4,
    )
    usage = TokenUsage(
        input_tokens=1_000,
        output_tokens=1_000,
        input_audio_tokens=800,
        input_image_tokens=800,
        output_audio_tokens=300,
        output_image_tokens=500,
        reasoning_tokens=400,
        citation_tokens=400,
    )
    charged = cost_nanos(price, usage)
    # (tokens x USD per Mtok x 1,000 nano-USD): input 1,000 x 1 + 800 x (10 - 1) + 200 x
    # (5 - 1); output 1,000 x 2 + 300 x (20 - 2) + 500 x (30 - 2) + 200 x (3 - 2)
    print(f"counts past their whole: charged {charged:,} nano-USD")
    assert charged == (9_000 + 21_600) * 1_000


def test_a_name_only_asked_whether_priced_is_looked_up_once_and_still_warned_of_when_requested(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`price(warn=False)` (an Azure deployment asked whether a price names it, on every call
    through `BudgetTransport`): a name without a price was looked up again each time (1.1 ms
    a call, the catalog searched); now once. A request of that name later is still warned of
    and listed unpriced, as one never asked about is."""
    book = PriceBook()
    looked: list[tuple[str, str]] = []
    listed = book._listed

    def counted(provider: str, model: str) -> Any:
        looked.append((provider, model))
        return listed(provider, model)

    monkeypatch.setattr(book, "_listed", counted)
    with caplog.at_level(logging.WARNING, logger="budget_middleware"):
        asked = [book.price("azure", "prod-chat", warn=False) for _ in range(5)]
        quiet = len(caplog.records)
        requested = book.price("azure", "prod-chat")
    print(f"5 asked: {len(looked) - 1} catalog look-ups before the request, {quiet} warnings; "
          f"then requested: {len(caplog.records)} warning, unpriced {book.unpriced}")  # fmt: skip
    assert asked == [None] * 5 and requested is None
    assert looked.count(("azure", "prod-chat")) == 2  # once asked, once requested
    assert quiet == 0 and len(caplog.records) == 1
    assert ("azure", "prod-chat") in book.unpriced
