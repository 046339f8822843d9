"""The cost of a request in integer nano-dollars (SPEC §7): prices per model and the arithmetic.

Prices are kept as integer femto-dollars (1e-15 USD) per token: $/Mtok * 1e9. Token counts times
these rates are exact integers, so a cost is rounded once, half up, to whole nano-dollars. A price
is exact to 1e-9 $/Mtok, far finer than any published price. Where prices come from (the pricing
file, the bundled catalog) is `engine.prices`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from budget_middleware.core.money import NANOS_PER_USD
from budget_middleware.core.usage import ImageTool, TokenUsage

_FEMTO_PER_TOKEN_PER_USD_PER_MTOK = 1e9
_FEMTO_PER_NANO = 1_000_000
_HALF_NANO = _FEMTO_PER_NANO // 2
_PER_K_PER_MTOK = 1000  # $ per thousand searches, as a $/Mtok rate: a search a "token" x 1000


def _rate(usd_per_mtok: float) -> int:
    femto = usd_per_mtok * _FEMTO_PER_TOKEN_PER_USD_PER_MTOK
    if not math.isfinite(femto) or usd_per_mtok < 0:  # 1e300 $/Mtok is finite, its rate not
        raise ValueError(
            f"a price must be a number from 0 to 1e299 USD per Mtok, not {usd_per_mtok!r}"
        )
    return round(femto)


# The image output of OpenAI's image generation tool (`TokenUsage.tool_image_tokens`), at its
# image model's rate whatever the model that called it (`TokenUsage.image_tool`'s, the price
# catalog's); where none is known, gpt-image-1's $40 per Mtok, the tool's default model; and
# the input its image model was fed, where an answer reports it, at gpt-image-1's $5 (text)
# and $10 (images), $1.25 read from its cache.
_IMAGE_TOOL_RATE = _rate(40.0)
_IMAGE_TOOL_INPUT = _rate(5.0)
_IMAGE_TOOL_SEEN = _rate(10.0)
_IMAGE_TOOL_CACHED = _rate(1.25)


def image_tool(model: str, price: ModelPrice | None) -> ImageTool:
    """The image generation tool drawing with `model` at `price`: its image output, text input
    and image input rates (femto-dollars a token; its output's and input's where it prices no
    images apart), and cached input rate; None (gpt-image-1's) for a model without a price."""
    if price is None:
        return ImageTool(model)
    rates = price._rates  # (`_Rates`: images' output rate, input, images' input rate, cached)
    return ImageTool(model, rates[13], rates[0], rates[12], cached_rate=rates[2])


def tool_image_nanos(tokens: int, rate: int | None = None) -> int:
    """What `tokens` image output tokens OpenAI's image generation tool drew cost at `rate`
    (`image_rate`; None: `_IMAGE_TOOL_RATE`), in whole nano-dollars rounded up: what a request
    offering it reserves."""
    if rate is None:
        rate = _IMAGE_TOOL_RATE
    return -(-max(tokens, 0) * rate // _FEMTO_PER_NANO)


# The tiers of a model without any (read only): one mapping for every such price.
_NO_TIERS: Mapping[str | None, ModelPrice] = {}

# (input, output, cache read, cache write, 1-hour cache write, input audio, output audio) in
# femto-dollars per token, a web search's, a request's and a file search's, (output reasoning,
# output citations, input images, output images) per token, and the output's as reserved (the
# dearer of text and images: `draws`).
_Rates = tuple[int, int, int, int, int, int, int, int, int, int, int, int, int, int, int]


def price_key(provider: str | None, model: str) -> str:
    """How a price file or a config file names a model's price: `provider/model` lowercased,
    or the bare model's own name."""
    return model.lower() if provider is None else f"{provider}/{model}".lower()


@dataclass(frozen=True, slots=True)
class DeploymentPrice:
    """How a configured deployment (a LiteLLM `model_list` entry's `provider/name`) is priced:
    as its base model (`base`: provider, model) is, whatever name the deployment has, with
    `rates` (ModelPrice's fields, USD per million tokens) in place of the base's own."""

    base: tuple[str | None, str]
    rates: tuple[tuple[str, float], ...] = ()

    def priced(self, base: ModelPrice | None) -> ModelPrice | None:
        """The deployment's price, given its base model's (None: the base has none, and what
        `rates` does not name costs nothing, as LiteLLM's custom prices do)."""
        if not self.rates:
            return base
        rates = dict(self.rates)
        if base is None:
            inp, out = rates.pop("input_per_mtok", 0.0), rates.pop("output_per_mtok", 0.0)
            return ModelPrice(inp, out, **rates, source="config_file")  # type: ignore[arg-type]
        # The base's tiers (long context, service tiers, peak hours) are its list prices, not
        # the ones the file sets: the file's apply to every token.
        return replace(base, **rates, tiers=(), service_tiers=(), daily=(), source="config_file")  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens; cache reads/writes and input audio without a price of their own
    cost the input, output audio the output, 1-hour cache writes a cache write; web searches
    and file searches (`file_search_per_k`: USD a thousand calls of OpenAI's file search tool)
    without a price cost nothing. `request_per_k`: a fee per request (USD a thousand requests:
    Perplexity's Sonar models), whatever its tokens. Reasoning and citation tokens reported
    apart (Perplexity's) without a price of their own cost the output; input and output images
    without a price of their own the input and the output.

    `tiers`: (start, prices) of long-context tiers, by start: a request of more than `start`
    input tokens (cache reads and writes included) pays that tier's prices on every token.
    `service_tiers`: (name, prices) of the service tiers priced apart (OpenAI's `priority` and
    `flex`): a request served at one pays its prices (`for_service_tier`).
    `daily`: (start, end, prices) of the hours priced apart each day (DeepSeek's peak hours),
    in seconds after midnight UTC, an end before its start across midnight: a request made
    within one pays the first such prices (`at_time`), at any other time these.
    """

    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None
    cache_write_per_mtok: float | None = None
    source: str = "catalog"  # "pricing_file" or "catalog"
    cache_write_1h_per_mtok: float | None = None
    input_audio_per_mtok: float | None = None
    output_audio_per_mtok: float | None = None
    web_search_per_k: float | None = None  # USD per thousand searches
    request_per_k: float | None = None  # USD per thousand requests
    file_search_per_k: float | None = None  # USD per thousand file search calls
    output_reasoning_per_mtok: float | None = None
    output_citation_per_mtok: float | None = None
    input_image_per_mtok: float | None = None
    output_image_per_mtok: float | None = None
    tiers: tuple[tuple[int, ModelPrice], ...] = ()
    service_tiers: tuple[tuple[str, ModelPrice], ...] = ()
    daily: tuple[tuple[float, float, ModelPrice], ...] = ()
    _rates: _Rates = field(init=False, repr=False, compare=False)  # computed once
    # `service_tiers` by name, the first of a name kept (`for_service_tier`): computed once.
    _by_tier: Mapping[str | None, ModelPrice] = field(init=False, repr=False, compare=False)
    # Whether some service tier is priced apart (`service_tiers`): computed once.
    tiered: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        inp = _rate(self.input_per_mtok)
        cached, write = self.cached_input_per_mtok, self.cache_write_per_mtok
        r_write = inp if write is None else _rate(write)
        hour = self.cache_write_1h_per_mtok
        out = _rate(self.output_per_mtok)
        heard, spoken = self.input_audio_per_mtok, self.output_audio_per_mtok
        thought, cited = self.output_reasoning_per_mtok, self.output_citation_per_mtok
        seen, drawn = self.input_image_per_mtok, self.output_image_per_mtok
        r_drawn = out if drawn is None else _rate(drawn)
        rates = (
            inp,
            out,
            inp if cached is None else _rate(cached),
            r_write,
            r_write if hour is None else _rate(hour),
            inp if heard is None else _rate(heard),
            out if spoken is None else _rate(spoken),
            0 if self.web_search_per_k is None else _rate(self.web_search_per_k) * _PER_K_PER_MTOK,
            0 if self.request_per_k is None else _rate(self.request_per_k) * _PER_K_PER_MTOK,
            0
            if self.file_search_per_k is None
            else _rate(self.file_search_per_k) * _PER_K_PER_MTOK,
            out if thought is None else _rate(thought),
            out if cited is None else _rate(cited),
            inp if seen is None else _rate(seen),
            r_drawn,
            max(out, r_drawn),
        )
        object.__setattr__(self, "_rates", rates)
        tiers = dict(reversed(self.service_tiers)) if self.service_tiers else _NO_TIERS
        object.__setattr__(self, "_by_tier", tiers)
        object.__setattr__(self, "tiered", bool(self.service_tiers))


def in_force(price: ModelPrice, input_tokens: int) -> ModelPrice:
    """The prices a request of this many input tokens pays: its long-context tier's, if any."""
    for start, tier in reversed(price.tiers):  # usually none
        if input_tokens > start:
            return tier
    return price


_DAY = 86_400


def at_time(price: ModelPrice, ts: float) -> ModelPrice:
    """The prices of a request made at `ts` (epoch seconds): those of the hours of the day it
    falls in, if any are priced apart (`daily`)."""
    second = ts % _DAY
    for start, end, prices in price.daily:
        if start <= second < end if start <= end else (second >= start or second < end):
            return prices
    return price


def for_service_tier(price: ModelPrice, tier: str | None) -> ModelPrice:
    """The prices of a request served at the service tier `tier`: that tier's when it is priced
    apart, else the standard ones ("auto", "default", a tier this model has no price of its own
    for)."""
    return price._by_tier.get(tier, price)


def asked_prices(price: ModelPrice, tier: str | None) -> ModelPrice:
    """The prices of a request asking for the service tier `tier` while nothing says where it
    was served (its reservation; its charge when its answer does not say): that tier's when
    they are no lower than the standard ones (OpenAI's `priority`), else the standard ones. A
    cheaper tier (`flex`) is charged only when the answer says so: OpenAI serves a flex request
    at flex and says so, or refuses it; an answer that does not say came through an app that
    may not have passed the field on either, and the provider billed its standard prices."""
    asked = for_service_tier(price, tier)
    if asked is price or all(map(int.__ge__, asked._rates, price._rates)):
        return asked
    return price


def cost_nanos(price: ModelPrice, usage: TokenUsage, femto_only: bool = False) -> int:
    """The charge in whole nano-dollars, rounded half up once, never negative (`femto_only`:
    in femto-dollars, unrounded: a tool loop's turns, each at its own tier, summed so).

    `usage.input_tokens` counts every prompt token; the cache reads and writes within it are
    priced at their own rates and the rest (floored at 0) at the input price, the output at the
    output price. The kinds with rates of their own within those (1-hour cache writes within the
    writes, audio and images within the rest of the input and within the output) add the
    difference of their rate, web and file searches their price each, and US-only inference
    a tenth of the tokens' price (`_other_kinds`: most answers have none).
    Integer arithmetic: exact.
    """
    if price.tiers:
        if usage.turns and _adds_up(usage):  # several requests' (a tool loop's turns): each
            femto = sum(cost_nanos(price, turn, True) for turn in usage.turns)  # its own tier
            return femto if femto_only else (femto + _HALF_NANO) // _FEMTO_PER_NANO
        price = in_force(price, usage.tier_input_tokens or usage.input_tokens)
    rates = price._rates
    out = usage.output_tokens
    if out < 0:  # conditionals, not max(): this runs on every request
        out = 0
    femto = out * rates[1] + rates[8]  # (the fee a request, most models none)
    plain = usage.input_tokens
    read = usage.cached_tokens
    write = usage.cache_write_tokens
    if read or write:  # cache reads and writes (most answers have none): priced apart
        if read < 0:
            read = 0
        if write < 0:
            write = 0
        plain -= read + write
        femto += read * rates[2] + write * rates[3]
    if plain < 0:
        plain = 0
    femto += plain * rates[0]
    if (
        usage.cache_write_1h_tokens
        or usage.input_audio_tokens
        or usage.output_audio_tokens
        or usage.web_searches
        or usage.file_searches
        or usage.reasoning_tokens
        or usage.citation_tokens
        or usage.input_image_tokens
        or usage.output_image_tokens
        or usage.us_inference
        or usage.image_tool is not None  # (its image model's input: drawing nothing, too)
    ):
        femto += _other_kinds(rates, usage, write, plain, out, femto)
    return femto if femto_only else (femto + _HALF_NANO) // _FEMTO_PER_NANO


def _adds_up(usage: TokenUsage) -> bool:
    """Whether the turns of a usage of several requests' add up to its counts (they do not once
    it is grown to an estimate of a cut stream: priced whole then, at its largest turn's tier)."""
    turns = usage.turns
    return (
        sum(t.input_tokens for t in turns) == usage.input_tokens
        and sum(t.output_tokens for t in turns) == usage.output_tokens
        and sum(t.cached_tokens for t in turns) == usage.cached_tokens
        and sum(t.cache_write_tokens for t in turns) == usage.cache_write_tokens
    )


def _other_kinds(
    rates: _Rates, usage: TokenUsage, write: int, plain: int, out: int, femto: int
) -> int:
    """What the kinds with rates of their own add, in femto-dollars, to their tokens priced as
    cache writes, input or output (`femto`, with the request's fee): each within its whole
    (1-hour writes within the writes, input audio and images within the uncached input, output
    audio, images, reasoning and citations reported apart within the output; of the output
    images, those OpenAI's image generation tool drew at its own model's rate); then, for an
    answer served on US-only infrastructure (`us_inference`), a tenth of every token's price
    (Anthropic bills them 1.1 times, searches and fees as they are)."""
    (r_in, r_out, _, r_write, r_hour, r_heard, r_spoken, r_search, r_fee, r_file, r_thought,
     r_cited, r_seen, r_drawn, _) = rates  # fmt: skip
    hour = min(max(usage.cache_write_1h_tokens, 0), write)
    heard = min(max(usage.input_audio_tokens, 0), plain)
    seen = min(max(usage.input_image_tokens, 0), plain - heard)
    spoken = min(max(usage.output_audio_tokens, 0), out)
    drawn = min(max(usage.output_image_tokens, 0), out - spoken)
    by_tool = min(max(usage.tool_image_tokens, 0), drawn)  # (at its own model's rate)
    tool = usage.image_tool
    r_tool = _IMAGE_TOOL_RATE if tool is None or tool.rate is None else tool.rate
    fed_cost = 0  # its image model's input, reported (`tool_usage`): at that model's prices
    if tool is not None and tool.input_tokens:
        fed = min(max(tool.input_tokens, 0), plain - heard - seen)
        fed_seen = min(max(tool.input_image_tokens, 0), fed)
        r_fed = _IMAGE_TOOL_INPUT if tool.input_rate is None else tool.input_rate
        r_fed_seen = _IMAGE_TOOL_SEEN if tool.image_input_rate is None else tool.image_input_rate
        fed_cost = (fed - fed_seen) * (r_fed - r_in) + fed_seen * (r_fed_seen - r_in)
        if tool.cached_tokens:  # read from its cache: at its cached rate, its images' scaled so
            cached = min(max(tool.cached_tokens, 0), fed)
            cached_seen = min(max(tool.cached_image_tokens, 0), cached, fed_seen)
            r_cached = _IMAGE_TOOL_CACHED if tool.cached_rate is None else tool.cached_rate
            r_cached_seen = r_cached * r_fed_seen // r_fed if r_fed else r_cached
            cached_text = min(cached - cached_seen, fed - fed_seen)
            fed_cost -= cached_text * (r_fed - r_cached) + cached_seen * (
                r_fed_seen - r_cached_seen
            )
    thought = min(max(usage.reasoning_tokens, 0), out - spoken - drawn)
    cited = min(max(usage.citation_tokens, 0), out - spoken - drawn - thought)
    searches = max(usage.web_searches, 0)
    files = max(usage.file_searches, 0)
    added = (
        hour * (r_hour - r_write)
        + heard * (r_heard - r_in)
        + seen * (r_seen - r_in)
        + drawn * (r_drawn - r_out)
        + by_tool * (r_tool - r_drawn)
        + fed_cost
        + spoken * (r_spoken - r_out)
        + thought * (r_thought - r_out)
        + cited * (r_cited - r_out)
    )
    if usage.us_inference:
        added += (femto - r_fee + added) // 10
    return added + searches * r_search + files * r_file


def estimate_nanos(
    price: ModelPrice | None,
    input_tokens: int,
    output_tokens: int,
    spoken: bool = False,
    caches: int = 0,
    us_inference: bool = False,
) -> int:
    """Worst-case cost to reserve: all input uncached, at its tier's prices; 0 when unpriced.
    `spoken`: the output may be audio, so it is counted at the dearer of its two prices. The
    output of a model with a dearer price for images than for text is counted at that price
    (`draws`: Gemini's image models draw without being asked).
    `caches`: the request asks for prompt caching, so its input may all be cache writes, counted
    at the dearer of the input's and the writes' prices; 2: some kept 1 hour, at the dearest of
    those and the 1-hour writes' (Anthropic's: 1.25 and 2 times the input; the Responses API's
    12-hour writes: 2).
    `us_inference`: asked to be served in the US only, every token 1.1 times (Anthropic's)."""
    if price is None:
        return 0
    rates = (in_force(price, input_tokens) if price.tiers else price)._rates
    if input_tokens < 0:
        input_tokens = 0
    if output_tokens < 0:
        output_tokens = 0
    out = rates[6] if spoken and rates[6] > rates[14] else rates[14]  # images, if dearer
    inp = rates[0]
    if caches:
        inp = max(inp, rates[3], rates[4]) if caches > 1 else max(inp, rates[3])
    femto = input_tokens * inp + output_tokens * out + rates[8]
    if us_inference:  # a tenth more of the tokens' price, rounded up
        femto += -(-(femto - rates[8]) // 10)
    return (femto + _HALF_NANO) // _FEMTO_PER_NANO


def draws(price: ModelPrice) -> bool:
    """Whether a model's image output costs more than its text (Gemini's image models, which
    draw without being asked): whatever a request asks, its output may be images, so it is
    reserved (`estimate_nanos`), and an answer that cannot be read charged, at that price."""
    rates = price._rates
    return rates[14] > rates[1]


def cost_usd(price: ModelPrice, usage: TokenUsage) -> float:
    return cost_nanos(price, usage) / NANOS_PER_USD
