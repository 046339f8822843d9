"""Usage extraction: the tokens (and any cost) a response reports (SPEC §7).

`usage_from_json` reads a non-streamed JSON body (streams are read by `sse.StreamMeter`);
`BodyDecoder` undoes a gzip/deflate `content-encoding` on a copy of the body, so the compressed
bytes still go to the client as they are.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

import orjson

from budget_middleware.core.media import drawn_image_tokens


def json_loads(data: bytes | str) -> Any:
    """JSON as Python's own parser reads it, at orjson's speed: what orjson refuses and the
    standard library reads (NaN and Infinity, which `json.dumps` writes by default, so a host
    app's answer may hold them; a UTF-16 body) is read by the standard library. Raises one of
    `JSON_ERRORS`."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:  # rare: only such bodies pay for the second parse
        return json.loads(data)


json_bytes: Callable[[Any], bytes] = orjson.dumps  # compact JSON, UTF-8


def json_dumps(value: Any) -> str:
    """Compact JSON text."""
    return orjson.dumps(value).decode()


# What a bad body can raise: orjson's and json's decode errors and UnicodeDecodeError are
# ValueErrors; the stdlib parser recurses, so a deeply nested body raises RecursionError.
JSON_ERRORS: Final = (ValueError, RecursionError)

_USAGE_KEY: Final = b'"usage"'
_CANDIDATES: Final = 4  # `"usage"` keys tried from the end before falling back to a full parse


@dataclass(slots=True)
class TokenUsage:
    """Tokens a response consumed, in OpenAI's semantics whatever the provider.

    - `input_tokens`: every prompt token, cache reads and cache writes included. Anthropic reports
      them apart, so its `cache_read_input_tokens` and `cache_creation_input_tokens` are added in.
    - `cached_tokens`: the cache reads within `input_tokens` (priced at the cached-input rate).
    - `cache_write_tokens`: the cache writes within `input_tokens` (priced at the cache-write rate):
      Anthropic's `cache_creation_input_tokens`, OpenAI's `cache_write_tokens` (GPT-5.6 on).
    - `output_tokens`: generated tokens, reasoning included.
    - `cost`: `usage.cost` (USD) when the upstream reported one (OpenRouter, LiteLLM), else None.
    - `uncosted`: of several usages added (`plus`) with a `cost`, those that reported none (a
      tool loop's turn): their tokens are priced beside the cost; None when there are none.
    - `cache_write_1h_tokens`: the cache writes kept 1 hour or more, within `cache_write_tokens`
      (Anthropic's `cache_creation.ephemeral_1h_input_tokens`, the Responses API's
      `cache_write_tokens_details.ttl_12h_tokens`; priced at the 1-hour write rate).
    - `input_audio_tokens`, `output_audio_tokens`: the audio within `input_tokens` (not cached)
      and `output_tokens` (OpenAI's `prompt_tokens_details` / `completion_tokens_details`
      `audio_tokens`, a gateway's Responses `input_tokens_details` / `output_tokens_details`
      ones, and the Audio API's transcriptions' `input_token_details`; priced at the audio
      rates).
    - `web_searches`: the server-side web searches (Anthropic's
      `server_tool_use.web_search_requests`, OpenAI's Responses `web_search_call` output items:
      `count_searches`), priced per search.
    - `file_searches`: the file search tool's calls (OpenAI's Responses `file_search_call`
      output items: `count_searches`), priced per call.
    - `tier_input_tokens`: the input that picks a long-context price tier when it is not
      `input_tokens` (0): of several requests' usages added (`plus`, a tool loop's turns), the
      largest one's, should `turns` no longer add up to the whole (grown to an estimate).
    - `turns`: of several requests' usages added (`plus`), each one's, for each is priced at
      its own long-context tier (a tool loop's turn of 190k input tokens, then one of 210k,
      pays the tier on the second only); () for one request's.
    - `service_tier`: the service tier the answer says it was served at (OpenAI's top-level
      `service_tier`: `default`, `priority`, `flex`; Anthropic's `usage.speed`: `standard`,
      `fast`), which some models price apart; None when it does not say.
    - `reasoning_tokens`, `citation_tokens`: the reasoning and citation tokens within
      `output_tokens` that are priced at rates of their own (Perplexity's top-level
      `reasoning_tokens` and `citation_tokens`, which its `completion_tokens` leaves out: Sonar
      Deep Research's).
    - `input_image_tokens`, `output_image_tokens`: the images within `input_tokens` (not cached)
      and `output_tokens` (`image_tokens` of OpenAI's Images API `input_tokens_details` and
      `output_tokens_details`, and of gateways' chat `prompt_tokens_details` and
      `completion_tokens_details`: LiteLLM's rendering of Gemini's image modality; priced at the
      image rates: gpt-image-1.5's $32 per Mtok of image output, its text's $10).
    - `tool_image_tokens`: of `output_image_tokens` (and so of `output_tokens`), those of the
      images OpenAI's image generation tool drew (the Responses API's `image_generation_call`
      output items, which its usage leaves out: `count_searches`), priced at that tool's image
      model's rate (`image_tool`'s; None: gpt-image-1's $40 per Mtok), whatever the answer's
      model; the exact count where the answer reports it (its `tool_usage.image_gen`).
    - `image_tool`: that tool (`ImageTool`: its model's prices), and the image model's input the
      answer reports (its `tool_usage.image_gen` input tokens: the prompt it was sent, text and
      images), within `input_tokens` and priced at that model's input prices; None: gpt-image-1,
      no input reported.
    - `us_inference`: the answer says it ran on US-only infrastructure (Anthropic's
      `usage.inference_geo: "us"`), which Anthropic bills at 1.1 times every token price.
    - `advisors`: (model, usage) of each sampling of another model the answer reports, billed
      at that model's prices: sub-inferences apart from its counts (Anthropic's advisor tool:
      `usage.iterations` entries of type `advisor_message`), and those of `fallbacks`.
    - `fallbacks`: of those, the samplings of a fallback model within its counts (Anthropic's
      server-side fallback: `usage.iterations` entries of type `fallback_message`, the model
      that served when the one asked for declined): the rest of the counts at the answer's
      own prices (`less`).
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cost: float | None = None
    cache_write_1h_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    web_searches: int = 0
    tier_input_tokens: int = 0
    service_tier: str | None = None
    uncosted: TokenUsage | None = None
    turns: tuple[TokenUsage, ...] = field(default=(), compare=False, repr=False)
    file_searches: int = 0
    reasoning_tokens: int = 0
    citation_tokens: int = 0
    input_image_tokens: int = 0
    output_image_tokens: int = 0
    tool_image_tokens: int = 0
    image_tool: ImageTool | None = None
    us_inference: bool = False
    advisors: tuple[tuple[str, TokenUsage], ...] = field(default=(), compare=False, repr=False)
    fallbacks: tuple[tuple[str, TokenUsage], ...] = field(default=(), compare=False, repr=False)

    def plus(self, other: TokenUsage) -> TokenUsage:
        """Two usages together (one answer that streams several messages, a tool loop's). Of
        those with a cost and those without, the cost is theirs and the others' tokens are kept
        apart (`uncosted`), to be priced: a cost does not cover what it was not reported for."""
        costs = [c for c in (self.cost, other.cost) if c is not None]
        uncosted = None
        if costs:
            for part in (self.uncosted if self.cost is not None else self,
                         other.uncosted if other.cost is not None else other):  # fmt: skip
                if part is not None:
                    uncosted = part if uncosted is None else uncosted.plus(part)
        return TokenUsage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cached_tokens + other.cached_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
            sum(costs) if costs else None,
            self.cache_write_1h_tokens + other.cache_write_1h_tokens,
            self.input_audio_tokens + other.input_audio_tokens,
            self.output_audio_tokens + other.output_audio_tokens,
            self.web_searches + other.web_searches,
            max(
                self.tier_input_tokens or self.input_tokens,
                other.tier_input_tokens or other.input_tokens,
            ),
            other.service_tier or self.service_tier,
            uncosted,
            (self.turns or (self,)) + (other.turns or (other,)),
            self.file_searches + other.file_searches,
            self.reasoning_tokens + other.reasoning_tokens,
            self.citation_tokens + other.citation_tokens,
            self.input_image_tokens + other.input_image_tokens,
            self.output_image_tokens + other.output_image_tokens,
            self.tool_image_tokens + other.tool_image_tokens,
            _tools(self.image_tool, other.image_tool),
            self.us_inference or other.us_inference,
            self.advisors + other.advisors,
            self.fallbacks + other.fallbacks,
        )

    def less(self, part: TokenUsage) -> TokenUsage:
        """This usage without the tokens of `part`, one within its counts (`fallbacks`'),
        none below 0."""
        return replace(
            self,
            input_tokens=max(self.input_tokens - part.input_tokens, 0),
            output_tokens=max(self.output_tokens - part.output_tokens, 0),
            cached_tokens=max(self.cached_tokens - part.cached_tokens, 0),
            cache_write_tokens=max(self.cache_write_tokens - part.cache_write_tokens, 0),
            cache_write_1h_tokens=max(self.cache_write_1h_tokens - part.cache_write_1h_tokens, 0),
            tier_input_tokens=0,
            fallbacks=(),
        )

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _tools(first: ImageTool | None, then: ImageTool | None) -> ImageTool | None:
    """The image tool of two usages together (`TokenUsage.plus`): the later's prices, and the
    image model's input both reported."""
    if first is None or not first.input_tokens:
        return then if then is not None else first
    if then is None:
        return first
    return replace(
        then,
        input_tokens=first.input_tokens + then.input_tokens,
        input_image_tokens=first.input_image_tokens + then.input_image_tokens,
    )


def _count(value: object) -> int:
    """A token count from JSON: a non-negative number, or one written as a string of digits
    (`"12"`, as a gateway that quotes its numbers sends it); anything else counts as 0."""
    if type(value) is int:  # `type() is`, not isinstance: True is not a count
        return value if value > 0 else 0
    if type(value) is float and math.isfinite(value) and value > 0:
        return int(value)
    if type(value) is str:
        return quoted_count(value) or 0
    return 0


def quoted_count(value: str) -> int | None:
    """A count written as a string of digits (`"12"`, up to 18 of them), else None."""
    if 0 < len(value) <= 18 and value.isascii() and value.isdigit():
        return int(value)
    return None


_TICKS: Final = "cost_in_usd_ticks"
_TICKS_PER_USD: Final = 10_000_000_000


def _cost(usage: Mapping[str, Any]) -> float | None:
    """What the usage says was paid, in USD: `usage.cost`, a number (OpenRouter, LiteLLM) or an
    object's `total_cost` in USD (Perplexity's, fees its token prices leave out included); with
    the caller's own provider key (OpenRouter's `is_byok`) that is only the gateway's fee, and
    the provider's bill, `cost_details.upstream_inference_cost`, is added. Without `cost`,
    xAI's `cost_in_usd_ticks` (1e-10 USD)."""
    if "cost" not in usage:  # xAI's: in ticks of 1e-10 USD, its server-side tools included
        ticks = _usd(usage[_TICKS])
        return None if ticks is None else ticks / _TICKS_PER_USD
    value = usage["cost"]
    if type(value) is dict and value.get("currency", "USD") == "USD":
        value = value.get("total_cost")
    cost = _usd(value)
    if usage.get("is_byok") is True and type(details := usage.get("cost_details")) is dict:
        upstream = _usd(details.get("upstream_inference_cost"))
        if upstream is not None:
            cost = upstream + (cost or 0.0)
    return cost


def _usd(value: object) -> float | None:
    if type(value) is int or type(value) is float:
        cost = float(value)
        if math.isfinite(cost) and cost >= 0:
            return cost
    return None


def _details(usage: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    details = usage.get(key)
    return details if isinstance(details, dict) else None  # JSON objects are dicts


def usage_from_mapping(usage: Mapping[str, Any]) -> TokenUsage | None:
    """The `TokenUsage` of a decoded `usage` object of any supported shape; None if it has no
    token count nor cost, or none that can be read. Bad values (strings, negatives, null)
    count as 0 beside one that can."""
    heard = spoken = seen = drawn = None  # audio and image counts, in the details objects
    apart = False  # Perplexity's reasoning, citations and searches, counted apart
    if "prompt_tokens" in usage or "completion_tokens" in usage:  # chat/completions/embeddings
        # the usual values (non-negative ints) are taken as they are: this runs on every request
        prompt = usage.get("prompt_tokens")
        total = usage.get("total_tokens")
        if type(prompt) is not int or prompt < 0:
            prompt = _count(prompt)
            if type(total) is str:  # quoted, as its prompt count is
                total = quoted_count(total)
        output = usage.get("completion_tokens")
        if type(output) is not int or output < 0:
            output = _count(output)
            if type(total) is str:
                total = quoted_count(total)
        details = usage.get("prompt_tokens_details")
        # LiteLLM-style bodies also carry Anthropic's cache fields, as subsets of prompt_tokens
        write = None
        if type(details) is dict:
            read = details.get("cached_tokens")
            heard = details.get("audio_tokens")
            seen = details.get("image_tokens")
            write = details.get("cache_write_tokens")  # GPT-5.6 on: paid apart, before none
        else:
            read = usage.get("cache_read_input_tokens")
        if not read and "prompt_cache_hit_tokens" in usage:  # DeepSeek's, within prompt_tokens
            read = usage["prompt_cache_hit_tokens"]
        if type(read) is not int or read < 0:
            read = _count(read)  # None counts 0
        if type(out_details := usage.get("completion_tokens_details")) is dict:
            spoken = out_details.get("audio_tokens")
            drawn = out_details.get("image_tokens")
        if "cache_creation_input_tokens" in usage:
            write = usage["cache_creation_input_tokens"]
        if write is None:
            write = 0
        elif type(write) is not int or write < 0:
            write = _count(write)
        if "citation_tokens" in usage or "num_search_queries" in usage:  # Perplexity's: output
            apart = True  # its completion count leaves out (`total_tokens` too, as a rule)
            output += _count(usage.get("reasoning_tokens")) + _count(usage.get("citation_tokens"))
        if type(total) is int and total > prompt + output and (prompt or output):
            output += _reasoning_apart(usage, out_details, total - prompt - output)
        if (
            (read or write)  # (none: nothing to add; one truth test for a usual request)
            and ("cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage)
            and (prompt or output)
        ):
            prompt = _gateway_prompt(prompt, output, total, read, write)
        if not (prompt or output) and ("input_tokens" in usage or "output_tokens" in usage):
            # Both shapes, the OpenAI counts null or 0 (a gateway's): the other shape's counts
            prompt, output, read, write = _input_output(usage)
    elif "input_tokens" in usage or "output_tokens" in usage:
        prompt, output, read, write = _input_output(usage)
        # The Images API's (and gateways' Responses): images and audio within the input and
        # the output
        if type(in_details := usage.get("input_tokens_details")) is dict:
            seen = in_details.get("image_tokens")
            heard = in_details.get("audio_tokens")
        elif type(in_details := usage.get("input_token_details")) is dict:
            heard = in_details.get("audio_tokens")  # the Audio API's transcriptions' (sic)
        if type(out_details := usage.get("output_tokens_details")) is dict:
            drawn = out_details.get("image_tokens")
            spoken = out_details.get("audio_tokens")
    elif "cost" in usage or _TICKS in usage:
        prompt = output = read = write = 0
    else:
        return None
    # Subsets can't exceed the whole: a cost never < 0.
    if read > prompt:
        read = prompt
    if write > prompt - read:
        write = prompt - read
    cost = _cost(usage) if "cost" in usage or "cost_in_usd_ticks" in usage else None
    if not (prompt or output) and cost is None and not any(_readable(usage, k) for k in _COUNTS):
        return None  # input and output counts null, text or negative: no usage reported at all
    found = TokenUsage(prompt, output, read, write, cost)
    # The kinds with prices of their own within those, which most answers do not have:
    if write:  # the writes kept longer, at a price of their own
        if type(creation := usage.get("cache_creation")) is dict:  # Anthropic's TTLs
            found.cache_write_1h_tokens = _count(creation.get("ephemeral_1h_input_tokens"))
        elif type(creation := _ttls(usage)) is dict:  # OpenAI's, the Responses API's
            found.cache_write_1h_tokens = _count(creation.get("ttl_12h_tokens"))  # (12 hours)
    if heard or spoken or seen or drawn:  # audio, images: within the uncached prompt and the
        found.input_audio_tokens = _count(heard)  # output; 0 or absent in most answers
        found.output_audio_tokens = _count(spoken)
        found.input_image_tokens = _count(seen)
        found.output_image_tokens = _count(drawn)
    if apart:  # Perplexity's, within the output (above), and its searches
        found.reasoning_tokens = _count(usage.get("reasoning_tokens"))
        found.citation_tokens = _count(usage.get("citation_tokens"))
        found.web_searches = _count(usage.get("num_search_queries"))
    # Anthropic's web searches:
    if "server_tool_use" in usage and type(tools := usage["server_tool_use"]) is dict:
        found.web_searches = _count(tools.get("web_search_requests"))
    if "inference_geo" in usage and usage["inference_geo"] == "us":  # Anthropic's US-only
        found.us_inference = True
    if "iterations" in usage and type(iterations := usage["iterations"]) is list:
        found = _with_compactions(found, iterations)
    return found


def _ttls(usage: Mapping[str, Any]) -> object:
    """The Responses API's `input_tokens_details.cache_write_tokens_details` (`ttl_30m_tokens`,
    `ttl_12h_tokens`: the cache writes kept 30 minutes and 12 hours, the latter billed at the
    1-hour write rate, twice the input), else None."""
    details = usage.get("input_tokens_details")
    return details.get("cache_write_tokens_details") if type(details) is dict else None


def _with_compactions(found: TokenUsage, iterations: list[Any]) -> TokenUsage:
    """Anthropic's usage with its server-side compactions' (`usage.iterations` entries of type
    `compaction`): the sampling that summarized the context is billed, and its tokens are left
    out of the top-level counts. Added as another request's are (`plus`: each priced by its own
    size). Its advisor tool's sub-inferences (`advisor_message` entries), left out of them too,
    are kept apart (`advisors`), to be priced at their own model's prices, and so are the
    samplings of a fallback model that served (`fallback_message` entries, within them:
    `fallbacks`). The other entries (`message`, ...) are within the top-level counts."""
    for entry in iterations:
        kind = entry.get("type") if type(entry) is dict else None
        if kind == "advisor_message" or kind == "fallback_message":
            advice = usage_from_mapping(entry)
            model = entry.get("model")
            if advice is not None and type(model) is str and model:
                advice.us_inference = found.us_inference  # served where the answer was
                found.advisors += ((model, advice),)
                if kind == "fallback_message":  # within the top-level counts
                    found.fallbacks += ((model, advice),)
        elif kind == "compaction":
            prompt, output, read, write = _input_output(entry)
            compaction = TokenUsage(prompt, output, min(read, prompt), min(write, prompt - read))
            if write and type(creation := entry.get("cache_creation")) is dict:
                compaction.cache_write_1h_tokens = _count(creation.get("ephemeral_1h_input_tokens"))
            found = found.plus(compaction)
    found.uncosted = None  # a cost it reported is the whole answer's, its compactions' too
    return found


def _input_output(usage: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """Prompt, output, cache reads and writes of a usage object of the `input_tokens` shape."""
    output = _count(usage.get("output_tokens"))
    details = _details(usage, "input_tokens_details")
    if details is not None:  # Responses API: input_tokens already counts the cached ones
        prompt = _count(usage.get("input_tokens"))
        total = usage.get("total_tokens")
        if type(total) is str:  # quoted, as its other counts may be
            total = quoted_count(total)
        out_details = usage.get("output_tokens_details")
        if type(total) is int and total > prompt + output and type(out_details) is dict:
            output += _reasoning_apart(usage, out_details, total - prompt - output)
        read, write = details.get("cached_tokens"), details.get("cache_write_tokens")
        return prompt, output, _count(read), _count(write)
    # Anthropic: input_tokens leaves out cache reads and writes
    read = _count(usage.get("cache_read_input_tokens"))
    write = _count(usage.get("cache_creation_input_tokens"))
    return _count(usage.get("input_tokens")) + read + write, output, read, write


def _gateway_prompt(prompt: int, output: int, total: object, read: int, write: int) -> int:
    """The prompt of a gateway's chat usage beside Anthropic's cache fields, with the cache
    reads and writes its `prompt_tokens` leaves out: those its `total_tokens` counts beyond the
    prompt and completion (up to the reads and writes), and writes that cannot fit in the
    prompt beside its reads (LiteLLM's Anthropic usage of mid-2025: `prompt_tokens` is the
    input and the cache reads, the writes apart). Anthropic bills every one of them."""
    if type(total) is int and total > prompt + output:
        prompt += min(total - prompt - output, read + write)
    if read <= prompt and write > prompt - read:
        prompt += write
    return prompt


def _reasoning_apart(usage: Mapping[str, Any], details: object, left_out: int) -> int:
    """The reasoning an answer counts apart from its output count, when `total_tokens` counts
    `left_out` tokens more than its input and output: output too, billed as such, up to what
    the total says. Where the output's details count it (`reasoning_tokens`: xAI's chat
    completions, gateways' renderings of Gemini's thoughts), that count; where nothing does
    (Gemini's own OpenAI-compatible endpoint: its thoughts are in the total alone), all of
    `left_out`, the dearer reading: Gemini's tool-use prompt (grounding, code execution) is in
    that total too, and is charged so at the output's price. But a total beside Anthropic's
    cache fields (a gateway's that counts the cache reads and writes its prompt count leaves
    out) leaves out no output: nothing. (OpenAI counts reasoning within its output, and its
    total is input and output alone: nothing is left out.)"""
    if type(details) is dict and _readable(details, "reasoning_tokens"):
        return min(_count(details["reasoning_tokens"]), left_out)
    if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
        return 0
    return left_out


_COUNTS: Final = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")


def _readable(usage: Mapping[str, Any], key: str) -> bool:
    """Whether `usage[key]` is a token count as JSON has it: a number, not below 0 (0 is one)."""
    value = usage.get(key)
    if type(value) is int:
        return value >= 0
    return type(value) is float and math.isfinite(value) and value >= 0


# A JSON string (or one the head cuts, to its end: matched in one pass, where a string left
# unclosed was tried again from each quote in it, 20 s for a head of escaped quotes), or a
# bracket: what tells a key's depth in a document (`usage_from_head`).
_STRING_OR_BRACKET: Final = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)|[][{}]', re.DOTALL)


def usage_from_head(head: bytes) -> TokenUsage | None:
    """The usage of a huge JSON answer that writes it before its bulk (`{"usage": {...},
    "choices": [...]}`), whose kept tail holds none: the top-level `usage` object of its
    first bytes `head`, when they hold it whole; else None."""
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(head):
        token = match.group()
        first = token[0]
        if first == 0x22:  # a string: the key, at the top level and followed by a colon?
            if len(token) == 1 or token[-1] != 0x22:
                return None  # cut by the head's end (or ending with an escaped quote)
            if depth == 1 and token == _USAGE_KEY:
                rest = head[match.end() :].lstrip()
                if rest[:1] != b":":
                    continue  # a value, not a key
                try:
                    text = rest[1:].decode(errors="replace")  # (cut at any byte)
                    usage, _ = json.JSONDecoder().raw_decode(text.lstrip())
                except (ValueError, RecursionError):  # not whole in the head
                    return None
                return usage_from_mapping(usage) if type(usage) is dict else None
        elif first == 0x7B or first == 0x5B:  # { [
            depth += 1
        else:
            depth -= 1
    return None


def usage_from_json(body: bytes, tiered: bool = False) -> TokenUsage | None:
    """The usage a non-streamed JSON response reports; None if it reports none or is not JSON.

    Never raises. The body is not parsed whole: the top-level `usage` object sits at the end, so
    only it and what follows are decoded, as `{` + that tail, which is valid JSON only when the
    key is a top-level one (a nested key leaves an extra closing bracket; a quoted one has no
    colon after it, or is escaped). What precedes is not validated. Anything unexpected falls
    back to a full parse. `tiered`: the model prices service tiers apart, so a top-level
    `service_tier` written before the usage is read too (`TokenUsage.service_tier`).
    """
    index = body.rfind(_USAGE_KEY)
    if index < 0 and _searched_whole(body):  # no usage key anywhere: no usage
        return None
    for _ in range(_CANDIDATES):  # the top-level key, from the end
        if index < 0:
            break
        if body[index - 1] != 0x5C or _unescaped(body, index):  # `\"usage"` is inside a string
            try:
                document = json_loads(b"{" + body[index:])  # an object, if it parses
            except JSON_ERRORS:
                pass
            else:
                break
        index = body.rfind(_USAGE_KEY, 0, index)
    else:
        index = -1
    if index < 0:  # not found from the end: the whole body
        try:
            document = json_loads(body)
        except JSON_ERRORS:
            return None
        if type(document) is not dict:
            return None
    usage = document.get("usage")
    if type(usage) is not dict:
        return None
    found = usage_from_mapping(usage)
    if found is not None:
        # OpenAI's tier: after the usage in a chat completion as OpenAI writes it, before it in
        # the Responses API and in any answer an SDK wrote back (`completion.model_dump()`).
        # Searched for before the usage only for a model priced by its tier (`tiered`): a body
        # without the key is searched whole (~25 µs for 100 KB), and most answers have none.
        tier = document.get("service_tier")
        if tier is None and tiered:  # Anthropic's fast mode, in its usage; else OpenAI's, before
            tier = usage.get("speed")
            if tier is None and index > 0:
                tier = _tier_before(body, index)
        if tier is not None:
            found.service_tier = tier_name(tier)
    return found


_WEB_SEARCH_CALL: Final = "web_search_call"
_FILE_SEARCH_CALL: Final = "file_search_call"
_SEARCH_CALL_KEY: Final = b'_search_call"'  # the end of either's name
IMAGE_CALL: Final = "image_generation_call"
_IMAGE_CALL_KEY: Final = b'"image_generation_call"'


@dataclass(frozen=True, slots=True)
class ImageTool:
    """The image generation tool a request offers: its image model (`model`, gpt-image-1 unless
    the tool names another), whose tables count its images' output tokens
    (`media.drawn_image_tokens`), and that model's prices in femto-dollars a token (`rate` of
    its image output, `input_rate` of its text input, `image_input_rate` of its image input;
    None, a model without a price: gpt-image-1's $40, $5 and $10 per Mtok,
    `pricing.image_tool`; `cached_rate`, of its cached input: gpt-image-1's $1.25).
    `input_tokens`, `input_image_tokens` (of them, the images): the image model's input an
    answer reports (`TokenUsage.image_tool`: its `tool_usage`); `cached_tokens`,
    `cached_image_tokens`: of that input, what it read from the cache, text and images."""

    model: str = "gpt-image-1"
    rate: int | None = None
    input_rate: int | None = None
    image_input_rate: int | None = None
    input_tokens: int = 0
    input_image_tokens: int = 0
    cached_rate: int | None = None
    cached_tokens: int = 0
    cached_image_tokens: int = 0


IMAGE_TOOL: Final = ImageTool()  # the tool's default: gpt-image-1
# What OpenAI bills for each partial image a streamed image sends before it (the tool's
# `partial_images`): 100 image output tokens, as the Images API's (`media.asked_image_tokens`).
PARTIAL_IMAGE_TOKENS: Final = 100


def image_call_tokens(item: Mapping[str, Any], tool: ImageTool = IMAGE_TOOL) -> int:
    """The image output tokens OpenAI bills for an `image_generation_call` output item (or the
    most for one image a tool definition asks): of its quality and size at `tool`'s model,
    the most it could be where they are not said or not known. A call that failed without an
    image (`"status": "failed"`, no `result`) drew none: 0."""
    if item.get("status") == "failed" and not item.get("result"):
        return 0
    return drawn_image_tokens(tool.model, item.get("size"), item.get("quality"))


def add_tool_images(
    usage: TokenUsage,
    tokens: int,
    tool: ImageTool = IMAGE_TOOL,
    fed: int = 0,
    seen: int = 0,
    cached: tuple[int, int] = (0, 0),
) -> None:
    """Count in `usage` the image output tokens the image generation tool drew (its
    `tool_image_tokens`: within its output and its image output, at `tool`'s rate), and the
    input its image model was fed as reported (`fed` tokens, `seen` of them images, `cached`
    of them read from its cache, all and images: within its input, at that model's input
    prices), once however often they are counted."""
    more = tokens - usage.tool_image_tokens
    usage.output_tokens += more
    usage.output_image_tokens += more
    usage.tool_image_tokens = tokens
    before = usage.image_tool
    if fed or (before is not None and before.input_tokens):
        usage.input_tokens += fed - (0 if before is None else before.input_tokens)
        tool = replace(
            tool,
            input_tokens=fed,
            input_image_tokens=min(seen, fed),
            cached_tokens=min(cached[0], fed),
            cached_image_tokens=min(cached[1], cached[0], seen, fed),
        )
    usage.image_tool = None if tool is IMAGE_TOOL else tool  # (None: the default's prices)


def _tool_usage(reported: object) -> TokenUsage | None:
    """What the image model of the image generation tool consumed, as a Responses answer's
    top-level `tool_usage` reports it (`{"image_gen": {"input_tokens": 27,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 27}, "output_tokens": 1056,
    ...}}`, as OpenAI writes it beside `usage`); None where it reports none, or 0 tokens."""
    gen = reported.get("image_gen") if type(reported) is dict else None
    found = usage_from_mapping(gen) if type(gen) is dict else None
    return found if found is not None and (found.input_tokens or found.output_tokens) else None


def _tool_cached(reported: object) -> tuple[int, int]:
    """Of the input the image generation tool's image model was fed (`_tool_usage`), what it
    read from the cache, all and images: `tool_usage.image_gen`'s `cached_tokens` and
    `cached_tokens_details.cached_image_tokens` (beside its `input_tokens_details`)."""
    gen = reported.get("image_gen") if type(reported) is dict else None
    if type(gen) is not dict or not gen.get("cached_tokens"):
        return 0, 0
    details = gen.get("cached_tokens_details")
    images = details.get("cached_image_tokens") if type(details) is dict else None
    return _count(gen["cached_tokens"]), _count(images)


def json_tool_images(body: bytes, tool: ImageTool = IMAGE_TOOL) -> int:
    """The image output tokens of the images the image generation tool drew that a whole JSON
    answer's top-level `output` holds (`image_call_tokens`): 0 for a body without such a call."""
    if body.find(_IMAGE_CALL_KEY) < 0 and _searched_whole(body):
        return 0
    try:
        document = json_loads(body)
    except JSON_ERRORS:
        return 0
    output = document.get("output") if type(document) is dict else None
    if type(output) is not list:
        return 0
    return sum(
        image_call_tokens(item, tool)
        for item in output
        if type(item) is dict and item.get("type") == IMAGE_CALL
    )


_RESULT_KEY: Final = re.compile(rb'"result"\s*:\s*"')


def without_results(body: bytes) -> bytes:
    """A JSON answer's bytes with the content of each `"result"` string left out (an image
    generation call's base64 image, no text and megabytes long), its quotes kept: the same
    document but for those strings, read whole where the answer is too large to keep (an
    image's item is no JSON in the tail kept of it). A string not closed yet is left out to the
    end, its opening kept: what follows of it, once the body is longer, is left out then."""
    kept: list[bytes] = []
    start = 0
    for match in _RESULT_KEY.finditer(body):
        at = match.start()
        if at < start or (at and body[at - 1] == 0x5C and not _unescaped(body, at)):
            continue  # within a string left out, or `\"result\"` within a text
        opened = match.end()
        end = body.find(b'"', opened)
        while end >= 0 and not _unescaped(body, end):
            end = body.find(b'"', end + 1)
        kept.append(body[start:opened])
        if end < 0:
            if not _unescaped(body, len(body)):  # cut within an escape: what it escapes follows
                kept.append(b"\\")
            return b"".join(kept)
        start = end
    kept.append(body[start:])
    return b"".join(kept)


def count_searches(
    usage: TokenUsage,
    output: object,
    tool: ImageTool = IMAGE_TOOL,
    partials: int = 0,
    reported: object = None,
) -> None:
    """Set in `usage` the server-side tools' calls a Responses API answer's `output` holds (a
    list), which its usage does not count, as OpenAI bills them. Web searches (the `web_search`
    tool, per search): its `web_search_call` items whose action is a search (or that name none,
    as `web_search_preview` answered; opening a page found, or finding in one, is no search).
    File searches (the `file_search` tool, per call): its `file_search_call` items, each one
    call whatever the queries it ran. Images (the `image_generation` tool, at its image model's
    prices, `tool`'s): its `image_generation_call` items (`image_call_tokens`), and the
    `partials` partial images streamed before them, 100 tokens each; where the answer reports
    what its image model consumed (`reported`, its `tool_usage`), those counts instead, input
    and output, the exact bill, and so its billable web searches (`web_search.num_requests`:
    a search of several queries, searches discounted)."""
    if type(output) is not list:
        return
    web = files = drawn = 0
    for item in output:
        if type(item) is dict:
            kind = item.get("type")
            if kind == _WEB_SEARCH_CALL:
                action = item.get("action")
                if type(action) is not dict or action.get("type", "search") == "search":
                    web += 1
            elif kind == _FILE_SEARCH_CALL:
                files += 1
            elif kind == IMAGE_CALL:
                drawn += image_call_tokens(item, tool)
    if type(reported) is dict:
        searched = reported.get("web_search")  # the billable searches, counted for us
        if type(searched) is dict and _readable(searched, "num_requests"):
            web = _count(searched["num_requests"])
    usage.web_searches = web
    usage.file_searches = files
    told = _tool_usage(reported) if reported is not None else None
    if told is not None:
        add_tool_images(usage, told.output_tokens, tool, told.input_tokens,
                        told.input_image_tokens, _tool_cached(reported))  # fmt: skip
    else:
        add_tool_images(usage, drawn + PARTIAL_IMAGE_TOKENS * partials, tool)


def json_searches(usage: TokenUsage, body: bytes, tool: ImageTool = IMAGE_TOOL) -> None:
    """`count_searches` of a whole JSON answer's top-level `output` (an answer to a request that
    may have used such tools: a body without a search call is not parsed, its usage's counts
    kept)."""
    if body.find(_SEARCH_CALL_KEY) < 0 and body.find(_IMAGE_CALL_KEY) < 0 and _searched_whole(body):
        return
    try:
        document = json_loads(body)
    except JSON_ERRORS:
        return
    if type(document) is dict:
        count_searches(usage, document.get("output"), tool, 0, document.get("tool_usage"))


def _searched_whole(body: bytes) -> bool:
    """Whether a search of a JSON body's bytes finds every key it holds: not when one may be
    `\\u`-escaped (`"web_search_cal\\u006c"`), nor in UTF-16 or UTF-32 (a NUL in its first 4
    bytes, or their byte-order mark, as `json.loads` tells them), which are read whole."""
    return b"\\u" not in body and b"\x00" not in body[:4] and body[:2] not in _WIDE_MARKS


_WIDE_MARKS: Final = (b"\xff\xfe", b"\xfe\xff")  # UTF-16's (and UTF-32-LE's) byte-order marks


def wide_codec(head: bytes) -> str | None:
    """The codec of text whose first bytes `head` (4 of them) say UTF-16 or UTF-32, as JSON's
    do (a byte-order mark, or the NULs beside an ASCII first character, as `json.loads` tells
    them), its byte order named (a mark reads as U+FEFF): any part of the text that begins at
    a code unit reads so. None: UTF-8."""
    codec: str = json.detect_encoding(head[:4])
    if codec.startswith("utf-8"):
        return None
    if codec in ("utf-16", "utf-32"):  # told by its mark
        codec += "-le" if head[:1] == b"\xff" else "-be"
    return codec


_JSON_STARTS: Final = (b"{", b"[")
# What JSON that begins otherwise than in ASCII may begin with: a byte-order mark (UTF-8's
# first byte, or a wide one's), or a NUL (UTF-16-BE or UTF-32-BE without one)
_MARK_STARTS: Final = (b"\xef", b"\xff", b"\xfe", b"\x00")


def begins_json(data: bytes) -> bool | None:
    """Whether an answer whose first bytes are `data` begins as JSON does, with `{` or `[`
    (after any whitespace): not an event stream, which cannot. In UTF-8, after a byte-order
    mark or not, or in UTF-16 or UTF-32, as `json.loads` reads bytes. None (falsy): too few
    bytes to say, fewer than 4 that begin as a byte-order mark or a wide first character may."""
    head = data[:64]
    first = head.lstrip()[:1]
    if first in _JSON_STARTS:
        return True
    if first not in _MARK_STARTS:
        return False
    text = head.decode(json.detect_encoding(head), "ignore")  # (cut at any byte)
    if text.lstrip(" \t\r\n\ufeff")[:1] in ("{", "["):
        return True
    return None if len(head.lstrip()) < 4 else False


_TIER_KEY: Final = b'"service_tier"'


def _tier_before(body: bytes, end: int) -> object:
    """The top-level `service_tier` written before the usage key at `end`, found as the usage
    is: `{` + the body from the key on parses only when the key is a top-level one (a nested
    one, such as a client's tool schema echoed back, leaves an extra closing bracket). Past
    _CANDIDATES keys that are not, the whole body is read, as for the usage: a client's schemas
    could otherwise hide the answer's tier."""
    at = body.rfind(_TIER_KEY, 0, end)
    for _ in range(_CANDIDATES):
        if at < 0:
            return None
        if body[at - 1] != 0x5C or _unescaped(body, at):
            try:
                return json_loads(b"{" + body[at:]).get("service_tier")
            except JSON_ERRORS:
                pass
        at = body.rfind(_TIER_KEY, 0, at)
    if at < 0:
        return None
    try:
        document = json_loads(body)
    except JSON_ERRORS:  # a huge answer's kept tail: not the whole of it
        return None
    return document.get("service_tier") if type(document) is dict else None


def tier_name(value: object) -> str | None:
    """A `service_tier`, asked for or answered, as it is priced: a name (at most 32
    characters), else None."""
    return value if type(value) is str and 0 < len(value) <= 32 else None


def _unescaped(body: bytes, index: int) -> bool:
    """Whether the quote at `index` ends an even run of backslashes (so is not escaped)."""
    backslashes = 0
    while index - backslashes > 0 and body[index - backslashes - 1] == 0x5C:
        backslashes += 1
    return backslashes % 2 == 0


# In an answer's output, what is not generated text: ids, kinds, roles, reasons, log-probs.
_NOT_TEXT: Final = frozenset(
    {
        "id",
        "call_id",
        "type",
        "object",
        "role",
        "status",
        "model",
        "name",
        "index",
        "finish_reason",
        "stop_reason",
        "stop_sequence",
        "logprobs",
        "annotations",
        "signature",  # a thinking block's (Anthropic's): opaque, as a stream's count leaves it
        "encrypted_content",  # a reasoning item's (the Responses API's): opaque
        # a drawn image's base64, no text (a gateway's chat `images`, LiteLLM's and
        # OpenRouter's), as a stream's count leaves it: a model that draws is charged its
        # most output (`Exchange._work_out`)
        "images",
        # an image generation call's image in base64 (the Responses API's), no text: priced as
        # the image its tool drew (`image_call_tokens`)
        "result",
    }
)
_OUTPUT_KEYS: Final = ("choices", "content", "output")  # OpenAI, Anthropic, the Responses API
_GENERATED_JSON: Final = frozenset({"input", "arguments"})  # Anthropic's tool input, OpenAI's
_MAX_DEPTH: Final = 32


def answered_chars(body: bytes) -> int | None:
    """The characters a JSON answer that reports no usage generated, for its estimate (as a
    stream's are counted as they pass): the text under its `choices` (chat and legacy
    completions), `content` (Anthropic) or `output` (the Responses API), a tool call's
    arguments and input included, ids and kinds left out. 0 for JSON that is no object; None
    for a body that is not JSON at all (cut short, corrupt, or some other format)."""
    try:
        document = json_loads(body)
    except JSON_ERRORS:
        return None
    if type(document) is not dict:
        return 0
    return sum(_chars(document.get(key), 0) for key in _OUTPUT_KEYS)


def images_answered(body: bytes) -> bool:
    """Whether a JSON answer is the Images API's: a top-level `data` list holding an image (its
    `b64_json` or `url`), which no text counts (`answered_chars` reads none of it)."""
    try:
        document = json_loads(body)
    except JSON_ERRORS:
        return False
    data = document.get("data") if type(document) is dict else None
    return type(data) is list and any(
        type(item) is dict and ("b64_json" in item or "url" in item) for item in data
    )


def spoken_chars(body: bytes) -> int:
    """Of the characters `answered_chars` counts, those a spoken answer's transcripts say
    (`message.audio.transcript`): priced as speech, the rest (a tool call's arguments) as
    text. 0 for a body that is not JSON."""
    try:
        document = json_loads(body)
    except JSON_ERRORS:
        return 0
    if type(document) is not dict:
        return 0
    return sum(_said(document.get(key), 0) for key in _OUTPUT_KEYS)


def _said(value: Any, depth: int) -> int:
    if depth == _MAX_DEPTH:
        return 0
    if type(value) is list:
        return sum(_said(item, depth + 1) for item in value)
    if type(value) is not dict:
        return 0
    total = 0
    for key, item in value.items():
        if key == "audio" and type(item) is dict:
            transcript = item.get("transcript")
            total += text_size(transcript) if type(transcript) is str else 0
        else:  # a text or a number is 0
            total += _said(item, depth + 1)
    return total


def generated_chars(value: Any) -> int:
    """The generated characters in a piece of an answer as `answered_chars` counts them (its
    strings, ids and kinds left out): a stream's content sent as a list of chunks."""
    return _chars(value, 0)


def text_size(text: str) -> int:
    """Generated text's characters as an estimate counts them, 4 a token: a character beyond
    ASCII (Chinese, Japanese, most emoji: a token or more each to a tokenizer) counts 4."""
    size = len(text)
    if text.isascii():  # the usual case: a flag CPython keeps
        return size
    return size + 3 * (size - len(text.encode("ascii", "ignore")))


def _chars(value: Any, depth: int) -> int:
    if type(value) is str:
        return text_size(value)
    if depth == _MAX_DEPTH:
        return 0
    if type(value) is list:
        return sum(_chars(item, depth + 1) for item in value)
    if type(value) is dict:
        return sum(
            (
                _json_chars(v)
                if k in _GENERATED_JSON
                else _speech_chars(v, depth + 1)
                if k == "audio"
                else _chars(v, depth + 1)
            )
            for k, v in value.items()
            if k not in _NOT_TEXT
        )
    return 0


def _speech_chars(value: Any, depth: int) -> int:
    """A spoken answer's `audio` (OpenAI's: base64 `data`, no text, and its `transcript`):
    counted by its transcript, as a stream's speech is."""
    if type(value) is dict:
        return _chars(value.get("transcript"), depth)
    return _chars(value, depth)


def _json_chars(value: Any) -> int:
    """A tool call's input or arguments, which the model wrote as JSON: all of it counts."""
    if type(value) is str:
        return text_size(value)
    try:
        return text_size(json_bytes(value).decode())
    except TypeError:  # nested deeper than orjson writes
        return 0


_ZLIB_CODINGS: Final = frozenset({"gzip", "x-gzip", "deflate"})
_GZIP_MAGIC: Final = b"\x1f\x8b"
_READABLE_CODINGS: Final = _ZLIB_CODINGS | {"identity"}
USUAL_ACCEPT: Final = b"gzip, deflate"  # what httpx and requests send: nothing to narrow


def readable_accept(value: str) -> str | None:
    """An `accept-encoding` narrowed to the codings `BodyDecoder` reads (gzip, deflate,
    identity), for a metered request: its answer's usage must be readable. br, zstd and `*`
    are left out (an answer in them would be charged as unread, at its reservation's worst case);
    "identity" when nothing is left. None: the header names no other coding, so it goes as sent."""
    kept: list[str] = []
    narrowed = False
    for item in value.split(","):
        coding = item.split(";", 1)[0].strip().lower()
        if coding in _READABLE_CODINGS:
            kept.append(item.strip())
        elif coding:
            narrowed = True
    if not narrowed:
        return None
    return ", ".join(kept) or "identity"


class BodyDecoder:
    """Decodes a response body's `content-encoding` chunk by chunk, to read its usage.

    Feed it a copy of each raw chunk; the client still gets the encoded bytes. `identity` (or no
    encoding) passes through; gzip and deflate (zlib or raw) are inflated, several of them too
    (`gzip, gzip`: undone last first, as httpx undoes them for the SDK). Anything else (br,
    zstd, beside them or alone) is not `supported`: `error` says why usage could not be read.
    Corrupt data, a truncated body or a decoded size over `max_size` also set `error`. It never
    raises. `max_size` None: no bound (an answer, read as it goes by and kept no more than its
    tail: a bound made one over it unreadable, charged its worst case for the usage at its end).
    """

    __slots__ = (
        "_coding",
        "_inflater",
        "_max_size",
        "_prefix",
        "_size",
        "_then",
        "error",
        "oversized",
        "supported",
    )

    def __init__(self, content_encoding: str | None, *, max_size: int | None = None) -> None:
        codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
        codings = [c for c in codings if c and c != "identity"]
        self.supported = all(c in _ZLIB_CODINGS for c in codings)
        self.error: str | None = None
        self.oversized = False  # decoded beyond `max_size` (one of the errors)
        if not self.supported:
            self.error = f"unsupported content-encoding: {content_encoding}"
        # Codings are listed in the order they were applied: the last is undone here, and what
        # that gives is the next one's to undo (`_then`).
        self._coding = codings[-1] if codings else "identity"
        self._then = (
            BodyDecoder(", ".join(codings[:-1]), max_size=max_size)
            if self.supported and len(codings) > 1
            else None
        )
        # wbits=47: zlib reads the gzip or zlib header itself
        self._inflater = zlib.decompressobj(wbits=47) if self.supported and codings else None
        # deflate input kept until its first 2 bytes (the zlib header) are read: raw deflate retries
        self._prefix: bytearray | None = bytearray() if self._coding == "deflate" else None
        self._max_size = max_size
        self._size = 0

    def feed(self, chunk: bytes) -> bytes:
        """The decoded bytes this chunk completes (b"" once `error` is set)."""
        out = self._feed(chunk)
        then = self._then
        return out if then is None else self._through(then.feed(out) if out else b"")

    def _through(self, out: bytes) -> bytes:
        """What the next coding undone gave, its error this decoder's."""
        then = self._then
        if then is not None and then.error is not None and self.error is None:
            self.oversized = then.oversized
            return self._fail(then.error)
        return out

    def _feed(self, chunk: bytes) -> bytes:
        """This decoder's own coding undone."""
        if self.error is not None:
            return b""
        if self._inflater is None:
            return self._count(chunk)
        try:
            limit = self._max_size
            out = self._inflater.decompress(chunk, 0 if limit is None else limit - self._size + 1)
        except zlib.error as exc:
            if self._prefix is None:
                return self._fail(f"corrupt {self._coding} body: {exc}")
            # HTTP "deflate" is meant to be zlib-wrapped, but some servers send raw deflate
            data, self._prefix = bytes(self._prefix) + chunk, None
            self._inflater = zlib.decompressobj(wbits=-15)
            return self._feed(data)
        if self._prefix is not None:
            self._prefix += chunk
            if len(self._prefix) >= 2:
                self._prefix = None
        inflater = self._inflater
        if inflater.eof and self._coding != "deflate":
            rest = inflater.unused_data
            if rest[:2] == _GZIP_MAGIC:  # gzip in several members (RFC 1952 2.2): the next one
                self._inflater = zlib.decompressobj(wbits=47)
                out = self._count(out)
                return out + self._feed(rest) if self.error is None else b""
            # Not a member (yet: its first byte alone, wait for the next), or trailing bytes
            # that clients ignore, as urllib3 and curl do: so do we.
        return self._count(out)

    def flush(self) -> bytes:
        """The last decoded bytes, at the end of the body."""
        out = self._flush()
        then = self._then
        if then is None or self.error is not None:
            return out
        return self._through((then.feed(out) if out else b"") + then.flush())

    def _flush(self) -> bytes:
        if self.error is not None or self._inflater is None:
            return b""
        inflater = self._inflater
        out = self._count(inflater.flush())
        if self.error is None and not inflater.eof:
            return self._fail(f"truncated {self._coding} body")
        return out

    def _count(self, out: bytes) -> bytes:
        self._size += len(out)
        if self._max_size is not None and self._size > self._max_size:
            self.oversized = True
            return self._fail(f"decoded body larger than {self._max_size} bytes")
        return out

    def decode(self, data: bytes) -> bytes | None:
        """A whole body decoded at once; None when it cannot be (see `error`)."""
        out = self.feed(data)
        out += self.flush()
        return None if self.error is not None else out

    def _fail(self, error: str) -> bytes:
        self.error = error
        self._inflater = None
        return b""
