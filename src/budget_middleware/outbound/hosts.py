"""The provider of a call, from the host it goes to (SPEC §13); `BUDGET_PROVIDER_HOSTS` adds to
or overrides the table (`{"llm.internal.example": "openai", "*.example.ai": "mistral"}`). The
table's providers are their one names (`core/providers.py`); the target resolver reads any
other spelling through `canonical_provider` too."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping

PROVIDER_HOSTS: Mapping[str, str] = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "generativelanguage.googleapis.com": "gemini",
    "*.openai.azure.com": "azure",
    "*.services.ai.azure.com": "azure",
    "*.cognitiveservices.azure.com": "azure",  # an AI Foundry resource's Azure OpenAI endpoint
    "*.openai.azure.us": "azure",  # Azure Government
    "*.cognitiveservices.azure.us": "azure",
    "*.openai.azure.cn": "azure",  # Azure China
    "*.cognitiveservices.azure.cn": "azure",
    "bedrock-runtime.*.amazonaws.com": "bedrock",
    "bedrock-runtime-fips.*.amazonaws.com": "bedrock",  # FIPS (US and GovCloud regions)
    "bedrock-mantle.*.api.aws": "bedrock",  # its OpenAI- and Anthropic-compatible APIs
    "*-aiplatform.googleapis.com": "vertex",
    "aiplatform.googleapis.com": "vertex",  # the global endpoint (`locations/global`)
    "api.mistral.ai": "mistral",
    "api.groq.com": "groq",
    "openrouter.ai": "openrouter",
    "api.deepseek.com": "deepseek",
    "api.x.ai": "xai",
    "api.together.xyz": "together",
    "api.fireworks.ai": "fireworks",
    "api.perplexity.ai": "perplexity",
    "api.cohere.com": "cohere",
    "api.cohere.ai": "cohere",
}


class HostTable:
    """Exact hosts by dict lookup, patterns (`*`) in order; what a host leads to is kept."""

    def __init__(self, extra: Mapping[str, str]) -> None:
        table = {**PROVIDER_HOSTS, **{h.lower(): p for h, p in extra.items()}}
        self.exact = {h: p for h, p in table.items() if "*" not in h}
        self.patterns = [
            (re.compile(fnmatch.translate(h)), p) for h, p in table.items() if "*" in h
        ]
        self.found: dict[str, str | None] = {}

    def provider(self, host: str) -> str | None:
        found = self.found.get(host)
        if found is None and host not in self.found:
            found = self.exact.get(host.lower())
            if found is None:
                found = next((p for rx, p in self.patterns if rx.match(host.lower())), None)
            if len(self.found) < 4096:
                self.found[host] = found
        return found


# APIs that refuse `stream_options` (a stream is then sent as written, not asked for its usage,
# SPEC §7): Mistral's (422, `extra_forbidden`; it reports a stream's usage unasked), and Azure
# OpenAI's api-versions before the field came (400, "Unrecognized request argument supplied").
# Of the providers here, only the calls to these are looked at (one set lookup a call).
USAGE_CHECKED = frozenset({"mistral", "azure"})
_AZURE_STREAM_OPTIONS_SINCE = "2024-09-01"  # 2024-09-01-preview, 2024-10-21 and later take it


def usage_unasked(provider: str, path: str, api_version: str | None) -> bool:
    """Whether a call to `provider`'s host (one of USAGE_CHECKED), to `path` with the
    `api-version` its URL names, refuses `stream_options`. Azure OpenAI's deployments API
    (`/openai/deployments/…`) by its dated version, compared as text; its v1 API (`/openai/v1/`)
    and Azure's other APIs take the field as they always did."""
    if provider == "mistral":
        return True
    return (
        api_version is not None
        and path.startswith("/openai/deployments/")
        and api_version < _AZURE_STREAM_OPTIONS_SINCE
    )
