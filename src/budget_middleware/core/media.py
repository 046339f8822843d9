"""Media a request sends by reference (SPEC §6): an image or a file named by a URL or a file id.

The provider fetches such media and bills their tokens as input, yet the body holds only the
reference, so the reservation's estimate from the body's size cannot bound them (an image is
~1,500 tokens, a PDF document can be hundreds of thousands, against the ~40 of its reference).
`media_references` counts them; the gate reserves for each what one has been measured to take.
Inline media (`data:` URLs, base64 sources, `file_data`) are not counted: their bytes are in the
body, and so in its estimate.
"""

from __future__ import annotations

from typing import Any, Final

# What every reference's JSON holds, as bytes: its part's `"type"` key, which each API requires.
# A text-only chat has none; one with content parts, tools or a response format is walked,
# cheaply (`may_reference`).
MARK: Final = b'"type"'
_NUL: Final = 0  # sought as an int (see `may_reference`)


def may_reference(body: bytes) -> bool:
    """Whether a request body may send media by reference, told from its bytes: it holds
    `"type"`, or it could spell that key otherwise (a `\\u` escape, `"\\u0074ype"`; a UTF-16 or
    UTF-32 body, whose bytes hold NULs). Only then is its parsed body walked."""
    # `find`, and a NUL as an int: `bytes in bytes` first tries its operand as an int, which
    # raises and clears a TypeError (~50 ns each in CPython 3.11)
    return body.find(MARK) >= 0 or body.find(b"\\u") >= 0 or _NUL in body


_DEPTH: Final = 3  # messages, their content, a tool result's content: no deeper


def media_references(body: Any) -> int:
    """How many media a request's parsed body sends by reference: in `messages[*].content[*]`
    (OpenAI chat, Anthropic messages, and a `tool_result`'s content) and in `input[*]` and
    `input[*].content[*]` (the Responses API, and a `function_call_output`'s output). Whatever is
    not as those APIs write it counts nothing."""
    if type(body) is not dict:
        return 0
    count = 0
    for name in ("messages", "input"):
        items = body.get(name)
        if type(items) is list:
            count += _count(items, _DEPTH)
    return count


def _count(items: list[Any], depth: int) -> int:
    count = 0
    for item in items:
        if type(item) is not dict:
            continue
        kind = item.get("type")
        if kind == "text" or kind == "input_text":  # most parts: read no further
            continue
        if _is_reference(item, kind):
            count += 1
        elif depth > 1:
            for name in ("content", "output"):
                inner = item.get(name)
                if type(inner) is list:
                    count += _count(inner, depth - 1)
    return count


def _is_reference(part: dict[str, Any], kind: Any) -> bool:
    if kind == "image_url":  # OpenAI chat: {"image_url": {"url": ...}} (or the URL itself)
        image = part.get("image_url")
        return _remote(image.get("url") if type(image) is dict else image)
    if kind == "input_image":  # Responses: `image_url` (a URL, or a data: URL) or `file_id`
        return _remote(part.get("image_url")) or _named(part.get("file_id"))
    if kind == "input_file":  # Responses: `file_id` or `file_url` (`file_data` is inline)
        return _named(part.get("file_id")) or _remote(part.get("file_url"))
    if kind == "file":  # OpenAI chat: {"file": {"file_id": ...}} (`file_data` is inline)
        file = part.get("file")
        return type(file) is dict and _named(file.get("file_id"))
    if kind == "image" or kind == "document":  # Anthropic: a source of type url or file
        source = part.get("source")
        if type(source) is dict:
            how = source.get("type")
            if how == "url":
                return _remote(source.get("url"))
            if how == "file":
                return _named(source.get("file_id"))
    return False


def _remote(url: Any) -> bool:
    """A URL the provider fetches: a non-empty string, not a `data:` URL (its bytes are here)."""
    return type(url) is str and url != "" and url[:5].lower() != "data:"


def _named(file_id: Any) -> bool:
    return type(file_id) is str and file_id != ""
