"""Reading usage from JSON response bodies, compressed or not (SPEC §7)."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import budget_middleware.core.usage as usage_module
from budget_middleware.core.usage import (
    BodyDecoder,
    TokenUsage,
    answered_chars,
    count_searches,
    json_searches,
    readable_accept,
    spoken_chars,
    usage_from_head,
    usage_from_json,
    usage_from_mapping,
)

CHAT_COMPLETION = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4.1-2025-04-14",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! How can I assist you today?",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 1117,
        "completion_tokens": 10,
        "total_tokens": 1127,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_eb9dce56a8",
}

RESPONSE = {
    "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
    "object": "response",
    "created_at": 1741476542,
    "status": "completed",
    "model": "gpt-4.1-2025-04-14",
    "output": [
        {
            "type": "message",
            "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "In a grove...", "annotations": []}],
        }
    ],
    "usage": {
        "input_tokens": 36,
        "input_tokens_details": {"cached_tokens": 12},
        "output_tokens": 87,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 123,
    },
    "user": None,
    "metadata": {},
}

ANTHROPIC_MESSAGE = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-20250514",
    "content": [{"type": "text", "text": "Hi! My name is Claude."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 2095,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 1800,
        "output_tokens": 503,
        "service_tier": "standard",
    },
}


def body(document: Any) -> bytes:
    return json.dumps(document).encode()


def padded(document: dict[str, Any], size: int = 100_000) -> dict[str, Any]:
    """The same response with a long answer, so the body takes the large-body path."""
    long = dict(document)
    return {"content_padding": "lorem ipsum " * (size // 12), **long}


# --- the shapes providers send ---------------------------------------------------------------


def test_openai_chat_completion_usage_counts_cached_tokens_within_input() -> None:
    served = TokenUsage(1117, 10, 1024, 0, service_tier="default")  # its tier, after the usage
    assert usage_from_json(body(CHAT_COMPLETION)) == served


def test_total_tokens_is_input_plus_output() -> None:
    assert TokenUsage(10, 5, cached_tokens=4).total_tokens == 15


def test_openai_embeddings_usage_has_no_output_tokens() -> None:
    embeddings = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0023, -0.0093]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
    assert usage_from_json(body(embeddings)) == TokenUsage(input_tokens=8)


def test_responses_api_input_tokens_already_include_cached_tokens() -> None:
    assert usage_from_json(body(RESPONSE)) == TokenUsage(36, 87, 12, 0)


def test_anthropic_cache_reads_and_writes_are_added_to_input_tokens() -> None:
    assert usage_from_json(body(ANTHROPIC_MESSAGE)) == TokenUsage(
        input_tokens=2095 + 100 + 1800,
        output_tokens=503,
        cached_tokens=1800,
        cache_write_tokens=100,
    )


def test_anthropic_usage_without_cache_fields_is_plain_input() -> None:
    assert usage_from_mapping({"input_tokens": 10, "output_tokens": 3}) == TokenUsage(10, 3)


def test_usage_cost_is_read_when_the_upstream_reports_it() -> None:
    openrouter = {
        **CHAT_COMPLETION,
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "cost": 0.00042},
    }
    assert usage_from_json(body(openrouter)) == TokenUsage(
        5, 2, cost=0.00042, service_tier="default"
    )


def test_usage_with_only_a_cost_is_still_usage() -> None:
    assert usage_from_mapping({"cost": 1}) == TokenUsage(cost=1.0)


def test_litellm_style_openai_usage_reads_anthropic_cache_fields_as_subsets() -> None:
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 5,
        "cache_read_input_tokens": 60,
        "cache_creation_input_tokens": 30,
    }
    assert usage_from_mapping(usage) == TokenUsage(100, 5, 60, 30)


def test_usage_of_both_shapes_with_null_openai_counts_is_read_by_its_other_counts() -> None:
    """A gateway that writes both shapes, the OpenAI keys null: read by those keys alone, it
    counted 0 tokens (an answer of 20,000 input and 500 output charged nothing)."""
    usage = {
        "prompt_tokens": None,
        "completion_tokens": None,
        "input_tokens": 20_000,
        "output_tokens": 500,
        "cache_read_input_tokens": 1_000,
    }
    assert usage_from_mapping(usage) == TokenUsage(21_000, 500, 1_000, 0)
    zeros = {"prompt_tokens": 0, "completion_tokens": 0, "input_tokens": 7, "output_tokens": 3}
    assert usage_from_mapping(zeros) == TokenUsage(7, 3)
    both = {"prompt_tokens": 9, "completion_tokens": 2, "input_tokens": 7, "output_tokens": 3}
    assert usage_from_mapping(both) == TokenUsage(9, 2)  # the OpenAI counts, when they say any
    half = {"prompt_tokens": 9, "completion_tokens": 0, "input_tokens": 7, "output_tokens": 3}
    assert usage_from_mapping(half) == TokenUsage(9, 0)  # one of them is a count said
    only_in = {"prompt_tokens": None, "completion_tokens": None, "input_tokens": 50}
    assert usage_from_mapping(only_in) == TokenUsage(50, 0)
    only_out = {"prompt_tokens": None, "completion_tokens": None, "output_tokens": 9}
    assert usage_from_mapping(only_out) == TokenUsage(0, 9)
    # No other shape there: LiteLLM's cache fields stay subsets of the (zero) prompt.
    cached = {"prompt_tokens": 0, "completion_tokens": 0, "cache_read_input_tokens": 5}
    assert usage_from_mapping(cached) == TokenUsage(0, 0, 0, 0)


# --- bad input never raises --------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b'{"usage": {"prompt_tokens": 1',
        b"[1, 2, 3]",
        b'"usage"',
        b'{"usage": null}',
        b'{"usage": "lots"}',
        b'{"usage": []}',
        b'{"id": "x"}',
        b'{"usage": {"total_tokens": 5}}',
        b"\xff\xfe" + b'"usage"',
        b"[" * 100_000 + b'"usage"' + b"]" * 100_000,
    ],
)
def test_body_without_readable_usage_gives_none(raw: bytes) -> None:
    assert usage_from_json(raw) is None


def test_wrong_types_and_negative_counts_count_as_zero_beside_a_readable_one() -> None:
    """A bad count (text, a boolean, negative, null, NaN) is 0 beside one that can be read;
    when no input or output count can be read (nor a cost), no usage was reported: the answer
    is charged an estimate, marked so, never a silent 0."""
    usage = {
        "prompt_tokens": "twelve",
        "completion_tokens": 4,
        "prompt_tokens_details": None,
        "cost": "0.1",
    }
    assert usage_from_mapping(usage) == TokenUsage(0, 4, 0, 0, None)
    assert usage_from_mapping({"input_tokens": True, "output_tokens": 7.0}) == TokenUsage(0, 7)
    assert usage_from_mapping({"prompt_tokens": 0, "completion_tokens": 0}) == TokenUsage()
    unreadable = [
        {"prompt_tokens": "-12", "completion_tokens": -4, "cost": "0.1"},
        {"prompt_tokens": None, "completion_tokens": None, "total_tokens": 107},
        {"output_tokens": float("nan"), "cost": -1},
        {"input_tokens": False, "output_tokens": "7.5"},
        {"input_tokens": "", "output_tokens": " 7"},
        {"input_tokens": "\uff17", "output_tokens": "1" * 19},  # a full-width 7; past 18 digits
    ]
    assert [usage_from_mapping(u) for u in unreadable] == [None] * 6


def test_a_count_written_as_digits_is_that_count() -> None:
    """`"12"` is 12 tokens: a gateway that quotes its numbers was charged its prompt as 0
    beside a readable output count (a whole prompt's tokens lost), or an estimate from the
    answer's characters when every count was quoted."""
    quoted = {"prompt_tokens": "1200", "completion_tokens": 40}
    assert usage_from_mapping(quoted) == TokenUsage(1200, 40)
    anthropic = {"input_tokens": "30", "output_tokens": "5", "cache_read_input_tokens": "100"}
    assert usage_from_mapping(anthropic) == TokenUsage(130, 5, 100, 0)
    responses = {"input_tokens": "7", "output_tokens": "3", "input_tokens_details": {}}
    assert usage_from_mapping(responses) == TokenUsage(7, 3)
    most = {"prompt_tokens": "9" * 18, "completion_tokens": "0012"}  # 18 digits: the most read
    assert usage_from_mapping(most) == TokenUsage(10**18 - 1, 12)
    assert usage_from_mapping({"prompt_tokens": None, "cost": 0.25}) == TokenUsage(cost=0.25)


def test_a_quoted_total_counts_and_a_quoted_count_is_never_lowered_in_a_stream() -> None:
    """Where every count is quoted, `total_tokens` is one too: the reasoning a total counts
    beyond the input and output (Gemini's thoughts) is output, as with an unquoted total (it
    was left out: 40 output tokens charged of 3,800). And a streamed Anthropic count never goes
    down: a gateway's `message_delta` with `"input_tokens": "0"` kept `message_start`'s
    `"1200"` (it was charged 0 input tokens)."""
    from budget_middleware.core.sse import StreamMeter

    quoted = {"prompt_tokens": "1200", "completion_tokens": "40", "total_tokens": "5000"}
    plain = {"prompt_tokens": 1200, "completion_tokens": 40, "total_tokens": 5000}
    responses = {"input_tokens": "1200", "output_tokens": "40", "total_tokens": "5000",
                 "input_tokens_details": {}, "output_tokens_details": {}}  # fmt: skip
    read = [usage_from_mapping(u) for u in (quoted, plain, responses)]
    print(f"quoted total: {read[0]}; unquoted: {read[1]}")
    assert read == [TokenUsage(1200, 3800)] * 3

    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()

    for later in ("0", 0):
        meter = StreamMeter()
        start = {"id": "m", "model": "claude-sonnet-4",
                 "usage": {"input_tokens": "1200", "output_tokens": "1"}}  # fmt: skip
        meter.feed(event("message_start", {"message": start}))
        meter.feed(
            event("message_delta", {"usage": {"input_tokens": later, "output_tokens": "62"}})
        )
        meter.feed(event("message_stop", {}))
        meter.finish()
        print(f'"1200", then {later!r}: {meter.usage}')
        assert meter.usage == TokenUsage(1200, 62)


def test_a_count_is_read_only_where_one_can_be() -> None:
    """Floats count as their whole part, 0.0 is a count (a usage of nothing is still one), and
    cache reads alone are a usage (Anthropic's input null, its cache read known)."""
    assert usage_from_mapping({"prompt_tokens": 10, "cache_creation_input_tokens": 2.5}) == (
        TokenUsage(10, 0, 0, 2)
    )
    assert usage_from_mapping({"prompt_tokens": 0.0, "completion_tokens": 0.0}) == TokenUsage()
    cached_only = {"input_tokens": None, "output_tokens": None, "cache_read_input_tokens": 5}
    assert usage_from_mapping(cached_only) == TokenUsage(5, 0, 5, 0)


def test_cached_tokens_never_exceed_input_tokens() -> None:
    usage = {
        "prompt_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 50},
        "cache_creation_input_tokens": 5,
    }
    assert usage_from_mapping(usage) == TokenUsage(10, 0, 10, 0)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    usage_from_json(raw)
    usage_from_json(raw + b'"usage": {"prompt_tokens": 3}}' + b" " * 5000)


# --- large bodies --------------------------------------------------------------------------------


def test_large_body_reads_the_usage_at_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[int] = []
    real = usage_module.json_loads

    def spy(data: bytes | str) -> Any:
        parsed.append(len(data))
        return real(data)

    monkeypatch.setattr(usage_module, "json_loads", spy)
    raw = body(padded(RESPONSE))
    assert len(raw) > 100_000
    assert usage_from_json(raw) == TokenUsage(36, 87, 12, 0)
    # only the tail (the usage and the keys after it) was parsed, never the 100 KB body
    assert parsed and all(size < 1000 for size in parsed)


def test_large_body_ignores_a_usage_key_quoted_inside_a_string() -> None:
    document = padded(CHAT_COMPLETION)
    document["system_fingerprint"] = 'fp "usage": {"prompt_tokens": 999}'
    document['note "usage'] = {"prompt_tokens": 777}
    assert usage_from_json(body(document)) == TokenUsage(1117, 10, 1024, 0, service_tier="default")


def test_large_body_with_many_decoys_falls_back_to_a_full_parse() -> None:
    document = padded(CHAT_COMPLETION)
    document["notes"] = [f'decoy {n} "usage' for n in range(6)]
    assert usage_from_json(body(document)) == TokenUsage(1117, 10, 1024, 0, service_tier="default")


def test_large_body_ignores_a_nested_usage_key_after_the_real_one() -> None:
    document = padded(RESPONSE)
    document["metadata"] = {"usage": {"input_tokens": 5, "output_tokens": 5}}
    assert usage_from_json(body(document)) == TokenUsage(36, 87, 12, 0)


def test_large_body_with_only_a_nested_usage_key_has_no_usage() -> None:
    document = padded({"id": "x", "metadata": {"usage": {"input_tokens": 5}}})
    assert usage_from_json(body(document)) is None


def test_large_body_with_null_usage_has_no_usage() -> None:
    assert usage_from_json(body(padded({**RESPONSE, "usage": None}))) is None


def test_large_body_with_whitespace_and_unicode_is_read() -> None:
    document = padded({**ANTHROPIC_MESSAGE, "content": [{"type": "text", "text": "héllo 🌍"}]})
    raw = json.dumps(document, indent=2, ensure_ascii=False).encode()
    assert usage_from_json(raw) == usage_from_json(body(ANTHROPIC_MESSAGE))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


nested_usage = st.recursive(
    json_values,
    lambda inner: (
        st.dictionaries(st.sampled_from(["usage", "a", 'x "usage": 1']), inner, max_size=2)
        | st.lists(inner | st.sampled_from(["usage", '"usage": {"prompt_tokens": 9}']), max_size=2)
    ),
    max_leaves=6,
)


def read_whole(raw: bytes) -> TokenUsage | None:
    """The reference: the whole document parsed as the standard library parses it (NaN and
    Infinity too, which `json.dumps` writes by default and `json_loads` reads since the
    twenty-fifth session), its top-level `usage` read."""
    try:
        document = json.loads(raw)
    except ValueError:
        return None
    usage = document.get("usage")
    return usage_from_mapping(usage) if isinstance(usage, dict) else None


# A usage holding Infinity (CI's run of 2026-12-04 found it: the reference refused it, the
# package reads it as the standard library does since the twenty-fifth session)
@example(
    usage={"cache_read_input_tokens": [float("inf")], "output_tokens": 0},
    before={},
    after={},
    indent=None,
    pad=0,
)
@settings(max_examples=300)
@given(
    usage=json_values
    | st.fixed_dictionaries(
        {},
        optional={
            "prompt_tokens": json_values,
            "completion_tokens": json_values,
            "cost": json_values,
            "input_tokens": json_values,
            "output_tokens": json_values,
            "cache_read_input_tokens": json_values,
            "input_tokens_details": json_values,
        },
    ),
    before=st.dictionaries(st.sampled_from(["choices", "metadata", 'q"usage']), nested_usage),
    # keys of `after` are none of `before`'s: a redefined key keeps its place ahead of `usage`,
    # and `after` is not kept valid JSON (an `Infinity` there would precede the usage)
    after=st.dictionaries(st.sampled_from(["user", "tier", "usage_note", "x"]), nested_usage),
    indent=st.sampled_from([None, 1]),
    pad=st.sampled_from([0, 5000]),
)
def test_the_tail_read_finds_the_usage_a_whole_parse_finds(
    usage: Any, before: dict[str, Any], after: dict[str, Any], indent: int | None, pad: int
) -> None:
    """Only the tail from the last top-level `usage` key is decoded; nested and quoted `usage`
    keys before or after it (decoys) never change what is read."""
    try:  # what precedes the usage is not validated (documented): keep it valid JSON here
        json.dumps(before, allow_nan=False)
    except ValueError:
        assume(False)
    document = {"id": "chatcmpl-1", **before, "usage": usage, **after}
    assert list(document)[-len(after) - 1] == "usage"  # everything of `after` follows the usage
    if pad:
        document = padded(document, pad)
    raw = json.dumps(document, indent=indent).encode()
    assert usage_from_json(raw) == read_whole(raw)


# --- content-encoding ----------------------------------------------------------------------------


def decode_in_pieces(decoder: BodyDecoder, data: bytes, size: int) -> bytes:
    out = b"".join(decoder.feed(data[i : i + size]) for i in range(0, len(data), size))
    return out + decoder.flush()


@pytest.mark.parametrize("size", [1, 7, 4096])
def test_gzip_body_is_decoded_incrementally(size: int) -> None:
    raw = body(CHAT_COMPLETION)
    decoder = BodyDecoder("gzip")
    assert decode_in_pieces(decoder, gzip.compress(raw), size) == raw
    assert decoder.supported and decoder.error is None


@pytest.mark.parametrize("size", [1, 3, 4096])
def test_deflate_body_is_decoded_zlib_wrapped_or_raw(size: int) -> None:
    raw = body(ANTHROPIC_MESSAGE)
    deflater = zlib.compressobj(wbits=-15)
    raw_deflate = deflater.compress(raw) + deflater.flush()
    for encoded in (zlib.compress(raw), raw_deflate):
        decoder = BodyDecoder("Deflate")
        assert decode_in_pieces(decoder, encoded, size) == raw
        assert decoder.error is None


@pytest.mark.parametrize("encoding", [None, "", "identity", " Identity "])
def test_identity_body_passes_through(encoding: str | None) -> None:
    decoder = BodyDecoder(encoding)
    assert decoder.feed(b"abc") == b"abc"
    assert decoder.flush() == b""
    assert decoder.supported and decoder.error is None


def test_identity_listed_with_gzip_is_gzip() -> None:
    decoder = BodyDecoder("gzip, identity")
    assert decode_in_pieces(decoder, gzip.compress(b"{}"), 10) == b"{}"


@pytest.mark.parametrize("size", [1, 5, 4096])
def test_several_codings_are_undone_last_first_as_httpx_does(size: int) -> None:
    """`content-encoding: deflate, gzip` is deflate, then gzip over it (RFC 9110 8.4): gzip is
    undone first. In pieces of any size; a layer cut short is an error at the end."""
    raw = body(CHAT_COMPLETION)
    for coding, encoded in (
        ("gzip, gzip", gzip.compress(gzip.compress(raw))),
        ("deflate, gzip", gzip.compress(zlib.compress(raw))),
        ("gzip, identity, deflate", zlib.compress(gzip.compress(raw))),
    ):
        decoder = BodyDecoder(coding)
        assert decode_in_pieces(decoder, encoded, size) == raw, coding
        assert decoder.supported and decoder.error is None
    inner_cut = gzip.compress(gzip.compress(raw)[:-12])
    decoder = BodyDecoder("gzip, gzip")
    decode_in_pieces(decoder, inner_cut, size)
    assert decoder.error == "truncated gzip body"


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, br", "br, gzip, gzip"])
def test_unknown_encoding_says_usage_cannot_be_read(encoding: str) -> None:
    decoder = BodyDecoder(encoding)
    assert not decoder.supported
    assert decoder.error == f"unsupported content-encoding: {encoding}"
    assert decoder.feed(b"\x1f\x8b...") == b""
    assert decoder.flush() == b""


def test_corrupt_gzip_sets_an_error_without_raising() -> None:
    decoder = BodyDecoder("gzip")
    assert decoder.feed(b"this is not gzip") == b""
    assert decoder.error is not None and decoder.error.startswith("corrupt gzip body")
    assert decoder.feed(b"more") == b""


def test_truncated_gzip_sets_an_error_at_flush() -> None:
    decoder = BodyDecoder("gzip")
    decoder.feed(gzip.compress(body(CHAT_COMPLETION))[:-12])
    assert decoder.flush() == b""
    assert decoder.error == "truncated gzip body"


def test_decoded_body_over_max_size_stops_decoding() -> None:
    bomb = gzip.compress(b"0" * 1_000_000)
    decoder = BodyDecoder("gzip", max_size=1000)
    assert decoder.feed(bomb) == b""
    assert decoder.error == "decoded body larger than 1000 bytes"
    identity = BodyDecoder(None, max_size=3)
    assert identity.feed(b"abc") == b"abc"
    assert identity.feed(b"d") == b""
    assert identity.error is not None


def test_usage_of_a_gzip_body_is_read_from_the_decoded_bytes() -> None:
    raw = body(padded(CHAT_COMPLETION))
    decoder = BodyDecoder("gzip")
    assert usage_from_json(decode_in_pieces(decoder, gzip.compress(raw), 1000)) == TokenUsage(
        1117, 10, 1024, 0, service_tier="default"
    )


def test_anthropic_counts_of_one_count_and_negative_ones_are_zero() -> None:
    one = {"input_tokens": 1, "output_tokens": 1, "cache_read_input_tokens": 1}
    assert usage_from_mapping(one) == TokenUsage(2, 1, 1, 0)
    negative = {"input_tokens": -3, "output_tokens": 0, "cache_creation_input_tokens": -2}
    assert usage_from_mapping(negative) == TokenUsage(0, 0, 0, 0)
    negative["output_tokens"] = -1  # nothing left to read: no usage
    assert usage_from_mapping(negative) is None
    assert usage_from_mapping({"output_tokens": 2.9}) == TokenUsage(0, 2, 0, 0)
    assert usage_from_mapping({"output_tokens": 1.0}) == TokenUsage(0, 1, 0, 0)
    assert usage_from_mapping({"output_tokens": float("inf")}) is None


@pytest.mark.parametrize(
    ("sent", "narrowed"),
    [
        ("gzip, deflate", None),
        ("GZIP, Deflate, identity", None),
        ("", None),
        (" , gzip", None),
        ("gzip, deflate, br", "gzip, deflate"),
        ("Br;q=1.0, GZIP;q=0.5", "GZIP;q=0.5"),
        ("zstd", "identity"),
        ("*", "identity"),
        ("identity;q=0, br", "identity;q=0"),
        ("x-gzip, compress", "x-gzip"),
    ],
)
def test_an_accept_encoding_is_narrowed_to_the_codings_that_can_be_read(
    sent: str, narrowed: str | None
) -> None:
    assert readable_accept(sent) == narrowed


def test_the_text_an_answer_generated_is_counted_without_its_ids_and_kinds() -> None:
    answer = {
        "id": "chatcmpl-" + "i" * 40,
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "logprobs": {"content": [{"token": "ab", "logprob": -0.1}]},
                "message": {"role": "assistant", "content": "abcd", "refusal": None},
            }
        ],
        "system_fingerprint": "fp_" + "f" * 20,
    }
    assert answered_chars(json.dumps(answer).encode()) == 4
    assert answered_chars(b"[1, 2]") == 0
    assert answered_chars(b"plain text") is answered_chars(b'{"content": "cut') is None


def _nested(text: str, levels: int) -> object:
    value: object = text
    for _ in range(levels):
        value = [value]
    return value


def test_the_text_of_an_answer_is_counted_32_levels_deep_and_no_deeper() -> None:
    """Nesting is bounded (a body is the upstream's): text inside 32 lists counts, inside 33 not;
    a tool input deeper than orjson writes counts nothing (its strings are text all the same)."""
    assert answered_chars(json.dumps({"content": _nested("deep", 32)}).encode()) == 4
    assert answered_chars(json.dumps({"content": _nested("deep", 33)}).encode()) == 0
    deep_input = {"content": [{"type": "tool_use", "input": {"a": _nested("x", 300)}}]}
    shallow = {"content": [{"type": "tool_use", "input": {"a": "x"}}]}
    assert answered_chars(json.dumps(deep_input).encode()) == 0
    assert answered_chars(json.dumps(shallow).encode()) == len('{"a":"x"}')


def test_a_gzip_body_in_several_members_is_decoded_whole_wherever_it_is_cut() -> None:
    """RFC 1952 allows several members, and clients decode them all: the usage in the second
    was never seen (the rest after the first member was dropped, no error). Bytes after the
    last member that are no member are ignored, as urllib3 and curl ignore them; a member
    cut short is a truncated body."""
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 50}})
    raw = body.encode()
    members = gzip.compress(raw[:30]) + gzip.compress(raw[30:]) + gzip.compress(b"")
    for cut in range(len(members) + 1):
        decoder = BodyDecoder("gzip")
        out = decoder.feed(members[:cut]) + decoder.feed(members[cut:]) + decoder.flush()
        assert (out, decoder.error) == (raw, None), cut
    trailing = BodyDecoder("gzip")
    assert trailing.decode(gzip.compress(raw) + b"\x00\x00") == raw
    cut_short = BodyDecoder("gzip")
    assert cut_short.decode(gzip.compress(raw) + gzip.compress(b"more")[:8]) is None
    assert cut_short.error == "truncated gzip body"
    assert usage_from_json(raw) == TokenUsage(10, 50)


def test_a_service_tier_before_the_usage_is_read_when_top_level_only() -> None:
    """An SDK's answer written back (`completion.model_dump()`) has `service_tier` before
    `usage`: read there; a client's `metadata` echoed with a `service_tier` of its own is not
    the answer's tier. Looked for only for a model priced by its tier (`tiered`): a body
    without the key is searched whole."""
    sdk_order = {k: v for k, v in CHAT_COMPLETION.items() if k != "usage"}
    sdk_order["service_tier"] = "priority"
    sdk_order["usage"] = CHAT_COMPLETION["usage"]
    assert usage_from_json(body(sdk_order), tiered=True) == TokenUsage(
        1117, 10, 1024, 0, service_tier="priority"
    )
    assert usage_from_json(body(sdk_order)) == TokenUsage(1117, 10, 1024, 0)  # not looked for
    echoed = {k: v for k, v in sdk_order.items() if k != "service_tier"}
    echoed = {"metadata": {"service_tier": "flex"}, **echoed}
    assert usage_from_json(body(echoed), tiered=True) == TokenUsage(1117, 10, 1024, 0)
    both = {"metadata": {"service_tier": "flex"}, **sdk_order}
    assert usage_from_json(body(both), tiered=True) == TokenUsage(
        1117, 10, 1024, 0, service_tier="priority"
    )


def test_text_beyond_ascii_is_estimated_a_token_a_character() -> None:
    """Chinese, Japanese and emoji take a token or more a character: the estimate of an answer
    without usage counts each as 4 characters (a token), ASCII as one (a quarter)."""
    from budget_middleware.core.usage import text_size

    assert text_size("hello") == 5 and text_size("") == 0
    assert text_size("预算") == 8 and text_size("a预") == 5 and text_size("🙂") == 4
    answer = {"choices": [{"message": {"role": "assistant", "content": "预算中间件"}}]}
    assert answered_chars(json.dumps(answer, ensure_ascii=False).encode()) == 20
    assert answered_chars(json.dumps(answer).encode()) == 20  # escaped as \\u: the same text


def test_two_usages_together_add_every_count_and_keep_the_tier_told() -> None:
    """`plus` (a tool loop's turns streamed as one answer): every count adds up, the tier input
    is the larger turn's, the service tier the later one's unless it does not say; the cost is
    the turn's that reported one, the other's tokens kept apart to be priced (`uncosted`)."""
    first = TokenUsage(
        input_tokens=300,
        output_tokens=10,
        cached_tokens=20,
        cache_write_tokens=30,
        cache_write_1h_tokens=5,
        input_audio_tokens=3,
        output_audio_tokens=2,
        web_searches=1,
        service_tier="priority",
    )
    second = TokenUsage(
        input_tokens=200,
        output_tokens=20,
        cached_tokens=40,
        cache_write_tokens=50,
        cost=0.25,
        cache_write_1h_tokens=7,
        input_audio_tokens=4,
        output_audio_tokens=6,
        web_searches=2,
    )
    both = first.plus(second)
    print(f"two turns together: {both}")
    assert both == TokenUsage(
        input_tokens=500,
        output_tokens=30,
        cached_tokens=60,
        cache_write_tokens=80,
        cost=0.25,
        cache_write_1h_tokens=12,
        input_audio_tokens=7,
        output_audio_tokens=8,
        web_searches=3,
        tier_input_tokens=300,
        service_tier="priority",
        uncosted=first,
    )
    assert second.plus(first).tier_input_tokens == 300  # the larger turn's, either way round
    assert second.plus(first).uncosted == first


def test_a_usage_of_completion_tokens_alone_or_input_audio_alone_is_read() -> None:
    assert usage_from_mapping({"completion_tokens": 5}) == TokenUsage(0, 5)
    heard = usage_from_mapping(
        {
            "prompt_tokens": 100,
            "completion_tokens": 5,
            "prompt_tokens_details": {"audio_tokens": 40},
        }
    )
    assert heard is not None
    assert (heard.input_audio_tokens, heard.output_audio_tokens) == (40, 0)


@pytest.mark.parametrize(
    ("told", "kept"), [("p", "p"), ("x" * 32, "x" * 32), ("x" * 33, None), ("", None)]
)
def test_the_service_tier_of_an_answer_is_a_name_of_1_to_32_characters(
    told: str, kept: str | None
) -> None:
    document = {"usage": {"prompt_tokens": 3, "completion_tokens": 1}, "service_tier": told}
    assert usage_from_json(json.dumps(document).encode()) == TokenUsage(3, 1, service_tier=kept)


@pytest.mark.parametrize(
    ("total", "output"),
    [(18_000, 8_000), (13_000, 3_000), (12_000, 2_000), (9_000, 2_000), (None, 2_000)],
    ids=["all apart", "total says less", "within output", "total below its parts", "no total"],
)
@pytest.mark.parametrize("shape", ["chat", "responses"])
def test_reasoning_counted_apart_is_output_up_to_what_the_total_says(
    shape: str, total: int | None, output: int
) -> None:
    """10,000 in, 2,000 out and 6,000 reasoning tokens: reasoning is output when the total
    counts it apart from the output (xAI's chat, a gateway's Responses rendering of Gemini's
    thoughts), as much of it as the total says is left out; within the output (OpenAI's), a
    total that counts less than its parts, or none, adds nothing."""
    if shape == "chat":
        details = {"reasoning_tokens": 6_000}
        usage: dict[str, Any] = {"prompt_tokens": 10_000, "completion_tokens": 2_000,
                                 "completion_tokens_details": details}  # fmt: skip
    else:
        usage = {"input_tokens": 10_000, "output_tokens": 2_000,
                 "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens_details": {"reasoning_tokens": 6_000}}  # fmt: skip
    if total is not None:
        usage["total_tokens"] = total
    found = usage_from_mapping(usage)
    assert found is not None and (found.input_tokens, found.output_tokens) == (10_000, output)


@pytest.mark.parametrize(
    ("usage", "cost"),
    [
        ({"cost_in_usd_ticks": 610_000_000}, 0.061),
        ({"prompt_tokens": 1, "completion_tokens": 1, "cost_in_usd_ticks": 10**13}, 1000.0),
        ({"cost": 0.5, "cost_in_usd_ticks": 10**13}, 0.5),
        ({"cost": {"total_cost": 0.008256, "currency": "USD"}}, 0.008256),
        ({"cost": {"total_cost": 0.008256, "currency": "EUR"}}, None),
        ({"cost": 0.00095, "is_byok": True,
          "cost_details": {"upstream_inference_cost": 0.019}}, 0.01995),
        ({"cost": 0, "is_byok": True, "cost_details": {"upstream_inference_cost": 0.019}}, 0.019),
        ({"cost": 0.019, "is_byok": False,
          "cost_details": {"upstream_inference_cost": 0.019}}, 0.019),
    ],
    ids=["ticks", "ticks, $1000", "cost first", "object", "not USD", "byok", "byok, fee 0", "own"],
)  # fmt: skip
def test_what_a_usage_says_was_paid_is_its_cost(usage: dict[str, Any], cost: float | None) -> None:
    """xAI's ticks (1e-10 USD), Perplexity's object, OpenRouter's fee with the provider's bill
    on the caller's own key: each is the USD the usage says was paid (another currency's is
    none, and a usage of nothing else is no usage)."""
    found = usage_from_mapping(usage)
    assert (None if found is None else found.cost) == cost


@pytest.mark.parametrize(
    ("apart", "counts"),
    [
        # Sonar Deep Research's whole object
        (
            {"citation_tokens": 50, "num_search_queries": 3, "reasoning_tokens": 20},
            (170, 20, 50, 3),
        ),
        ({"citation_tokens": 50}, (150, 0, 50, 0)),  # citations alone
        ({"num_search_queries": 3, "reasoning_tokens": 20}, (120, 20, 0, 3)),  # no citations
        # a top-level reasoning count without either of Perplexity's: within the completion
        # count, as sent, none priced apart
        ({"reasoning_tokens": 20}, (100, 0, 0, 0)),
    ],
    ids=["all", "citations", "searches", "not perplexity"],
)
def test_perplexity_s_counts_apart_are_read_by_either_of_its_keys(
    apart: dict[str, int], counts: tuple[int, int, int, int]
) -> None:
    """Perplexity's `citation_tokens` or `num_search_queries` (either one) marks its usage: its
    reasoning and citation tokens, which its completion count leaves out, are added to the
    output and kept apart, and its search queries are web searches. (output, reasoning,
    citations, searches)."""
    usage = {"prompt_tokens": 1_000, "completion_tokens": 100, "total_tokens": 1_100} | apart
    found = usage_from_mapping(usage)
    assert found is not None
    read = (found.output_tokens, found.reasoning_tokens, found.citation_tokens, found.web_searches)
    print(f"{apart}: (output, reasoning, citations, searches) {read}")
    assert read == counts
    assert found.input_tokens == 1_000


def test_two_usages_together_add_their_reasoning_and_citations() -> None:
    """`plus` (a tool loop's turns, a stream's messages) keeps Perplexity's counts apart: 30 + 10
    reasoning tokens and 20 + 5 citation tokens are 40 and 25."""
    first = TokenUsage(output_tokens=100, reasoning_tokens=30, citation_tokens=20)
    second = TokenUsage(output_tokens=50, reasoning_tokens=10, citation_tokens=5)
    both = first.plus(second)
    print(f"together: reasoning {both.reasoning_tokens}, citations {both.citation_tokens}")
    assert (both.output_tokens, both.reasoning_tokens, both.citation_tokens) == (150, 40, 25)


@pytest.mark.parametrize(
    ("details", "cached"),
    [(None, 800), ({"cached_tokens": 0}, 800), ({"cached_tokens": 300}, 300)],
    ids=["hits alone", "details of 0", "details say"],
)
def test_deepseek_s_cache_hits_are_cached_input(
    details: dict[str, int] | None, cached: int
) -> None:
    """DeepSeek counts its cache hits in `prompt_cache_hit_tokens` (within `prompt_tokens`),
    beside or instead of `prompt_tokens_details`: cached input, unless the details count some."""
    usage: dict[str, Any] = {"prompt_tokens": 1_000, "completion_tokens": 100}
    usage |= {"prompt_cache_hit_tokens": 800, "prompt_cache_miss_tokens": 200}
    if details is not None:
        usage["prompt_tokens_details"] = details
    found = usage_from_mapping(usage)
    assert found is not None and (found.input_tokens, found.cached_tokens) == (1_000, cached)


def test_an_answer_s_decoder_has_no_bound_on_its_decoded_size() -> None:
    """An answer is read as it goes by (kept no more than its tail): no bound by default."""
    raw = b"0" * (65 << 20)
    decoder = BodyDecoder("gzip")
    assert len(decode_in_pieces(decoder, gzip.compress(raw, 1), 1 << 16)) == len(raw)
    assert decoder.error is None


def test_an_answer_s_opaque_tokens_are_no_generated_text() -> None:
    """An answer without usage (a gateway's) is estimated from its text; a thinking block's
    `signature` and a reasoning item's `encrypted_content` are opaque (base64, hundreds of
    characters) and were counted as text, as a stream's estimate never counts them: the
    Anthropic answer below read as 1,004 characters → 4 (the thinking "hm", the "ok"),
    and the Responses one likewise."""
    opaque = "A" * 1000
    anthropic = {"content": [{"type": "thinking", "thinking": "hm", "signature": opaque},
                             {"type": "text", "text": "ok"}]}  # fmt: skip
    responses = {"output": [{"type": "reasoning", "summary": [], "encrypted_content": opaque},
                            {"type": "message", "content": [{"type": "output_text",
                                                             "text": "okay"}]}]}  # fmt: skip
    counted = [answered_chars(json.dumps(a).encode()) for a in (anthropic, responses)]
    print(f"characters counted: {counted}")
    assert counted == [4, 4]


def test_a_spoken_answer_s_transcripts_are_told_apart_from_its_other_text() -> None:
    """`spoken_chars`: of what `answered_chars` counts, the transcripts a spoken answer says
    (priced as speech), not a tool call's arguments nor other text (priced as text)."""
    said = "Hello there, the budget is fine. "  # 33 characters
    audio = {"id": "a", "data": "QUFB" * 100, "transcript": said}
    call = {"type": "function", "function": {"name": "f", "arguments": '{"q": "abc"}'}}
    message = {"role": "assistant", "content": "and text", "audio": audio, "tool_calls": [call]}
    answer = {"choices": [{"message": message}, {"message": {"audio": audio}}]}
    body = json.dumps(answer).encode()
    counted = (spoken_chars(body), answered_chars(body))
    print(f"spoken, all: {counted}")
    assert counted == (66, 66 + len("and text") + len('{"q": "abc"}'))
    odd = [{"choices": [{"message": {"audio": {"transcript": 5}}}]}, {"audio": audio}, [audio]]
    assert [spoken_chars(json.dumps(o).encode()) for o in odd] == [0, 0, 0]
    assert spoken_chars(b'{"choices": [') == 0 and spoken_chars(b"speech") == 0
    nested: Any = {"audio": audio}
    for _ in range(31):
        nested = [nested]
    assert spoken_chars(json.dumps({"output": nested}).encode()) == 33  # 32 deep: read
    assert spoken_chars(json.dumps({"output": [nested]}).encode()) == 0  # 33: not
    within: Any = {"audio": audio}
    for _ in range(31):
        within = {"message": within}
    assert spoken_chars(json.dumps({"output": within}).encode()) == 33  # in objects too
    assert spoken_chars(json.dumps({"output": {"more": within}}).encode()) == 0


@pytest.mark.parametrize(
    ("head", "counts"),
    [
        (b'{"usage": {"prompt_tokens": 5, "completion_tokens": 7}, "choices": [{"t": "x', (5, 7)),
        (b'{"id": "a", "usage" : {"input_tokens": 3, "output_tokens": 4}, "content": [', (3, 4)),
        # a key in a string, a nested `usage`, a value "usage": none of them the top-level key
        (
            b'{"a": "\\"usage\\": {}", "usage": {"prompt_tokens": 2, "completion_tokens": 1}, "b',
            (2, 1),
        ),
        (b'{"choices": [{"usage": {"prompt_tokens": 5}}], "id": "usage", "x', None),
        (b'{"usage": {"prompt_tokens": 5, "completion_tok', None),  # cut within it
        (b'[{"usage": {"prompt_tokens": 5, "completion_tokens": 1}}, ', None),  # not an object
        # a head cut in a string of escaped quotes: read in one pass (it took 20 s, each
        # quote a new try to the end)
        ((b'{"choices": [{"content": "' + b'\\"' * 40_000)[:65_536], None),
    ],
    ids=[
        "first",
        "after-a-field",
        "past-a-string",
        "nested-only",
        "cut",
        "in-a-list",
        "cut-in-escaped-quotes",
    ],
)
def test_a_huge_answer_s_usage_is_read_from_its_head_only_at_the_top_level(
    head: bytes, counts: tuple[int, int] | None
) -> None:
    """`usage_from_head`: the top-level `usage` object of a JSON answer's first bytes, when they
    hold it whole; never a nested one, a key inside a string, or a value."""
    usage = usage_from_head(head)
    got = None if usage is None else (usage.input_tokens, usage.output_tokens)
    print(head[:40], "->", got)
    assert got == counts


@pytest.mark.parametrize(
    ("usage", "output"),
    [
        ({"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 1_105}, 1_096),
        # a reasoning detail counts what is left out, up to the total
        (
            {
                "prompt_tokens": 9,
                "completion_tokens": 3,
                "total_tokens": 1_105,
                "completion_tokens_details": {"reasoning_tokens": 100},
            },
            103,
        ),
        # beside Anthropic's cache fields, the surplus is the cache a gateway's total counts
        (
            {
                "prompt_tokens": 80,
                "completion_tokens": 173,
                "total_tokens": 550,
                "cache_read_input_tokens": 297,
            },
            173,
        ),
        ({"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}, 3),
    ],
    ids=["in-the-total-alone", "detail", "gateway-cache", "none-left-out"],
)
def test_what_a_chat_total_counts_beyond_prompt_and_completion(
    usage: dict[str, Any], output: int
) -> None:
    """Output counted apart from `completion_tokens` (SPEC §7): the total's surplus."""
    found = usage_from_mapping(usage)
    assert found is not None
    print(usage, "->", found.output_tokens)
    assert found.output_tokens == output


@pytest.mark.parametrize("output", [0, 12])
def test_a_gateway_s_cache_reads_outside_its_prompt_count_with_or_without_output(
    output: int,
) -> None:
    """A gateway's chat usage whose `total_tokens` counts Anthropic cache reads beyond its
    `prompt_tokens` (`_gateway_prompt`): the reads are input whether or not the answer had any
    output (an answer cut before its first token reports 0). The rule was tried only when
    prompt or output was there; a mutant asking for both passed every test."""
    found = usage_from_mapping(
        {
            "prompt_tokens": 80,
            "completion_tokens": output,
            "total_tokens": 80 + output + 297,
            "cache_read_input_tokens": 297,
        }
    )
    print(output, found)
    assert found is not None
    assert (found.input_tokens, found.cached_tokens, found.output_tokens) == (377, 297, output)


def test_a_tool_loop_s_usages_keep_each_turn_and_add_their_file_searches() -> None:
    """`plus` keeps each request's usage (`turns`, each priced at its own tier) in order, however
    they are added, and adds the file searches (2 + 3 + 0); one request's usage has no turns."""
    a, b, c = (
        TokenUsage(10, 1, file_searches=2),
        TokenUsage(20, 2, file_searches=3),
        TokenUsage(30, 3),
    )
    loop = a.plus(b).plus(c)
    print("3 turns:", [t.input_tokens for t in loop.turns], "file searches:", loop.file_searches)
    assert a.turns == () and loop.file_searches == 5
    assert [t.input_tokens for t in loop.turns] == [10, 20, 30]
    assert [t.input_tokens for t in a.plus(b.plus(c)).turns] == [10, 20, 30]
    assert "turns" not in repr(loop) and loop == TokenUsage(
        60, 6, tier_input_tokens=30, file_searches=5
    )


def test_the_searches_of_a_responses_answer_are_counted_from_its_output_items() -> None:
    """OpenAI's Responses API counts no searches in its usage: `count_searches` counts the
    `web_search_call` items that search (or name no action), not those that open or find in a
    page, and each `file_search_call` item once; other items, and an output not a list, count
    nothing. `json_searches` does so for a whole JSON body, keeping the counts of a body with
    no search call, or not JSON, or not an object."""
    output = [
        {"type": "web_search_call", "action": {"type": "search", "query": "a"}},
        {"type": "web_search_call", "action": {"query": "b"}},  # no type: a search
        {"type": "web_search_call"},  # web_search_preview's: no action
        {"type": "web_search_call", "action": "search"},  # an action not an object
        {"type": "web_search_call", "action": {"type": "open_page"}},
        {"type": "web_search_call", "action": {"type": "find_in_page"}},
        {"type": "file_search_call", "queries": ["x", "y"]},
        {"type": "file_search_call"},
        {"type": "message", "content": []},
        "file_search_call",
        ["web_search_call"],
    ]
    usage = TokenUsage(1, 1, web_searches=9, file_searches=9)
    count_searches(usage, output)
    print("web searches:", usage.web_searches, "file searches:", usage.file_searches)
    assert (usage.web_searches, usage.file_searches) == (4, 2)
    kept = TokenUsage(1, 1, web_searches=7, file_searches=7)
    count_searches(kept, {"0": {"type": "file_search_call"}})  # not a list
    assert (kept.web_searches, kept.file_searches) == (7, 7)
    body = json.dumps({"output": output, "usage": {"input_tokens": 1}}).encode()
    usage = TokenUsage(1, 1)
    json_searches(usage, body)
    assert (usage.web_searches, usage.file_searches) == (4, 2)
    for other in (
        json.dumps({"output": [{"type": "message"}]}).encode(),  # no search call
        body[:-1],  # cut: not JSON
        json.dumps([{"output": output}]).encode(),  # not an object
    ):
        kept = TokenUsage(1, 1, web_searches=7, file_searches=7)
        json_searches(kept, other)
        assert (kept.web_searches, kept.file_searches) == (7, 7)
    empty = TokenUsage(1, 1, web_searches=7, file_searches=7)
    named = json.dumps({"output": [], "file_search_call": 1}).encode()  # the name, no call
    json_searches(empty, named)
    assert (empty.web_searches, empty.file_searches) == (0, 0)


def test_an_image_call_s_tokens_are_told_by_its_quality_and_size() -> None:
    """`image_call_tokens`: gpt-image-1's image output tokens by quality and size; a size not
    listed counts as its quality's most, a quality not listed (or not said, or not a string)
    as the high quality's; `count_searches` counts them once in the output and its image
    output however often it is called."""
    told = [
        usage_module.image_call_tokens(item)
        for item in (
            {"quality": "low", "size": "1024x1024"},
            {"quality": "medium", "size": "1536x1024"},
            {"quality": "high", "size": "1024x1536"},
            {"quality": "medium", "size": "auto"},
            {"quality": ["high"], "size": {"w": 1}},
            {},
        )
    ]
    print("image tokens:", told)
    assert told == [272, 1_568, 6_240, 1_584, 6_240, 6_240]
    usage = TokenUsage(10, 20)
    output = [{"type": "image_generation_call", "quality": "low", "size": "1024x1024"}]
    count_searches(usage, output)
    count_searches(usage, output)
    assert (usage.output_tokens, usage.output_image_tokens, usage.tool_image_tokens) == (
        292,
        272,
        272,
    )


@pytest.mark.parametrize("cut", [1, 7, 100, 4096])
def test_an_answer_s_images_left_out_chunk_by_chunk_leave_the_same_document(cut: int) -> None:
    """`without_results` run on a body as it grows (a huge answer's, `Exchange._keep_the_tail`)
    leaves out each `"result"` string's content, an unclosed one's to its end, and keeps the
    rest: the document read in the end is the answer's, its results empty. A `"result"` key
    quoted in a text, and the escapes in a result (`\\/`, `\\"`), are no end of it."""
    answer = {
        "output": [
            {"type": "image_generation_call", "result": "ab\\/cd" * 50 + '"q"', "size": "x"},
            {"type": "message", "content": [{"text": 'say "result": "no" \\'}]},
            {"type": "image_generation_call", "result": "Z" * 300, "quality": "low"},
        ],
        "usage": {"input_tokens": 3, "output_tokens": 4},
    }
    body = json.dumps(answer).encode()
    kept = b""
    for start in range(0, len(body), cut):
        kept = usage_module.without_results(kept + body[start : start + cut])
    document = json.loads(kept)
    print(len(body), "bytes kept as", len(kept))
    for item in answer["output"]:
        if "result" in item:
            item["result"] = ""
    assert document == answer
