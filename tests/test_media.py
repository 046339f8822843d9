"""Media sent by reference (SPEC §6): an image or a file named by URL or id takes input tokens its
body does not hold, so the reservation's estimate (a third of the body's bytes) cannot bound it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from budget_middleware.core.media import MARK, media_references

URL = "https://example.com/cat.png"


def _chat(*parts: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": list(parts)}]}


HTTPS = "https://example.com/report.pdf"
DATA = "data:image/png;base64,iVBORw0KGgo="


@pytest.mark.parametrize(
    ("body", "references"),
    [
        # OpenAI chat
        (_chat({"type": "image_url", "image_url": {"url": URL}}), 1),
        (_chat({"type": "image_url", "image_url": {"url": URL, "detail": "low"}}), 1),
        (_chat({"type": "image_url", "image_url": URL}), 1),  # the URL itself
        (_chat({"type": "image_url", "image_url": {"url": DATA}}), 0),  # inline
        (_chat({"type": "image_url", "image_url": {"url": "DATA:image/png;base64,AA"}}), 0),
        (_chat({"type": "file", "file": {"file_id": "file-abc"}}), 1),
        (_chat({"type": "file", "file": {"file_data": DATA, "filename": "a.pdf"}}), 0),
        (_chat({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}), 0),
        (_chat({"type": "text", "text": "an image_url with a file_id"}), 0),
        # The Responses API: in a message's content, or an item of `input` itself
        (
            {
                "model": "gpt-4o-mini",
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "compare"},
                            {"type": "input_image", "image_url": URL},
                            {"type": "input_image", "file_id": "file-1"},
                            {"type": "input_image", "image_url": DATA},
                            {"type": "input_file", "file_id": "file-2"},
                            {"type": "input_file", "file_url": HTTPS},
                            {"type": "input_file", "file_data": DATA, "filename": "x.pdf"},
                        ],
                    }
                ],
            },
            4,
        ),
        ({"model": "gpt-4o", "input": [{"type": "input_image", "image_url": URL}]}, 1),
        ({"model": "gpt-4o", "input": "a string input"}, 0),
        (
            {
                "model": "gpt-4o",
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c1",
                        "output": [{"type": "input_image", "image_url": URL}],
                    }
                ],
            },
            1,
        ),
        # Anthropic messages, a tool result's content too
        (_chat({"type": "image", "source": {"type": "url", "url": URL}}), 1),
        (_chat({"type": "image", "source": {"type": "file", "file_id": "file_01"}}), 1),
        (_chat({"type": "image", "source": {"type": "base64", "data": "AA"}}), 0),
        (_chat({"type": "document", "source": {"type": "url", "url": HTTPS}}), 1),
        (_chat({"type": "document", "source": {"type": "file", "file_id": "file_02"}}), 1),
        (_chat({"type": "document", "source": {"type": "text", "data": "plain"}}), 0),
        (
            _chat(
                {
                    "type": "tool_result",
                    "tool_use_id": "t1",
                    "content": [{"type": "image", "source": {"type": "url", "url": URL}}],
                }
            ),
            1,
        ),
        # Several messages, several references
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": URL}}]},
                    {"role": "assistant", "content": "a cat"},
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": URL}}]},
                ]
            },
            2,
        ),
    ],
)
def test_media_references_counts_each_medium_sent_by_reference(
    body: dict[str, Any], references: int
) -> None:
    assert media_references(body) == references
    # and the bytes of every body that names one hold what the gate looks for first
    for raw in (json.dumps(body).encode(), json.dumps(body, separators=(",", ":")).encode()):
        assert references == 0 or MARK in raw


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "text",
        42,
        {},
        {"messages": None},
        {"messages": "hello"},
        {"messages": [None, 1, "x", []]},
        {"messages": [{"content": None}, {"content": [None, 3, "x"]}]},
        {"messages": [{"content": [{"type": "image_url"}]}]},  # no URL
        {"messages": [{"content": [{"type": "image_url", "image_url": {"url": 3}}]}]},
        {"messages": [{"content": [{"type": "image_url", "image_url": {"url": ""}}]}]},
        {"messages": [{"content": [{"type": "image_url", "image_url": ["x"]}]}]},
        {"messages": [{"content": [{"type": "file", "file": "file-1"}]}]},
        {"messages": [{"content": [{"type": "image", "source": "https://x"}]}]},
        {"messages": [{"content": [{"type": "image", "source": {"type": "url"}}]}]},
        {"messages": [{"content": [{"type": ["image_url"], "image_url": URL}]}]},
        {"input": [{"content": {"type": "input_image", "image_url": URL}}]},  # not a list
    ],
)
def test_media_references_reads_whatever_comes_without_failing(body: Any) -> None:
    assert media_references(body) == 0


def test_media_references_stops_at_the_depth_the_apis_use() -> None:
    deep: dict[str, Any] = {"type": "image_url", "image_url": URL}
    for _ in range(5):
        deep = {"type": "tool_result", "content": [deep]}
    assert media_references({"messages": [deep]}) == 0
    nested = {"messages": [{"content": [{"type": "tool_result", "content": [deep["content"]]}]}]}
    assert media_references(nested) == 0  # a list in a list: not a part
