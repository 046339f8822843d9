"""Server-Sent Events: an incremental decoder, and the meter that reads usage from a stream.

`SSEDecoder` follows the WHATWG event-stream rules and keeps the exact bytes of every event, so
`StreamMeter` can forward a stream byte for byte while it reads the usage (SPEC §7), and remove
the usage-only chunk that the middleware caused by asking for `stream_options.include_usage`.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any, Final

from budget_middleware.core.usage import (
    IMAGE_CALL,
    IMAGE_TOOL,
    JSON_ERRORS,
    PARTIAL_IMAGE_TOKENS,
    TokenUsage,
    count_searches,
    generated_chars,
    image_call_tokens,
    json_loads,
    quoted_count,
    text_size,
    tier_name,
    usage_from_mapping,
    wide_codec,
)

_LF: Final = 0x0A
_CR: Final = 0x0D
_COLON: Final = 0x3A
_BOM: Final = b"\xef\xbb\xbf"
_MAX_PENDING: Final = 16 * 1024 * 1024  # an "event" this large is not held: skipped unread
# Where the bytes of a skipped event have got to (`_gap_end`): at the start of a line, just
# after a CR (a LF next is part of that line end).
_AT_START: Final = 1
_AFTER_CR: Final = 2

# Responses API events whose `delta` is generated text (audio deltas are base64, not text: the
# speech is counted by its transcript): a tool call the model writes (the code interpreter's
# code, an MCP call's arguments, a shell command) as much as a function call's arguments; not a
# shell's output, which it did not write
_RESPONSES_TEXT: Final = frozenset(
    f"response.{kind}.delta"
    for kind in (
        "output_text",
        "refusal",
        "function_call_arguments",
        "custom_tool_call_input",
        "code_interpreter_call_code",
        "mcp_call_arguments",
        "shell_call_command",
        "reasoning_text",
        "reasoning_summary_text",
        "audio.transcript",
    )
)
_TRANSCRIPT: Final = "response.audio.transcript.delta"  # speech, by what it says
_ITEM_DONE: Final = "response.output_item.done"  # an output item whole: an image drawn
_SPEECH_DONE: Final = "speech.audio.done"  # the Audio API's speech streamed: its usage, its end
_PARTIAL_IMAGE: Final = "response.image_generation_call.partial_image"  # billed 100 tokens
# named events worth a JSON parse; others (ping, content_block_start, ...) carry no usage nor text
_READ: Final = _RESPONSES_TEXT | {
    "response.created",
    "response.completed",
    "response.incomplete",
    "response.failed",
    _ITEM_DONE,
    _PARTIAL_IMAGE,
    "message_start",
    "message_delta",
    "message_stop",
    "content_block_delta",
}
_SKIP: Final = frozenset({"ping", "content_block_start", "content_block_stop", "error"})
_DELTA_TEXT: Final = frozenset({"content", "refusal", "reasoning_content", "reasoning"})
# an Anthropic content block's generated text: text, tool input, thinking, a compaction's summary
_BLOCK_TEXT: Final = ("text", "partial_json", "thinking", "content")


@dataclass(slots=True)
class SSEEvent:
    """One event of a stream.

    `raw` is the exact bytes it was read from: any comment-only blocks since the previous event
    (the first `head` bytes), then its own lines, comments included, up to and including the
    blank line that ends it. `id` is the last event ID seen (it carries over, per the spec).
    `complete` is False only for what `SSEDecoder.flush` returns: bytes cut off by the end of the
    stream, which the spec says are not an event; they are returned so a filter can re-emit them.
    """

    event: str | None
    data: str
    raw: bytes
    id: str | None = None
    head: int = 0
    complete: bool = True


class SSEDecoder:
    """Incremental SSE decoder over bytes: lines end with CR, LF or CRLF, even split across
    chunks; each complete line is decoded as UTF-8 (invalid bytes become U+FFFD); `retry` and
    unknown fields are ignored; a block without `data` is no event.

    End of stream: like the WHATWG spec and openai-python's `_streaming.py`, an event not ended
    by a blank line is discarded, never dispatched; `flush` hands back its bytes, `complete=False`
    (`StreamMeter.finish` still reads its usage, when its data is whole).
    """

    __slots__ = ("_block", "_buf", "_data", "_event", "_last_id", "_line", "_skip_lf", "_started")

    def __init__(self) -> None:
        self._last_id: str | None = None
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()  # bytes not yet returned in an event or by `release`
        self._line = 0  # where the line being read starts in _buf
        self._block = 0  # where the current block starts in _buf; before it, comment-only blocks
        self._skip_lf = False  # the last chunk ended with CR: a LF next is part of it
        self._started = False  # a BOM is skipped on the first line only
        self._event: str | None = None
        self._data: list[str] = []

    @property
    def pending(self) -> int:
        """Bytes read but not yet handed back (the event in progress and comments before it)."""
        return len(self._buf)

    def whole_data(self, chunk: bytes) -> str | None:
        """The data of a chunk that is exactly one `data: ...` event, when nothing is pending:
        most upstreams send one event a chunk, and reading them costs no line scanning and no
        event object. None for anything else (then `feed` it)."""
        if (
            self._buf
            or self._skip_lf
            or not chunk.startswith(b"data: ")
            or chunk.find(b"\n") != len(chunk) - 2
            or chunk[-1] != _LF
            or _CR in chunk  # a byte as an int: `b"\r" in` raises and clears a TypeError first
        ):
            return None
        self._started = True
        return chunk[6:-2].decode("utf-8", "replace")

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Every event this chunk completes, in order."""
        if not chunk:
            return []
        buf = self._buf
        scan = len(buf)
        # most chunks start a fresh event: read them in place; append only to a partial event
        data: bytes | bytearray = chunk if not scan else buf
        if scan:
            buf += chunk
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == _LF:  # second half of a CRLF: it belongs to the line that just ended
                scan += 1
                if self._block == self._line:
                    self._block = scan
                self._line = scan
        events: list[SSEEvent] = []
        cut = 0  # bytes of data handed back in events
        line = self._line
        for eol, line_end in _line_ends(data, scan):
            if not self._started:
                self._started = True
                if data.startswith(_BOM, line):
                    line += len(_BOM)
            if eol == line:  # blank line: dispatch
                if self._data:
                    text = "\n".join(self._data)
                    raw = bytes(data[cut:line_end])
                    head = self._block - cut
                    events.append(SSEEvent(self._event, text, raw, self._last_id, head))
                    cut = line_end
                self._block = line_end
                self._event = None
                self._data = []
            elif data[line] != _COLON:  # a comment line is skipped
                self._field(data[line:eol].decode("utf-8", "replace"))
            line = line_end
        if line == len(data) and data[-1] == _CR:
            self._skip_lf = True
        self._line = line - cut
        self._block -= cut
        if data is buf:
            del buf[:cut]
        elif cut < len(chunk):
            buf += memoryview(chunk)[cut:]
        return events

    def abandon(self) -> tuple[bytes, int | None]:
        """Gives up the event in progress (one too large to hold): the bytes held, and where
        they leave the event (`_AT_START`, `_AFTER_CR`; None: at no event, none to skip). The
        decoder is then ready for what follows the event's blank line."""
        buf = self._buf
        held = bytes(buf)
        gap = None
        if self._block < len(buf):
            gap = (_AT_START if self._line == len(buf) else 0) | (_AFTER_CR if self._skip_lf else 0)
        self._reset()
        return held, gap

    def release(self) -> bytes:
        """Hands back the comment-only blocks read since the last event, so they can go on now;
        the next event's `raw` then starts after them."""
        block = self._block
        if not block:
            return b""
        out = bytes(self._buf[:block])
        del self._buf[:block]
        self._line -= block
        self._block = 0
        return out

    def flush(self) -> list[SSEEvent]:
        """End of stream: the bytes still held, as one incomplete event (none if no bytes are);
        the decoder is then ready for the next stream (keeping the last event ID, per the spec)."""
        buf = self._buf
        if not buf:
            self._reset()
            return []
        if self._line < len(buf) and buf[self._line] != _COLON:
            start = self._line + (len(_BOM) if not self._started and buf.startswith(_BOM) else 0)
            self._field(buf[start:].decode("utf-8", "replace"))
        event = SSEEvent(
            self._event, "\n".join(self._data), bytes(buf), self._last_id, self._block, False
        )
        self._reset()
        return [event]

    def _field(self, line: str) -> None:
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value or None  # an empty type is the default, "message"
        elif name == "id" and "\0" not in value:
            self._last_id = value


class _WideDecoder(SSEDecoder):
    """An event stream written in UTF-16 or UTF-32, read as the text it is (`codec`, which its
    first bytes say). Its events' `raw` are the UTF-8 of that text, not the bytes that came:
    such a stream is only read, passed on as it came (`StreamMeter._first`)."""

    __slots__ = ("_text",)

    def __init__(self, codec: str) -> None:
        super().__init__()
        self._text = codecs.getincrementaldecoder(codec)("replace")

    def whole_data(self, chunk: bytes) -> str | None:
        return None  # (UTF-16 can spell `data: ` with other characters)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        return super().feed(self.recode(chunk))

    def recode(self, chunk: bytes) -> bytes:
        """The UTF-8 of the text `chunk` completes (`feed` reads it; `StreamMeter._skip` looks
        in it for the end of an event skipped)."""
        return self._text.decode(chunk).encode()

    def flush(self) -> list[SSEEvent]:
        rest = self._text.decode(b"", True).encode()  # a character cut off: U+FFFD
        return (super().feed(rest) if rest else []) + super().flush()


_WIDE_FIRST: Final = frozenset(b"\0\xfe\xff")  # a first byte of UTF-16 or UTF-32 text, not of UTF-8
# The first bytes that say how a stream is written (`json.detect_encoding` needs 4: UTF-32's
# mark, or the NULs beside a first character); a first chunk shorter is held until they come.
_HEAD: Final = 4


def _merge_counts(known: dict[str, Any], usage: dict[str, Any], depth: int) -> None:
    """`usage`'s counts into `known`, none lowered: in the objects nested in it too, down to
    `depth` (Anthropic's `cache_creation` and `server_tool_use`: a `message_delta` with
    `ephemeral_1h_input_tokens: 0` kept no 1-hour writes of those `message_start` reported)."""
    for name, value in usage.items():
        if value is None:
            continue
        if type(value) is str and (count := quoted_count(value)) is not None:
            value = count  # quoted (`"1200"`): a count, which a later `"0"` does not lower
        old = known.get(name)
        if type(old) in _NUMBERS and type(value) in _NUMBERS and old > value:
            continue
        if depth > 1 and type(old) is dict and type(value) is dict:
            value = dict(old)
            _merge_counts(value, usage[name], depth - 1)
        known[name] = value


class StreamMeter:
    """Reads usage from a `text/event-stream` response as it passes through (SPEC §7).

    `feed` returns the bytes to forward now, `finish` what is left at the end. Without
    `drop_usage_chunk` every chunk is returned as it came (the same object): the meter only reads.
    With it (the middleware added `stream_options.include_usage`), the OpenAI usage-only chunk
    (`choices: []`, non-null `usage`) is removed; everything else is forwarded byte for byte, and
    only the unfinished tail of the current event is held back. Dropping needs an identity-encoded
    stream: the caller must not ask for it on a compressed one.

    `completed`: the stream reached its end: `[DONE]`, OpenAI's usage-only chunk (the last it
    sends: an app streaming an SDK's chunks back often leaves `[DONE]` out), `message_stop`,
    `response.completed` or `.incomplete`.

    `usage` is the best known so far: OpenAI's usage chunk, `response.completed`'s usage, or
    Anthropic's `message_start` usage updated by `message_delta` (cumulative: each count keeps its
    highest value). Until `completed` it may be partial (Anthropic's output count only grows with
    `message_delta`): for a cut stream, estimate the output from `text_chars`, the generated
    characters streamed (as `usage.text_size` counts them: 4 a token); `text_at_usage` is how
    many had been streamed when `usage` was last read (text after it is not in it). `gave_up`:
    an event over _MAX_PENDING bytes was skipped unread (passed on as it came, not held); the
    stream is read again from its end, so a usage chunk after it is read, and dropped.
    `gap_unread()`: and no usage was read after it, so what it held may be in no count.
    `failed`: an error was streamed (Anthropic's `event: error`, the Responses API's `error` and
    `response.failed`, an OpenAI-style `data: {"error": ...}` without `choices`).
    `tool_image_tokens`: the image output tokens of the images OpenAI's image generation tool
    drew (`image_generation_call` items done, as `usage.image_call_tokens` counts them at
    `image_tool`'s model, and 100 for each of the `partial_images` streamed: of the response
    under way, its usage's), which no text
    counts: for an answer without usage (a usage counts them from its response's output,
    `TokenUsage.tool_image_tokens`, and the partial images streamed).
    """

    __slots__ = (
        "_anthropic",
        "_decoder",
        "_drop",
        "_earlier",
        "_fresh",
        "_gap",
        "_head",
        "_owe_lf",
        "_own",
        "_text_start",
        "_usage_at_gap",
        "_usage_id",
        "_wide",
        "completed",
        "done",
        "failed",
        "gave_up",
        "image_tool",
        "model",
        "partial_images",
        "speech_chars",
        "text_at_usage",
        "text_chars",
        "tool_image_tokens",
        "unreported",
        "usage",
    )

    def __init__(self, drop_usage_chunk: bool = False) -> None:
        self.usage: TokenUsage | None = None
        self.completed = False  # the stream's end was seen (see the class's doc)
        self.done = False  # `[DONE]` was read: OpenAI's last event, where its SDK stops reading
        self.text_chars = 0
        self.speech_chars = 0  # of those, a spoken answer's transcript: priced as speech
        self.tool_image_tokens = 0
        self.image_tool = IMAGE_TOOL  # the image generation tool offered (the exchange's)
        self.partial_images = 0
        self.text_at_usage = 0
        self.gave_up = False
        self.failed = False  # an error event was read (see the class's doc)
        self.unreported = False  # a completion streams after the last usage, none of its own
        self.model: str | None = None
        self._drop = drop_usage_chunk
        # Made by the first bytes (`_first`); None after them: gave up reading (_MAX_PENDING)
        self._decoder: SSEDecoder | None = None
        self._fresh = True  # no bytes yet, or fewer than _HEAD (held: `_head`)
        self._head = b""
        self._wide: _WideDecoder | None = None  # the decoder of a stream in UTF-16 or UTF-32
        self._anthropic: dict[str, Any] = {}  # Anthropic usage fields so far, the last value wins
        # Of the messages (Anthropic) or completions and responses (OpenAI) before this one in
        # the stream: a tool loop's turns streamed as one answer, each its own usage.
        self._earlier: TokenUsage | None = None
        self._own: TokenUsage | None = (
            None  # the usage of the OpenAI completion or response read last
        )
        self._usage_id: object = None  # that completion's or response's `id`
        self._text_start = 0  # `text_chars` when the current Anthropic message began
        self._owe_lf = False  # a dropped event ended in CR: a LF right after it is part of it
        self._gap: int | None = None  # skipping an event over _MAX_PENDING (see `_gap_end`)
        self._usage_at_gap: TokenUsage | None = None  # `usage` when the last one began

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to forward to the client now."""
        decoder = self._decoder
        if decoder is None:
            if not self._fresh or not chunk:
                return chunk if self._gap is None else self._skip(chunk)
            if len(chunk) < _HEAD or self._head:
                return self._held(chunk)
            decoder = self._first(chunk)
        data = decoder.whole_data(chunk)
        if data is not None:
            if self._read_data(data) and self._drop:  # the usage chunk we caused: drop it
                return b""
            if self._owe_lf:
                return self._lf_owed(chunk)
            return chunk
        events = decoder.feed(chunk)
        if not self._drop:
            for event in events:
                self._read(event)
            if decoder.pending > _MAX_PENDING:
                self._give_up(decoder)
            return chunk
        out: list[bytes] = []
        for event in events:
            if self._read(event):  # the usage chunk we caused: drop it, keep the comments before it
                self._emit(out, event.raw[: event.head])
                self._owe_lf = event.raw[-1] == _CR
            else:
                self._emit(out, event.raw)
        self._emit(out, decoder.release())
        if decoder.pending > _MAX_PENDING:
            self._emit(out, self._give_up(decoder))
        return b"".join(out)

    def _held(self, chunk: bytes) -> bytes:
        """A stream's first bytes while they are too few to say how it is written (a UTF-16
        stream's first byte alone reads as UTF-8): held, then read (and with
        `drop_usage_chunk`, forwarded) with the bytes that make them _HEAD."""
        head = self._head + chunk
        if len(head) < _HEAD:
            self._head = head
            return b"" if self._drop else chunk
        self._head = b""
        drop = self._drop  # (a wide stream then drops nothing: forwarded as it came)
        out = self.feed(head)
        return out if drop else chunk

    def _first(self, chunk: bytes) -> SSEDecoder:
        """The decoder of a stream whose first bytes are `chunk`, which say how it is written:
        in UTF-8, or in UTF-16 or UTF-32 (a NUL or a mark in its first two bytes: read as such,
        and passed on as it came, its usage chunk we caused too, which could only be taken
        out of it re-encoded)."""
        self._fresh = False
        codec = None
        if chunk[0] in _WIDE_FIRST or chunk[1:2] == b"\0":
            codec = wide_codec(chunk)  # (its first character ASCII, as an event's is)
        if codec is None:
            decoder = SSEDecoder()
        else:
            decoder = self._wide = _WideDecoder(codec)
            self._drop = False
        self._decoder = decoder
        return decoder

    def _give_up(self, decoder: SSEDecoder) -> bytes:
        """An event over _MAX_PENDING bytes (no SSE, or one that big): not held, skipped unread
        to its blank line (`_skip`), the stream read again after it. Its bytes held so far are
        handed back, to go on."""
        held, gap = decoder.abandon()
        if gap is not None:
            self._decoder = None
            self._gap = gap
            self.gave_up = True
            self._usage_at_gap = self.usage
        return held

    def _skip(self, chunk: bytes) -> bytes:
        """A chunk of the event being skipped, passed on unread; from its end on, read again.
        A wide stream's is looked at as the text it is (its bytes hold no LF byte that ends a
        line), and read on by its decoder (passed on as it came)."""
        wide = self._wide
        if wide is not None:
            text = wide.recode(chunk)
            end, self._gap = _gap_end(text, self._gap or 0)
            if end >= 0:
                self._gap = None
                self._decoder = wide
                for event in SSEDecoder.feed(wide, text[end:]):  # (the text, as UTF-8)
                    self._read(event)
                if wide.pending > _MAX_PENDING:
                    self._give_up(wide)
            return chunk
        end, self._gap = _gap_end(chunk, self._gap or 0)
        if end < 0:
            return chunk
        self._gap = None
        self._decoder = SSEDecoder()
        rest = chunk[end:]
        out = self.feed(rest) if rest else rest
        return chunk if out is rest else chunk[:end] + out

    def finish(self) -> bytes:
        """The bytes left to forward at the end of the stream."""
        decoder, self._decoder = self._decoder, None
        if decoder is None:  # gave up, or fewer than _HEAD bytes came: not an event
            held, self._head = self._head, b""
            return held if self._drop else b""
        out: list[bytes] = []
        for event in decoder.flush():
            # Cut off by the end of the stream, no blank line after it (an app that joins its
            # events with blank lines, none after the last): no event to an SSE client, but
            # what the upstream sent, and billed. Read when its data is whole (JSON that
            # parses, `[DONE]`: a line cut short is neither); the usage chunk we caused dropped
            # (nothing of another block before it: `feed` released those).
            ours = self._read(event)
            if self._drop and not ours:
                self._emit(out, event.raw)
        return b"".join(out)

    def _lf_owed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        self._emit(out, chunk)
        return b"".join(out)

    def _emit(self, out: list[bytes], data: bytes) -> None:
        if data and self._owe_lf:
            self._owe_lf = False
            if data[0] == _LF:
                data = data[1:]
        if data:
            out.append(data)

    def _read(self, event: SSEEvent) -> bool:
        """Takes what the event says; True if it is a usage-only chunk to drop."""
        name = event.event
        if name is not None and name != "message":
            if name in _READ:
                body = _object(event.data)
                if body is not None:
                    self._read_typed(name, body)
                return False
            if name in _SKIP or name.startswith("response."):
                if name == "error":
                    self.failed = True
                return False
            # any other name: some OpenAI-compatible server; read it like an unnamed event
        return self._read_data(event.data)

    def _read_data(self, data: str) -> bool:
        """An unnamed event's data; True if it is a usage-only chunk to drop."""
        if data == "[DONE]":
            self.completed = self.done = True
            return False
        body = _object(data)
        if body is None:
            return False
        kind = body.get("type")
        if isinstance(kind, str) and kind in _READ:  # Anthropic or Responses without `event:`
            self._read_typed(kind, body)
            return False
        return self._read_chunk(body)

    def _read_chunk(self, body: dict[str, Any]) -> bool:
        """An OpenAI chat/completions chunk."""
        if self.model is None:
            self._see_model(body.get("model"))
        choices = body.get("choices")
        if isinstance(choices, list):
            made = 0
            for choice in choices:
                if isinstance(choice, dict):
                    made += _choice_chars(choice, self)
            if made and self._own is not None and body.get("id") != self._usage_id:
                self._next_completion(body.get("id"))
            self.text_chars += made
        elif body.get("error") is not None or body.get("type") == "error":  # see `failed`
            self.failed = True
        usage = body.get("usage")
        if not isinstance(usage, dict):  # `"usage": null` on every chunk but the last
            # Groq's, on the chunk that ends the choice, asked for or not (asked, repeated in a
            # usage-only chunk of the same `id`: it counts once)
            groq = body.get("x_groq")
            if type(groq) is not dict or type(usage := groq.get("usage")) is not dict:
                return False
        found = usage_from_mapping(usage)
        if found is not None:
            if "service_tier" in body:  # OpenAI's, on every chunk
                found.service_tier = tier_name(body["service_tier"])
            found = self._of_completion(body.get("id"), found)
        self._take(found)
        if choices == []:  # the usage-only chunk, OpenAI's last: the answer ended, `[DONE]` or not
            self.completed = True
            return self._drop
        if body.get("type") == _SPEECH_DONE:  # speech's usage, its last event: it ended
            self.completed = True
        return False

    def _read_typed(self, kind: str, body: dict[str, Any]) -> None:
        if kind == "content_block_delta":
            delta = body.get("delta")
            if isinstance(delta, dict):
                self.text_chars += _text_chars(delta, _BLOCK_TEXT)
        elif kind in _RESPONSES_TEXT:
            made = _text_chars(body, ("delta",))
            self.text_chars += made
            if kind == _TRANSCRIPT:
                self.speech_chars += made
        elif kind == "message_start":
            message = body.get("message")
            if isinstance(message, dict):
                self._see_model(message.get("model"))
                if self._anthropic:  # a message before this one in the stream (a tool loop's)
                    done = usage_from_mapping(self._anthropic)
                    if done is not None:
                        self._earlier = _added(self._earlier, done)
                    self._anthropic = {}
                    self.completed = False  # the answer goes on: this message has to end too
                    self._text_start = self.text_chars
                self._merge_anthropic(message.get("usage"))
        elif kind == "message_delta":
            self._merge_anthropic(body.get("usage"))
        elif kind == "message_stop":
            self.completed = True
        elif kind == _ITEM_DONE:
            item = body.get("item")
            if isinstance(item, dict) and item.get("type") == IMAGE_CALL:
                self.tool_image_tokens += image_call_tokens(item, self.image_tool)
        elif kind == _PARTIAL_IMAGE:
            self.partial_images += 1
            self.tool_image_tokens += PARTIAL_IMAGE_TOKENS
        else:  # response.created and the Responses API's end events
            response = body.get("response")
            if isinstance(response, dict):
                self._see_model(response.get("model"))
                ident = response.get("id")
                if kind == "response.created" and self._own is not None and ident != self._usage_id:
                    self._next_completion(ident)  # another response, after one's usage
                usage = response.get("usage")
                if isinstance(usage, dict):
                    found = usage_from_mapping(usage)
                    if found is not None:
                        found.service_tier = tier_name(response.get("service_tier"))
                        if "output" in response:  # its searches, which the usage leaves out
                            count_searches(
                                found,
                                response["output"],
                                self.image_tool,
                                self.partial_images,
                                response.get("tool_usage"),
                            )
                        found = self._of_completion(ident, found)
                    self._take(found)
            if kind in ("response.completed", "response.incomplete"):
                self.completed = True
            elif kind == "response.failed":
                self.failed = True
            if kind != "response.created":  # its end: the next response's partials are its own
                self.partial_images = 0

    def _next_completion(self, ident: object) -> None:
        """Text of another `id` after a completion's usage (or another response created after
        one's): the next completion of a tool loop's turns streamed as one answer. Until its
        own usage comes it is `unreported`: cut before it (or its usage left out), it is
        charged its prompt and its streamed text, beside the completions before it, as a
        second Anthropic message is."""
        assert self._own is not None
        self._earlier = _added(self._earlier, self._own)
        self._own = None
        self._usage_id = ident
        self._text_start = self.text_chars
        self.completed = False  # the answer goes on: this completion has to end too
        self.unreported = True

    def _of_completion(self, ident: object, usage: TokenUsage) -> TokenUsage:
        """An OpenAI completion's or response's usage, with those of the ones before it in the
        stream: a usage of another `id` ends the one before (a tool loop's turns, each with its
        usage chunk; only the last was charged), one of the same `id` replaces its own (vLLM's
        usage on every chunk counts all so far)."""
        if ident != self._usage_id:
            if self._own is not None:
                self._earlier = _added(self._earlier, self._own)
            self._usage_id = ident
        self._own = usage
        return usage if self._earlier is None else self._earlier.plus(usage)

    def _merge_anthropic(self, usage: object) -> None:
        # message_delta counts are cumulative, input/cache ones may repeat: never added, and
        # never lowered (a gateway's message_delta with `input_tokens: 0` keeps message_start's)
        if isinstance(usage, dict):
            known = self._anthropic
            _merge_counts(known, usage, 2)
            usage = usage_from_mapping(known)
            if usage is not None and "speed" in known:  # fast mode, priced apart
                usage.service_tier = tier_name(known["speed"])
            if usage is not None and self._earlier is not None:
                usage = _added(self._earlier, usage)
            self._take(usage)

    def gap_unread(self) -> bool:
        """Whether no usage was read after the last event skipped (`gave_up`): a usage after it
        counts all of it (OpenAI's last chunk, Anthropic's cumulative `message_delta`)."""
        return self.gave_up and self.usage is self._usage_at_gap

    def streamed_output(self) -> int:
        """The output tokens the streamed text shows at least, 4 characters a token: of the
        current message's text, beside what the messages before it reported."""
        earlier = 0 if self._earlier is None else self._earlier.output_tokens
        return earlier + (self.text_chars - self._text_start + 3) // 4

    def _take(self, usage: TokenUsage | None) -> None:
        """A usage read: the best known from now on, with the text streamed so far."""
        if usage is not None:
            self.usage = usage
            self.text_at_usage = self.text_chars
            self.unreported = False

    def _see_model(self, model: object) -> None:
        if isinstance(model, str) and model:
            self.model = model


_NUMBERS: Final = (int, float)


def _added(earlier: TokenUsage | None, usage: TokenUsage) -> TokenUsage:
    """Two messages' usage together (one answer streams each turn of a tool loop as one)."""
    return usage if earlier is None else earlier.plus(usage)


def _line_ends(data: bytes | bytearray, pos: int) -> list[tuple[int, int]]:
    """(end of line, start of next line) of every CR, LF or CRLF from pos; faster than a regex."""
    ends = []
    size = len(data)
    lf, cr = data.find(b"\n", pos), data.find(b"\r", pos)
    while lf >= 0 or cr >= 0:
        if cr < 0 or 0 <= lf < cr:
            ends.append((lf, lf + 1))
        else:
            ends.append((cr, cr + 2 if cr + 1 < size and data[cr + 1] == _LF else cr + 1))
        pos = ends[-1][1]
        if 0 <= lf < pos:
            lf = data.find(b"\n", pos)
        if 0 <= cr < pos:
            cr = data.find(b"\r", pos)
    return ends


def _gap_end(data: bytes, gap: int) -> tuple[int, int | None]:
    """Where a skipped event ends in `data`, just past its blank line (-1: not in it), and
    where its bytes leave it for the next chunk (`gap` says where the last chunk left it)."""
    if not data:
        return -1, gap
    pos = 1 if gap & _AFTER_CR and data[0] == _LF else 0  # the second half of a CRLF
    start = pos if gap & _AT_START else -1  # where the current line starts, if in `data`
    for eol, line_end in _line_ends(data, pos):
        if eol == start:  # a blank line: the event's end
            return line_end, None
        start = line_end
    return -1, (_AT_START if start == len(data) else 0) | (_AFTER_CR if data[-1] == _CR else 0)


def _object(data: str) -> dict[str, Any] | None:
    try:
        value = json_loads(data)
    except JSON_ERRORS:
        return None
    return value if isinstance(value, dict) else None


def _text_chars(obj: dict[str, Any], keys: tuple[str, ...]) -> int:
    return sum(text_size(value) for key in keys if isinstance(value := obj.get(key), str))


def _choice_chars(choice: dict[str, Any], meter: StreamMeter) -> int:
    """Generated characters in a chat chunk's choice, or a legacy completion's `text` (those
    of speech noted apart too, `meter.speech_chars`)."""
    text = choice.get("text")
    total = text_size(text) if isinstance(text, str) else 0
    delta = choice.get("delta")
    if isinstance(delta, dict):
        for key, value in delta.items():  # usually one key: cheaper than a get() per field
            if key in _DELTA_TEXT:
                if isinstance(value, str):
                    total += text_size(value)
                elif isinstance(value, list):  # chunks: Mistral's (its models' thinking)
                    total += generated_chars(value)
            elif key == "tool_calls" and isinstance(value, list):
                for call in value:
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict):
                        total += _text_chars(function, ("arguments",))
            elif key == "function_call" and isinstance(value, dict):  # `functions=`, legacy
                total += _text_chars(value, ("arguments",))
            elif key == "audio" and isinstance(value, dict):  # speech: its transcript (the
                said = _text_chars(value, ("transcript",))  # base64 `data` is no text)
                meter.speech_chars += said
                total += said
    return total
