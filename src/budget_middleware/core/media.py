"""Media a request sends by reference (SPEC §6): an image or a file named by a URL or a file id.

The provider fetches such media and bills their tokens as input, yet the body holds only the
reference, so the reservation's estimate from the body's size cannot bound them (an image is
~1,500 tokens, a PDF document can be hundreds of thousands, against the ~40 of its reference).
`media_references` counts them; the gate reserves for each what one has been measured to take.
Inline images (`data:` URLs, base64 sources) are not references: their bytes are in the body,
and so in its estimate; inline files (`file_data`, an Anthropic base64 `document`) count as
references, for their pages are billed beyond their bytes. An inline image, though, is billed by
its size in pixels, not its bytes (a 1 MB PNG of 1024x1024 is ~765 tokens on gpt-4o, ~333k by
its bytes), and a small file of many pixels more than its bytes: `inline_images` reads each
one's width and height from the first bytes of its base64 (PNG, JPEG, GIF, WebP) so that its
bytes are counted instead as the most its provider bills an image of that size
(`image_tokens`).
"""

from __future__ import annotations

import binascii
import math
import re
from typing import Any, Final

# What every reference's JSON holds, as bytes: its part's `"type"` key, which each API requires.
# A text-only chat has none; one with content parts, tools or a response format is walked,
# cheaply (`may_reference`).
MARK: Final = b'"type"'
_NUL: Final = 0  # sought as an int (see `may_reference`)
# The Images API's edits as JSON name their images by a key of their own (`_edited`).
EDITED: Final = b'"images"'


def may_reference(body: bytes) -> bool:
    """Whether a request body may send media by reference, told from its bytes: it holds
    `"type"` (or `"images"`: the Images API's edits), or it could spell that key otherwise (a
    `\\u` escape, `"\\u0074ype"`; a UTF-16 or UTF-32 body, whose bytes hold NULs). Only then is
    its parsed body walked."""
    # `find`, and a NUL as an int: `bytes in bytes` first tries its operand as an int, which
    # raises and clears a TypeError (~50 ns each in CPython 3.11)
    return body.find(MARK) >= 0 or body.find(EDITED) >= 0 or body.find(b"\\u") >= 0 or _NUL in body


_DEPTH: Final = 3  # messages, their content, a tool result's content: no deeper


def media_references(body: Any) -> int:
    return walk(body, None)


def walk(body: Any, images: list[tuple[int, int, int]] | None) -> int:
    """How many media a request's parsed body sends by reference: in `messages[*].content[*]`
    (OpenAI chat, Anthropic messages, and a `tool_result`'s content) and in `input[*]` and
    `input[*].content[*]` (the Responses API, and a `function_call_output`'s output), and in
    `images[*]` (the Images API's edits, `_edited`). Whatever is
    not as those APIs write it counts nothing. With `images`, each inline image found in the
    same places is added to it as (characters of its base64, width, height) when its header is
    read, and each inline audio as (characters, 0, most seconds it lasts), else not (its bytes
    stay counted as text)."""
    if type(body) is not dict:
        # A form's files (`identity.FormFields.media`): sized as inline media are
        media = getattr(body, "media", None)
        if media and images is not None:
            images.extend(media)
        return 0
    count = 0
    for name in ("messages", "input"):
        items = body.get(name)
        if type(items) is list:
            count += _count(items, _DEPTH, images)
    edited = body.get("images")
    if type(edited) is list:
        count += _edited(edited)
    return count


def _edited(items: list[Any]) -> int:
    """The images the Images API's edits sent as JSON (gpt-image-1.5's `images`) name by
    reference: `{"image_url": URL}` or `{"file_id": ...}`. One sent inline (a `data:` URL)
    stays counted by its bytes: how its pixels are billed there is not known here."""
    return sum(
        1
        for item in items
        if type(item) is dict and (_remote(item.get("image_url")) or _named(item.get("file_id")))
    )


def _count(items: list[Any], depth: int, images: list[tuple[int, int, int]] | None) -> int:
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
                    count += _count(inner, depth - 1, images)
        if images is not None:
            data = _inline_image(item, kind)
            if data is not None:
                size = image_size(data)
                if size is not None:
                    images.append((len(data), *size))
            elif kind == "input_audio":  # OpenAI chat: {"input_audio": {"data", "format"}}
                audio = item.get("input_audio")
                if type(audio) is dict and type(data := audio.get("data")) is str:
                    seconds = audio_seconds(data, audio.get("format"))
                    if seconds is not None:
                        images.append((len(data), 0, seconds))
    return count


def _is_reference(part: dict[str, Any], kind: Any) -> bool:
    if kind == "image_url":  # OpenAI chat: {"image_url": {"url": ...}} (or the URL itself)
        image = part.get("image_url")
        return _remote(image.get("url") if type(image) is dict else image)
    if kind == "input_image":  # Responses: `image_url` (a URL, or a data: URL) or `file_id`
        return _remote(part.get("image_url")) or _named(part.get("file_id"))
    # A file is billed by its pages (a PDF's: each one's text and an image of it), which its
    # bytes do not bound (a compact 10-page PDF of 6 KB is ~30,000 tokens): one sent inline
    # (`file_data`, an Anthropic `document` of type `base64`) counts as sent by reference.
    if kind == "input_file":  # Responses: `file_id`, `file_url` or `file_data`
        return (
            _named(part.get("file_id"))
            or _remote(part.get("file_url"))
            or _named(part.get("file_data"))
        )
    if kind == "file":  # OpenAI chat: {"file": {"file_id": ...}} or `file_data`
        file = part.get("file")
        return type(file) is dict and (_named(file.get("file_id")) or _named(file.get("file_data")))
    if kind == "image" or kind == "document":  # Anthropic: a source of type url or file
        source = part.get("source")
        if type(source) is dict:
            how = source.get("type")
            if how == "url":
                return _remote(source.get("url"))
            if how == "file":
                return _named(source.get("file_id"))
            if how == "base64" and kind == "document":
                return _named(source.get("data"))
    return False


def _inline_image(part: dict[str, Any], kind: Any) -> str | None:
    """The base64 of an image a part sends inline: a `data:` URL (OpenAI chat `image_url`, the
    Responses API's `input_image`) or an Anthropic `image` source of type `base64`."""
    if kind == "image_url":
        image = part.get("image_url")
        return _data_url(image.get("url") if type(image) is dict else image)
    if kind == "input_image":
        return _data_url(part.get("image_url"))
    if kind == "image":
        source = part.get("source")
        if type(source) is dict and source.get("type") == "base64":
            data = source.get("data")
            if type(data) is str:
                return data
    return None


def _data_url(url: Any) -> str | None:
    """The base64 of a `data:...;base64,` URL."""
    if type(url) is not str or url[:5].lower() != "data:":
        return None
    comma = url.find(",", 0, 256)
    if comma < 0 or not url[:comma].lower().endswith(";base64"):
        return None
    return url[comma + 1 :]


def _remote(url: Any) -> bool:
    """A URL the provider fetches: a non-empty string, not a `data:` URL (its bytes are here)."""
    return type(url) is str and url != "" and url[:5].lower() != "data:"


def _named(file_id: Any) -> bool:
    return type(file_id) is str and file_id != ""


def inline_images(body: Any) -> list[tuple[int, int, int]]:
    """The inline images of a parsed body whose size could be read: (characters of base64,
    width, height) each."""
    images: list[tuple[int, int, int]] = []
    walk(body, images)
    return images


def _decode(data: str | bytes, start: int, size: int) -> bytes | None:
    """Bytes `start` to `start + size` of base64 `data`, decoding only the characters that hold
    them; None when they are not plain base64 (line breaks, a wrong alphabet). `data` as bytes
    (a form's file): those bytes as they are."""
    if type(data) is bytes:
        piece = data[start : start + size]
        return piece if len(piece) == size else None
    first = start // 3
    end = -(-(start + size) // 3)
    try:
        chunk = binascii.a2b_base64(data[first * 4 : end * 4], strict_mode=True)
    except (binascii.Error, ValueError):
        return None
    piece = chunk[start - first * 3 : start - first * 3 + size]
    return piece if len(piece) == size else None


_JPEG_SEGMENTS: Final = 64  # APPn, tables: a picture's size comes in its first few
_SPACES: Final = ("\n", "\r", " ", "\t")  # what a base64 encoder may break it with
_SOF: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers: not DHT, JPG, DAC


def image_size(data: str | bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, JPEG, GIF or WebP image from the first bytes of its base64
    (or of the image itself, as bytes), None for another format or what cannot be read."""
    head = _decode(data, 0, 30)
    if head is None:
        return None
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    elif head[:6] in (b"GIF87a", b"GIF89a"):
        # the logical screen; frames are drawn within it
        width, height = int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        chunk = head[12:16]
        if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
            width = int.from_bytes(head[26:28], "little") & 0x3FFF
            height = int.from_bytes(head[28:30], "little") & 0x3FFF
        elif chunk == b"VP8L" and head[20] == 0x2F:
            bits = int.from_bytes(head[21:25], "little")
            width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        elif chunk == b"VP8X":
            width = int.from_bytes(head[24:27], "little") + 1
            height = int.from_bytes(head[27:30], "little") + 1
        else:
            return None
    elif head[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    else:
        return None
    return (width, height) if width > 0 and height > 0 else None


def _jpeg_size(data: str | bytes) -> tuple[int, int] | None:
    """A JPEG's size from its first frame header (SOFn), its segments before it skipped by their
    lengths: only the few bytes of each marker decoded."""
    at = 2
    for _ in range(_JPEG_SEGMENTS):
        marker = _decode(data, at, 4)
        if marker is None or marker[0] != 0xFF:
            return None
        if marker[1] == 0xFF:  # fill byte
            at += 1
            continue
        if marker[1] in _SOF:
            frame = _decode(data, at + 5, 4)
            if frame is None:
                return None
            height, width = int.from_bytes(frame[:2], "big"), int.from_bytes(frame[2:], "big")
            if type(data) is str:  # (a form's file: its bytes as they are)
                end = -(-(at + 9) // 3) * 4
                for space in _SPACES:  # base64 in lines: what was read is not where it was sought
                    if data.find(space, 0, end) >= 0:
                        return None
            return (width, height) if width > 0 and height > 0 else None
        if marker[1] == 0xD9 or marker[1] == 0xDA:  # end, or scan data before any frame
            return None
        at += 2 + int.from_bytes(marker[2:], "big")
    return None


# The most tokens a provider bills an image of a size (SPEC §6), from each one's documentation:
# - OpenAI (platform.openai.com/docs/guides/images-vision, "Calculating costs"): tiles: fit in
#   2048x2048, shortest side to 768, 170 tokens a 512px tile + 85 (gpt-4o, gpt-4.1, o1, o3;
#   gpt-4o-mini 5,667 a tile + 2,833); patches: ceil(w/32) x ceil(h/32), capped (1,536, or
#   10,000 at detail "original") then x a model's multiplier (gpt-4.1-mini 1.62, gpt-4.1-nano
#   2.46, o4-mini 1.72): counted here uncapped at 2.46, the largest.
# - Anthropic (docs.anthropic.com, "Vision"): width x height / 750, after a resize that only
#   lowers it (a long edge over 1568 px, 2576 on Opus 4.7): counted unresized, plus a margin.
# - Gemini (ai.google.dev, "Understand and count tokens"): 258 a 768x768 tile (258 for an
#   image within 384x384); Gemini 3's media_resolution up to 2,240 an image.
# Another OpenAI model (gpt-5, o4-mini, ...) is counted at the larger of tiles and patches; a
# model whose name tells no family here (an Azure deployment's) at the largest of them all. An
# image model's input image (the Images API's edits: gpt-image-1, chatgpt-image-latest) is
# counted at least as the most tokens of one it draws (`drawn_image_tokens`): its
# `input_fidelity: high` bills an input image's details beyond its patches.
_IMAGE_MARGIN: Final = 100  # tokens an image's wrapping may take beside its pixels
_PATCH_MULTIPLIER: Final = 2.46
_MINI_TILE: Final = ("4o-mini",)
_TILED: Final = ("gpt-4o", "gpt-4.1", "o1", "o3", "chatgpt-4o")
_UNTILED: Final = ("-mini", "-nano")
_OPENAI: Final = ("gpt-", "o1", "o3", "o4", "chatgpt-", "computer-use")
_DRAWERS: Final = ("gpt-image", "chatgpt-image")


def _tiles(width: int, height: int) -> int:
    """512px tiles of an image fitted in 2048x2048 then its shortest side scaled to 768: the
    largest count whether a smaller image is scaled up to 768 or kept."""
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    most = 0
    for short in (min(768.0, min(w, h)), 768.0):
        s = short / min(w, h)
        tw, th = min(w * s, 2048.0), min(h * s, 2048.0)
        most = max(most, math.ceil(tw / 512) * math.ceil(th / 512))
    return most


def image_tokens(model: str, width: int, height: int) -> int:
    """The most input tokens the provider of `model` bills an image of `width` x `height`
    pixels (its family told by its name; the largest bound of all when it is not known)."""
    name = model.rsplit("/", 1)[-1].lower()
    claude = math.ceil(width * height / 750) + _IMAGE_MARGIN
    if "claude" in name:
        return claude
    gemini = max(258 * math.ceil(width / 768) * math.ceil(height / 768), 2240) + _IMAGE_MARGIN
    if "gemini" in name:
        return gemini
    tiles = _tiles(width, height)
    mini = 2833 + 5667 * tiles + _IMAGE_MARGIN
    if any(family in name for family in _MINI_TILE):
        return mini
    tiled = 85 + 170 * tiles + _IMAGE_MARGIN
    if name.startswith(_TILED) and not any(size in name for size in _UNTILED):
        return tiled
    patches = math.ceil(width / 32) * math.ceil(height / 32)
    patched = max(tiled, math.ceil(patches * _PATCH_MULTIPLIER) + _IMAGE_MARGIN)
    if name.startswith(_DRAWERS):  # an image to edit: at least the most one drawn bills
        return max(patched, drawn_image_tokens(model))
    if name.startswith(_OPENAI):
        return patched
    return max(patched, claude, gemini, mini)


# The most output tokens one image a model draws is billed (SPEC §6), from each one's pricing:
# - Gemini (ai.google.dev/gemini-api/docs/pricing): 2.5 Flash Image 1,290 an image (up to
#   1024x1024); 3 Pro Image 1,120 (1K, 2K) and 2,000 (4K); 3.1 Flash Image up to 2,520 (4K).
# - OpenAI's Images API (developers.openai.com, image generation, "Cost and latency"), by the
#   image's size and quality: gpt-image-1, -1-mini and -1.5 (and chatgpt-image-latest) in three
#   sizes, 1024x1024, 1024x1536 and 1536x1024 (`_TABLED`: 4,160 a 1024x1024 image at high
#   quality, 6,240 a 1024x1536 one); gpt-image-2 and later in any size (16-pixel steps, up to
#   8,294,400 pixels), by the formula of OpenAI's cost calculator (`_sized_tokens`: 7,024 a
#   1024x1024 image at high quality, 23,719 at 2880x2880, the most). A streamed image's partial
#   images (`partial_images`, up to 3) are billed 100 image tokens each beside it.
# A size or quality not given (or `auto`, or one not known here) is counted at the largest; a
# model whose name tells no family here at the largest of all.
_DRAWN_TOKENS: Final = (("gemini-2.5-flash-image", 1290), ("gemini", 2520))
_TABLED: Final = ("gpt-image-1", "chatgpt-image")
_TABLE_SIZES: Final = ("1024x1024", "1024x1536", "1536x1024")
_TABLE: Final = {
    "low": (272, 408, 400),
    "medium": (1056, 1584, 1568),
    "high": (4160, 6240, 6208),
}
_QUALITY_FACTORS: Final = {"low": 16, "medium": 48, "high": 96}
_MOST_PIXELS: Final = 8_294_400  # 2880x2880, the most tokens of each quality
_PARTIAL_IMAGE_TOKENS: Final = 100
_SIZE: Final = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")


def drawn_image_tokens(model: str, size: object = None, quality: object = None) -> int:
    """The most output tokens the provider of `model` bills one image it draws (its family
    told by its name), of `size` (`"1024x1536"`) and `quality` (`"high"`) where they price it
    (OpenAI's Images API); the largest when they are not given or not known."""
    name = model.rsplit("/", 1)[-1].lower()
    for family, tokens in _DRAWN_TOKENS:
        if family in name:
            return tokens
    asked = quality if type(quality) is str and quality in _QUALITY_FACTORS else "high"
    if any(family in name for family in _TABLED):
        column = _TABLE[asked]
        return column[_TABLE_SIZES.index(size)] if size in _TABLE_SIZES else max(column)
    factor = _QUALITY_FACTORS[asked]
    found = _SIZE.fullmatch(size) if type(size) is str else None
    if found is not None:
        width, height = int(found[1]), int(found[2])
        if 0 < width * height <= _MOST_PIXELS:
            return _sized_tokens(factor, width, height)
    return _sized_tokens(factor, 2880, 2880)


def _sized_tokens(factor: int, width: int, height: int) -> int:
    """gpt-image-2's output tokens for one image of `width` x `height` at the quality whose
    factor is `factor` (`_QUALITY_FACTORS`)."""
    long, short = max(width, height), min(width, height)
    across = (2 * factor * short + long) // (2 * long)
    return -(-factor * across * (2_000_000 + width * height) // 4_000_000)


def asked_image_tokens(model: str, size: object, quality: object, partials: int) -> int:
    """The most output tokens one image an Images API request asks for is billed: of its
    `size` and `quality` (`drawn_image_tokens`), and its `partials` partial images (streamed;
    the API draws at most 3)."""
    return drawn_image_tokens(model, size, quality) + _PARTIAL_IMAGE_TOKENS * min(partials, 3)


# Audio is billed by how long it lasts: Gemini 32 tokens a second (ai.google.dev, "Understand
# and count tokens"), OpenAI's ~10 (1 a 100 ms, as its answers count them): 64 a second bounds
# both. A WAV's length is its bytes over its byte rate (its header's). An MP3 is left counted
# by its bytes: compressed, they bound it about as well (8 kbps, the lowest MPEG bit rate, is
# ~440 tokens a second by its base64).
_AUDIO_TOKENS_PER_SECOND: Final = 64


def audio_seconds(data: str, audio_format: Any) -> int | None:
    """The most whole seconds inline audio (base64, OpenAI's `format`) lasts, None when that
    cannot be told from its header (its bytes then stay counted as text)."""
    if audio_format != "wav":
        return None
    size = len(data) * 3 // 4
    head = _decode(data, 0, 36)
    if head is None or head[:4] != b"RIFF" or head[8:16] != b"WAVEfmt ":
        return None
    # PCM, IEEE float or extensible: a fixed byte rate (a compressed one's may not be)
    if int.from_bytes(head[20:22], "little") not in (1, 3, 0xFFFE):
        return None
    rate = int.from_bytes(head[28:32], "little")
    return -(-size // rate) if rate > 0 else None


# A form's file part (`multipart/form-data`: the Images API's edits, the Audio API's
# transcriptions and translations) is billed by what it is, not its bytes: an image by its size
# in pixels (`image_size`, `image_tokens`), audio by how long it lasts. A compressed audio
# file's length is not in its first bytes: bounded by its size at 2 kbps (250 bytes a second,
# below the lowest rate of the codecs the Audio API reads: Opus's 6 kbps, AMR's 4.75, MPEG's
# 8), counting no more than the API's 25 MB, and no more than 1,500 seconds, the longest audio
# a model billing it by tokens takes (OpenAI's gpt-4o-transcribe family; it refuses longer,
# and whisper-1 is billed by the minute). Any other file stays counted by its bytes, as text.
_AUDIO_BYTES_PER_SECOND: Final = 250
_AUDIO_MOST_BYTES: Final = 25 * 1024 * 1024
_AUDIO_MOST_SECONDS: Final = 1500
_AUDIO_MAGIC: Final = (b"ID3", b"OggS", b"fLaC", b"\x1aE\xdf\xa3", b"#!AMR", b"FORM")
_AUDIO_TYPES: Final = (b"audio/", b"video/")


def form_file(head: bytes, data: bytes) -> tuple[int, int, int] | None:
    """A form's file part (`head` its headers, `data` its bytes) as an inline medium
    (`inline_image_tokens`): (bytes, width, height) of an image whose size is read, (bytes, 0,
    most seconds) of audio (told by its type or its first bytes), None for another file."""
    size = image_size(data)
    if size is not None:
        return (len(data), *size)
    kind = _CONTENT_TYPE.search(head)
    if (
        (kind is not None and kind.group(1).lower().startswith(_AUDIO_TYPES))
        or data.startswith(_AUDIO_MAGIC)
        or data[4:8] == b"ftyp"  # MP4, M4A
        or (data[:4] == b"RIFF" and data[8:12] == b"WAVE")
        or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)  # an MPEG frame
    ):
        seconds = -(-min(len(data), _AUDIO_MOST_BYTES) // _AUDIO_BYTES_PER_SECOND)
        return (len(data), 0, min(seconds, _AUDIO_MOST_SECONDS))
    return None


_CONTENT_TYPE: Final = re.compile(rb"(?i)content-type:[ \t]*([^\r\n;]*)")


def inline_image_tokens(
    model: str, images: list[tuple[int, int, int]], audio_weight: int = 1, image_weight: int = 1
) -> int:
    """How many tokens to add to a body's estimate (a third of its bytes) for its inline images
    and audio: each one's bound for `model` (audio's times `audio_weight`, images' times
    `image_weight`: their prices over the input's, so that the estimate priced as input covers
    them), less the third of its base64 (or of a form's file, its bytes) the estimate counted."""
    tokens = 0
    for chars, width, height in images:
        if width:
            tokens += image_tokens(model, width, height) * image_weight - chars // 3
        else:
            most = height * _AUDIO_TOKENS_PER_SECOND + _IMAGE_MARGIN
            tokens += most * audio_weight - chars // 3
    return tokens
