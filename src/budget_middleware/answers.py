"""Every refusal in one shape (SPEC §8): OpenAI's error body, with the limit that refused."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from budget_middleware.core.admission import Refusal, retry_at
from budget_middleware.core.money import MAX_CHARGE_NANOS, usd_text
from budget_middleware.core.scopes import LimitSet

_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_implemented",
    503: "service_unavailable",
}

_OWNER_LABELS = {
    "customer": "Customer",
    "team": "Team",
    "virtual_key": "Virtual key",
    "provider_config": "Provider config",
    "provider": "Provider",
    "model_config": "Model config",
    "tag": "Tag",
}


@dataclass(slots=True, frozen=True)
class ErrorAnswer:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]
    # A 429 no wait can pass (a rate limit of 0): a route takes it as final (SPEC §12).
    never_passes: bool = False


def error_body(
    status: int,
    code: str,
    message: str,
    *,
    error_type: str | None = None,
    param: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The one shape of every error, the middleware's and the admin API's (OpenAI's)."""
    return {
        "error": {
            "message": message,
            "type": error_type or _TYPES.get(status, "invalid_request_error"),
            "code": code,
            "param": param,
            **extra,
        }
    }


def error_answer(
    status: int,
    code: str,
    message: str,
    *,
    error_type: str | None = None,
    scope: dict[str, str] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> ErrorAnswer:
    extra: dict[str, Any] = {} if scope is None else {"scope": scope}
    body = json.dumps(error_body(status, code, message, error_type=error_type, **extra)).encode()
    out = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    return ErrorAnswer(status, body, out + (headers or []))


def unpriced_message(provider: str, model: str) -> str:
    """403 `model_not_priced` (BUDGET_UNPRICED_MODELS=refuse): the model has no known price."""
    return (
        f"Model '{model}' of provider '{provider}' has no known price, and "
        "BUDGET_UNPRICED_MODELS=refuse refuses unpriced models: add it to BUDGET_PRICING_FILE"
    )


# Rate limits counted in windows: a limit of 0 refuses every request, final as an exhausted
# budget is. Its 429 keeps SPEC §8's `Retry-After` (the window's end) and says no retry can
# pass, which the OpenAI and Anthropic SDKs obey before any status, and a route reads (final).
_WINDOWED = {"request_limit_exceeded": "request", "token_limit_exceeded": "token"}
_FINAL = (b"x-should-retry", b"false")
# The longest `Retry-After` an SDK is left to sleep through within one call: OpenAI's own limit
# (it raises at once a 429 that asks for longer). Past it a 429 says `x-should-retry: false` too,
# which both SDKs obey: Anthropic's slept an hourly limit's 3,600 s, twice, before it raised.
LONGEST_SDK_WAIT = 120.0


def _when(ts: float | None) -> str:
    """When the window resets, to the whole second rounded up as `Retry-After` is: a window
    ending midway through a second (a rolling one counts from when its limit was made) has not
    ended at the second before, where a client that came back then was refused again."""
    if ts is None:
        return "never resets"
    return "resets " + datetime.fromtimestamp(math.ceil(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _usd(nanos: int) -> str:
    return usd_text(nanos)


def refusal_answer(
    refusal: Refusal,
    exceeded_status: int,
    now: float | None = None,
    reserved: int = 0,
    limits: LimitSet | None = None,
) -> ErrorAnswer:
    """The answer for a request refused by a limit: names the limit, the amounts, the reset.
    `reserved`: what the request itself would have reserved. `limits`: the request's, whose
    other spent rate windows a rate limit's `Retry-After` waits for too (`retry_at`)."""
    scope = refusal.scope
    owner = f"{_OWNER_LABELS[scope.type]} '{scope.name}'"
    scope_json = {"type": scope.type, "id": scope.id, "name": scope.name}
    code = refusal.code
    final = False  # a retry cannot pass: `x-should-retry: false` beside SPEC §8's Retry-After
    never = False  # no wait passes (a rate limit of 0), not only none an SDK should sleep
    when = _when(refusal.reset_at)
    now = time.time() if now is None else now
    if code == "budget_exceeded":
        message = (
            f"{owner} budget exceeded: {_usd(refusal.used)} spent of {_usd(refusal.limit)} ({when})"
        )
        status = exceeded_status
        return error_answer(
            status,
            code,
            message,
            error_type="budget_exceeded",
            scope=scope_json,
            headers=[_FINAL],
        )
    if code == "budget_reserved":
        if refusal.reserved >= MAX_CHARGE_NANOS:  # all one request can be charged: see gate
            message = (
                f"{owner} budget is held by a request in flight whose cost only its answer "
                "tells (to a model without a price, or with media sent by reference or tools its "
                "provider runs, such as web search, that no answer of its model has measured "
                f"yet): {_usd(refusal.used)} spent of "
                f"{_usd(refusal.limit)}; retry when it finishes"
            )
        elif reserved >= MAX_CHARGE_NANOS:  # this request's own cost only its answer tells
            message = (
                f"{owner} budget is held by requests in flight ({_usd(refusal.used)} spent and "
                f"{_usd(refusal.reserved)} reserved of {_usd(refusal.limit)}), and this request's "
                "cost only its answer tells (to a model without a price, or with media sent by "
                "reference or tools its provider runs, such as web search, that no answer of its "
                "model has measured yet), so it runs alone; "
                "retry when they finish"
            )
        else:
            message = (
                f"{owner} budget is held by requests in flight: {_usd(refusal.used)} spent and "
                f"{_usd(refusal.reserved)} reserved of {_usd(refusal.limit)}; retry when they "
                "finish"
            )
        wait = 1.0
    elif refusal.limit == 0 and code in _WINDOWED:  # no window's end lets one through
        kind = _WINDOWED[code]
        message = (
            f"{owner} {kind} limit of 0 refuses every request (as a $0 budget does); "
            f"raise its {kind}_max_limit to admit any"
        )
        wait = _wait(refusal.reset_at, now)
        final = never = True
    elif code == "request_limit_exceeded":
        message = (
            f"{owner} request limit exceeded: {refusal.used} of {refusal.limit} requests ({when})"
        )
        wait = _wait(refusal.reset_at, now)
    elif code == "token_limit_exceeded":
        message = f"{owner} token limit exceeded: {refusal.used} of {refusal.limit} tokens ({when})"
        wait = _wait(refusal.reset_at, now)
    else:
        message = (
            f"{owner} concurrency limit exceeded: {refusal.used} of {refusal.limit} requests "
            "in flight; retry when one finishes"
        )
        wait = 1.0
    if limits is not None and not final and code != "budget_reserved":
        latest = retry_at(limits, now)
        if latest is not None and latest - now > wait:
            wait = latest - now
    if wait > LONGEST_SDK_WAIT:  # the caller decides when to come back, not its SDK's sleep
        final = True
    retry = [
        (b"retry-after", str(max(math.ceil(wait), 1)).encode()),
        # Rounded up, as Retry-After is: a client that waits it (the OpenAI SDK) finds the
        # window ended, not a fraction of a millisecond before its end.
        (b"retry-after-ms", str(max(math.ceil(wait * 1000), 1)).encode()),
    ]
    if final:
        retry.append(_FINAL)
    answer = error_answer(429, code, message, scope=scope_json, headers=retry)
    return replace(answer, never_passes=True) if never else answer


def _wait(reset_at: float | None, now: float) -> float:
    if reset_at is None:
        return 1.0
    return max(reset_at - now, 0.001)


_RETRY_HEADERS = (b"retry-after", b"retry-after-ms", b"x-should-retry", b"content-length")

# A route's targets the key may not use (SPEC §12: skipped, not tried).
_SKIPPED = frozenset(("provider_not_allowed", "model_not_allowed"))


# Refusals a client may retry (429 with Retry-After); `budget_exceeded` is final, whatever
# status BUDGET_EXCEEDED_STATUS gives it.
_RETRYABLE = frozenset(
    (
        "request_limit_exceeded",
        "token_limit_exceeded",
        "concurrency_limit_exceeded",
        "budget_reserved",
    )
)


def route_refusal_answer(
    tried: list[tuple[str, str, ErrorAnswer]],
) -> tuple[ErrorAnswer, int, dict[str, Any]]:
    """Every target of a route refused (SPEC §12): (target, code, its answer) in route order.
    The answer is the first retryable refusal (a rate limit, a reservation: 429) with the
    shortest `Retry-After` of them (an exhausted budget is not one, even sent as 429; nor is a
    rate limit of 0, which no wait passes; an hourly limit is, though past what an SDK waits:
    its 429 says `x-should-retry: false` when it is the shortest wait), or else the first
    target's, of those the key may use (a target it may not is skipped: its 403 is the answer
    only when the key may use none); its `error.targets` lists each target and its code.
    Returns the answer, the index of the target whose refusal it is, and its `error` object."""
    retryable = [
        answer for _, code, answer in tried if code in _RETRYABLE and not answer.never_passes
    ]
    if retryable:
        chosen = retryable[0]
    else:
        usable = [answer for _, code, answer in tried if code not in _SKIPPED]
        chosen = usable[0] if usable else tried[0][2]
    index = [answer for _, _, answer in tried].index(chosen)
    document = json.loads(chosen.body)
    document["error"]["targets"] = [{"target": target, "code": code} for target, code, _ in tried]
    body = json.dumps(document).encode()
    # A final answer keeps its own; a retryable one takes the shortest wait's, with whether an
    # SDK should wait it (`x-should-retry: false` past LONGEST_SDK_WAIT).
    dropped = _RETRY_HEADERS if retryable else (b"content-length",)
    headers = [h for h in chosen.headers if h[0] not in dropped]
    headers.append((b"content-length", str(len(body)).encode()))
    if retryable:
        waits = [dict(answer.headers) for answer in retryable]
        shortest = min(waits, key=lambda h: int(h[b"retry-after-ms"]))
        headers.append((b"retry-after", shortest[b"retry-after"]))
        headers.append((b"retry-after-ms", shortest[b"retry-after-ms"]))
        if shortest.get(_FINAL[0]) == _FINAL[1]:
            headers.append(_FINAL)
    return ErrorAnswer(chosen.status, body, headers), index, document["error"]


def store_unavailable(unknown_key: bool = False) -> ErrorAnswer:
    """503: the store or Redis cannot decide and the settings fail closed; or (`unknown_key`)
    they fail open, but the store cannot say whether a key this process has never seen is
    valid, and a key nobody vouches for is never admitted."""
    if unknown_key:
        message = (
            "The budget store cannot be reached and this process has not seen this virtual key "
            "yet: it is not admitted (BUDGET_FAIL_OPEN=true admits only keys known valid)"
        )
    else:
        message = (
            "The budget store or Redis cannot be reached, so the request's limits cannot be "
            "checked; it was not sent (BUDGET_FAIL_OPEN=false)"
        )
    return error_answer(503, "service_unavailable", message, headers=[(b"retry-after", b"1")])


def request_too_large(limit: int) -> ErrorAnswer:
    """413: a request body (as sent, or once decoded) over BUDGET_MAX_BODY_BYTES."""
    return error_answer(
        413,
        "request_too_large",
        f"Request body is larger than BUDGET_MAX_BODY_BYTES ({limit} bytes)",
    )
