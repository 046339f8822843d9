"""Decoding Server-Sent Events and metering streamed responses (SPEC §7)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budget_middleware.core.sse import SSEDecoder, SSEEvent, StreamMeter
from budget_middleware.core.usage import TokenUsage

# --- realistic streams, one block (lines of an event) per entry --------------------------------

CHAT_ID = '"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk"'
CHAT_HEAD = CHAT_ID + ',"created":1741570283,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp"'


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def chat_chunk(delta: dict[str, Any], finish: str | None = None, usage: str = "null") -> str:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return f'data: {{{CHAT_HEAD},"choices":[{dumps(choice)}],"usage":{usage}}}'


CHAT_USAGE = (
    '{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,'
    '"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},'
    '"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0}}'
)
CHAT_USAGE_CHUNK = f'data: {{{CHAT_HEAD},"choices":[],"usage":{CHAT_USAGE}}}'


def openai_chat(texts: list[str]) -> list[list[str]]:
    blocks = [[chat_chunk({"role": "assistant", "content": "", "refusal": None})]]
    blocks += [[chat_chunk({"content": text})] for text in texts]
    blocks.append([chat_chunk({}, finish="stop")])
    return [*blocks, [CHAT_USAGE_CHUNK], ["data: [DONE]"]]


RESPONSE_BASE = {
    "id": "resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654",
    "object": "response",
    "created_at": 1741290958,
    "status": "in_progress",
    "model": "gpt-4.1-2025-04-14",
    "output": [],
    "usage": None,
    "metadata": {},
}
RESPONSE_USAGE = {
    "input_tokens": 37,
    "input_tokens_details": {"cached_tokens": 5},
    "output_tokens": 11,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 48,
}


def typed(name: str, payload: dict[str, Any], with_name: bool = True) -> list[str]:
    data = f"data: {dumps({'type': name, **payload})}"
    return [f"event: {name}", data] if with_name else [data]


def responses(texts: list[str], end: str = "response.completed") -> list[list[str]]:
    done = {**RESPONSE_BASE, "status": "completed", "usage": RESPONSE_USAGE}
    item = {"item_id": "msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654", "output_index": 0}
    return [
        typed("response.created", {"sequence_number": 0, "response": RESPONSE_BASE}),
        typed("response.in_progress", {"sequence_number": 1, "response": RESPONSE_BASE}),
        *(
            typed("response.output_text.delta", {**item, "content_index": 0, "delta": text})
            for text in texts
        ),
        typed("response.output_text.done", {**item, "text": "".join(texts)}),
        typed(end, {"sequence_number": 9, "response": done}),
    ]


ANTHROPIC_START_USAGE = {
    "input_tokens": 472,
    "cache_creation_input_tokens": 20,
    "cache_read_input_tokens": 300,
    "output_tokens": 2,
    "service_tier": "standard",
}


def anthropic(texts: list[str], with_names: bool = True, deltas: int = 1) -> list[list[str]]:
    message: dict[str, Any] = {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-20250514",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": ANTHROPIC_START_USAGE,
    }
    blocks = [
        typed("message_start", {"message": message}, with_names),
        typed(
            "content_block_start",
            {"index": 0, "content_block": {"type": "text", "text": ""}},
            with_names,
        ),
        ["event: ping", 'data: {"type": "ping"}'],
    ]
    for text in texts:
        delta = {"index": 0, "delta": {"type": "text_delta", "text": text}}
        blocks.append(typed("content_block_delta", delta, with_names))
    blocks.append(typed("content_block_stop", {"index": 0}, with_names))
    for n in range(1, deltas + 1):  # cumulative counts: 5, 10, 15, ...
        stop = {"stop_reason": "end_turn" if n == deltas else None, "stop_sequence": None}
        blocks.append(
            typed("message_delta", {"delta": stop, "usage": {"output_tokens": 5 * n}}, with_names)
        )
    return [*blocks, typed("message_stop", {}, with_names)]


def render(blocks: list[list[str]], eol: str = "\n") -> bytes:
    return "".join(eol.join(block) + eol + eol for block in blocks).encode()


def decode_all(stream: bytes, cuts: list[int] | None = None) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for piece in pieces(stream, cuts or []):
        events += decoder.feed(piece)
    return events + decoder.flush()


def pieces(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(points) if a < b]


@dataclass
class Metered:
    meter: StreamMeter
    output: bytes
    returned: list[bytes] = field(default_factory=list)


def meter_all(stream: bytes, drop: bool, cuts: list[int] | None = None) -> Metered:
    meter = StreamMeter(drop_usage_chunk=drop)
    returned = [meter.feed(piece) for piece in pieces(stream, cuts or [])]
    returned.append(meter.finish())
    return Metered(meter, b"".join(returned), returned)


def fields(events: list[SSEEvent]) -> list[tuple[str | None, str, str | None, bool]]:
    return [(e.event, e.data, e.id, e.complete) for e in events]


def dispatched(events: list[SSEEvent]) -> list[tuple[str | None, str, str | None, bool]]:
    # a cut between CR and LF can leave the LF alone for flush: bytes, not an event
    return [(e.event, e.data, e.id, e.complete) for e in events if e.complete]


# --- the decoder ---------------------------------------------------------------------------------


@pytest.mark.parametrize("eol", ["\n", "\r", "\r\n"])
def test_lf_cr_and_crlf_all_end_lines(eol: str) -> None:
    stream = render([["event: a", "data: 1"], ["data: 2"]], eol)
    events = decode_all(stream)
    assert fields(events) == [("a", "1", None, True), (None, "2", None, True)]
    assert b"".join(e.raw for e in events) == stream


def test_empty_chunk_changes_nothing() -> None:
    decoder, meter, empty = SSEDecoder(), StreamMeter(drop_usage_chunk=False), b""
    assert decoder.feed(empty) == [] and decoder.pending == 0
    assert meter.feed(empty) is empty


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: 1\r") == []
    assert decoder.feed(b"\ndata: 2\r") == []
    (event,) = decoder.feed(b"\n\r\n")
    assert (event.data, event.raw) == ("1\n2", b"data: 1\r\ndata: 2\r\n\r\n")


def test_blank_line_ending_in_cr_dispatches_without_waiting_for_the_next_chunk() -> None:
    decoder = SSEDecoder()
    (event,) = decoder.feed(b"data: 1\r\n\r")
    assert event.data == "1"
    (event,) = decoder.feed(b"\ndata: 2\r\n\r\n")  # the LF ends the CR above, not a line
    assert event.data == "2" and event.head == 1


def test_comment_lines_are_ignored_but_kept_in_raw() -> None:
    stream = b": ping\n\n: keep-alive\ndata: hi\n: trailing\n\n"
    (event,) = decode_all(stream)
    assert event.data == "hi"
    assert event.raw == stream
    assert event.head == len(b": ping\n\n")


def test_multi_line_data_joins_with_newline_and_keeps_empty_lines() -> None:
    (event,) = decode_all(b"data: a\ndata:\ndata:  b\n\n")
    assert event.data == "a\n\n b"  # only one space after the colon is removed


def test_event_id_and_field_without_colon() -> None:
    stream = b"event: update\nid: 7\ndata\n\ndata: x\n\nid: bad\x00id\ndata: y\n\n"
    events = decode_all(stream)
    assert fields(events) == [
        ("update", "", "7", True),
        (None, "x", "7", True),
        (None, "y", "7", True),
    ]


def test_block_without_data_is_not_an_event() -> None:
    assert fields(decode_all(b"event: x\n\nid: 1\n\n\n\n: c\n\n")) == [
        (None, "", "1", False)  # only flush's leftover bytes, marked incomplete
    ]


def test_utf8_character_split_across_chunks_is_decoded_whole() -> None:
    stream = "data: héllo 🌍\n\n".encode()
    split = stream.index(b"\xf0") + 2
    assert decode_all(stream, [split])[0].data == "héllo 🌍"


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert decode_all(b"data: \xff\xfe\n\n")[0].data == "\ufffd\ufffd"


def test_byte_order_mark_at_stream_start_is_skipped() -> None:
    (event,) = decode_all(b"\xef\xbb\xbfdata: x\n\n", [1])
    assert event.data == "x" and event.raw.startswith(b"\xef\xbb\xbf")


def test_event_cut_off_by_end_of_stream_is_not_dispatched() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: 1\n\nevent: e\ndata: 2\n") != []
    (rest,) = decoder.flush()
    assert (rest.event, rest.data, rest.raw, rest.complete) == (
        "e",
        "2",
        b"event: e\ndata: 2\n",
        False,
    )
    assert decoder.flush() == []


def test_release_hands_back_comment_only_blocks_at_once() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b": ping\n\n: ping\r\n\r\ndata: par") == []
    assert decoder.release() == b": ping\n\n: ping\r\n\r\n"
    assert decoder.release() == b""
    (event,) = decoder.feed(b"tial\n\n")
    assert (event.raw, event.head) == (b"data: partial\n\n", 0)
    assert decoder.pending == 0


# --- the meter: OpenAI ---------------------------------------------------------------------------


def test_openai_usage_chunk_gives_usage_and_done_completes() -> None:
    run = meter_all(render(openai_chat(["Hel", "lo"])), drop=False)
    assert run.meter.usage == TokenUsage(19, 10, 3, 0)
    assert run.meter.completed
    assert run.meter.text_chars == 5
    assert run.meter.model == "gpt-4o-2024-08-06"


def test_without_dropping_every_chunk_is_returned_as_the_same_object() -> None:
    meter = StreamMeter(drop_usage_chunk=False)
    for block in openai_chat(["a", "b"]):
        chunk = render([block])
        assert meter.feed(chunk) is chunk
    assert meter.finish() == b""


def test_dropping_removes_exactly_the_usage_only_chunk() -> None:
    blocks = openai_chat(["Hi", " there"])
    run = meter_all(render(blocks), drop=True)
    assert run.output == render([b for b in blocks if b != [CHAT_USAGE_CHUNK]])
    assert run.meter.usage == TokenUsage(19, 10, 3, 0)


def test_dropping_never_delays_a_complete_event() -> None:
    meter = StreamMeter(drop_usage_chunk=True)
    first = render([[chat_chunk({"content": "a"})]])
    assert meter.feed(first + b'data: {"id"') == first  # only the unfinished tail is held
    assert meter.feed(b':"x"}\n') == b""
    assert meter.feed(b"\n: ping\n\ndata") == b'data: {"id":"x"}\n\n: ping\n\n'
    assert meter.finish() == b"data"


def test_dropping_forwards_comment_pings_at_once() -> None:
    meter = StreamMeter(drop_usage_chunk=True)
    assert meter.feed(b": ping\n\n: ping\n\ndata: {") == b": ping\n\n: ping\n\n"


def test_dropped_usage_chunk_ending_in_cr_takes_its_lf_from_the_next_chunk() -> None:
    stream = render([[CHAT_USAGE_CHUNK], ["data: [DONE]"]], "\r\n")
    cut = stream.index(b"\r\n\r\n") + 3
    run = meter_all(stream, drop=True, cuts=[cut])
    assert run.output == b"data: [DONE]\r\n\r\n"


def test_usage_in_a_chunk_with_choices_is_read_but_never_dropped() -> None:
    stream = render([[chat_chunk({"content": "x"}, usage=CHAT_USAGE)]])
    run = meter_all(stream, drop=True)
    assert run.output == stream
    assert run.meter.usage == TokenUsage(19, 10, 3, 0)


def test_null_usage_chunks_leave_usage_unknown_and_a_cut_stream_incomplete() -> None:
    run = meter_all(render(openai_chat(["abc", "de"])[:-2]), drop=False)
    assert run.meter.usage is None
    assert not run.meter.completed
    assert run.meter.text_chars == 5


def test_tool_call_arguments_refusals_and_legacy_completions_count_as_text() -> None:
    tool = {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}], "refusal": "no"}
    legacy = 'data: {"id":"cmpl-1","object":"text_completion","choices":[{"text":"four"}]}'
    run = meter_all(render([[chat_chunk(tool)], [legacy]]), drop=False)
    assert run.meter.text_chars == len('{"city":') + 2 + 4


def test_openrouter_cost_in_the_usage_chunk_is_kept() -> None:
    usage = '{"prompt_tokens":4,"completion_tokens":2,"cost":0.0012}'
    run = meter_all(render([[f'data: {{{CHAT_HEAD},"choices":[],"usage":{usage}}}']]), True)
    assert run.meter.usage == TokenUsage(4, 2, cost=0.0012)
    assert run.output == b""


# --- the meter: Responses API and Anthropic ------------------------------------------------------


def test_responses_api_usage_comes_from_response_completed() -> None:
    run = meter_all(render(responses(["Hi", "!"])), drop=True)
    assert run.meter.usage == TokenUsage(37, 11, 5, 0)
    assert run.meter.completed and run.meter.text_chars == 3
    assert run.meter.model == "gpt-4.1-2025-04-14"
    assert run.output == render(responses(["Hi", "!"]))


def test_responses_api_incomplete_response_still_has_usage() -> None:
    run = meter_all(render(responses(["a"], end="response.incomplete")), drop=False)
    assert run.meter.usage == TokenUsage(37, 11, 5, 0) and run.meter.completed


def test_anthropic_cache_tokens_are_added_to_input_tokens() -> None:
    run = meter_all(render(anthropic(["Hello", " world"])), drop=False)
    assert run.meter.usage == TokenUsage(472 + 20 + 300, 5, 300, 20)
    assert run.meter.completed and run.meter.text_chars == 11
    assert run.meter.model == "claude-sonnet-4-20250514"


def test_anthropic_output_tokens_are_cumulative_not_summed() -> None:
    run = meter_all(render(anthropic(["x"], deltas=3)), drop=False)
    assert run.meter.usage is not None and run.meter.usage.output_tokens == 15


def test_anthropic_message_delta_input_fields_replace_rather_than_add() -> None:
    blocks = anthropic(["x"])
    late = {
        "input_tokens": 472,
        "cache_creation_input_tokens": 20,
        "cache_read_input_tokens": 300,
        "output_tokens": 9,
        "server_tool_use": None,
    }
    blocks.insert(-1, typed("message_delta", {"delta": {}, "usage": late}))
    run = meter_all(render(blocks), drop=False)
    assert run.meter.usage == TokenUsage(792, 9, 300, 20)


def test_anthropic_stream_cut_after_message_start_has_input_but_is_not_completed() -> None:
    run = meter_all(render(anthropic(["abc"])[:4]), drop=False)
    assert run.meter.usage == TokenUsage(792, 2, 300, 20)
    assert not run.meter.completed and run.meter.text_chars == 3


def test_events_without_event_lines_are_read_by_their_type() -> None:
    run = meter_all(render(anthropic(["abc"], with_names=False)), drop=False)
    assert run.meter.usage == TokenUsage(792, 5, 300, 20) and run.meter.completed


def test_thinking_and_tool_input_deltas_count_as_text() -> None:
    blocks = [
        typed("content_block_delta", {"delta": {"type": "thinking_delta", "thinking": "hm"}}),
        typed(
            "content_block_delta", {"delta": {"type": "input_json_delta", "partial_json": '{"a"'}}
        ),
    ]
    assert meter_all(render(blocks), drop=False).meter.text_chars == 6


# --- the meter: bad input ------------------------------------------------------------------------


def test_malformed_events_are_forwarded_and_ignored() -> None:
    blocks = [
        ["data: {not json"],
        ["data: [1,2]"],
        ["event: message_delta", "data: null"],
        ["event: response.completed", 'data: {"response": {"usage": "x"}}'],
        ["event: custom", f'data: {{{CHAT_HEAD},"choices":"x","usage":{CHAT_USAGE}}}'],
    ]
    run = meter_all(render(blocks), drop=True)
    assert run.output == render(blocks)
    assert run.meter.usage == TokenUsage(19, 10, 3, 0)  # the unknown event name was still read
    assert run.meter.completed  # response.completed arrived, even with unreadable usage


def test_usage_in_an_event_cut_off_by_the_end_of_stream_is_read_only_when_whole() -> None:
    """No blank line after the last event (an app joining its events with blank lines): the
    upstream sent that usage and billed it; read, and the usage chunk we caused dropped. A line
    cut short is no JSON: not read, passed on as it came."""
    whole = render([[": ping"], [CHAT_USAGE_CHUNK]])[:-1]
    for drop in (False, True):
        run = meter_all(whole, drop=drop)
        assert run.meter.usage == TokenUsage(19, 10, 3, 0) and run.meter.completed
        assert run.output == (b": ping\n\n" if drop else whole)
    cut = render([[CHAT_USAGE_CHUNK]])[:-3]
    run = meter_all(cut, drop=True)
    assert run.meter.usage is None and run.output == cut
    named = render(anthropic(["Hi"]))[:-1]  # `message_stop` not ended
    assert meter_all(named, drop=False).meter.completed


def test_a_stream_that_is_no_sse_is_passed_on_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("budget_middleware.core.sse._MAX_PENDING", 100)
    for drop in (False, True):
        stream = b"x" * 150 + render([[CHAT_USAGE_CHUNK]])
        run = meter_all(stream, drop, cuts=[120])
        assert run.output == stream and run.meter.usage is None


@pytest.mark.parametrize("written", ["utf-8", "utf-16", "utf-32-be"])
@pytest.mark.parametrize("eol", ["\n", "\r", "\r\n"])
@pytest.mark.parametrize("drop", [False, True])
def test_a_stream_is_read_again_after_an_event_too_large_to_hold_however_cut(
    eol: str, drop: bool, written: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event over the limit (several lines, a comment among them) is skipped to its blank
    line, wherever the chunks cut it (a CRLF split included): what follows is read, the usage
    chunk we asked for dropped, every other byte passed on as it came. In UTF-16 or UTF-32
    too (passed on as it came, the usage chunk included): its blank line was looked for in its
    bytes, where a LF byte is never alone on a line, so nothing after the big event was read."""
    monkeypatch.setattr("budget_middleware.core.sse._MAX_PENDING", 400)  # over any other event
    # Its last line, read as an event of its own (the big one cut short), would be text.
    last = json.dumps({"choices": [{"index": 0, "delta": {"content": "z" * 250}}]})
    big = render([["data: " + "x" * 250, ": " + "y" * 250, "data: " + last]], eol)
    blocks = openai_chat(["Hel", "lo"])[1:]  # text in the event right after the big one
    stream = big + render(blocks, eol)
    kept = big + render([b for b in blocks if b != [CHAT_USAGE_CHUNK]] if drop else blocks, eol)
    if written != "utf-8":
        stream = kept = stream.decode().encode(written)
    for cut in range(1, len(stream), 1 if written == "utf-8" else 5):
        for cuts in ([cut], [cut, cut + 1]):
            run = meter_all(stream, drop, cuts)
            assert run.output == kept, cuts
            assert run.meter.usage == TokenUsage(19, 10, 3), cuts
            assert run.meter.completed and not run.meter.gap_unread(), cuts
            # every event after the skipped one read: none of them skipped with it
            assert run.meter.text_chars == len("Hello"), cuts


# --- fuzz: chunk boundaries change nothing -------------------------------------------------------

texts = st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=8), max_size=5)
comment = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=5)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], int | None, str]:
    """(rendered blocks, index of the OpenAI usage block or None, eol) with random comments."""
    kind = draw(st.sampled_from(["openai", "responses", "anthropic", "anthropic-untyped"]))
    parts = draw(texts)
    if kind == "openai":
        blocks = openai_chat(parts)
    elif kind == "responses":
        blocks = responses(parts)
    else:
        blocks = anthropic(parts, with_names=kind == "anthropic", deltas=draw(st.integers(1, 3)))
    eol = draw(st.sampled_from(["\n", "\r", "\r\n"]))
    rendered: list[bytes] = []
    usage_at = None
    for block in blocks:
        if draw(st.booleans()):
            rendered.append(render([[": ping"]], eol))
        lines = list(block)
        if draw(st.booleans()):
            lines.insert(draw(st.integers(0, len(lines))), ": " + draw(comment))
        if block == [CHAT_USAGE_CHUNK]:
            usage_at = len(rendered)
        rendered.append(render([lines], eol))
    return rendered, usage_at, eol


@settings(max_examples=300)
@given(streams(), st.lists(st.integers(0, 4000), max_size=12))
def test_cutting_a_stream_anywhere_changes_no_event_usage_or_output(
    generated: tuple[list[bytes], int | None, str], cuts: list[int]
) -> None:
    blocks, usage_at, _ = generated
    stream = b"".join(blocks)
    cuts = [c % (len(stream) + 1) for c in cuts]

    whole, split = decode_all(stream), decode_all(stream, cuts)
    assert dispatched(split) == dispatched(whole)
    assert b"".join(e.raw for e in split) == stream

    for drop in (False, True):
        a, b = meter_all(stream, drop), meter_all(stream, drop, cuts)
        assert (b.meter.usage, b.meter.completed, b.meter.text_chars, b.meter.model) == (
            a.meter.usage,
            a.meter.completed,
            a.meter.text_chars,
            a.meter.model,
        )
        assert a.meter.usage is not None and a.meter.completed
        assert b.output == a.output
        if not drop:
            assert b.returned[:-1] == pieces(stream, cuts) and b.output == stream
        else:
            expected = [blk for i, blk in enumerate(blocks) if i != usage_at]
            assert b.output == b"".join(expected)


@settings(max_examples=200)
@given(
    streams(),
    st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]),
    st.lists(st.integers(0, 3) | st.integers(0, 8000), max_size=12),
)
def test_a_stream_in_utf_16_or_utf_32_reads_as_its_utf_8_does_and_goes_on_as_it_came(
    generated: tuple[list[bytes], int | None, str], written: str, cuts: list[int]
) -> None:
    """An event stream written in UTF-16 or UTF-32 (its first bytes say so: a byte-order mark,
    or NULs), cut anywhere (inside a character too, inside its first 4 bytes too: a first chunk
    of 1 to 3 bytes was read as UTF-8): its usage, end, text and model are those of the same
    stream in UTF-8 (none was read: its lines were split at the LF byte); it goes on as it
    came, the usage chunk asked for included."""
    blocks, _, _ = generated
    stream = b"".join(blocks)
    wide = stream.decode().encode(written)
    cuts = [c % (len(wide) + 1) for c in cuts]
    utf8 = meter_all(stream, False).meter
    for drop in (False, True):
        run = meter_all(wide, drop, cuts)
        assert (run.meter.usage, run.meter.completed, run.meter.text_chars, run.meter.model) == (
            utf8.usage,
            utf8.completed,
            utf8.text_chars,
            utf8.model,
        )
        assert run.output == wide


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["data: x", "data: é", "event: e", ": c", "id: 1", "", "data"]),
            st.sampled_from(["\n", "\r", "\r\n"]),
        ),
        max_size=20,
    ),
    st.lists(st.integers(0, 200), max_size=10),
)
def test_any_mix_of_line_ends_decodes_the_same_whole_or_cut(
    lines: list[tuple[str, str]], cuts: list[int]
) -> None:
    stream = "".join(text + eol for text, eol in lines).encode()
    cuts = [c % (len(stream) + 1) for c in cuts]
    whole, split = decode_all(stream), decode_all(stream, cuts)
    assert dispatched(split) == dispatched(whole)
    assert b"".join(e.raw for e in split) == b"".join(e.raw for e in whole) == stream
    dropped = meter_all(stream, drop=True, cuts=cuts)
    assert dropped.output == stream


@settings(max_examples=300)
@given(streams())
def test_one_event_a_chunk_reads_as_the_whole_stream_does(
    generated: tuple[list[bytes], int | None, str],
) -> None:
    """Most upstreams send one event a chunk; such chunks take a shortcut past the line scanner
    (`SSEDecoder.whole_data`). It must find exactly what the scanner finds."""
    blocks, usage_at, _ = generated
    stream = b"".join(blocks)
    at_blocks = [sum(len(b) for b in blocks[:i]) for i in range(1, len(blocks))]
    for drop in (False, True):
        whole, chunked = meter_all(stream, drop), meter_all(stream, drop, at_blocks)
        assert (chunked.meter.usage, chunked.meter.completed, chunked.meter.text_chars) == (
            whole.meter.usage, whole.meter.completed, whole.meter.text_chars
        )  # fmt: skip
        assert chunked.meter.model == whole.meter.model
        assert chunked.output == whole.output
        if drop:
            assert chunked.output == b"".join(b for i, b in enumerate(blocks) if i != usage_at)


def test_the_one_event_shortcut_takes_only_a_single_plain_data_event() -> None:
    decoder = SSEDecoder()
    assert decoder.whole_data(b'data: {"a": 1}\n\n') == '{"a": 1}'
    for chunk in (
        b'data: {"a": 1}\n\ndata: 2\n\n',  # two events
        b"data: 1\r\n\r\n",  # CR line ends: the scanner's
        b"event: x\ndata: 1\n\n",  # a named event
        b": ping\ndata: 1\n\n",  # a comment first
        b"data: 1\n",  # not ended
        b"data:1\n\n",  # no space: the scanner strips it
    ):
        assert SSEDecoder().whole_data(chunk) is None, chunk
    decoder.feed(b"data: par")  # something pending: the next chunk continues it
    assert decoder.whole_data(b'data: {"a": 1}\n\n') is None


# --- edges of the decoder and the meter ----------------------------------------------------------

BOM = b"\xef\xbb\xbf"
USAGE_ONLY = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'


def test_a_whole_event_chunk_must_end_with_its_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.whole_data(b"data: x\nY") is None
    assert decoder.whole_data(b"data: x\n\r") is None
    assert decoder.whole_data(b"data: x\n\n") == "x"


def test_a_bom_is_skipped_only_at_the_start_of_a_stream() -> None:
    decoder = SSEDecoder()
    assert decoder.whole_data(b"data: a\n\n") == "a"
    # not the first line any more: the BOM is part of the line, a field no one knows
    assert decoder.feed(BOM + b"data: b\n\n") == []
    # a new stream after `flush` may start with one again
    decoder.flush()
    assert [e.data for e in decoder.feed(BOM + b"data: c\n\n")] == ["c"]


def test_flush_reads_the_unterminated_last_line_of_the_cut_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: e\ndata: 1\ndata: 2") == []
    (cut,) = decoder.flush()
    assert (cut.event, cut.data, cut.complete) == ("e", "1\n2", False)
    assert cut.raw == b"event: e\ndata: 1\ndata: 2"
    decoder = SSEDecoder()
    decoder.feed(b"data: xyz")
    assert decoder.flush()[0].data == "xyz"
    decoder = SSEDecoder()
    decoder.feed(BOM + b"data: xyz")
    assert decoder.flush()[0].data == "xyz"
    decoder = SSEDecoder()
    decoder.feed(b"data: 1\n: a comment")
    assert decoder.flush()[0].data == "1"


def test_a_meter_forwards_a_stream_that_starts_with_a_blank_line_whole() -> None:
    meter = StreamMeter(drop_usage_chunk=True)
    assert meter.feed(b"\n") + meter.feed(b"data: x\n\n") + meter.finish() == b"\ndata: x\n\n"


def test_without_dropping_finish_forwards_nothing_more() -> None:
    meter = StreamMeter()
    assert meter.feed(b"data: cut") == b"data: cut"
    assert meter.finish() == b""
    dropping = StreamMeter(drop_usage_chunk=True)
    assert dropping.feed(b"data: cut") == b""
    assert dropping.finish() == b"data: cut"


@pytest.mark.parametrize("drop", [False, True])
def test_an_event_of_exactly_16_mib_is_still_read_past(drop: bool) -> None:
    """16 MiB held is the most: such an event is read whole; a byte more, and it is skipped
    unread (the stream read again after it)."""
    gave_up = []
    for size in (16 * 1024 * 1024, 16 * 1024 * 1024 + 1):
        meter = StreamMeter(drop_usage_chunk=drop)
        meter.feed(b"data: " + b"x" * (size - 6))
        meter.feed(b"\n\n" + USAGE_ONLY)
        assert meter.usage == TokenUsage(3, 4)
        gave_up.append(meter.gave_up)
    assert gave_up == [False, True]


def test_named_events_that_carry_no_usage_are_never_read_as_chunks() -> None:
    odd = b'"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    stream = b"event: response.output_item.added\ndata: {" + odd + b"event: ping\ndata: {" + odd
    meter = StreamMeter(drop_usage_chunk=True)
    assert meter.feed(stream) + meter.finish() == stream
    assert meter.usage is None


def test_odd_shapes_in_chunks_are_ignored_not_fatal() -> None:
    stream = b"".join(
        b"data: " + json.dumps(body).encode() + b"\n\n"
        for body in (
            {"model": 42, "choices": ["x", {"delta": {"content": "ab"}}]},
            {"model": "", "choices": [{"delta": {"tool_calls": [{"function": "f"}, "g"]}}]},
            {"type": "content_block_delta", "delta": "text"},
            {"type": "message_start", "message": "m"},
            {"type": "message_delta", "usage": 5},
            {"type": "response.completed", "response": "r"},
        )
    )
    meter = StreamMeter(drop_usage_chunk=True)
    assert meter.feed(stream) == stream
    assert (meter.text_chars, meter.model, meter.usage) == (2, None, None)
    assert meter.completed is True


def test_a_new_message_start_counts_its_fields_apart_and_the_stream_sums_them() -> None:
    """A stream of two messages (a tool loop's turns): each message's fields are its own (the
    first's cache read is not the second's), and the stream costs both."""

    def event(body: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    meter = StreamMeter()
    first = {"input_tokens": 10, "cache_read_input_tokens": 5}
    meter.feed(event({"type": "message_start", "message": {"model": "claude", "usage": first}}))
    assert meter.usage == TokenUsage(15, 0, 5, 0)
    meter.feed(event({"type": "message_start", "message": {"usage": {"input_tokens": 3}}}))
    # the largest turn's input picks a long-context tier (`tier_input_tokens`), not their sum
    assert meter.usage == TokenUsage(15 + 3, 0, 5, 0, tier_input_tokens=15)
    meter.feed(event({"type": "message_delta", "usage": {"output_tokens": 7}}))
    assert meter.usage == TokenUsage(18, 7, 5, 0, tier_input_tokens=15)
    assert meter.model == "claude"


def test_a_bom_after_the_first_line_of_a_stream_is_part_of_its_line() -> None:
    decoder = SSEDecoder()
    assert [e.data for e in decoder.feed(b"data: a\n\n" + BOM + b"data: b\n\n")] == ["a"]
    again = SSEDecoder()
    assert [e.data for e in again.feed(b"data: a\n\n")] == ["a"]
    assert again.flush() == []
    assert [e.data for e in again.feed(BOM + b"data: c\n\n")] == ["c"]  # a new stream


def test_only_tool_calls_lists_count_their_arguments() -> None:
    body = {"choices": [{"delta": {"content": "ab", "other": [{"function": {"arguments": "zz"}}]}}]}
    meter = StreamMeter()
    meter.feed(b"data: " + json.dumps(body).encode() + b"\n\n")
    assert meter.text_chars == 2


def test_anthropic_counts_a_message_delta_nulls_or_nests_are_merged_never_lowered() -> None:
    """A `message_delta` repeating the counts: a null keeps what `message_start` said (it is
    no count), a count in a nested object that grows is taken (the 1-hour cache writes
    `cache_creation` reports), one that is lower is not."""
    start = {
        "input_tokens": 10,
        "cache_read_input_tokens": 300,
        "cache_creation_input_tokens": 3000,
        "cache_creation": {"ephemeral_5m_input_tokens": 3000, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 1,
    }
    message = {"type": "message", "role": "assistant", "content": [], "usage": start}
    late = {
        "input_tokens": None,  # a gateway's null: no count, not 0
        "cache_read_input_tokens": None,
        "cache_creation_input_tokens": 3000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
        "output_tokens": 50,
    }
    blocks = [
        typed("message_start", {"message": message}),
        typed("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": late}),
        typed("message_stop", {}),
    ]
    usage = meter_all(render(blocks), drop=False).meter.usage
    print("merged:", usage)
    assert usage is not None
    assert (usage.input_tokens, usage.cached_tokens, usage.output_tokens) == (3310, 300, 50)
    assert usage.cache_write_1h_tokens == 2000  # grown in the nested object: taken


def test_a_stream_s_service_tier_is_read_with_its_usage() -> None:
    """The tier a stream says it was served at: an OpenAI chunk's `service_tier` (on every
    chunk, read with the usage), `response.completed`'s; none said, none read."""
    chat_usage = json.loads(CHAT_USAGE)
    served = {"id": "c", "choices": [], "usage": chat_usage, "service_tier": "priority"}
    said = meter_all(render([["data: " + json.dumps(served)], ["data: [DONE]"]]), drop=False)
    unsaid = meter_all(render(openai_chat(["hi"])), drop=False)
    blocks = responses(["hi"])
    done = {**RESPONSE_BASE, "status": "completed", "usage": RESPONSE_USAGE}
    blocks[-1] = typed("response.completed", {"response": {**done, "service_tier": "flex"}})
    completed = meter_all(render(blocks), drop=False)
    tiers = [run.meter.usage.service_tier if run.meter.usage else "?" for run in (said, unsaid)]
    tiers.append(completed.meter.usage.service_tier if completed.meter.usage else "?")
    print("tiers read:", tiers)
    assert tiers == ["priority", None, "flex"]
    plain = meter_all(render(responses(["hi"])), drop=False).meter.usage
    assert plain is not None and plain.service_tier is None


@pytest.mark.parametrize(
    ("stream", "failed"),
    [
        (b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error"}}\n\n', True),
        (b'data: {"error": {"message": "upstream overloaded"}}\n\n', True),
        (b'data: {"type": "error", "message": "upstream overloaded"}\n\n', True),
        (b'event: response.failed\ndata: {"type": "response.failed", "response": {}}\n\n', True),
        (b'event: ping\ndata: {"type": "ping"}\n\n', False),
        (b'data: {"error": null, "choices": [{"delta": {"content": "hi"}}]}\n\n', False),
        (b'data: {"type": "message", "error": null}\n\n', False),
        (b'event: response.completed\ndata: {"type": "response.completed"}\n\n', False),
    ],
    ids=[
        "anthropic-error",
        "gateway-error",
        "typed-error",
        "response-failed",
        "ping",
        "null-error",
        "no-error",
        "completed",
    ],
)
def test_a_stream_that_streamed_an_error_is_told_failed(stream: bytes, failed: bool) -> None:
    """`failed` is what settles a 200 answer that streamed an error and no output at $0 (the
    provider bills nothing): Anthropic's `event: error`, a gateway's `data: {"error": ...}`,
    one typed `error`, the Responses API's `response.failed`; never a ping, a null `error` or a
    stream that ended well (those are charged their usage or estimate)."""
    meter = StreamMeter(drop_usage_chunk=False)
    meter.feed(stream)
    print(f"{stream[:40]!r}: failed {meter.failed}")
    assert meter.failed is failed


def test_a_spoken_stream_s_transcript_is_counted_apart_from_its_other_text() -> None:
    """`speech_chars`: of `text_chars`, what a spoken stream's transcripts say (Chat
    Completions' `delta.audio.transcript`, the Responses API's transcript deltas): priced as
    speech when no usage comes, the rest (a tool call's arguments, text) as text."""
    said = "Hello there. "  # 13 characters
    chunks = [
        {"choices": [{"index": 0, "delta": {"audio": {"data": "QUFB" * 50, "transcript": said}}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "function": {"name": "f", "arguments": '{"q": 1}'}}
                        ]
                    },
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {"content": "text"}}]},
    ]
    chat = meter_all(render([["data: " + json.dumps(c)] for c in chunks]), drop=False)
    events = [("response.audio.transcript.delta", said), ("response.output_text.delta", "ok"),
              ("response.audio.transcript.delta", said)]  # fmt: skip
    responses = meter_all(render([[f"event: {k}", "data: " + json.dumps({"type": k, "delta": d})]
                                  for k, d in events]), drop=False)  # fmt: skip
    counted = [(m.meter.speech_chars, m.meter.text_chars) for m in (chat, responses)]
    print(f"(speech, all) characters: chat {counted[0]}, responses {counted[1]}")
    assert counted == [(13, 13 + 8 + 4), (26, 26 + 2)]
