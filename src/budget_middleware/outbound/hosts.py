"""The provider of a call, from the host it goes to (SPEC §13); `BUDGET_PROVIDER_HOSTS` adds to
or overrides the table (`{"llm.internal.example": "openai", "*.example.ai": "mistral"}`). The
table's providers are their one names (`core/providers.py`); the target resolver reads any
other spelling through `canonical_provider` too."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any

from budget_middleware.core.identity import path_deployment

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
    "codestral.mistral.ai": "mistral",  # Codestral's own endpoint (its own API key)
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
        extra = {_bare(h): p for h, p in extra.items()}
        table = {**PROVIDER_HOSTS, **extra}
        self.exact = {h: p for h, p in table.items() if "*" not in h}
        # The settings' patterns first: one of theirs overrides a broader built-in one
        # (`mistral-*.services.ai.azure.com` over `*.services.ai.azure.com`).
        ordered = {**extra, **table}
        self.patterns = [(re.compile(fnmatch.translate(h)), table[h]) for h in ordered if "*" in h]
        self.found: dict[str, str | None] = {}

    def provider(self, host: str) -> str | None:
        found = self.found.get(host)
        if found is None and host not in self.found:
            name = _bare(host)
            found = self.exact.get(name)
            if found is None:
                found = next((p for rx, p in self.patterns if rx.match(name)), None)
            if len(self.found) < 4096:
                self.found[host] = found
        return found


def _bare(host: str) -> str:
    """A host as the table compares it: lowercased, without the root's dot a fully qualified
    name may end with (`api.openai.com.` is `api.openai.com`, and is sent so by httpx)."""
    return host.lower().rstrip(".")


# APIs that refuse `stream_options` (a stream is then sent as written, not asked for its usage,
# SPEC §7): Mistral's (422, `extra_forbidden`; it reports a stream's usage unasked), and Azure
# OpenAI's api-versions before the field came (400, "Unrecognized request argument supplied").
# Of the providers here, only the calls to these are looked at (one set lookup a call), and the
# calls to a host the table does not name whose path is Azure OpenAI's (`AZURE_PATHS`: API
# Management's `*.azure-api.net` fronting it, as enterprises do; one `startswith` for those).
USAGE_CHECKED = frozenset({"mistral", "azure"})
AZURE_PATHS = "/openai/"
_AZURE_STREAM_OPTIONS_SINCE = "2024-09-01"  # 2024-09-01-preview, 2024-10-21 and later take it


def usage_unasked(provider: str | None, path: str, api_version: str | None, parsed: Any) -> bool:
    """Whether a call to `provider`'s host (one of USAGE_CHECKED, or None: a host the table
    does not name, on an Azure OpenAI path), to `path` with the `api-version` its URL names and
    the body `parsed`, refuses `stream_options`. Azure OpenAI's deployments API
    (`/openai/deployments/…`) by its dated version, compared as text; its v1 API (`/openai/v1/`)
    and Azure's other APIs take the field as they always did. An Azure "On Your Data" call
    (`data_sources` in its body) refuses it on every version (400, "Validation error at
    #/stream_options: Extra inputs are not permitted"), and streams no usage anyway."""
    if provider == "mistral":
        return True
    return (
        api_version is not None
        and path.startswith("/openai/deployments/")
        and api_version < _AZURE_STREAM_OPTIONS_SINCE
    ) or (type(parsed) is dict and "data_sources" in parsed)


def deployment_named(path: str, parsed: Any) -> str | None:
    """The deployment an Azure OpenAI call's path names (`/openai/deployments/<name>/…`) when
    the body's `model` says another, or none (`AzureOpenAI(azure_deployment=...)` sends the
    `model` it is given, which Azure ignores): that deployment is served, and is the model
    (README), whatever the body says, unless no price names it (`TargetResolver.served`)."""
    name = path_deployment(path)
    model = parsed.get("model") if type(parsed) is dict else None
    return name if name is not None and model != name else None
