"""The outbound adapter (SPEC §13): an httpx transport that meters the calls an app makes to
providers (through the OpenAI and Anthropic SDKs), and `charge_to` to say who pays."""

from budget_middleware.outbound.payer import charge_to
from budget_middleware.outbound.transport import BudgetSyncTransport, BudgetTransport

__all__ = ["BudgetSyncTransport", "BudgetTransport", "charge_to"]
