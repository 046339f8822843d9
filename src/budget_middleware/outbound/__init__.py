"""The outbound adapter (SPEC §13): an httpx transport that meters the calls an app makes to
providers (through the OpenAI and Anthropic SDKs), and `charge_to` to say who pays.

The transports are imported when first named (PEP 562): from then on the middlewares note every
request's caller, which the adapters' own import of `outbound.payer` must not set off."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from budget_middleware.outbound.payer import charge_to

if TYPE_CHECKING:
    from budget_middleware.outbound.transport import BudgetSyncTransport, BudgetTransport

__all__ = ["BudgetSyncTransport", "BudgetTransport", "charge_to"]


def __getattr__(name: str) -> Any:
    if name not in ("BudgetSyncTransport", "BudgetTransport"):
        raise AttributeError(f"module 'budget_middleware.outbound' has no attribute {name!r}")
    value = getattr(importlib.import_module("budget_middleware.outbound.transport"), name)
    globals()[name] = value
    return value
