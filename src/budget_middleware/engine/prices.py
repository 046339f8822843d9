"""Where prices come from (SPEC §7): `BUDGET_PRICING_FILE` first, then the `genai-prices`
catalog bundled with the package (never updated over the network). Each (provider, model) is
looked up once, and again from the day a price the catalog dates starts; afterwards a price costs
a dict lookup.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time as _time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Annotated

import pydantic
from genai_prices import types as gp
from genai_prices.data import providers as _CATALOG  # bundled data: no remote update, ever
from genai_prices.data_snapshot import find_provider_by_id

from budget_middleware.core.pricing import (
    DeploymentPrice,
    ModelPrice,
    cost_nanos,
    cost_usd,
    price_key,
)
from budget_middleware.core.providers import canonical_provider
from budget_middleware.exceptions import PricingFileError
from budget_middleware.manage.schemas import TwiceGiven, unique_keys

logger = logging.getLogger("budget_middleware")

_MAX_CACHED = 4096  # model names come from request bodies: keep the caches bounded
# A bare model name is looked for in these providers (after those whose naming it matches), before
# any reseller or cloud that lists the same model.
_FIRST_PARTY = ("openai", "anthropic", "google", "mistral", "x-ai", "deepseek", "cohere")
_ORDERED = sorted(_CATALOG, key=lambda p: _FIRST_PARTY.index(p.id) if p.id in _FIRST_PARTY else 99)


_Price = Annotated[float, pydantic.Field(ge=0)]


class _FilePrice(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    input_per_mtok: _Price
    output_per_mtok: _Price
    cached_input_per_mtok: _Price | None = None
    cache_write_per_mtok: _Price | None = None
    cache_write_1h_per_mtok: _Price | None = None
    input_audio_per_mtok: _Price | None = None
    output_audio_per_mtok: _Price | None = None
    web_search_per_k: _Price | None = None
    request_per_k: _Price | None = None
    file_search_per_k: _Price | None = None
    output_reasoning_per_mtok: _Price | None = None
    output_citation_per_mtok: _Price | None = None
    input_image_per_mtok: _Price | None = None
    output_image_per_mtok: _Price | None = None


class _PricingFile(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    models: dict[str, _FilePrice]


def _load_pricing_file(path: Path) -> dict[str, ModelPrice]:
    def fail(what: str) -> PricingFileError:
        return PricingFileError(f"BUDGET_PRICING_FILE={path}: {what}")

    try:
        # a key given twice is refused: the last would silently win (a price of 0, say)
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except OSError as exc:
        raise fail(f"cannot be read ({exc.strerror or exc})") from exc
    except TwiceGiven as exc:  # the last would silently win (a price of 0, say)
        raise fail(str(exc)) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        example = '{"models": {"openai/gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10}}}'
        raise fail(f'must be a JSON object with a "models" object, e.g. {example}')
    try:
        parsed = _PricingFile.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(part) for part in err["loc"])
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(_FilePrice.model_fields) if len(err["loc"]) > 2 else "models"
                problems.append(f"{where}: unknown field (allowed: {allowed})")
            elif err["type"] == "model_type":  # not an object (pydantic names our class)
                fields = ", ".join(_FilePrice.model_fields)
                problems.append(f"{where}: must be an object of prices ({fields})")
            else:
                problems.append(f"{where}: {err['msg']}")
        raise fail("; ".join(problems)) from exc
    prices: dict[str, ModelPrice] = {}
    written: dict[str, str] = {}
    for key, p in parsed.models.items():
        if not key.strip("/ ") or key.startswith("/") or key.endswith("/"):
            raise fail(f"models: {key!r} is not a model name (use 'provider/model' or 'model')")
        # `provider/model` by the provider's one name, as requests name it (`google/…` is
        # `gemini/…`): the price meets the requests however either spells the provider.
        head, sep, name = key.lower().partition("/")
        found = f"{canonical_provider(head)}/{name}" if sep else head
        if found in written:
            raise fail(f"models: {written[found]!r} and {key!r} name one model ({found!r})")
        written[found] = key
        try:
            prices[found] = ModelPrice(**p.model_dump(), source="pricing_file")
        except ValueError as exc:  # a price JSON holds as finite, too large for a rate
            raise fail(f"models.{key}: {exc}") from exc
    return prices


def _catalog_find(provider: str, model: str) -> tuple[gp.Provider, gp.ModelInfo] | None:
    """The catalog's provider and model for (provider, model); a bare lookup when the provider is
    unknown to genai-prices or does not list the model (e.g. an OpenAI-compatible gateway)."""
    ref = model.lower()
    if provider and provider != "unknown":
        owner = find_provider_by_id(_CATALOG, provider)  # also maps aliases: gemini, bedrock, xai
        if owner is not None and (info := owner.find_model(ref, all_providers=_CATALOG)):
            return owner, info
        # Its own publisher's prefix, which the catalog's names leave out: Vertex AI's
        # `google/gemini-3-pro-preview` is the catalog's `google` `gemini-3-pro-preview` (it
        # was unpriced, or found under OpenRouter's listing, without its image prices).
        head, _, rest = ref.partition("/")
        if (
            owner is not None
            and rest
            and head == owner.id
            and (info := owner.find_model(rest, all_providers=_CATALOG))
        ):
            return owner, info
        # Its own listing's id with the version the name leaves out: Bedrock Mantle's
        # `openai.gpt-oss-120b` is Bedrock's `openai.gpt-oss-120b-1:0`, which the catalog
        # matches by `openai.gpt-oss-120b-1` alone (it was unpriced, charged $0).
        if owner is not None and (info := _versioned(owner, ref)) is not None:
            return owner, info
    # As genai-prices does: providers whose naming the model matches (gpt-*, claude*, gemini*).
    for owner in _CATALOG:
        matches = owner.model_match is not None and owner.model_match.is_match(ref)
        if matches and (info := owner.find_model(ref, all_providers=_CATALOG)):
            return owner, info
    # Then any provider that lists it (text-embedding-3-small), the model makers first.
    for owner in _ORDERED:
        if info := owner.find_model(ref):
            return owner, info
    return None


_VERSION = re.compile(r"-v?[1-9]\d*:\d+")  # a Bedrock model id's version: `-1:0`, `-v2:0`


def _versioned(owner: gp.Provider, ref: str) -> gp.ModelInfo | None:
    """The model `owner` lists as `ref` and a version (`-1:0`, `-v1:0`), if any."""
    for info in owner.models:
        listed = info.id.lower()
        if listed.startswith(ref) and _VERSION.fullmatch(listed, len(ref)):
            return info
    return None


def _catalog_price(info: gp.ModelInfo, now: datetime) -> ModelPrice | None:
    """The catalog's prices of a model on the day of `now`, with the hours of the day it prices
    apart (`daily`)."""
    prices, hours = _prices_in_force(info, now)
    base = _priced(info, prices, now)
    if base is None or not hours:
        return base
    daily = []
    for start, end, priced in hours:
        found = _priced(info, priced, now)
        if found is not None:
            daily.append((start, end, found))
    return replace(base, daily=tuple(daily))


def _family_audio(
    owner: gp.Provider, info: gp.ModelInfo, price: ModelPrice, now: datetime
) -> ModelPrice:
    """An audio model (`<family>-audio…`) that the catalog gives no audio price (OpenAI's
    gpt-4o-audio-preview and gpt-4o-mini-audio-preview: their text prices only) has its audio
    priced at the most its provider's models of its family charge for audio (gpt-4o's realtime
    $40/$80 per Mtok, gpt-4o-mini's $10/$20, as OpenAI bills these), never at the text price."""
    family, audio, _ = info.id.partition("-audio")
    priced = price.input_audio_per_mtok, price.output_audio_per_mtok
    if not audio or priced != (None, None):
        return price
    # The models listed beside it: its maker's when `owner` prices it as its maker does (Azure).
    listing = next((p for p in (owner, *_CATALOG) if any(m is info for m in p.models)), owner)
    heard: float | None = None
    spoken: float | None = None
    for other in listing.models:
        if other is info or not other.id.startswith(family + "-"):
            continue
        sibling = _token_price(_prices_in_force(other, now)[0], -1)
        if sibling is None:
            continue
        if sibling.input_audio_per_mtok is not None:
            heard = max(heard or 0.0, sibling.input_audio_per_mtok)
        if sibling.output_audio_per_mtok is not None:
            spoken = max(spoken or 0.0, sibling.output_audio_per_mtok)
    if heard is None and spoken is None:
        return price
    return replace(price, input_audio_per_mtok=heard, output_audio_per_mtok=spoken)


# Claude Sonnet 4 and 4.5 with the 1M-token context window, as the catalog lists them without
# the long-context prices their makers and hosts bill (catalog provider, catalog model).
_LONG_CONTEXT_SONNETS = frozenset(
    {
        ("anthropic", "claude-sonnet-4-0"),
        ("google", "claude-4-sonnet"),  # Vertex AI
        ("aws", "regional.anthropic.claude-sonnet-4-20250514-v1:0"),
        ("aws", "global.anthropic.claude-sonnet-4-20250514-v1:0"),
        ("aws", "regional.anthropic.claude-sonnet-4-5-20250929-v1:0"),
        ("aws", "global.anthropic.claude-sonnet-4-5-20250929-v1:0"),
        ("openrouter", "anthropic/claude-sonnet-4"),
    }
)
_LONG_CONTEXT_START = 200_000


def _long_context(owner: gp.Provider, info: gp.ModelInfo, price: ModelPrice) -> ModelPrice:
    """Claude Sonnet 4's and 4.5's prices with their long-context tier where the catalog has
    none: a request of more than 200k input tokens (cache reads and writes included; only the
    1M-token context window takes one) pays twice the input, cache read and cache write prices
    and 1.5 times the output price on all its tokens, as Anthropic, Bedrock and Vertex AI bill
    it (claude-sonnet-4-5 on Anthropic: $6 and $22.50 per Mtok, where the catalog has it)."""
    if price.tiers or (owner.id, info.id) not in _LONG_CONTEXT_SONNETS:
        return price

    def twice(usd: float | None) -> float | None:
        return None if usd is None else usd * 2

    tier = replace(
        price,
        input_per_mtok=price.input_per_mtok * 2,
        output_per_mtok=price.output_per_mtok * 1.5,
        cached_input_per_mtok=twice(price.cached_input_per_mtok),
        cache_write_per_mtok=twice(price.cache_write_per_mtok),
        cache_write_1h_per_mtok=twice(price.cache_write_1h_per_mtok),
        service_tiers=(),
        daily=(),
    )
    return replace(price, tiers=((_LONG_CONTEXT_START, tier),))


def _priced(info: gp.ModelInfo, prices: gp.ModelPrice, now: datetime) -> ModelPrice | None:
    """`prices` with their long-context tiers and the service tiers priced apart."""
    base = _with_tiers(prices)
    if base is None:  # priced per request, second, page...: not token-priced
        return None
    # The service tiers priced apart (OpenAI's `priority` and `flex`, genai-prices' variants
    # `when service_tier`; Anthropic's fast mode, `when speed`), each a whole price of its own,
    # long-context tiers included.
    served = []
    for tier in _service_tiers(info):
        tiered = _with_tiers(_variant(info, prices, _only(tier), now))
        if tiered is not None and tiered != base:
            served.append((tier, tiered))
    return replace(base, service_tiers=tuple(served)) if served else base


def _with_tiers(prices: gp.ModelPrice) -> ModelPrice | None:
    """The token prices with their long-context tiers, which apply to the whole request above a
    threshold of input tokens (e.g. Claude Sonnet 4.5's and Gemini 2.5 Pro's above 200k): one
    ModelPrice per threshold. None when the model is not priced by the token."""
    base = _token_price(prices, -1)
    if base is None:
        return None
    starts = sorted(
        {t.start for v in vars(prices).values() if isinstance(v, gp.TieredPrices) for t in v.tiers}
    )
    tiers = tuple((start, _token_price(prices, start) or base) for start in starts)
    return replace(base, tiers=tiers) if tiers else base


# What a variant is priced apart by, and is named by its value: the service tier (OpenAI's,
# Gemini's: `priority`, `flex`), Anthropic's fast mode (`speed`: `fast`). No model of the
# catalog has variants by both.
_TIER_KEYS = ("service_tier", "speed")


def _service_tiers(info: gp.ModelInfo) -> list[str]:
    """The service tiers the catalog prices this model's requests at apart, in its order."""
    names: list[str] = []
    for variant in info.price_variants or ():
        if len(variant.when) == 1:
            for key in _TIER_KEYS:
                tier = variant.when.get(key)
                if tier is not None and tier not in names:
                    names.append(tier)
    return names


def _only(tier: str) -> list[dict[str, str]]:
    """The `when` of a variant for the service tier `tier`, by each key it may be named by."""
    return [{key: tier} for key in _TIER_KEYS]


def _variant(
    info: gp.ModelInfo, prices: gp.ModelPrice, when: list[dict[str, str]], now: datetime
) -> gp.ModelPrice:
    """`prices` as a request served at a tier pays them: each price of the first variant for
    that tier (`when` is one of `when`) in force that names it, as genai-prices resolves
    variants (those started by `now` only)."""
    overrides: dict[str, object] = {}
    for variant in info.price_variants or ():
        if variant.when not in when:
            continue
        if variant.constraint is not None and not variant.constraint.active(now):
            continue
        for name, value in vars(variant.prices).items():
            if value is not None:
                overrides.setdefault(name, value)
    return gp.ModelPrice(**{**vars(prices), **overrides})


_Hours = list[tuple[float, float, gp.ModelPrice]]


def _prices_in_force(info: gp.ModelInfo, now: datetime) -> tuple[gp.ModelPrice, _Hours]:
    """The prices in force, and the hours of the day priced apart (start and end in seconds
    after midnight UTC), the first that holds winning: as genai-prices resolves them, the last
    conditional price in force wins. Start dates are resolved at `now` (a price that starts
    later is picked up that day: `PriceBook`); the hours, by the time each request is made
    (`at_time`)."""
    if isinstance(info.prices, gp.ModelPrice):
        return info.prices, []
    prices = info.prices[0].prices
    hours: _Hours = []
    for conditional in reversed(info.prices):
        c = conditional.constraint
        if isinstance(c, gp.TimeOfDateConstraint):
            hours.append((_seconds(c.start_time), _seconds(c.end_time), conditional.prices))
        elif not isinstance(c, gp.StartDateConstraint) or c.active(now):
            prices = conditional.prices
            break
    return prices, hours


def _next_change(now: datetime) -> float:
    """When the catalog's next dated price starts (epoch seconds of its day's midnight UTC,
    as genai-prices dates them), after `now`; infinity when none does."""
    today = now.astimezone(UTC).date()
    starts: set[date] = set()
    for owner in _CATALOG:
        for info in owner.models:
            conditions = [] if isinstance(info.prices, gp.ModelPrice) else info.prices
            for dated in (*conditions, *(info.price_variants or ())):
                c = dated.constraint
                if isinstance(c, gp.StartDateConstraint) and c.start_date > today:
                    starts.add(c.start_date)
    if not starts:
        return math.inf
    return datetime.combine(min(starts), time(0), UTC).timestamp()


def _seconds(moment: time) -> float:
    """A time of day as seconds after midnight UTC (a naive one is UTC)."""
    day = datetime.combine(date(2000, 1, 1), moment, moment.tzinfo or UTC).astimezone(UTC)
    return day.hour * 3600 + day.minute * 60 + day.second + day.microsecond / 1e6


def _token_price(prices: gp.ModelPrice, above: int) -> ModelPrice | None:
    """The token prices of a request of more than `above` input tokens (-1: the base tier)."""

    def at(value: Decimal | gp.TieredPrices | None) -> float | None:
        if isinstance(value, gp.TieredPrices):
            tiered = value.base
            for tier in value.tiers:  # sorted by start
                if tier.start <= above:
                    tiered = tier.price
            value = tiered
        return None if value is None else float(value)

    inp, out = at(prices.input_mtok), at(prices.output_mtok)
    if inp is None and out is None:
        if not any(value is not None for value in vars(prices).values()):
            # The catalog's empty price (`{}`) is a free model's (Gemma 3 on the Gemini API,
            # OpenRouter's `:free` models; genai-prices charges them 0): priced at 0, not
            # unpriced (refused under BUDGET_UNPRICED_MODELS=refuse, its first request in flight
            # holding its budgets whole).
            return ModelPrice(0.0, 0.0)
        return None  # priced per request, second, page...: not by the token
    write, hour = at(prices.cache_write_mtok), at(prices.cache_write_1h_mtok)
    if hour is None and write is not None and inp is not None:
        # Only Claude's answers report writes kept 1 hour, which Anthropic prices at twice the
        # input wherever it is served (Vertex AI, whose listings the catalog leaves without),
        # and the Responses API's kept 12 hours, which OpenAI prices so too (the catalog's
        # notes: "the 12-hour rate (2x input) is not modeled")
        hour = inp * 2
    return ModelPrice(
        inp or 0.0,
        out or 0.0,
        at(prices.cache_read_mtok),
        write,
        cache_write_1h_per_mtok=hour,
        input_audio_per_mtok=at(prices.input_audio_mtok),
        output_audio_per_mtok=at(prices.output_audio_mtok),
        web_search_per_k=at(prices.web_searches_kcount),
        request_per_k=at(prices.requests_kcount),
        # OpenAI's file search tool, $2.50 a thousand calls (genai-prices' "storage searches")
        file_search_per_k=at(prices.storage_searches_kcount),
        # Perplexity's reasoning and citation tokens (Sonar Deep Research's), its answers count
        output_reasoning_per_mtok=at(prices.output_reasoning_mtok),
        output_citation_per_mtok=at(prices.output_citation_mtok),
        # Images in and out (gpt-image-1.5's $8 and $32 per Mtok, Gemini's image models' output)
        input_image_per_mtok=at(prices.input_image_mtok),
        output_image_per_mtok=at(prices.output_image_mtok),
    )


class PriceBook:
    """Prices per (provider, model): the pricing file, then the genai-prices catalog; cached."""

    cost_nanos = staticmethod(cost_nanos)
    cost_usd = staticmethod(cost_usd)

    def __init__(
        self,
        pricing_file: Path | None = None,
        clock: Callable[[], float] = _time.time,
        unpriced_models: str = "allow",
        shadow: bool = False,
    ) -> None:
        self.pricing_file = pricing_file
        # What the log says of an unpriced model's requests (BUDGET_UNPRICED_MODELS, SPEC §3):
        # under `refuse` they cost nothing, being refused (or, in shadow mode, said to be).
        if unpriced_models != "refuse":
            self._unpriced_fate = "cost 0"
        elif shadow:
            self._unpriced_fate = "would be refused, 403 model_not_priced, served in shadow mode"
        else:
            self._unpriced_fate = "are refused, 403 model_not_priced"
        # The catalog's prices are those of the clock's day; at the next day a dated price
        # starts (a new model's price, a rise), every price is looked up again.
        self._clock = clock
        self._changes_at = _next_change(self._now())
        self._file = _load_pricing_file(pricing_file) if pricing_file is not None else {}
        self._file_providers: dict[str, str] = {}
        for key in self._file:
            prov, sep, name = key.partition("/")
            if sep:
                self._file_providers.setdefault(name, prov)
        self._prices: dict[tuple[str, str], ModelPrice | None] = {}
        # Names found unpriced by a caller that only asked (`price(warn=False)`): not in
        # `_prices`, so a request of one is still warned of; not looked up again (1.1 ms each)
        self._quiet_misses: set[tuple[str, str]] = set()
        self._guesses: dict[str, str | None] = {}
        self.unpriced: set[tuple[str, str]] = set()
        self.unpriced_tools: set[tuple[str, str]] = set()  # image tools' models (`tool_price`)
        # Deployments BUDGET_CONFIG_FILE prices (a LiteLLM `model_list`), by `provider/model`
        # lowercased as the pricing file's keys (a bare model as itself).
        self.deployments: dict[str, DeploymentPrice] = {}
        self._all_deployments: dict[str, DeploymentPrice] = {}

        # Wildcard deployments (`openai/ft:gpt-4.1:*`) as their texts between `*`s, the most
        # specific first, matched against what a request names.
        self._deployment_globs: list[tuple[tuple[str, ...], DeploymentPrice]] = []
        # Called when what is priced changes (deployments priced, a dated price starting):
        # what was worked out from it before is forgotten (`TargetResolver.forget`).
        self.changed: list[Callable[[], None]] = []

    def add_deployments(self, deployments: Mapping[str, DeploymentPrice]) -> None:
        """Price these deployments as a config file says (after BUDGET_PRICING_FILE's own
        price of the same name, before the catalog's), over any of the same name priced before;
        a `*` in a name matches any text, as LiteLLM's wildcard deployments do."""
        self._all_deployments.update(deployments)
        deployments = self._all_deployments
        self.deployments = {k: v for k, v in deployments.items() if "*" not in k}
        globs = [(tuple(k.split("*")), v) for k, v in deployments.items() if "*" in k]
        # The most specific pattern first, as LiteLLM tries them: here the most text besides
        # its `*`s (file order among equals), so `openai/ft:*` prices a fine-tune before
        # `openai/*` does.
        globs.sort(key=lambda glob: -sum(map(len, glob[0])))
        self._deployment_globs = globs
        self._prices.clear()
        self._quiet_misses.clear()
        for forget in self.changed:
            forget()

    def _deployed(self, provider: str, model: str) -> ModelPrice | None:
        """A configured deployment's price for (provider, model), if one is configured."""
        qualified, bare = price_key(provider, model), price_key(None, model)
        deployed = self.deployments.get(qualified) or self.deployments.get(bare)
        if deployed is None:
            deployed = next(
                (
                    d
                    for glob, d in self._deployment_globs
                    if _glob_match(glob, qualified) or _glob_match(glob, bare)
                ),
                None,
            )
        if deployed is None:
            return None
        base_provider, base_model = deployed.base
        if "*" in base_model:  # a wildcard priced as itself: as the model asked for is
            base_provider, base_model = provider, model
        return deployed.priced(self._lookup(base_provider or provider, base_model))

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def price(self, provider: str, model: str, *, warn: bool = True) -> ModelPrice | None:
        """(provider, model)'s price, None when it has none (warned of once, unless not `warn`:
        a name only asked whether it is priced, `TargetResolver.served`)."""
        key = (provider, model)
        if self._clock() >= self._changes_at:  # a dated catalog price starts: look up again
            self._prices.clear()
            self._quiet_misses.clear()
            self._changes_at = _next_change(self._now())
            for forget in self.changed:
                forget()
        try:
            return self._prices[key]
        except KeyError:
            if not warn and key in self._quiet_misses:
                return None
        found = self._from_file(provider, model)
        if found is None and (self.deployments or self._deployment_globs):
            found = self._deployed(provider, model)  # after the pricing file's own name
        if found is None:
            found = self._listed(provider, model)
        if found is None and not warn:
            # not in `_prices`: a request of it later is warned of (and listed unpriced)
            if len(self._quiet_misses) >= _MAX_CACHED:
                self._quiet_misses.clear()
            self._quiet_misses.add(key)
            return None
        if len(self._prices) >= _MAX_CACHED:
            self._prices.clear()
        self._prices[key] = found
        if found is None:
            self._warn_unpriced(provider, model)
        return found

    def tool_price(self, provider: str, model: str) -> ModelPrice | None:
        """The price of the image model OpenAI's image generation tool names (`gate._image_tool`),
        at which its images are charged. Without one they are charged at gpt-image-1's $40 per
        Mtok, as warned once a model (not `price`'s warning: no request of that model is made,
        none costs 0 nor is refused for it)."""
        found = self.price(provider, model, warn=False)
        key = (provider, model)
        told = self.unpriced_tools
        if found is None and key not in told and len(told) < _MAX_CACHED:
            told.add(key)
            logger.warning(
                "no price for image model %r of provider %r, which an image generation tool names:"
                " its images are charged at gpt-image-1's $40 per Mtok (add it to"
                " BUDGET_PRICING_FILE)",
                model,
                provider,
            )
        return found

    def _lookup(self, provider: str, model: str) -> ModelPrice | None:
        """(provider, model)'s price: the pricing file's, else the catalog's, else the file's
        under another provider; not cached."""
        return self._from_file(provider, model) or self._listed(provider, model)

    def _from_file(self, provider: str, model: str) -> ModelPrice | None:
        """BUDGET_PRICING_FILE's price of (provider, model), or of the bare model."""
        return self._file.get(price_key(provider, model)) or self._file.get(price_key(None, model))

    def _listed(self, provider: str, model: str) -> ModelPrice | None:
        """The catalog's price, else the pricing file's under another provider."""
        hit = _catalog_find(provider, model)
        now = self._now()
        found = _catalog_price(hit[1], now) if hit is not None else None
        if found is not None and hit is not None:
            found = _long_context(*hit, _family_audio(*hit, found, now))
        if found is None and (maker := self._file_providers.get(model.lower())) is not None:
            # As the catalog is searched when the provider named does not list the model: the
            # file's price under another provider (a bare name's provider comes from a header
            # the client sets, and the app serves the same model whatever it says).
            found = self._file[price_key(maker, model)]
        return found

    def guess_provider(self, model: str) -> str | None:
        """The provider that the catalog knows for a bare model name, else the one the pricing
        file names it under (a model the catalog does not list); a fine-tune (`ft:<base>:…`)
        is its base model's provider's. A file's price for another provider's deployment of a
        listed model (`azure/gpt-4o`) is that provider's price, not where every bare `gpt-4o`
        goes."""
        try:
            return self._guesses[model]
        except KeyError:
            pass
        guess = hit = None
        if model[:3].lower() == "ft:":  # a fine-tune, `ft:<base>:<org>:…`: its base's maker
            # (OpenAI's and Mistral's naming); the catalog lists few fine-tunes, and matched
            # `ft:o4-mini:…` to Azure's o4-mini by its name's middle. But a pricing file that
            # names the fine-tune itself under a provider says where it is served: that one.
            guess = self._file_providers.get(model.lower())
            base = model[3:].partition(":")[0]
            if guess is None and base:
                hit = _catalog_find("", base)
        if guess is None:
            if hit is None:
                hit = _catalog_find("", model)
            guess = hit[0].id if hit is not None else self._file_providers.get(model.lower())
        if len(self._guesses) >= _MAX_CACHED:
            self._guesses.clear()
        self._guesses[model] = guess
        return guess

    def note_unpriced(self, provider: str, model: str) -> None:
        """A request charged 0 because its model has no price: warned of once a model (counted
        in the engine's `stats.unpriced_requests`, which `/metrics` reads)."""
        self._warn_unpriced(provider, model)

    def _warn_unpriced(self, provider: str, model: str) -> None:
        key = (provider, model)
        if key in self.unpriced or len(self.unpriced) >= _MAX_CACHED:
            return
        self.unpriced.add(key)
        logger.warning(
            "no price for model %r of provider %r: its requests %s (add it to BUDGET_PRICING_FILE)",
            model,
            provider,
            self._unpriced_fate,
        )


def _glob_match(parts: tuple[str, ...], text: str) -> bool:
    """Whether `text` matches the pattern whose texts between `*`s are `parts` (each `*` any
    text) from its start, as LiteLLM matches (`openai/*-mini` prices `gpt-4o-mini-2024-07-18`
    too): in one pass, each part at its first place after the one before (a regex of several
    `.*` backtracked for seconds on a long model name a client sent)."""
    if not text.startswith(parts[0]):
        return False
    at = len(parts[0])
    for part in parts[1:]:
        found = text.find(part, at)
        if found < 0:
            return False
        at = found + len(part)
    return True
