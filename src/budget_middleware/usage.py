"""Usage extraction: the tokens (and any cost) a response reports (SPEC §7)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TokenUsage:
    """Tokens a response consumed. `cached_tokens` are cache reads, priced on their own."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cost: float | None = None  # `usage.cost` when the upstream reported one (USD)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens
