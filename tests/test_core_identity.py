"""Who is calling, for what (core/identity.py, SPEC §4): headers, provider and model, tags."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest

from budget_middleware.core import identity
from budget_middleware.core.identity import (
    MAX_MODEL_CHARS,
    MAX_PROVIDER_CHARS,
    MAX_TAG_CHARS,
    MAX_TAGS,
    MAX_TAGS_READ,
    Credentials,
    TargetResolver,
    body_encoding,
    clean_text,
    form_fields,
    hash_key,
    header_reader,
    header_text,
    is_inference_path,
    key_digest,
    route_path,
)

read = header_reader("X-Budget-Key", "sk-bm-")


def headers(**named: str) -> list[tuple[bytes, bytes]]:
    return [(name.replace("_", "-").encode(), value.encode()) for name, value in named.items()]


# --- headers ------------------------------------------------------------------------------------


def test_the_key_header_carries_a_key_of_any_value_trimmed() -> None:
    assert read(headers(x_budget_key="  anything  ")).key == "anything"
    # its name is matched whatever the case it was configured in
    assert header_reader("x-budget-key", "sk-bm-")(headers(x_budget_key="k")).key == "k"


def test_a_blank_or_empty_key_header_holds_no_key_and_the_others_are_read() -> None:
    """SPEC §4, first found wins: a header of spaces is an empty field value (RFC 9110 trims
    a field's whitespace), so no key is found in it and the bearer token is (it was refused
    401 `virtual_key_required` where a key is required)."""
    assert read(headers(x_budget_key="   ", authorization="Bearer sk-bm-1")).key == "sk-bm-1"
    assert read(headers(x_budget_key="", authorization="Bearer sk-bm-1")).key == "sk-bm-1"
    assert read(headers(x_budget_key=" \t ", x_api_key="sk-bm-2")).key == "sk-bm-2"
    assert read(headers(x_budget_key="   ")).key is None


def test_a_header_sent_twice_counts_by_its_first_value_as_the_host_app_reads_it() -> None:
    """SPEC §4, first found: Starlette's `request.headers` (and so the app's own check of the
    caller) reads a repeated header's first value; the key charged is that one."""
    from starlette.datastructures import Headers

    for first, second in (("sk-bm-a", "sk-bm-b"), ("sk-bm-b", "sk-bm-a")):
        raw = [
            (b"authorization", f"Bearer {first}".encode()),
            *headers(x_budget_tags="t", authorization=f"Bearer {second}"),
        ]
        assert read(raw).key == first
        assert Headers(raw=raw)["authorization"] == f"Bearer {first}"
    twice = headers(x_budget_key="k1") + headers(x_budget_key="k2")
    assert read(twice).key == "k1"
    assert read(iter(twice)).key == "k1"  # an iterable that cannot be reversed (ASGI allows it)
    assert read(tuple(twice)).key == "k1"  # a sequence of another type, read as it is


def test_a_bearer_token_counts_only_with_the_prefix() -> None:
    assert read(headers(authorization="Bearer sk-bm-abc ")).key == "sk-bm-abc"
    assert read(headers(authorization="bearer sk-bm-abc")).key == "sk-bm-abc"
    assert read(headers(authorization="BEARER sk-bm-abc")).key == "sk-bm-abc"
    assert read(headers(authorization="bEaReR sk-bm-abc")).key == "sk-bm-abc"  # any case
    assert read(headers(authorization="Bearer sk-openai-abc")).key is None
    assert read(headers(authorization="Basic sk-bm-abc")).key is None
    assert read(headers(authorization="Bearer ")).key is None
    assert read(headers(authorization="Bearersk-bm-abc")).key is None


def test_api_key_headers_count_only_with_the_prefix_x_api_key_first() -> None:
    assert read(headers(x_api_key=" sk-bm-a ")).key == "sk-bm-a"
    assert read(headers(x_goog_api_key="sk-bm-g")).key == "sk-bm-g"
    assert read(headers(x_api_key="sk-bm-a", x_goog_api_key="sk-bm-g")).key == "sk-bm-a"
    assert read(headers(x_api_key="other", x_goog_api_key="sk-bm-g")).key == "sk-bm-g"
    assert read(headers(x_api_key="", x_goog_api_key="sk-bm-g")).key == "sk-bm-g"
    assert read(headers(x_api_key="other")).key is None
    # a bearer token without the prefix leaves the API-key headers their chance
    assert read(headers(authorization="Bearer upstream", x_api_key="sk-bm-a")).key == "sk-bm-a"
    # a bearer token with it wins over them
    assert read(headers(authorization="Bearer sk-bm-b", x_api_key="sk-bm-a")).key == "sk-bm-b"


def test_without_a_prefix_every_bearer_and_api_key_counts() -> None:
    plain = header_reader("x-budget-key", "")
    assert plain(headers(authorization="Bearer upstream")).key == "upstream"
    assert plain(headers(x_api_key="any")).key == "any"
    # a blank bearer token is none: the API-key headers still count
    assert plain(headers(authorization="Bearer  ", x_api_key="any")).key == "any"
    assert plain(headers()).key is None


def test_provider_tags_and_length_headers() -> None:
    found = read(
        headers(
            x_budget_provider=" openai ",
            x_budget_tags=" a , b,,c ",
            content_length="42",
        )
    )
    assert found == Credentials(None, "openai", ("a", "b", "c"), 42)
    assert read(headers(x_budget_provider="   ")).provider is None
    assert read(headers(content_length="forty")).content_length is None
    assert read(headers()) == Credentials(None, None, (), None)
    assert read(headers(x_budget_tags="")).tags == ()


def test_the_body_coding_and_the_answer_codings_asked_for_are_read() -> None:
    """content-encoding names the body's coding (None for identity); an accept-encoding naming
    a coding whose answer cannot be read (br) is narrowed to the readable ones, the usual
    `gzip, deflate` and one naming only readable codings go as sent (None)."""
    assert read(headers(content_encoding=" GZip ")).content_encoding == "gzip"
    assert read(headers(content_encoding="identity")).content_encoding is None
    narrowed = read(headers(accept_encoding="br, gzip;q=0.8")).accept_encoding
    print(f"accept-encoding 'br, gzip;q=0.8' goes on as {narrowed!r}")
    assert narrowed == "gzip;q=0.8"
    assert read(headers(accept_encoding="zstd")).accept_encoding == "identity"
    assert read(headers(accept_encoding="gzip, deflate")).accept_encoding is None
    assert read(headers(accept_encoding="gzip")).accept_encoding is None
    assert read(headers()).accept_encoding is None


def test_header_tags_are_cut_cleaned_and_at_most_32() -> None:
    """At most 256 are read, of which a request keeps 32 (those with limits first)."""
    many = ",".join(f"t{n}" for n in range(300))
    tags = read(headers(x_budget_tags=many)).tags
    assert tags == tuple(f"t{n}" for n in range(MAX_TAGS_READ))
    assert len(resolver()({"model": "m"}, "/v1/x", Credentials(tags=tags), ()).tags) == MAX_TAGS
    long = "x" * (MAX_TAG_CHARS + 5)
    assert read(headers(x_budget_tags=f"{long},ok")).tags == ("x" * MAX_TAG_CHARS, "ok")
    assert read(headers(x_budget_tags="a\x01b")).tags == ("a?b",)
    # an empty one takes no place among the 32
    spaced = ",".join(["", *[f"t{n}" for n in range(31)], "last"])
    assert read(headers(x_budget_tags=spaced)).tags == (*[f"t{n}" for n in range(31)], "last")


def test_keys_are_indexed_and_stored_by_their_sha256() -> None:
    assert key_digest("sk-bm-1") == hashlib.sha256(b"sk-bm-1").digest()
    assert hash_key("sk-bm-1") == hashlib.sha256(b"sk-bm-1").hexdigest()


# --- client text --------------------------------------------------------------------------------


def test_a_key_known_by_its_digest_alone_is_kept_out_of_the_model_wherever_it_stands() -> None:
    """A call charged to a key named by its id: the transport knows the key's digest, not its
    value. A generated key in the model is `unknown` wherever it stands (a review found
    `gpt-4o-<key>` and `<key>-v2` kept whole: the shape's word boundary, and a match running
    past the key); another key, or text that only looks like one, is kept."""
    import secrets

    from budget_middleware.core.identity import GENERATED_KEY_CHARS, KEY_BYTES

    value = "sk-bm-" + secrets.token_urlsafe(KEY_BYTES)
    other = "sk-bm-" + secrets.token_urlsafe(KEY_BYTES)
    assert len(value) == len("sk-bm-") + GENERATED_KEY_CHARS
    resolve = TargetResolver(lambda model: None, "sk-bm-")
    seen = {}
    for model in (value, f"{value}/gpt-4o", f"gpt-4o-{value}", f"{value}-v2", f"x sk-bm- {value}",
                  other, "gpt-4o"):  # fmt: skip
        credentials = Credentials(None, None, (), 10)
        credentials.key_digest = key_digest(value)
        target = resolve({"model": model}, "/v1/chat/completions", credentials, ())
        seen[model] = (target.provider, target.model)
    print(seen)
    assert all("unknown" in seen[m] and value not in "".join(seen[m]) for m in list(seen)[:5])
    assert seen[other][1] == other and seen["gpt-4o"] == ("unknown", "gpt-4o")


def test_clean_text_bounds_and_replaces_unprintable_characters() -> None:
    assert clean_text("gpt-4o", 10) == "gpt-4o"
    assert clean_text("abcdef", 6) == "abcdef"
    assert clean_text("abcdefg", 6) == "abcdef"
    assert clean_text("a\x00b\nc", 10) == "a?b?c"
    assert clean_text("a\x00bcdef", 3) == "a?b"
    assert clean_text("", 3) == ""
    # Only what a tag or provider name set by the admin side may not hold is replaced, and what
    # no store takes (a lone surrogate): a no-break space or an emoji's joiner stays.
    assert clean_text("team\u00a0a", 10) == "team\u00a0a"
    assert clean_text("👩\u200d💻", 3) == "👩\u200d💻"
    assert clean_text("x\u2028y\u2029\ud800\x85\x7f", 10) == "x?y????"
    assert clean_text("a\u00a0\x00b", 3) == "a\u00a0?"
    # The bidi embeddings, overrides and isolates, which reorder what is shown around them.
    assert clean_text("alice\u202egnp.exe\u2066\u2069", 20) == "alice?gnp.exe??"


def test_a_name_the_admin_side_takes_is_one_a_request_can_carry() -> None:
    assert identity.name_problem("tag", "a" * MAX_TAG_CHARS, MAX_TAG_CHARS) is None
    assert identity.name_problem("tag", "team\u00a0a 👩\u200d💻", MAX_TAG_CHARS) is None
    too_long = identity.name_problem("tag", "a" * (MAX_TAG_CHARS + 1), MAX_TAG_CHARS)
    assert too_long == f"a tag name has 1 to {MAX_TAG_CHARS} characters"
    assert identity.name_problem("provider", "", 5) == "a provider name has 1 to 5 characters"
    assert identity.name_problem("tag", " a", 5) == "a tag name has no space at either end: ' a'"
    assert identity.name_problem("tag", "a ", 5) is not None
    for control in ("\n", "\x00", "\x7f", "\x85", "\u2028"):
        problem = identity.name_problem("tag", f"a{control}b", 5)
        assert problem is not None and problem.startswith("a tag name has no control character")
    # A tag's or a provider's (the default) says why a request could not carry it; a name no
    # request carries (a customer's) only what it may not hold.
    assert identity.name_problem("tag", "a\nb", 5) == (
        "a tag name has no control character or line break: 'a\\nb' (a request's tag is read "
        "with '?' for it)"
    )
    assert identity.name_problem("customer", "a\nb", 5, carried=False) == (
        "a customer name has no control character or line break: 'a\\nb'"
    )


def test_a_name_in_a_header_is_read_as_utf_8_else_latin_1() -> None:
    assert header_text("café 👩\u200d💻".encode()) == "café 👩\u200d💻"
    assert header_text(b"caf\xe9") == "café"  # no UTF-8: latin-1, as Starlette reads it
    assert header_text(b"plain") == "plain"


# --- provider and model -------------------------------------------------------------------------


def resolver(guesses: dict[str, str] | None = None) -> TargetResolver:
    table = guesses or {}
    return TargetResolver(table.get)


def target(body: Any, path: str = "/v1/chat/completions", **creds: Any) -> identity.Target:
    return resolver({"gpt-4o": "openai"})(body, path, Credentials(**creds), ())


def test_a_qualified_model_names_its_provider() -> None:
    found = target({"model": " mistral/mistral-large "})
    assert (found.provider, found.model) == ("mistral", "mistral-large")
    # only the first slash splits
    found = target({"model": "openrouter/meta/llama"})
    assert (found.provider, found.model) == ("openrouter", "meta/llama")
    # an empty half is no provider: the model is taken whole
    assert (target({"model": "/gpt-4o"}).provider, target({"model": "/gpt-4o"}).model) == (
        "unknown",
        "/gpt-4o",
    )
    assert target({"model": "gpt-4o/"}).model == "gpt-4o/"


def test_the_provider_comes_from_the_model_then_header_then_path_then_catalog() -> None:
    assert target({"model": "groq/llama"}, provider="azure").provider == "groq"
    assert target({"model": "gpt-4o"}, provider="azure").provider == "azure"
    assert target({"model": "gpt-4o"}, "/mistral/v1/chat/completions").provider == "mistral"
    assert target({"model": "gpt-4o"}, "mistral/v1/x").provider == "mistral"
    assert target({"model": "gpt-4o"}, "/v1/chat/completions").provider == "openai"
    assert target({"model": "no-such"}, "/v1/chat/completions").provider == "unknown"
    assert target({"model": "no-such"}, "/nowhere/v1/chat").provider == "unknown"
    assert target({"model": "no-such"}, "/v1/messages").provider == "anthropic"
    assert target({"model": "gpt-4o"}, "/v1/messages").provider == "openai"
    assert target({"model": "no-such"}, "/v1/messages/count").provider == "unknown"


def test_the_catalog_is_asked_only_about_a_model_and_only_once_per_route() -> None:
    asked: list[str] = []

    def guess(model: str) -> str | None:
        asked.append(model)
        return "openai" if model == "gpt-4o" else None

    resolve = TargetResolver(guess)
    assert resolve({}, "/v1/chat/completions", Credentials(), ()).model == "unknown"
    assert asked == []
    for _ in range(3):
        assert resolve({"model": "gpt-4o"}, "/v1/x", Credentials(), ()).provider == "openai"
    assert asked == ["gpt-4o"]


def test_a_missing_or_odd_body_gives_unknown_provider_and_model() -> None:
    for body in (None, [], "text", {"model": 42}, {"model": ""}, {"model": "   "}):
        found = target(body)
        assert (found.provider, found.model) == ("unknown", "unknown")
        assert found.tags == ()
        assert found.stream is False
        assert found.max_output_tokens is None


def test_provider_and_model_are_bounded_and_cleaned() -> None:
    # the store's column sizes: 100 characters for a provider, 200 for a model, 100 for a tag
    assert (MAX_PROVIDER_CHARS, MAX_MODEL_CHARS, MAX_TAG_CHARS, MAX_TAGS) == (100, 200, 100, 32)
    found = target({"model": "p" * 150 + "/" + "m" * 250})
    assert found.provider == "p" * 100
    assert found.model == "m" * 200
    found = target({"model": "open\x00ai/gpt\n4o"})
    assert (found.provider, found.model) == ("open?ai", "gpt?4o")


def test_routes_are_remembered_bounded_and_never_for_huge_names() -> None:
    resolve = resolver()
    huge = "m" * (MAX_MODEL_CHARS + 1)
    resolve({"model": huge}, "/v1/x", Credentials(), ())
    assert resolve._routes == {}
    exact = "m" * MAX_MODEL_CHARS
    resolve({"model": exact}, "/v1/x", Credentials(), ())
    assert list(resolve._routes) == [(exact, None, "/v1/x")]
    for n in range(4095):
        resolve({"model": f"m{n}"}, "/v1/x", Credentials(), ())
    assert len(resolve._routes) == 4096
    resolve({"model": "one-more"}, "/v1/x", Credentials(), ())
    assert list(resolve._routes) == [("one-more", None, "/v1/x")]


def test_a_huge_provider_header_or_path_is_worked_out_not_remembered() -> None:
    resolve = resolver()
    edge = "p" * MAX_PROVIDER_CHARS
    path = "/" + "v" * 255  # 256 characters: the longest path remembered
    for where in ((edge, "/v1/x"), ("p", path), (edge + "p", "/v1/x"), ("p", path + "v")):
        found = resolve({"model": "m"}, where[1], Credentials(provider=where[0]), ())
        assert found.model == "m"
    print(list(resolve._routes))
    assert list(resolve._routes) == [("m", edge, "/v1/x"), ("m", "p", path)]


def test_a_virtual_key_sent_as_a_name_is_kept_out_of_the_target() -> None:
    own = "sk-bm-mine"
    shaped = "sk-bm-" + "A" * 40
    resolve = TargetResolver({}.get, "sk-bm-")
    creds = Credentials(provider="openai", tags=(f"x{own}", shaped + "!", "ok", "sk-bm-short"))
    body = {"model": f"gpt-{own}", "metadata": {"tags": ["also-ok", own]}}
    found = resolve(body, "/v1/x", creds, ("key-tag",), own)
    assert (found.provider, found.model) == ("openai", "unknown")
    assert found.tags == ("also-ok", "key-tag", "ok", "sk-bm-short")
    # the caller's key as the provider: that one is unknown, the model kept
    found = resolve({"model": "gpt-4o"}, "/v1/x", Credentials(provider=own), (), own)
    assert (found.provider, found.model) == ("unknown", "gpt-4o")
    # a key in mixed case, as generated ones are: a provider is named in lower case, so the
    # key was not found in it, and reached records and messages lowered
    mixed = "sk-bm-MiXed_Case-" + "Q" * 30
    for creds, model in (
        (Credentials(provider=mixed), "gpt-4o"),
        (Credentials(), f"{mixed}/gpt-4o"),
    ):
        found = TargetResolver({}.get, "sk-bm-")({"model": model}, "/v1/x", creds, (), mixed)
        assert (found.provider, found.model) == ("unknown", "gpt-4o"), found
    # no key (an anonymous request): only a key's shape is told, never a model
    found = resolve({"model": own}, "/v1/x", Credentials(tags=(own, shaped)), ())
    assert (found.model, found.tags) == (own, (own,))
    # no prefix: nothing is shaped as a key
    assert TargetResolver({}.get)({}, "/v1/x", Credentials(tags=(shaped,)), ()).tags == (shaped,)


# --- tags, stream, output limit -----------------------------------------------------------------


def test_tags_from_header_key_and_body_are_merged_sorted_and_unique() -> None:
    body = {"model": "gpt-4o", "metadata": {"tags": ["b", " a ", 3, "", "z"]}}
    creds = Credentials(tags=("z", "h"))
    found = resolver()(body, "/v1/x", creds, ("k", "a"))
    assert found.tags == ("a", "b", "h", "k", "z")
    # two are sorted and deduplicated too
    assert resolver()({}, "/v1/x", Credentials(tags=("b", "a")), ()).tags == ("a", "b")
    assert resolver()({}, "/v1/x", Credentials(tags=("a",)), ("a",)).tags == ("a",)
    # one tag is kept as it is
    assert resolver()({"model": "m"}, "/v1/x", Credentials(tags=("solo",)), ()).tags == ("solo",)
    assert resolver()({"model": "m"}, "/v1/x", Credentials(), ("key",)).tags == ("key",)


def test_body_tags_need_a_metadata_object_with_a_list() -> None:
    for metadata in (None, "tags", ["a"], {"tags": "a,b"}, {"tags": {"a": 1}}, {}):
        assert target({"model": "m", "metadata": metadata}).tags == ()
    assert target({"model": "m", "metadata": {"tags": ["x", "y"]}}).tags == ("x", "y")


def test_merged_tags_are_at_most_32() -> None:
    body = {"metadata": {"tags": [f"b{n:02}" for n in range(20)]}}
    creds = Credentials(tags=tuple(f"h{n:02}" for n in range(20)))
    found = resolver()(body, "/v1/x", creds, ())
    assert len(found.tags) == MAX_TAGS
    assert found.tags == tuple(sorted(found.tags))
    assert found.tags[0] == "b00"
    assert found.tags[-1] == "h11"


def test_the_tags_with_limits_are_asked_for_only_past_32_or_256_tags() -> None:
    """`limited_tags` (the configuration's, in the engine) is asked for by a request with more
    tags than it keeps or reads, not by one with a few: three tags ask for it 0 times; 257 in
    the header keep the last one, which has limits."""
    asked: list[int] = []

    def limited() -> frozenset[str]:
        asked.append(1)
        return frozenset({"capped"})

    resolve = TargetResolver({}.get, limited_tags=limited)
    few = resolve({"model": "m"}, "/v1/x", read(headers(x_budget_tags="a,b,c")), ())
    print(f"3 tags: limited_tags asked {len(asked)} times")
    assert few.tags == ("a", "b", "c") and asked == []
    many = read(headers(x_budget_tags=",".join([*(f"t{n}" for n in range(256)), "capped"])))
    found = resolve({"model": "m"}, "/v1/x", many, ())
    assert "capped" in found.tags and len(found.tags) == MAX_TAGS and asked


def test_a_key_s_own_tags_are_kept_whatever_a_client_adds() -> None:
    """The key's tags are its operator's: their limits apply however many a client sends
    (32 client tags that sort first used to push `product:chat` out, and its $0 budget)."""
    creds = Credentials(tags=tuple(f"a{n:02}" for n in range(32)))
    body = {"metadata": {"tags": [f"b{n:02}" for n in range(5)]}}
    found = resolver()(body, "/v1/x", creds, ("product:chat", "team:x"))
    print(found.tags)
    assert len(found.tags) == MAX_TAGS and found.tags == tuple(sorted(found.tags))
    assert {"product:chat", "team:x"} <= set(found.tags)
    assert found.tags[:30] == tuple(f"a{n:02}" for n in range(30))  # then the client's, in order


def test_stream_when_true_as_the_app_reads_it_and_the_output_limit_a_non_negative_count() -> None:
    assert target({"stream": True}).stream is True
    # As a lax reader (FastAPI's pydantic, vLLM's) reads it: the stream the upstream then gets
    assert target({"stream": 1}).stream is True
    assert target({"stream": "true"}).stream is True
    assert target({"stream": "True", "n": 2}).stream is True
    for no in (False, None, 0, 2, "false", "0", "x", [], {}):
        assert target({"stream": no}).stream is False
        assert target({"stream": no, "n": 2}).stream is False
    assert target({}).stream is False
    assert target({"max_tokens": 0}).max_output_tokens == 0
    assert target({"max_tokens": 7}).max_output_tokens == 7
    assert target({"max_tokens": -1}).max_output_tokens is None
    assert target({"max_tokens": True}).max_output_tokens is None
    # As a lax reader (FastAPI's pydantic) reads it, rounded up: what the upstream then gets
    assert target({"max_tokens": 7.0}).max_output_tokens == 7
    assert target({"max_tokens": " 7 "}).max_output_tokens == 7
    assert target({"max_tokens": "7.0"}).max_output_tokens == 7
    assert target({"max_tokens": 6.5}).max_output_tokens == 7
    assert target({"max_tokens": "seven"}).max_output_tokens is None
    assert target({"max_tokens": float("inf")}).max_output_tokens is None
    assert target({"max_tokens": "-7"}).max_output_tokens is None
    assert target({"max_output_tokens": 9}).max_output_tokens == 9
    # Several limits: the largest (upstreams differ in which one they obey)
    assert target({"max_completion_tokens": 5, "max_tokens": 7}).max_output_tokens == 7
    assert target({"max_completion_tokens": 7, "max_tokens": 5}).max_output_tokens == 7
    assert target({"max_completion_tokens": -5, "max_tokens": 7}).max_output_tokens == 7


def test_an_images_api_request_is_limited_to_its_images_most_tokens_n_of_them() -> None:
    """The Images API (`/v1/images/generations`, `/v1/images/edits`) has no output limit, and
    its `prompt` is one text: each of its `n` images is billed by its size and quality (OpenAI's
    tables: 6,240 a 1024x1536 image of gpt-image-1 at high quality), its partial images 100
    each, whatever an output limit in the body says. A legacy completion's `prompt` is a batch
    still. (Without this, gpt-image-1 was reserved the default 1,024 of each.)"""
    asked = {"model": "gpt-image-1", "prompt": "a cat", "size": "1024x1536", "quality": "high"}
    for path in (
        "/v1/images/generations",
        "/v1/images/edits",
        "/openai/deployments/gpt-image-1/images/edits",  # (the deployment is the model)
    ):
        found = target({**asked, "n": 2}, path)
        print(path, found.max_output_tokens, found.choices)
        assert (found.max_output_tokens, found.choices) == (6240, 2)
    low = target({**asked, "quality": "low", "partial_images": 2}, "/v1/images/generations")
    assert (low.max_output_tokens, low.choices) == (408 + 200, 1)
    auto = target({"model": "gpt-image-1", "prompt": "a cat", "size": "auto"}, "/v1/images/edits")
    assert auto.max_output_tokens == 6240  # the largest
    limited = target({**asked, "max_tokens": 10}, "/v1/images/generations")
    assert limited.max_output_tokens == 6240  # no output limit bounds an image
    assert target({**asked, "max_tokens": 9000}, "/v1/images/generations").max_output_tokens == 9000
    batch = target({"model": "gpt-4o", "prompt": ["a", "b"]}, "/v1/completions")
    assert (batch.max_output_tokens, batch.choices) == (None, 2)


def test_the_choices_billed_are_the_larger_of_n_and_best_of_at_least_one() -> None:
    assert target({}).choices == 1
    assert target({"n": 1}).choices == 1
    assert target({"n": 5}).choices == 5
    assert target({"n": 2, "best_of": 3}).choices == 3
    assert target({"n": 4, "best_of": 3}).choices == 4
    assert target({"n": 0}).choices == 1  # a provider refuses it: one at most is made
    assert target({"n": True}).choices == 1 and target({"n": "x"}).choices == 1
    assert target({"n": "5"}).choices == 5 and target({"n": 5.0}).choices == 5
    # A legacy completion's batch of prompts: each completed (n times) and billed
    assert target({"prompt": ["a", "b", "c"], "n": 2}).choices == 6
    assert target({"prompt": [[1, 2], [3]]}).choices == 2
    assert target({"prompt": [1, 2, 3]}).choices == 1  # token ids: one prompt
    assert target({"prompt": "abc"}).choices == 1 and target({"prompt": []}).choices == 1
    assert target({"prompt": {"id": "pmpt_1"}}).choices == 1  # the Responses API's template


def test_the_service_tier_asked_for_is_a_name_of_at_most_32_characters() -> None:
    assert target({"service_tier": "priority"}).service_tier == "priority"
    assert target({"service_tier": "flex", "max_tokens": 7}).service_tier == "flex"
    assert target({"service_tier": 1}).service_tier is None
    assert target({"service_tier": "x" * 33}).service_tier is None
    assert target({"max_tokens": 7}).service_tier is None


def test_an_inference_path_is_metered_with_slashes_after_it_and_nothing_else() -> None:
    paths = ("/chat/completions", "/embeddings")
    assert is_inference_path("/v1/chat/completions", paths)
    assert is_inference_path("/v1/chat/completions/", paths)
    assert is_inference_path("/v1/embeddings///", paths)
    assert not is_inference_path("/v1/chat/completions/x", paths)
    # dot segments, as a URL library removes them before sending the request on
    assert is_inference_path("/v1/chat/completions/.", paths)
    assert is_inference_path("/v1/chat/completions/x/..", paths)
    assert is_inference_path("/v1/chat/completions/./", paths)
    assert not is_inference_path("/v1/chat/completions/..", paths)
    assert is_inference_path("/v1/chat/completions//..", paths)  # httpx sends .../completions
    assert not is_inference_path("/..", paths) and not is_inference_path("/./", paths)
    assert not is_inference_path("/.well-known/x", paths)
    assert not is_inference_path("/embeddings/..", paths)  # up to the root, not the path
    assert not is_inference_path("/v1/chat", paths) and not is_inference_path("/", paths)
    assert not is_inference_path("", paths) and not is_inference_path("/v1/chat/completions", ())


def test_a_content_encoding_header_names_its_codings_or_none() -> None:
    assert body_encoding(" GZip ") == "gzip"
    assert body_encoding("identity") is None and body_encoding("  ") is None
    assert body_encoding("deflate, gzip") == "deflate, gzip"


# --- the mount point ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "root", "seen"),
    [
        ("/api/v1/chat", "/api", "/v1/chat"),
        ("/api", "/api", "/"),
        ("/v1/chat", "/api", "/v1/chat"),
        ("/v1/chat", "", "/v1/chat"),
    ],
)
def test_the_route_path_is_the_path_below_the_mount_point(path: str, root: str, seen: str) -> None:
    assert route_path({"path": path, "root_path": root}) == seen
    assert route_path({"path": path}) == path


def test_a_request_sent_on_to_another_model_keeps_its_tags_stream_and_limit() -> None:
    resolve = resolver({"gpt-4o": "openai"})
    first = resolve(
        {"model": "gpt-4o", "stream": True, "max_tokens": 9, "metadata": {"tags": ["t"]}},
        "/v1/chat/completions",
        Credentials(),
        (),
    )
    moved = resolve.retarget(first, "azure/gpt-4o", Credentials(), "/v1/chat/completions")
    assert (moved.provider, moved.model) == ("azure", "gpt-4o")
    assert (moved.tags, moved.stream, moved.max_output_tokens) == (("t",), True, 9)
    bare = resolve.retarget(first, "gpt-4o", Credentials(), "/v1/chat/completions")
    assert (bare.provider, bare.model) == ("openai", "gpt-4o")
    unknown = resolve.retarget(first, "claude-x", Credentials(), "/v1/messages")
    assert (unknown.provider, unknown.model) == ("anthropic", "claude-x")
    header = resolve.retarget(first, "m", Credentials(provider="groq"), "/v1/chat/completions")
    assert (header.provider, header.model) == ("groq", "m")


def test_a_host_s_provider_wins_and_keeps_the_model_whole() -> None:
    """The outbound transport's case (SPEC §13): OpenRouter's `anthropic/claude-sonnet-4` is
    OpenRouter's model; without the host's word, the prefix names the provider."""
    resolve = identity.TargetResolver(lambda model: None)
    body = {"model": " anthropic/claude-sonnet-4 "}
    host = Credentials(provider="openrouter", provider_is_host=True)
    header = Credentials(provider="openrouter")
    found = resolve(body, "/api/v1/chat/completions", host, ())
    assert (found.provider, found.model) == ("openrouter", "anthropic/claude-sonnet-4")
    found = resolve(body, "/api/v1/chat/completions", header, ())
    assert (found.provider, found.model) == ("anthropic", "claude-sonnet-4")
    nameless = resolve({}, "/v1/chat/completions", host, ())
    assert (nameless.provider, nameless.model) == ("openrouter", "unknown")
    unknown_host = Credentials(provider=None, provider_is_host=True)
    found = resolve({"model": "mistral/large"}, "/v1/chat/completions", unknown_host, ())
    assert (found.provider, found.model) == ("mistral", "large")  # §4's rules


def test_a_background_request_and_the_edges_of_a_lenient_count() -> None:
    """`background: true` (the Responses API's, answered queued) is told, a stream with it or
    not, and written as the host app's lax pydantic model reads a True (`"true"`, `"1"`, `1`),
    which it sends on as `true`; anything else is not one. A count of 0 written as text or a
    float is a limit of 0; a batch of one prompt is one."""
    assert target({}).background is False
    assert target({"background": False}).background is False
    for false in ("false", "0", 0, "no", None, [], "maybe"):
        assert target({"background": false}).background is False, false
    for true in ("true", " True ", "1", "on", "yes", 1, 1.0):
        assert target({"background": true}).background is True, true
    queued = target({"background": True, "max_output_tokens": 9, "n": 2, "service_tier": "flex"})
    assert (queued.background, queued.stream, queued.max_output_tokens) == (True, False, 9)
    assert (queued.choices, queued.service_tier) == (2, "flex")
    streamed = target({"background": True, "stream": True, "model": "openai/gpt-4o"})
    assert (streamed.background, streamed.stream) == (True, True)
    assert (streamed.provider, streamed.model) == ("openai", "gpt-4o")
    assert target({"max_tokens": "0"}).max_output_tokens == 0
    assert target({"max_tokens": 0.0}).max_output_tokens == 0
    assert target({"prompt": ["a"]}).choices == 1 and target({"prompt": [[1]]}).choices == 1


def test_the_name_pattern_is_exactly_what_name_problem_accepts() -> None:
    """The OpenAPI document's pattern for a tag, a provider and an owner's name says exactly
    what the server takes: every character alone, inside a name and at either end of one."""
    pattern = re.compile(identity.NAME_PATTERN.removesuffix("$") + r"\Z")
    checked = 0
    for code in range(0x3100):
        c = chr(code)
        for name in (c, f"a{c}b", f"{c}a", f"a{c}"):
            accepted = identity.name_problem("tag", name, 5) is None
            assert accepted is bool(pattern.match(name)), repr(name)
            checked += 1
    print(f"{checked} names checked")


@pytest.mark.parametrize(
    ("host", "model", "metered"),
    [
        ("openai", "openai/gpt-4o", "gpt-4o"),  # OpenAI's API names it bare
        ("anthropic", "Anthropic/claude-sonnet-4", "claude-sonnet-4"),
        ("openai", "azure/gpt-4o", "azure/gpt-4o"),  # another provider's: as sent
        ("openrouter", "openrouter/auto", "openrouter/auto"),  # a real OpenRouter id
        ("openrouter", "openai/gpt-4o", "openai/gpt-4o"),
        ("groq", "groq/compound", "groq/compound"),  # a real Groq id
        ("gemini", "models/gemini-2.5-flash", "gemini-2.5-flash"),  # Gemini's resource name
    ],
)
def test_a_call_to_a_provider_s_host_drops_only_a_prefix_its_own_api_never_uses(
    host: str, model: str, metered: str
) -> None:
    """A route's `openai/gpt-4o` on api.openai.com is OpenAI's `gpt-4o` (sent and metered so);
    the review found `openrouter/auto` on OpenRouter's host sent as `auto`, which it has not."""
    found = target({"model": model}, provider=host, provider_is_host=True)
    assert (found.provider, found.model) == (host, metered)


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        (b"", None),
        (b"--", None),
        (b'{"model": "gpt-4o"}', None),
        (b"--b\r\n", {}),
        (b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-image-1', {}),
        (
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-image-1\r\n'
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n\x89PNG\xff\r\n--b\r\n"
            b'content-disposition: form-data; name="model"\r\n\r\ngpt-\xffimage\r\n--b--\r\n',
            {"model": "gpt-\ufffdimage"},
        ),
        (  # an empty field: its value ends at the delimiter right after its head
            b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n\r\n'
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-image-1\r\n--b--\r\n',
            {"prompt": "", "model": "gpt-image-1"},
        ),
    ],
    ids=[
        "empty",
        "dashes",
        "json",
        "no-part",
        "cut-short",
        "file-and-repeated-name",
        "empty-field",
    ],
)
def test_a_form_s_text_fields_are_read_and_odd_bodies_do_not_crash(
    body: bytes, fields: dict[str, str] | None
) -> None:
    """`form_fields`: a form's text fields (the last of a name repeated, files left out, bytes
    that are no UTF-8 replaced), nothing from a body that is no form or is cut short."""
    found = form_fields(body)
    print(f"{body[:30]!r}...: {found}")
    assert found == fields


@pytest.mark.parametrize("kind", ["urlencoded", "multipart"])
def test_a_form_of_more_fields_than_starlette_reads_is_not_read(kind: str) -> None:
    """Starlette's forms refuse more than 1,000 fields (400 "Too many fields"), so the app
    serves none of such a form: it is not read either (reading a 9 MB one held the event loop
    for seconds). Up to the bound, the last `model` is read, as Starlette reads it."""
    import time

    def form(count: int) -> bytes:
        if kind == "urlencoded":
            return b"a=1&" * (count - 1) + b"model=gpt-image-1"
        part = b'--B\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n'
        last = b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-image-1\r\n'
        return part * (count - 1) + last + b"--B--\r\n"

    read = identity.form_fields(form(identity.MAX_FORM_FIELDS))
    assert read is not None and read["model"] == "gpt-image-1"
    assert identity.form_fields(form(identity.MAX_FORM_FIELDS + 1)) is None
    huge = b"a=&" * 3_000_000 if kind == "urlencoded" else form(400_000)
    began = time.perf_counter()
    assert identity.form_fields(huge) is None
    print(f"{kind}: {len(huge):,} bytes left unread in {time.perf_counter() - began:.4f} s")
