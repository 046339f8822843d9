"""One name per provider (SPEC §4, §6, §13): every provider name, whoever writes it (a request's
`provider/model`, `x-budget-provider`, a path prefix, the pricing catalog, the outbound host
table, the admin API, the config file, the CLI, a route's target, `BUDGET_PROVIDER_HOSTS`), is
read through `canonical_provider`, so a provider's budgets and a key's provider config meet every
request to it, however it was spelled.

The canonical names are the SPEC's: lower case, as LiteLLM and the outbound host table name
providers (`openai`, `anthropic`, `gemini` for the Gemini API at
generativelanguage.googleapis.com, `vertex` for Vertex AI, `bedrock`, `azure`, `xai`). The
genai-prices catalog's ids (`google`, `aws`, `x-ai`) and LiteLLM's (`vertex_ai`, `together_ai`,
`fireworks_ai`, `azure_ai`) are aliases of them.
"""

from __future__ import annotations

PROVIDER_ALIASES: dict[str, str] = {
    # Google: the Gemini API (AI Studio) is `gemini`, as SPEC §13's host table names it; the
    # catalog's `google` (where a bare `gemini-*` model is found) means it too.
    "google": "gemini",
    "google-gla": "gemini",
    "google_ai_studio": "gemini",
    "vertex_ai": "vertex",
    "vertex-ai": "vertex",
    "vertexai": "vertex",
    "google-vertex": "vertex",
    # xAI: `xai` (its host's, LiteLLM's); the catalog says `x-ai`.
    "x-ai": "xai",
    "x.ai": "xai",
    # AWS Bedrock: `bedrock` (its host's, LiteLLM's); the catalog says `aws`.
    "aws": "bedrock",
    "aws-bedrock": "bedrock",
    "aws_bedrock": "bedrock",
    "amazon-bedrock": "bedrock",
    "amazon_bedrock": "bedrock",
    # Azure OpenAI and Azure AI Foundry share the host table's `azure`.
    "azure_ai": "azure",
    "azure-ai": "azure",
    "azure_openai": "azure",
    "azure-openai": "azure",
    "together_ai": "together",
    "together-ai": "together",
    "togetherai": "together",
    "fireworks_ai": "fireworks",
    "fireworks-ai": "fireworks",
    "mistralai": "mistral",
}


# The providers whose own APIs name every model without a `vendor/` prefix: on their hosts a
# route's `openai/gpt-4o` is sent and metered as `gpt-4o` (SPEC §13). Not the gateways and
# hosts whose ids hold one (`openrouter/auto`, `groq/compound`, `meta-llama/...`).
BARE_MODEL_PROVIDERS = frozenset(
    {"openai", "anthropic", "azure", "gemini", "deepseek", "mistral", "xai", "cohere"}
)

# Gemini's resource name of a model, `models/gemini-2.5-flash`: the model `gemini-2.5-flash`
# (Gemini's API reads a bare name so), not a provider named `models`.
RESOURCE_PREFIX = "models"


def canonical_provider(name: str) -> str:
    """The one name of the provider `name` spells: trimmed, lower case, aliases resolved
    (`OpenAI` -> `openai`, `google` -> `gemini`, `x-ai` -> `xai`). Other names are kept,
    trimmed and lower-cased (an OpenAI-compatible gateway's own name)."""
    text = name.strip().lower()
    return PROVIDER_ALIASES.get(text, text)


def stored_provider(name: str) -> str:
    """The provider a name in a path finds: by its one name (`OpenAI` is `openai`), but never
    one with a space or line break at either end, which no provider's name holds (`PUT` refuses
    it): `DELETE /providers/openai%0A` removed `openai`."""
    return canonical_provider(name) if name == name.strip() else name


def owner_name(owner_type: str | None, owner_id: str | None) -> str | None:
    """An owner's id in a filter (`GET /budgets?owner_type=provider&owner_id=OpenAI`), as the
    store keeps it: a provider's by its one name, any other as given."""
    if owner_type == "provider" and owner_id is not None:
        return canonical_provider(owner_id)
    return owner_id
