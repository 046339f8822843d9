#!/usr/bin/env python3
"""Mutation testing of `budget_middleware.core`: how many injected bugs do the tests catch?

    .venv/bin/python scripts/mutate.py                       # every module of core/, --min 90
    .venv/bin/python scripts/mutate.py --module core/windows.py --module sse
    .venv/bin/python scripts/mutate.py --list                # the mutants, without running them
    .venv/bin/python scripts/mutate.py --id windows-12 --show  # one mutant, with pytest's output
    .venv/bin/python scripts/mutate.py --module engine/gate.py --tests tests/test_asgi.py
                                                             # a module outside core/, its tests

Each module of `src/budget_middleware/core/` is parsed and every classic mutation point is
listed (the `MUTATIONS` table below). For each mutant the module's tests (`TESTS`) run with
`-x -q -p no:cacheprovider` against the mutated module; a failing, erroring or timed-out run kills
it. The summary gives killed/total per module and overall, every survivor (file:line and the
change) and exits 1 when the share killed is below `--min`.

Nothing in the working tree is ever changed: `src`, `tests` and `examples` are copied to a
temporary directory once (so edits made meanwhile do not mix into a run), and a mutant exists only
in the memory of the process that tests it (an import hook compiles the mutated syntax tree in
place of the module's file). A killed run leaves at most that temporary directory behind.

Speed: the parent imports pytest, its plugins and the heavy libraries once, then forks one child
per mutant (`--jobs`, default 2); a child imports the package from the copy and runs pytest in
process. The PostgreSQL variants of store-backed tests are left out (`BUDGET_TEST_STORES=sqlite`
unless set): the core does not depend on the store. Redis tests run against
`BUDGET_TEST_REDIS_URL` as usual. Hypothesis runs derandomized, without its example database, so
a run is deterministic: the same tree gives the same mutants and the same verdicts.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import importlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import CodeType, FrameType, ModuleType
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "budget_middleware"
SRC = Path("src") / PACKAGE
CORE = SRC / "core"

# The tests that exercise each module, fastest and most direct first (`-x` stops at the first
# failure, so a mutant that the unit tests catch costs a fraction of a second).
TESTS: dict[str, tuple[str, ...]] = {
    "alerts.py": ("tests/test_core_alerts.py",),
    "admission.py": (
        "tests/test_admission.py",
        "tests/test_counters.py",
        "tests/test_guards.py",
        "tests/test_hierarchy.py",
        "tests/test_middleware.py",
    ),
    "durations.py": ("tests/test_durations.py", "tests/test_counters.py", "tests/test_guards.py"),
    "media.py": ("tests/test_media.py",),
    "identity.py": (
        "tests/test_core_identity.py",
        "tests/test_guards.py",
        "tests/test_middleware.py",
        "tests/test_hierarchy.py",
    ),
    "money.py": ("tests/test_pricing.py", "tests/test_guards.py", "tests/test_costs.py"),
    "pricing.py": (
        "tests/test_pricing.py",
        "tests/test_guards.py",
        "tests/test_costs.py",
        "tests/test_litellm_config.py",  # deployments' custom prices (DeploymentPrice)
    ),
    "records.py": ("tests/test_store.py", "tests/test_accounting.py"),
    "routing.py": ("tests/test_core_routing.py", "tests/test_routing.py"),
    "scopes.py": (
        "tests/test_core_scopes.py",
        "tests/test_admission.py",
        "tests/test_model_names.py",
        "tests/test_counters.py",
        "tests/test_guards.py",
        "tests/test_hierarchy.py",
    ),
    "sse.py": (
        "tests/test_sse.py",
        "tests/test_guards.py",
        "tests/test_streaming.py",
        "tests/test_answers.py",
        "tests/test_costs.py",
    ),
    "times.py": ("tests/test_durations.py", "tests/test_counters.py", "tests/test_store.py"),
    "usage.py": (
        "tests/test_usage.py",
        "tests/test_sse.py",
        "tests/test_guards.py",
        "tests/test_pricing.py",
        "tests/test_answers.py",
        "tests/test_costs.py",
    ),
    "windows.py": (
        "tests/test_counters.py",
        "tests/test_admission.py",
        "tests/test_guards.py",
        "tests/test_window_rolls.py",
        "tests/test_window_headers.py",
    ),
}


@dataclass(frozen=True, slots=True)
class Skip:
    """An equivalent mutant: no test can tell it from the original. Matched by the module, the
    text of its source line (so the entry survives edits elsewhere) and the change."""

    module: str
    line: str
    change: str
    reason: str
    previous: str = ""  # the line before, where the line alone is ambiguous


# Kept small and honest: each entry says why the mutant cannot change behaviour.
SKIPS: tuple[Skip, ...] = (
    *(
        Skip(
            "core/media.py",
            'return body.find(MARK) >= 0 or body.find(b"\\\\u") >= 0 or _NUL in body',
            change,
            'may_reference: a body starting with `"type"` or `\\u` is not a JSON object, so'
            " it sends no media whichever way the test at index 0 goes",
        )
        for change in (
            "body.find(MARK) >= 0 -> body.find(MARK) > 0",
            "body.find(b'\\\\u') >= 0 -> body.find(b'\\\\u') > 0",
            "0 -> 1",
        )
    ),
    Skip(
        "core/money.py",
        "_CENT_NANOS = 10_000_000",
        "10000000 -> 10000001",
        "usd_text: a cent is a multiple of $0.0001, written with four decimals either way",
    ),
    Skip(
        "core/money.py",
        "if abs(nanos) >= _CENT_NANOS or nanos % _LAST_DECIMAL_NANOS == 0:",
        "abs(nanos) >= _CENT_NANOS -> abs(nanos) > _CENT_NANOS",
        "usd_text: a cent is a multiple of $0.0001, written with four decimals either way",
    ),
    Skip(
        "core/money.py",
        "if usd <= 0:",
        "usd <= 0 -> usd < 0",
        "at 0 the rounding below gives 0 too: floor(round(0.0, 4) + 0.5) == 0",
    ),
    Skip(
        "core/money.py",
        "if usd >= MAX_CHARGE_NANOS / NANOS_PER_USD:",
        "usd >= MAX_CHARGE_NANOS / NANOS_PER_USD -> usd > MAX_CHARGE_NANOS / NANOS_PER_USD",
        "at exactly $1,000,000 the conversion gives MAX_CHARGE_NANOS too",
    ),
    Skip(
        "core/money.py",
        'return b"%d.%06d" % (whole, part // 1000)',
        "part // 1000 -> part / 1000",
        "usd_header: part is a multiple of 1000 here: the quotient is whole, %d prints it alike",
    ),
    Skip(
        "core/pricing.py",
        "if price.tiers:",
        "if price.tiers: -> if True:",
        "cost_nanos: a fast path; in_force of a price without tiers is that price",
    ),
    Skip(
        "core/pricing.py",
        "if read or write:  # cache reads and writes (most answers have none): priced apart",
        "if read or write: -> if True:",
        "cost_nanos: a fast path; without cache reads and writes the branch adds and takes 0",
    ),
    Skip(
        "core/pricing.py",
        "if read < 0:",
        "read < 0 -> read <= 0",
        "a count of 0 set to 0 is 0",
    ),
    Skip(
        "core/pricing.py",
        "if read < 0:",
        "0 -> 1",
        "counts are whole numbers: below 1 is at most 0, set to 0 alike",
    ),
    Skip(
        "core/pricing.py",
        "if write < 0:",
        "write < 0 -> write <= 0",
        "a count of 0 set to 0 is 0",
    ),
    Skip(
        "core/pricing.py",
        "if write < 0:",
        "0 -> 1",
        "counts are whole numbers: below 1 is at most 0, set to 0 alike",
    ),
    Skip(
        "core/pricing.py",
        "if out < 0:  # conditionals, not max(): this runs on every request",
        "out < 0 -> out <= 0",
        "a count of 0 set to 0 is 0",
    ),
    Skip(
        "core/pricing.py",
        "if out < 0:  # conditionals, not max(): this runs on every request",
        "0 -> 1",
        "counts are whole numbers: below 1 is at most 0, set to 0 alike",
    ),
    Skip(
        "core/pricing.py",
        "if plain < 0:",
        "plain < 0 -> plain <= 0",
        "a count of 0 set to 0 is 0",
    ),
    Skip(
        "core/pricing.py",
        "if plain < 0:",
        "0 -> 1",
        "counts are whole numbers: below 1 is at most 0, set to 0 alike",
    ),
    Skip(
        "core/pricing.py",
        "if input_tokens < 0:",
        "input_tokens < 0 -> input_tokens <= 0",
        "a count of 0 set to 0 is 0",
    ),
    Skip(
        "core/pricing.py",
        "if input_tokens < 0:",
        "0 -> 1",
        "counts are whole numbers: below 1 is at most 0, set to 0 alike",
    ),
    Skip(
        "core/pricing.py",
        "if output_tokens < 0:",
        "output_tokens < 0 -> output_tokens <= 0",
        "a count of 0 set to 0 is 0",
    ),
    Skip(
        "core/pricing.py",
        "if output_tokens < 0:",
        "0 -> 1",
        "counts are whole numbers: below 1 is at most 0, set to 0 alike",
    ),
    Skip(
        "core/pricing.py",
        "usage.cache_write_1h_tokens",
        "if usage.cache_write_1h_tokens or usage.input_audio_tokens or usage.ou...: -> if True:",
        "cost_nanos: a fast path; _other_kinds of a usage without those kinds adds 0",
    ),
    Skip(
        "core/pricing.py",
        "out = rates[6] if spoken and rates[6] > rates[1] else rates[1]",
        "rates[6] > rates[1] -> rates[6] >= rates[1]",
        "estimate_nanos: at equal audio and text output rates either is the same rate",
    ),
    *(
        Skip(
            "core/usage.py",
            "if body.find(_SEARCH_CALL_KEY) < 0:",
            change,
            'json_searches: a body starting with `_search_call"` is not JSON: parsing it fails'
            " and keeps the counts, as returning at once does",
        )
        for change in (
            "body.find(_SEARCH_CALL_KEY) < 0 -> body.find(_SEARCH_CALL_KEY) <= 0",
            "0 -> 1",
        )
    ),
    Skip(
        "core/identity.py",
        "if value is not None and value > choices:",
        "value > choices -> value >= choices",
        "at value == choices the assignment gives choices the value it has",
    ),
    Skip(
        "core/identity.py",
        "if value is not None and (limit is None or value > limit):",
        "value > limit -> value >= limit",
        "at value == limit the assignment gives the limit the value it has",
    ),
    Skip(
        "core/identity.py",
        "if tags:",
        "if tags: -> if True:",
        "TargetResolver: `_no_keys` of no tags is no tags",
        previous="tags += _body_tags(data)",
    ),
    *(
        Skip(
            "core/identity.py",
            "if shaped(tag) is not None or (own_key is not None and own_key in tag):",
            change,
            "_no_keys: the test only decides whether to filter; the filter keeps exactly the"
            " tags that hold no key, so filtering tags that hold none gives them all back",
        )
        for change in (
            "if shaped(tag) is not None or (own_key is not None and own_key in tag): -> if True:",
            "own_key in tag -> own_key not in tag",
        )
    ),
    Skip(
        "core/identity.py",
        "if len(kept) > 1:  # never above the root",
        "len(kept) > 1 -> len(kept) >= 1",
        "plain_path: popping the root's empty segment leaves the same empty path",
    ),
    Skip(
        "core/identity.py",
        "if len(kept) > 1:  # never above the root",
        "1 -> 0",
        "plain_path: popping the root's empty segment leaves the same empty path",
    ),
    Skip(
        "core/admission.py",
        "if limits.soft_budgets:",
        "if limits.soft_budgets: -> if True:",
        "charging an empty tuple changes nothing: the test only skips a call",
    ),
    Skip(
        "core/admission.py",
        "if reservation:",
        "if reservation: -> if True:",
        "a reservation of 0 added to, or taken from, a budget's `reserved` changes nothing",
    ),
    Skip(
        "core/durations.py",
        "return 30 if month in (4, 6, 9, 11) else 31",
        "31 -> 32",
        "only `min(day, days in month)` reads it, and a day is never over 31",
    ),
    Skip(
        "core/durations.py",
        "if now <= anchor:",
        "now <= anchor -> now < anchor",
        "at now == anchor the arithmetic below gives the anchor too (k = 0)",
    ),
    Skip(
        "core/durations.py",
        "while start.day > 28:",
        "start.day > 28 -> start.day >= 28",
        "a series on the 28th never clamps: stepped through, it gives the starts the count gives",
    ),
    Skip(
        "core/durations.py",
        "while start.day > 28:",
        "28 -> 0",
        "stepping through every start gives the starts the count gives, only more slowly",
    ),
    Skip(
        "core/durations.py",
        "_durations: LRUCache[str, Duration] = LRUCache(1024)  # durations written in the store",
        "1024 -> 1025",
        "the cache's size: one entry more changes no answer",
    ),
    Skip(
        "core/durations.py",
        "weeks = (now - _EPOCH_MONDAY).days // 7",
        "(now - _EPOCH_MONDAY).days // 7 -> (now - _EPOCH_MONDAY).days / 7",
        "only `weeks // n * n` reads it: floor(floor(x) / n) == floor(x / n) for n >= 1",
    ),
    Skip(
        "core/identity.py",
        'POST = frozenset(map("".join, itertools.product(*zip("POST", "post", strict=True))))',
        "True -> False",
        "zip's strict check on two strings of 4: the same pairs without it",
    ),
    Skip(
        "core/identity.py",
        "if sized:",
        "if sized: -> if True:",
        "a fast path: with no size field the three lookups below find nothing either",
    ),
    Skip(
        "core/identity.py",
        "if len(text) <= limit and text.isprintable():",
        "if len(text) <= limit and text.isprintable(): -> if False:",
        "a fast path: the general expression below returns the same text",
    ),
    Skip(
        "core/identity.py",
        "if len(text) <= limit and text.isprintable():",
        "len(text) <= limit -> len(text) < limit",
        "a fast path: at len == limit the general expression returns the same text",
    ),
    Skip(
        "core/identity.py",
        "break",
        "break -> continue",
        "_clean_tags: past 32 tags `continue` skips the rest one by one: the same tags, slower",
        previous="if len(cleaned) == MAX_TAGS:",
    ),
    Skip(
        "core/identity.py",
        "if key_tags:",
        "if key_tags: -> if True:",
        "adding an empty tuple of key tags changes nothing",
    ),
    Skip(
        "core/identity.py",
        "if len(tags) > 1:",
        "len(tags) > 1 -> len(tags) >= 1",
        "one tag sorted and deduplicated is itself",
    ),
    Skip("core/identity.py", "if len(tags) > 1:", "1 -> 0", "one tag sorted is itself"),
    Skip(
        "core/identity.py",
        "if len(tags) > MAX_TAGS:",
        "len(tags) > MAX_TAGS -> len(tags) >= MAX_TAGS",
        "at exactly 32 tags the cut to 32 keeps them all",
    ),
    Skip(
        "core/identity.py",
        'first = canonical_provider(route_path.lstrip("/").split("/", 1)[0])',
        "1 -> 2",
        "only the first part is read: one split more leaves it as it is",
    ),
    Skip(
        "core/scopes.py",
        'if j < n and name[j] == "]":',
        "if j < n and name[j] == ']': -> if True:",
        "skipping a character that is no `]` is what the loop below does anyway; past the end, "
        "`j >= n` holds either way",
    ),
    Skip(
        "core/sse.py",
        "if data is not None:",
        "if data is not None: -> if False:",
        "StreamMeter.feed: `whole_data` is a fast path; `decoder.feed` reads the same chunk alike",
    ),
    Skip(
        "core/sse.py",
        "if data:",
        "if data: -> if True:",
        "_emit: appending b'' to what is joined changes nothing",
    ),
    Skip(
        "core/sse.py",
        "return False",
        "return False -> return None",
        "_read, _read_data and _read_chunk are only tested for truth: None is as false",
    ),
    Skip(
        "core/sse.py",
        "if cr < 0 or 0 <= lf < cr:",
        "0 <= lf < cr -> 0 <= lf <= cr",
        "_line_ends: a LF and a CR are never at one position",
    ),
    Skip(
        "core/sse.py",
        "if 0 <= lf < pos:",
        "0 <= lf < pos -> 0 <= lf <= pos",
        "_line_ends: a LF at `pos` is found again by the search from `pos`",
    ),
    Skip(
        "core/routing.py",
        "if left < least:",
        "left < least -> left <= least",
        "room: an equal left is the same least",
    ),
    Skip(
        "core/routing.py",
        "if not most_remaining or len(limits) < 2:",
        "2 -> 0",
        "trial_order: with no candidate or one, ranking by room gives [] or [0] too",
    ),
    Skip(
        "core/usage.py",
        "if type(prompt) is not int or prompt < 0:",
        "if type(prompt) is not int or prompt < 0: -> if True:",
        "a fast path: _count of a non-negative int is that int",
    ),
    Skip(
        "core/usage.py",
        "if type(prompt) is not int or prompt < 0:",
        "prompt < 0 -> prompt <= 0",
        "a fast path: _count(0) is 0 too",
    ),
    Skip(
        "core/usage.py",
        "if type(prompt) is not int or prompt < 0:",
        "0 -> 1",
        "a fast path: _count(0) is 0 too",
    ),
    Skip(
        "core/usage.py",
        "if type(output) is not int or output < 0:",
        "if type(output) is not int or output < 0: -> if True:",
        "a fast path: _count of a non-negative int is that int",
    ),
    Skip(
        "core/usage.py",
        "if type(output) is not int or output < 0:",
        "output < 0 -> output <= 0",
        "a fast path: _count(0) is 0 too",
    ),
    Skip(
        "core/usage.py",
        "if type(output) is not int or output < 0:",
        "0 -> 1",
        "a fast path: _count(0) is 0 too",
    ),
    Skip(
        "core/usage.py",
        "if type(read) is not int or read < 0:",
        "if type(read) is not int or read < 0: -> if True:",
        "a fast path: _count of a non-negative int is that int",
    ),
    Skip(
        "core/usage.py",
        "if type(read) is not int or read < 0:",
        "read < 0 -> read <= 0",
        "a fast path: _count(0) is 0 too",
    ),
    Skip(
        "core/usage.py",
        "if type(read) is not int or read < 0:",
        "0 -> 1",
        "a fast path: _count(0) is 0 too",
    ),
    Skip(
        "core/usage.py",
        "if read > prompt:",
        "read > prompt -> read >= prompt",
        "at read == prompt it is set to what it is",
    ),
    Skip(
        "core/usage.py",
        "if write > prompt - read:",
        "write > prompt - read -> write >= prompt - read",
        "at write == prompt - read it is set to what it is",
    ),
    Skip(
        "core/usage.py",
        "if type(value) is float and math.isfinite(value) and value > 0:",
        "value > 0 -> value >= 0",
        "_count: int(0.0) is the 0 returned below",
    ),
    Skip(
        "core/usage.py",
        "if heard or spoken:"
        "  # OpenAI's audio, within the uncached prompt and the output: 0 or absent",
        "if heard or spoken: -> if True:",
        "a fast path: _count of None or 0 is the 0 the fields hold",
    ),
    Skip(
        "core/usage.py",
        'elif "input_tokens" in usage or "output_tokens" in usage:',
        "if 'input_tokens' in usage or 'output_tokens' in usage: -> if True:",
        "a usage with neither key reads as no counts there: none readable, the same None, or "
        "the same cost alone",
    ),
    Skip(
        "core/windows.py",
        "if ledger.unconfirmed:",
        "if ledger.unconfirmed: -> if True:",
        "a fast path: an empty dict's get gives the same 0",
    ),
    Skip(
        "core/windows.py",
        "elif self.pending and self.pending_start == self.start:",
        "if self.pending and self.pending_start == self.start: -> if True:",
        "configure: with nothing pending, pending_start is never read (a charge sets it first)",
    ),
    Skip(
        "core/windows.py",
        "elif self.pending and self.pending_start == self.start:",
        "self.pending and self.pending_start == self.start -> "
        "self.pending or self.pending_start == self.start",
        "configure: what is pending is the current window's (its start moves only once sealed), "
        "so both differ only with nothing pending, where pending_start is never read",
    ),
    Skip(
        "core/windows.py",
        "if first < self.anchor < last:",
        "first < self.anchor < last -> first <= self.anchor < last",
        "_window_at: an anchor at the window's start is where the window starts anyway",
    ),
    Skip(
        "core/windows.py",
        "if first < self.anchor < last:",
        "first < self.anchor < last -> first < self.anchor <= last",
        "_window_at: the window holds `max(now, anchor)`, so it never ends at the anchor",
    ),
    Skip(
        "core/windows.py",
        "if self.duration is None or self.calendar_aligned or start <= self.anchor:",
        "start <= self.anchor -> start < self.anchor",
        "window_before: at a series' first window (start == anchor) the window just before "
        "is read from the anchor on, so it starts there too",
    ),
    Skip(
        "core/windows.py",
        "self.alert_at = 0",
        "0 -> 1",
        "the alerts look at a budget whose window start is not alert_start (0.0 before their "
        "first look, which sets both), whatever alert_at holds",
    ),
    Skip(
        "core/windows.py",
        "self.alert_start = 0.0",
        "self.alert_start = 0.0 -> pass",
        "read only beside alert_at, which is 0 (every spend looks) until the first look sets both",
    ),
    Skip(
        "core/windows.py",
        "self.alert_start = 0.0",
        "0.0 -> 1.0",
        "read only beside alert_at, which is 0 (every spend looks) until the first look sets both",
    ),
    Skip(
        "core/sse.py",
        "_COLON: Final = 0x3A",
        "58 -> 59",
        "a comment line read as a field has the name '', which no field has: ignored alike",
    ),
    Skip(
        "core/sse.py",
        "_COLON: Final = 0x3A",
        "58 -> 0",
        "a comment line read as a field has the name '', which no field has: ignored alike",
    ),
    Skip(
        "core/sse.py",
        "head: int = 0",
        "0 -> 1",
        "every SSEEvent the decoder makes passes `head`",
    ),
    Skip(
        "core/sse.py",
        "elif cut < len(chunk):",
        "cut < len(chunk) -> cut <= len(chunk)",
        "appending the empty rest changes nothing",
    ),
    Skip(
        "core/sse.py",
        "if not block:",
        "if not block: -> if False:",
        "release: a fast path; with block 0 the general code returns b'' and changes nothing",
    ),
    Skip(
        "core/sse.py",
        "if self._line < len(buf) and buf[self._line] != _COLON:",
        "if self._line < len(buf) and buf[self._line] != _COLON: -> if True:",
        "flush: an empty or comment line read as a field has the name '': ignored alike",
    ),
    Skip(
        "core/sse.py",
        "if 0 <= cr < pos:",
        "0 <= cr < pos -> 0 <= cr <= pos",
        "_line_ends: a CR at `pos` is found again by the search from `pos`",
    ),
    Skip(
        "core/records.py",
        "start_ts: float = 0.0  # window_start as the live counter holds it (epoch seconds)",
        "0.0 -> 1.0",
        "every Delta the package makes passes start_ts; nothing reads it from one made without",
    ),
    Skip(
        "core/usage.py",
        "if 0 < len(value) <= 18 and value.isascii() and value.isdigit():",
        "0 < len(value) <= 18 -> 0 <= len(value) <= 18",
        "quoted_count: an empty text is no count either way (`''.isdigit()` is False)",
    ),
)


# -- mutants ----------------------------------------------------------------------------------

_COMPARE: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
_ARITHMETIC: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
    ast.BitOr: ast.BitAnd,
    ast.BitAnd: ast.BitOr,
    ast.BitXor: ast.BitAnd,
}
_BOOLEAN: dict[type[ast.boolop], type[ast.boolop]] = {ast.And: ast.Or, ast.Or: ast.And}

# What each kind of mutant does, for `--list` and the report.
MUTATIONS = {
    "compare": "a comparison operator changed (< <=, > >=, == !=, is/is not, in/not in)",
    "arith": "an arithmetic operator changed (+ -, * /, // /, % //), also in `x += y`",
    "bool": "`and` and `or` swapped",
    "not": "`not` (or a unary minus) removed",
    "const": "a number n made n + 1 and 0, a boolean flipped",
    "return": "a returned value replaced by None",
    "branch": "an `if` branch dropped (`if False:`); a condition without its own operator "
    "mutants (a name, a call, `and`/`or`) made always true",
    "drop": "a statement with an effect dropped (a call, x += y, an attribute/item set, raise)",
    "loop": "`break` and `continue` swapped",
}


@dataclass(frozen=True, slots=True)
class Mutant:
    """One mutation: the `node`-th node of the module (in `ast.walk` order), changed by `kind`
    (`choice` tells apart the mutants of one node)."""

    module: str  # core/windows.py
    number: int  # 1-based within the module
    line: int
    last: int  # the last line of what the mutation changes (a test that runs none is no judge)
    inside: bool  # in a function's body (else it runs at import, for every test)
    node: int
    kind: str
    choice: int
    before: str
    after: str

    @property
    def id(self) -> str:
        return f"{Path(self.module).stem}-{self.number}"

    @property
    def where(self) -> str:
        return f"{self.module}:{self.line}"

    @property
    def change(self) -> str:
        return f"{self.before} -> {self.after}"


def _short(node: ast.AST) -> str:
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= 70 else text[:67] + "..."


def _excluded(tree: ast.Module) -> set[int]:
    """Ids of nodes that are not behaviour: docstrings, annotations, decorators (dataclass and
    cache options), `__slots__`/`__all__`, `if TYPE_CHECKING` blocks, and dataclass fields'
    `repr=` (display) and `compare=` of a derived (`init=False`) field."""
    skipped: list[ast.AST] = []
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            skipped.append(body[0])
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            skipped.extend(node.decorator_list)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns is not None:
            skipped.append(node.returns)
        if isinstance(node, ast.arg) and node.annotation is not None:
            skipped.append(node.annotation)
        if isinstance(node, ast.AnnAssign):
            skipped.append(node.annotation)
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING"
        ):
            skipped.append(node)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "field":
            # dataclass field options that are display, or the equality of a derived field
            derived = any(
                k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False
                for k in node.keywords
            )
            skipped.extend(
                k.value
                for k in node.keywords
                if k.arg == "repr" or (k.arg == "compare" and derived)
            )
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id in ("__slots__", "__all__") for t in node.targets
        ):
            skipped.append(node)
    return {id(sub) for node in skipped for sub in ast.walk(node)}


def _in_functions(tree: ast.Module) -> set[int]:
    """Ids of the statements inside function bodies (the only ones worth dropping: a module or
    class statement dropped fails at import)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for stmt in node.body:
                inside.update(id(s) for s in ast.walk(stmt) if isinstance(s, ast.stmt))
    return inside


def _in_bodies(tree: ast.Module) -> set[int]:
    """Ids of every node inside a function body (not its decorators, defaults or annotations):
    code that runs when the function is called, not at import."""
    return {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for stmt in (node.body if isinstance(node.body, list) else [node.body])
        for sub in ast.walk(stmt)
    }


def _floors(tree: ast.Module) -> set[int]:
    """Ids of the comparisons of `x if x > 0 else 0` (a floor at 0, written so for speed): made
    `x >= 0` they give 0 at 0 too, an equivalent mutant, so they are not mutated."""
    return {
        id(node.test)
        for node in ast.walk(tree)
        if isinstance(node, ast.IfExp)
        and isinstance(node.test, ast.Compare)
        and len(node.test.ops) == 1
        and isinstance(node.test.ops[0], ast.Gt)
        and isinstance(node.test.comparators[0], ast.Constant)
        and node.test.comparators[0].value == 0
        and isinstance(node.orelse, ast.Constant)
        and node.orelse.value == 0
        and ast.dump(node.body) == ast.dump(node.test.left)
    }


def _droppable(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.Expr):
        return isinstance(stmt.value, ast.Call | ast.Await)
    if isinstance(stmt, ast.Assign):  # a plain `name = value` dropped only fails with NameError
        return any(isinstance(t, ast.Attribute | ast.Subscript) for t in stmt.targets)
    return isinstance(stmt, ast.AugAssign | ast.Raise | ast.Delete)


def _is_format(node: ast.BinOp) -> bool:
    """`"%d" % x`, `b"..." + y`: text, not arithmetic."""
    return any(
        isinstance(side, ast.Constant) and isinstance(side.value, str | bytes)
        for side in (node.left, node.right)
    )


def _candidates(node: ast.AST, in_function: bool) -> Iterator[tuple[str, int, str, str]]:
    """(kind, choice, before, after) of every mutant of one node."""
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            new = _COMPARE.get(type(op))
            if new is not None:
                ops = [*node.ops[:i], new(), *node.ops[i + 1 :]]
                mutated = ast.Compare(left=node.left, ops=ops, comparators=node.comparators)
                yield "compare", i, _short(node), _short(mutated)
    elif isinstance(node, ast.BinOp) and not _is_format(node):
        new_op = _ARITHMETIC.get(type(node.op))
        if new_op is not None:
            yield "arith", 0, _short(node), _short(ast.BinOp(node.left, new_op(), node.right))
    elif isinstance(node, ast.AugAssign):
        new_op = _ARITHMETIC.get(type(node.op))
        if new_op is not None:
            changed = ast.AugAssign(node.target, new_op(), node.value)
            yield "arith", 0, _short(node), _short(changed)
    elif isinstance(node, ast.BoolOp):
        new_bool = _BOOLEAN[type(node.op)]
        yield "bool", 0, _short(node), _short(ast.BoolOp(new_bool(), node.values))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
        if not (isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant)):
            yield "not", 0, _short(node), _short(node.operand)
    elif isinstance(node, ast.Constant) and not isinstance(node.value, str | bytes):
        value = node.value
        if isinstance(value, bool):
            yield "const", 0, repr(value), repr(not value)
        elif isinstance(value, int):
            yield "const", 0, repr(value), repr(value + 1)
            if value != 0:
                yield "const", 1, repr(value), "0"
        elif isinstance(value, float) and value == value and abs(value) != float("inf"):
            yield "const", 0, repr(value), repr(value + 1)
    elif isinstance(node, ast.Return) and node.value is not None:
        if not (isinstance(node.value, ast.Constant) and node.value.value is None):
            yield "return", 0, f"return {_short(node.value)}", "return None"
    elif isinstance(node, ast.If):
        test = f"if {_short(node.test)}:"
        yield "branch", 1, test, "if False:"  # the branch dropped (the `else`, if any, taken)
        if not isinstance(node.test, ast.Compare | ast.UnaryOp):  # those have their own mutants
            yield "branch", 0, test, "if True:"
    if isinstance(node, ast.stmt) and in_function:
        if _droppable(node):
            yield "drop", 9, _short(node), "pass"
        elif isinstance(node, ast.Break):
            yield "loop", 0, "break", "continue"
        elif isinstance(node, ast.Continue):
            yield "loop", 0, "continue", "break"


def _skipped(module: str, lines: Sequence[str], mutant: Mutant) -> bool:
    text = lines[mutant.line - 1].strip()
    before = lines[mutant.line - 2].strip() if mutant.line > 1 else ""
    return any(
        s.module == module
        and s.line == text
        and s.change == mutant.change
        and (not s.previous or s.previous == before)
        for s in SKIPS
    )


def mutants_of(module: str, source: str) -> list[Mutant]:
    """Every mutant of one module's source, in a fixed order (the nodes in `ast.walk` order)."""
    tree = ast.parse(source)
    excluded, in_function, in_body = _excluded(tree), _in_functions(tree), _in_bodies(tree)
    floors = _floors(tree)
    lines = source.splitlines()
    found: list[Mutant] = []
    for index, node in enumerate(ast.walk(tree)):
        if id(node) in excluded or id(node) in floors:
            continue
        for kind, choice, before, after in _candidates(node, id(node) in in_function):
            span = node.test if isinstance(node, ast.If) else node  # an if: its condition
            line, last = getattr(span, "lineno", 0), getattr(span, "end_lineno", 0) or 0
            inside = id(node) in in_body
            mutant = Mutant(module, 0, line, last, inside, index, kind, choice, before, after)
            if not _skipped(module, lines, mutant):
                found.append(mutant)
    found.sort(key=lambda m: (m.line, m.node, m.kind, m.choice))
    return [
        Mutant(module, n, m.line, m.last, m.inside, m.node, m.kind, m.choice, m.before, m.after)
        for n, m in enumerate(found, 1)
    ]


def _replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for name, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, name, new)
                return
            if isinstance(value, list) and any(item is old for item in value):
                value[next(i for i, item in enumerate(value) if item is old)] = new
                return
    raise LookupError("node without a parent")


def mutated_code(source: str, path: str, mutant: Mutant) -> CodeType:
    """The module's code with this one mutation (the tree is parsed afresh each time)."""
    tree = ast.parse(source)
    node = list(ast.walk(tree))[mutant.node]
    kind, choice = mutant.kind, mutant.choice
    if kind == "compare":
        assert isinstance(node, ast.Compare)
        node.ops[choice] = _COMPARE[type(node.ops[choice])]()
    elif kind == "arith":
        assert isinstance(node, ast.BinOp | ast.AugAssign)
        node.op = _ARITHMETIC[type(node.op)]()
    elif kind == "bool":
        assert isinstance(node, ast.BoolOp)
        node.op = _BOOLEAN[type(node.op)]()
    elif kind == "not":
        assert isinstance(node, ast.UnaryOp)
        _replace(tree, node, node.operand)
    elif kind == "const":
        assert isinstance(node, ast.Constant)
        value = node.value
        if isinstance(value, bool):
            node.value = not value
        else:
            assert isinstance(value, int | float)
            node.value = value + 1 if choice == 0 else 0
    elif kind == "return":
        assert isinstance(node, ast.Return)
        node.value = ast.Constant(None)
    elif kind == "branch":
        assert isinstance(node, ast.If)
        node.test = ast.Constant(choice == 0)
    elif kind == "drop":
        _replace(tree, node, ast.Pass())
    elif kind == "loop":
        _replace(tree, node, ast.Continue() if isinstance(node, ast.Break) else ast.Break())
    else:
        raise ValueError(kind)
    ast.fix_missing_locations(tree)
    return compile(tree, path, "exec", dont_inherit=True)


# -- running ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Verdict:
    outcome: str  # killed, timeout, survived, uncovered (no test runs it), error
    seconds: float = 0.0
    code: int = 0
    output: str = ""  # pytest's output, kept only with --show and for the unmutated runs


@dataclass(slots=True)
class Coverage:
    """What a module's unmutated tests run of it: the lines run before the first test (imports,
    collection), the lines each test runs (setup, call and teardown, in any thread) and how long
    each test takes."""

    at_import: frozenset[int]
    by_test: dict[str, frozenset[int]]
    seconds: dict[str, float]

    def tests_for(self, mutant: Mutant) -> frozenset[str] | None:
        """The node ids of the tests that run what the mutant changes; None (every test) when
        the change runs at import, where any test may see it."""
        span = range(mutant.line, mutant.last + 1)
        if not mutant.inside or any(line in self.at_import for line in span):
            return None
        return frozenset(t for t, lines in self.by_test.items() if any(n in lines for n in span))


class _Tracer:
    """Records the lines of one file run, in every thread, into `lines`."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.lines: set[int] = set()

    def calls(self, frame: FrameType, event: str, arg: Any) -> Any:
        """The global trace function: follows the frames of the file only."""
        return self._lines if frame.f_code.co_filename == self.filename else None

    def _lines(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            self.lines.add(frame.f_lineno)
        return self._lines


class _Recorder:
    """pytest plugin of an unmutated run: which lines each test runs, by node id."""

    def __init__(self, tracer: _Tracer) -> None:
        self.tracer = tracer
        self.at_import: set[int] | None = None
        self.by_test: dict[str, list[int]] = {}
        self.seconds: dict[str, float] = {}

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        if self.at_import is None:
            self.at_import = self.tracer.lines
        self.tracer.lines = set()
        started = time.perf_counter()
        try:
            return (yield)
        finally:
            self.seconds[item.nodeid] = time.perf_counter() - started
            self.by_test[item.nodeid] = sorted(self.tracer.lines)

    def save(self, path: Path) -> None:
        at_import = sorted(self.at_import or ())
        data = {"at_import": at_import, "by_test": self.by_test, "seconds": self.seconds}
        path.write_text(json.dumps(data))


def _load_coverage(path: Path) -> Coverage:
    data = json.loads(path.read_text())
    by_test = {test: frozenset(lines) for test, lines in data["by_test"].items()}
    return Coverage(frozenset(data["at_import"]), by_test, data["seconds"])


class _Select:
    """pytest plugin of a mutant's run: only the tests that run the mutated code (all when
    `wanted` is None), fastest first when `seconds` are given (`-x` stops at the first failure)."""

    def __init__(self, wanted: frozenset[str] | None, seconds: dict[str, float] | None) -> None:
        self.wanted, self.seconds = wanted, seconds

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        wanted, seconds = self.wanted, self.seconds
        if wanted is not None:
            items[:] = [item for item in items if item.nodeid in wanted]
        if seconds is not None:
            items.sort(key=lambda item: seconds.get(item.nodeid, 0.0))  # stable


def _copy_tree(into: Path) -> Path:
    """The package, the tests and what they import, copied once (no caches, no mutants)."""
    tree = into / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".hypothesis")
    for name in ("src", "tests", "examples"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def _preload() -> None:
    """Import, once in the parent, what every child needs but no mutant changes: pytest's
    plugins and the libraries the package and the tests use. Never the package itself."""
    for plugin in entry_points(group="pytest11"):
        with contextlib.suppress(Exception):
            plugin.load()
    for name in (
        "hypothesis",
        "sqlalchemy",
        "sqlmodel",
        "pydantic",
        "pydantic_settings",
        "starlette.applications",
        "fastapi",
        "httpx",
        "httpx2",
        "orjson",
        "cachetools",
        "genai_prices",
        "redis",
        "redis.asyncio",
        "psycopg",
        "prometheus_client",
        "yaml",
        "openai",
        "anthropic",
        "jsonschema",
        "uvicorn",
    ):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    import hypothesis

    hypothesis.settings.register_profile(
        "mutate", derandomize=True, database=None, deadline=None, print_blob=False
    )
    # What is loaded now outlives every child: the collector need not scan it (pytest collects
    # twice at the end of a session, 0.3 s with all this loaded).
    gc.freeze()


class _MutantLoader(importlib.machinery.SourceFileLoader):
    """Loads one module from a code object made in memory instead of its file."""

    def __init__(self, fullname: str, path: str, code: CodeType) -> None:
        super().__init__(fullname, path)
        self._code = code

    def get_code(self, fullname: str) -> CodeType:
        return self._code


class _MutantFinder:
    def __init__(self, fullname: str, path: str, code: CodeType) -> None:
        self.fullname, self.path, self.code = fullname, path, code

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.fullname:
            return None
        loader = _MutantLoader(fullname, self.path, self.code)
        return importlib.util.spec_from_file_location(fullname, self.path, loader=loader)


@dataclass(slots=True)
class _Job:
    """One pytest run: a module's tests (`files`, only the `wanted` node ids unless None), with
    the mutant's `code` in place of the module, or unmutated and traced (`coverage` to write)."""

    mutant: Mutant | None
    module: str
    files: tuple[str, ...]
    wanted: frozenset[str] | None
    code: CodeType | None
    timeout: float
    coverage: Path | None = None  # trace the unmutated module, write what each test runs here
    seconds: dict[str, float] | None = None  # run the fastest tests first


def _child(tree: Path, job: _Job, log: Path) -> NoReturn:
    """In the forked child: pytest on the copied tree, with the mutant in place of its module."""
    code = 3
    try:
        os.setpgid(0, 0)  # the parent kills the whole group on a timeout
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(tree)
        sys.path.insert(0, str(tree / "src"))
        path = str(tree / SRC / job.module)
        plugins: list[object] = []
        recorder = None
        if job.code is not None:
            name = _dotted(job.module)
            sys.meta_path.insert(0, _MutantFinder(name, path, job.code))
        if job.wanted is not None or job.seconds is not None:
            plugins.append(_Select(job.wanted, job.seconds))
        if job.coverage is not None:
            tracer = _Tracer(path)
            recorder = _Recorder(tracer)
            plugins.append(recorder)
            threading.settrace(tracer.calls)
            sys.settrace(tracer.calls)
        args = ["-x", "-q", "-p", "no:cacheprovider", "--rootdir", str(tree)]
        args += ["-c", str(tree / "pyproject.toml"), "--basetemp", str(log.with_suffix(".tmp"))]
        # The plugins were imported before pytest started (by the parent): they cannot be
        # rewritten for assertions, which pytest warns about, and the warning is an error here.
        args += ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
        args += ["--hypothesis-profile=mutate", *job.files]
        code = int(pytest.main(args, plugins=plugins))
        sys.settrace(None)
        if recorder is not None and job.coverage is not None:
            recorder.save(job.coverage)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Runner:
    """Runs jobs in forked children, `jobs` at a time, each killed past its timeout."""

    def __init__(self, tree: Path, work: Path, jobs: int, show: bool) -> None:
        self.tree, self.work, self.jobs, self.show = tree, work, jobs, show
        self.running: dict[int, tuple[_Job, int, float]] = {}  # pid: job, slot, start

    def run(self, jobs: Sequence[_Job], done: Callable[[_Job, Verdict], None]) -> None:
        waiting = list(reversed(jobs))
        free = list(reversed(range(self.jobs)))
        try:
            while waiting or self.running:
                while waiting and free:
                    job, slot = waiting.pop(), free.pop()
                    self.running[self._start(job, slot)] = (job, slot, time.monotonic())
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    self._expire(done, free)
                    time.sleep(0.005)
                    continue
                job, slot, started = self.running.pop(pid)
                free.append(slot)
                code = os.waitstatus_to_exitcode(status)
                # pytest: 1 tests failed, 2 interrupted (an error while collecting), 3 internal
                # error, 4 usage error (the conftest failed to import): the mutant broke the tests
                # or the import; 5 (no tests collected) is a fault of this script.
                outcome = "survived" if code == 0 else "error" if code == 5 else "killed"
                seconds = time.monotonic() - started
                done(job, Verdict(outcome, seconds, code, self._output(job, slot)))
        finally:
            for pid in self.running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)

    def _start(self, job: _Job, slot: int) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(self.tree, job, self.log(slot))
        with contextlib.suppress(OSError):  # the child does it too: whichever runs first
            os.setpgid(pid, pid)
        return pid

    def log(self, slot: int) -> Path:
        return self.work / f"slot{slot}.log"

    def _output(self, job: _Job, slot: int) -> str:
        if job.mutant is not None and not self.show:
            return ""
        return self.log(slot).read_text(errors="replace")

    def _expire(self, done: Callable[[_Job, Verdict], None], free: list[int]) -> None:
        now = time.monotonic()
        for pid, (job, slot, started) in list(self.running.items()):
            if now - started > job.timeout:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                del self.running[pid]
                free.append(slot)
                done(job, Verdict("timeout", now - started, -9, self._output(job, slot)))


# -- the command ------------------------------------------------------------------------------


def _dotted(module: str) -> str:
    """`engine/gate.py` -> `budget_middleware.engine.gate`."""
    return ".".join((PACKAGE, *Path(module).with_suffix("").parts))


def _modules(wanted: Sequence[str]) -> list[str]:
    """`core/x.py` names of the modules to mutate: all of core/, or those named (`windows`,
    `windows.py`, `core/windows.py` or its path under src/). A module outside core/ is named by
    its path under `src/budget_middleware/` (`engine/gate.py`, or its whole path); its tests
    come from `TESTS` (keyed by that path) or `--tests`."""
    every = sorted(p.name for p in (ROOT / CORE).glob("*.py") if p.name != "__init__.py")
    if not wanted:
        return [f"core/{name}" for name in every]
    chosen = []
    for text in wanted:
        relative = Path(text.removeprefix(f"{SRC}/"))
        if len(relative.parts) > 1 and relative.parts[0] != "core":
            if relative.suffix != ".py" or not (ROOT / SRC / relative).is_file():
                raise SystemExit(f"mutate: no module {text!r} in {SRC}")
            chosen.append(relative.as_posix())
            continue
        name = Path(text).name
        name = name if name.endswith(".py") else name + ".py"
        if name not in every:
            raise SystemExit(f"mutate: no module {text!r} in {CORE} (have {', '.join(every)})")
        chosen.append(f"core/{name}")
    return sorted(set(chosen))


_EXTRA_TESTS: list[str] = []  # --tests: in place of TESTS, for every module of the run


def _tests_for(module: str) -> tuple[str, ...]:
    if _EXTRA_TESTS:
        return tuple(_EXTRA_TESTS)
    name = module.removeprefix("core/")
    if name not in TESTS:
        raise SystemExit(f"mutate: no tests are mapped to {module}: add it to TESTS")
    return tuple(t for t in TESTS[name] if (ROOT / t).is_file())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--module",
        action="append",
        default=[],
        help="only this module: of core/ (windows), or any under src/budget_middleware/ by its "
        "path there (engine/gate.py)",
    )
    parser.add_argument(
        "--tests",
        action="append",
        default=[],
        help="run these test files (in this order) in place of the module's in TESTS",
    )
    parser.add_argument("--id", action="append", default=[], help="only this mutant (windows-12)")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--show", action="store_true", help="print pytest's output (with --id)")
    parser.add_argument("--min", type=float, default=90.0, help="least %% killed (default 90)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants at once (default 2)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="most seconds a mutant's tests may take (default 60; a timeout kills the mutant); "
        "5x the module's unmutated run, at least 30 s, when that is less",
    )
    args = parser.parse_args(argv)

    missing = [t for t in args.tests if not (ROOT / t).is_file()]
    if missing:
        raise SystemExit(f"mutate: no test file {', '.join(missing)}")
    _EXTRA_TESTS[:] = args.tests
    modules = _modules(args.module)
    sources = {m: (ROOT / SRC / m).read_text() for m in modules}
    mutants = [mutant for m in modules for mutant in mutants_of(m, sources[m])]
    if args.id:
        unknown = set(args.id) - {m.id for m in mutants}
        if unknown:
            raise SystemExit(f"mutate: no mutant {', '.join(sorted(unknown))}")
        mutants = [m for m in mutants if m.id in args.id]
        modules = sorted({m.module for m in mutants})
    if args.list:
        for m in mutants:
            print(f"{m.id:<16} {m.where:<22} {m.kind:<8} {m.change}")
        print(f"{len(mutants)} mutants in {len(modules)} modules")
        return 0

    os.environ.setdefault("BUDGET_TEST_STORES", "sqlite")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bm-mutate-"))

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        tree = _copy_tree(work)
        sources = {m: (tree / SRC / m).read_text() for m in modules}
        if sources != {m: (ROOT / SRC / m).read_text() for m in modules}:
            raise SystemExit("mutate: a module changed while it was copied: run again")
        _preload()
        runner = Runner(tree, work, max(1, args.jobs), args.show)
        return _run(runner, modules, sources, mutants, args, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(
    runner: Runner,
    modules: list[str],
    sources: dict[str, str],
    mutants: list[Mutant],
    args: argparse.Namespace,
    started: float,
) -> int:
    # The unmutated tests first: they must pass; traced, they say which tests run which lines.
    baseline: dict[str, Verdict] = {}
    base_jobs = [
        _Job(None, m, _tests_for(m), None, None, 900.0, runner.work / f"{Path(m).stem}.json")
        for m in modules
    ]
    runner.run(base_jobs, lambda job, verdict: baseline.__setitem__(job.module, verdict))
    broken = [m for m in modules if baseline[m].outcome != "survived"]
    for m in broken:
        tests = " ".join(_tests_for(m))
        print(f"mutate: the tests of {m} fail without a mutant ({tests}, {baseline[m].code}):")
        print(baseline[m].output[-3000:])
    if broken:
        return 2
    coverage = {job.module: _load_coverage(job.coverage) for job in base_jobs if job.coverage}
    # Fastest tests first, if the tests pass in that order too (else in their files' order).
    ordered: dict[str, Verdict] = {}
    order_jobs = [
        _Job(None, m, _tests_for(m), None, None, 900.0, seconds=coverage[m].seconds)
        for m in modules
    ]
    runner.run(order_jobs, lambda job, verdict: ordered.__setitem__(job.module, verdict))
    for m in modules:
        count, seconds = len(coverage[m].by_test), ordered[m].seconds
        print(f"{m}: {count} tests, {seconds:.1f} s unmutated", flush=True)
        if ordered[m].outcome != "survived":
            print("  (they fail when the fastest run first: run in their files' order)")
    print(f"{len(mutants)} mutants in {len(modules)} modules, {runner.jobs} at a time", flush=True)

    verdicts: dict[str, Verdict] = {}
    jobs = []
    for mutant in mutants:
        module = mutant.module
        wanted = coverage[module].tests_for(mutant)
        if wanted is not None and not wanted:
            verdicts[mutant.id] = Verdict("uncovered")
            continue
        files = _tests_for(module)
        if wanted is not None:
            files = tuple(f for f in files if any(t.startswith(f + "::") for t in wanted))
        path = str(runner.tree / SRC / module)
        code = mutated_code(sources[module], path, mutant)
        timeout = min(args.timeout, max(30.0, 5 * ordered[module].seconds))
        fastest = coverage[module].seconds if ordered[module].outcome == "survived" else None
        jobs.append(_Job(mutant, module, files, wanted, code, timeout, seconds=fastest))

    left = {m: sum(1 for mutant in mutants if mutant.module == m) for m in modules}
    for mutant_id in verdicts:  # not covered: decided already
        left[mutant_id_module(mutants, mutant_id)] -= 1

    def done(job: _Job, verdict: Verdict) -> None:
        assert job.mutant is not None
        verdicts[job.mutant.id] = verdict
        if args.show:
            print(f"== {job.mutant.id} {job.mutant.where} {job.mutant.change}: {verdict.outcome}")
            print(verdict.output)
        left[job.module] -= 1
        if not left[job.module]:  # each module's figure as soon as it is known
            mine = [m for m in mutants if m.module == job.module]
            killed = sum(verdicts[m.id].outcome in ("killed", "timeout") for m in mine)
            print(f"  {job.module}: {killed}/{len(mine)} killed", file=sys.stderr, flush=True)
            for m in mine:
                if verdicts[m.id].outcome not in ("killed", "timeout"):
                    print(f"    {m.id:<16} {m.where:<22} {m.change}", file=sys.stderr, flush=True)

    runner.run(jobs, done)
    return _report(modules, mutants, verdicts, args.min, time.monotonic() - started)


def mutant_id_module(mutants: Sequence[Mutant], mutant_id: str) -> str:
    return next(m.module for m in mutants if m.id == mutant_id)


def _report(
    modules: list[str],
    mutants: list[Mutant],
    verdicts: dict[str, Verdict],
    minimum: float,
    seconds: float,
) -> int:
    print(f"\n{'module':<20} {'killed':>7} {'total':>6} {'%':>6}")
    total_killed = 0
    for module in modules:
        mine = [verdicts[m.id] for m in mutants if m.module == module]
        killed = sum(v.outcome in ("killed", "timeout") for v in mine)
        total_killed += killed
        share = 100 * killed / len(mine) if mine else 100.0
        print(f"{module:<20} {killed:>7} {len(mine):>6} {share:>6.1f}")
    share = 100 * total_killed / len(mutants) if mutants else 100.0
    print(f"{'overall':<20} {total_killed:>7} {len(mutants):>6} {share:>6.1f}")
    alive = [m for m in mutants if verdicts[m.id].outcome not in ("killed", "timeout")]
    if alive:
        print(f"\n{len(alive)} survivors:")
        notes = {"uncovered": "  (no test runs it)", "error": "  (pytest found no test)"}
        for m in alive:
            note = notes.get(verdicts[m.id].outcome, "")
            print(f"  {m.id:<16} {m.where:<22} {m.change}{note}")
    timeouts = sum(v.outcome == "timeout" for v in verdicts.values())
    print(f"\n{timeouts} timed out (killed); {seconds:.0f} s in all")
    if share < minimum:
        print(f"mutate: {share:.1f} % killed, below --min {minimum:g}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
