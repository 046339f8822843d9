"""Django (SPEC §15): the example project (examples/django_app) under Django's WSGI and ASGI
handlers, Django's own test clients, and its admin API under a Django URL prefix."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from budget_middleware import BudgetMiddleware
from budget_middleware.engine.portal import shut_down_engines
from conftest import REDIS_URL, need_redis
from service_support import delete_prefix, unique_prefix, use_prefix
from support import BodyThenGone, post_scope, running, set_up_django_example

ROOT = Path(__file__).resolve().parents[1]
ADMIN = {"authorization": "Bearer admin-secret"}


def chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 8,
        **extra,
    }


@pytest.fixture(autouse=True)
def _engines_shut_down() -> Iterator[None]:
    yield
    shut_down_engines()


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The example Django project, set up on this test's store (its URL conf imported anew, so
    that its admin URLs are on this test's engine)."""
    set_up_django_example(monkeypatch, tmp_path)


def asgi_application() -> Any:
    from llmsite.asgi import application

    return application


@asynccontextmanager
async def served(application: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The application with its lifespan run, and a client of it through httpx's ASGI transport."""
    async with (
        running(application),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(application), base_url="http://test"
        ) as client,
    ):
        yield client


# -- the admin API under a Django URL prefix, served by Django's ASGI handler ------------------


async def test_the_admin_urls_serve_under_django_s_asgi_handler(site: None) -> None:
    """`admin_urls()` read `request.environ`, which only Django's WSGI request has: under
    `get_asgi_application()` (uvicorn, Django's `AsyncClient`) every admin call was a 500
    (`AttributeError: 'ASGIRequest' object has no attribute 'environ'`)."""
    from django.test import AsyncClient

    application = asgi_application()
    assert isinstance(application, BudgetMiddleware)
    async with served(application) as client:
        created = await client.post(
            "/budget-admin/virtual-keys",
            json={"name": "alice", "budgets": [{"max_limit": 0.000000000001}]},
            headers=ADMIN,
        )
        health = await AsyncClient().get("/budget-admin/health")  # Django's own ASGI client
        print("create:", created.status_code, "AsyncClient health:", health.status_code)
        assert health.status_code == 200, health.content[:200]
        assert created.status_code == 201, created.text[:300]
        value = created.json()["virtual_key"]["value"]
        bearer = {"authorization": f"Bearer {value}"}
        statuses = [
            (await client.post("/v1/chat/completions", json=chat(), headers=bearer)).status_code
            for _ in range(2)
        ]
        listed = await client.get("/budget-admin/budgets?from_memory=true", headers=ADMIN)
        budget = listed.json()["budgets"][0]
        print("metered:", statuses, "spent:", budget["current_usage"])
        assert statuses == [200, 402]
        assert budget["current_usage"] > 0


async def test_a_tag_ending_in_an_escaped_slash_is_that_tag_under_both_django_handlers(
    site: None,
) -> None:
    """Django hands its views the path decoded (`%2F` as `/`), and the admin URLs took
    `PUT /budget-admin/tags/team%2F` (the tag `team/`) for a trailing slash written by the
    client: a 307 to `.../tags/team`, under Django's WSGI handler and its ASGI handler alike.
    The path as the client sent it is read from the request line (`RAW_URI`, ASGI's
    `raw_path`)."""
    from llmsite.wsgi import application as wsgi_application
    from werkzeug.test import Client

    limit = {"budgets": [{"max_limit": 3}]}
    wsgi = Client(wsgi_application)
    through_wsgi = wsgi.put("/budget-admin/tags/team%2F", json=limit, headers=ADMIN)
    async with served(asgi_application()) as client:
        through_asgi = await client.put("/budget-admin/tags/chat%2F", json=limit, headers=ADMIN)
        listed = await client.get("/budget-admin/tags", headers=ADMIN)
        slashed = await client.put("/budget-admin/tags/chat/", json=limit, headers=ADMIN)
    tags = sorted(t["tag"] for t in listed.json()["tags"])
    print("WSGI:", through_wsgi.status_code, through_wsgi.headers.get("location"),
          "ASGI:", through_asgi.status_code, through_asgi.headers.get("location"),
          "tags:", tags, "PUT tags/chat/:", slashed.status_code)  # fmt: skip
    assert through_wsgi.status_code == 201 and through_asgi.status_code == 201
    assert tags == ["chat/", "team/"]
    assert slashed.status_code == 307  # a slash written as one is still redirected


def test_a_tag_outside_latin_1_is_managed_through_the_django_admin_urls(site: None) -> None:
    """Django hands its views the path decoded (UTF-8); the view passed it on to the WSGI admin
    app as if it were WSGI's latin-1 text, whose `raw_path` then failed to encode: a tag named
    outside latin-1 (`PUT /budget-admin/tags/产品`) was a 500."""
    from django.test import Client

    client = Client()
    put = client.put(
        "/budget-admin/tags/产品",
        data=json.dumps({"budgets": [{"max_limit": 5, "reset_duration": "1d"}]}),
        content_type="application/json",
        HTTP_AUTHORIZATION="Bearer admin-secret",
    )
    listed = client.get("/budget-admin/tags", HTTP_AUTHORIZATION="Bearer admin-secret")
    print("PUT tag:", put.status_code, put.content[:200])
    assert put.status_code in (200, 201)
    assert "产品" in json.dumps(listed.json(), ensure_ascii=False)


async def test_a_django_view_under_the_asgi_handler_sees_who_is_calling(site: None) -> None:
    """The README's Django way to see the caller, `budget_state(request.META)`, found nothing
    under Django's ASGI handler (the ASGI middleware names the caller in the scope's state, and
    Django's `META` holds none of it): the example's view said `x_caller: null` for a key's
    call. `budget_state(request)` finds it under either handler."""
    application = asgi_application()
    async with served(application) as client:
        created = await client.post(
            "/budget-admin/virtual-keys", json={"name": "alice"}, headers=ADMIN
        )
        key = created.json()["virtual_key"]
        answer = await client.post(
            "/v1/chat/completions",
            json=chat(),
            headers={"authorization": f"Bearer {key['value']}"},
        )
        print("ASGI: x_caller", answer.json()["x_caller"], "key", key["id"])
        assert answer.status_code == 200
        assert answer.json()["x_caller"] == key["id"]


def test_budget_state_of_a_django_request_under_the_wsgi_handler(site: None) -> None:
    """`budget_state(request)` under Django's WSGI handler too (as `budget_state(request.META)`)."""
    from django.test import Client as DjangoClient
    from llmsite.wsgi import application
    from werkzeug.test import Client

    created = DjangoClient().post(
        "/budget-admin/virtual-keys",
        data={"name": "alice"},
        content_type="application/json",
        HTTP_AUTHORIZATION="Bearer admin-secret",
    )
    key = created.json()["virtual_key"]
    answer = Client(application).post(
        "/v1/chat/completions", json=chat(), headers={"authorization": f"Bearer {key['value']}"}
    )
    print("WSGI: x_caller", answer.json["x_caller"], "key", key["id"])
    assert answer.status_code == 200 and answer.json["x_caller"] == key["id"]


def test_an_answer_s_last_byte_frees_its_slot_before_the_server_sends_it(site: None) -> None:
    """A WSGI server sends an answer's last chunk, then asks the app for the next one, which
    ends it. Where the answer says its Content-Length (Django's `CommonMiddleware`, Flask), the
    client has it all before that, and its next call (another connection: another thread)
    could come first: on a key of one request in flight, a client calling one call after
    another was refused 429 now and then (17 and 16 of 200 under gunicorn
    `gthread` and waitress: tests/test_wsgi_servers.py). The answer is now settled as its last
    byte goes."""
    from llmsite.wsgi import application
    from werkzeug.test import Client, EnvironBuilder

    created = Client(application).post(
        "/budget-admin/virtual-keys",
        json={"name": "alice", "rate_limit": {"max_concurrent_requests": 1}},
        headers=ADMIN,
    )
    bearer = {"authorization": f"Bearer {created.json['virtual_key']['value']}"}

    def environ() -> dict[str, Any]:
        built = EnvironBuilder(
            path="/v1/chat/completions", method="POST", json=chat(), headers=bearer
        )
        return built.get_environ()

    started: list[Any] = []
    first = application(environ(), lambda status, headers, exc=None: started.extend(headers))
    length = int(dict(started)["Content-Length"])
    chunks = iter(first)
    sent = b""
    while len(sent) < length:  # the server sends each chunk until the last byte
        sent += next(chunks)
    # The client has its answer, and calls again before the server asks for the next chunk.
    second = Client(application).post("/v1/chat/completions", json=chat(), headers=bearer)
    second.get_data()
    assert list(chunks) == []
    first.close()
    print(f"first answer: {len(sent)} of {length} bytes sent, next call: {second.status_code}")
    assert second.status_code == 200


def test_a_head_request_to_the_django_admin_urls_tells_the_body_s_length(site: None) -> None:
    """HEAD answers headers only, the body's length told (RFC 9110: never another length), as
    the admin app answers it under werkzeug and the admin URLs under Django's ASGI handler
    (uvicorn: 47 of `/health`). Under Django's WSGI handler (gunicorn, waitress, `runserver`)
    the admin URLs answered `Content-Length: 0` to every HEAD: the admin app's length was
    dropped for the empty body Django then measured."""
    from llmsite.wsgi import application
    from werkzeug.test import Client

    client = Client(application)
    lengths = {}
    for path, headers in (("/budget-admin/health", {}), ("/budget-admin/customers", ADMIN)):
        got = client.get(path, headers=headers)
        head = client.head(path, headers=headers)
        lengths[path] = (len(got.data), head.headers.get("content-length"), len(head.data))
        assert got.status_code == head.status_code == 200
    print("GET bytes, HEAD content-length, HEAD bytes:", lengths)
    for got_bytes, head_length, head_bytes in lengths.values():
        assert head_length == str(got_bytes) != "0" and head_bytes == 0


async def test_the_example_streams_under_the_asgi_handler_unbuffered(site: None) -> None:
    """The example's stream was a sync generator: Django's ASGI handler reads such an iterator
    whole in a thread before the first chunk goes (it warns: "StreamingHttpResponse must consume
    synchronous iterators"), so under uvicorn the client got the whole stream at its end. Under
    the ASGI handler the example streams through an async iterator, metered as it goes."""
    import warnings

    application = asgi_application()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with served(application) as client:
            created = await client.post(
                "/budget-admin/virtual-keys", json={"name": "alice"}, headers=ADMIN
            )
            value = created.json()["virtual_key"]["value"]
            streamed = await client.post(
                "/v1/chat/completions",
                json=chat(stream=True, max_tokens=3),
                headers={"authorization": f"Bearer {value}"},
            )
    buffered = [str(w.message) for w in caught if "must consume" in str(w.message)]
    print("events:", streamed.text.count("data: "), "Django's warnings:", buffered)
    assert streamed.status_code == 200 and streamed.text.count("data: ") == 5
    assert b'"usage"' not in streamed.content  # the usage chunk we asked for is cut out
    assert not buffered


async def test_an_admin_call_first_under_a_server_with_no_lifespan_leaves_the_engine_its_loop(
    site: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a server that sends no lifespan (daphne, `uvicorn --lifespan off`, an
    `httpx.ASGITransport`), an admin call through `admin_urls` before any metered request
    started the shared engine in the WSGI adapter's background loop (the view is sync, and it
    hopped there), and the ASGI middleware then used that engine from the server's loop: on
    Redis the first metered call raised ("got Future attached to a different loop": a 500
    under a server), and so did the engine's Redis heartbeat. Under Django's ASGI handler the
    admin view now runs the admin app on the server's own loop: 200 x4 on a budget of four
    calls, then 402."""
    from budget_middleware import get_engine

    need_redis()
    monkeypatch.setenv("BUDGET_REDIS_URL", REDIS_URL)
    prefix = unique_prefix()
    use_prefix(get_engine(), prefix)
    application = asgi_application()
    price = 4 * 0.00000645  # four calls of the example's fake (11 + 8 tokens of gpt-4o-mini)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(application), base_url="http://test"
        ) as client:
            created = await client.post(
                "/budget-admin/virtual-keys",
                json={"name": "alice", "budgets": [{"max_limit": price}]},
                headers=ADMIN,
            )
            bearer = {"authorization": f"Bearer {created.json()['virtual_key']['value']}"}
            statuses = []
            for _ in range(6):
                try:
                    answer = await client.post("/v1/chat/completions", json=chat(), headers=bearer)
                    statuses.append(answer.status_code)
                except RuntimeError as exc:
                    statuses.append(type(exc).__name__)
            print("admin first, then metered:", created.status_code, statuses)
            assert created.status_code == 201
            assert statuses == [200, 200, 200, 200, 402, 402]
    finally:
        await get_engine().shutdown()
        delete_prefix(REDIS_URL, prefix)


async def test_a_client_gone_before_django_answers_is_charged(
    site: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Django's ASGI handler cancels the view when the client goes away, and answers nothing;
    a sync view's thread runs on (the provider answers it in full), and an async one's provider
    call is cut. Either way the call was made, yet it was charged $0 (outcome
    `client_disconnected`, status 0): a client that hung up before each answer spent without
    limit (under the WSGI handler the same call is charged its usage). It is now charged the
    most it could have cost, as its reservation counted it, marked estimated."""
    import asyncio
    import time

    import llmsite.views

    from budget_middleware import get_engine
    from support import BodyThenGone, post_scope

    usage = llmsite.views._usage

    def slow_usage(body: dict[str, Any]) -> tuple[int, int]:
        time.sleep(0.5)  # the provider thinking
        return usage(body)

    monkeypatch.setattr(llmsite.views, "_usage", slow_usage)
    application = asgi_application()
    async with served(application) as client:
        created = await client.post(
            "/budget-admin/virtual-keys",
            json={"name": "alice", "budgets": [{"max_limit": 1}]},
            headers=ADMIN,
        )
        key = created.json()["virtual_key"]
        body = json.dumps(chat()).encode()
        receive = BodyThenGone(body)
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = post_scope(
            "/v1/chat/completions",
            [
                (b"authorization", f"Bearer {key['value']}".encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        )
        call = asyncio.create_task(application(scope, receive, send))
        await asyncio.sleep(0.1)
        receive.gone.set()  # the client hangs up while the view works
        await call
        await asyncio.sleep(0.6)  # the view's thread ends
        engine = get_engine()
        await engine.flush()
        with engine.store.engine.connect() as conn:
            from sqlalchemy import text

            rows = [
                dict(r._mapping)
                for r in conn.execute(
                    text("SELECT outcome, status, cost_nanos, estimated FROM bm_usage_records")
                )
            ]
    print("answer sent:", [m["type"] for m in sent], "record:", rows)
    assert not sent  # Django answered nothing
    assert len(rows) == 1 and rows[0]["outcome"] == "client_disconnected"
    # at least the answer's 11 + 8 tokens of gpt-4o-mini (6,450 nano-dollars), estimated
    assert rows[0]["cost_nanos"] >= 6_450 and rows[0]["estimated"]


async def test_a_sync_view_calling_out_first_leaves_the_asgi_middleware_its_engine(
    site: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a server that sends no lifespan (daphne, `uvicorn --lifespan off`), a sync Django
    view that called out through `BudgetSyncTransport` before the first metered request started
    the shared engine in the background loop (Django runs sync views in a thread, which has no
    loop), and `BudgetMiddleware` then used that engine from the server's loop: on Redis its
    connections were used from both loops ("got Future attached to a different loop", raised
    by metered calls at once after an admin call, and by the engine's shutdown). In a thread
    that asgiref runs for an ASGI server (Django's way with sync views), an engine that a
    `BudgetMiddleware` serves now starts on that server's loop."""
    import asyncio

    import llmsite.urls
    from django.http import JsonResponse
    from django.urls import clear_url_caches, path

    from budget_middleware import BudgetSyncTransport, get_engine

    def provider(request: httpx.Request) -> httpx.Response:
        usage = {"prompt_tokens": 10, "completion_tokens": 10}
        return httpx.Response(200, json={"object": "chat.completion", "usage": usage})

    def calls_out(request: Any) -> Any:  # a sync view, as most Django views are
        transport = BudgetSyncTransport(transport=httpx.MockTransport(provider))
        with httpx.Client(transport=transport) as out:
            answer = out.post("https://api.openai.com/v1/chat/completions", json=chat())
        return JsonResponse({"status": answer.status_code})

    need_redis()
    monkeypatch.setenv("BUDGET_REDIS_URL", REDIS_URL)
    prefix = unique_prefix()
    use_prefix(get_engine(), prefix)
    key = get_engine().manager.create_virtual_key(name="alice", budgets=[{"max_limit": 1}])
    bearer = {"authorization": f"Bearer {key.value}"}
    llmsite.urls.urlpatterns.append(path("calls-out", calls_out))
    clear_url_caches()
    application = asgi_application()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(application), base_url="http://test"
        ) as client:
            first = await client.get("/calls-out")
            on_the_server_s_loop = get_engine().loop is asyncio.get_running_loop()
            answers = await asyncio.gather(
                *[
                    client.post("/v1/chat/completions", json=chat(), headers=bearer)
                    for _ in range(3)
                ],
                return_exceptions=True,
            )
        statuses = [getattr(a, "status_code", type(a).__name__) for a in answers]
        print("sync view called out first:", first.status_code, "engine on the server's loop:",
              on_the_server_s_loop, "then 3 metered at once:", statuses)  # fmt: skip
        assert first.status_code == 200 and first.json()["status"] == 200
        assert statuses == [200, 200, 200]
        assert on_the_server_s_loop
    finally:
        engine = get_engine()
        if engine.loop is asyncio.get_running_loop():
            await engine.shutdown()
        shut_down_engines()  # or in the background loop
        delete_prefix(REDIS_URL, prefix)


def test_django_s_test_client_is_not_metered_and_the_wrapped_application_is(site: None) -> None:
    """What the README says of testing: Django's test `Client` calls Django's handler, not the
    `application` of `wsgi.py`, so its calls pass unmetered; calls sent to `application`
    (werkzeug's `Client`) are metered."""
    from django.test import Client as DjangoClient
    from llmsite.wsgi import application
    from werkzeug.test import Client

    created = DjangoClient().post(
        "/budget-admin/virtual-keys",
        data={"name": "tiny", "budgets": [{"max_limit": 0.000000000001}]},
        content_type="application/json",
        HTTP_AUTHORIZATION="Bearer admin-secret",
    )
    bearer = {"authorization": f"Bearer {created.json()['virtual_key']['value']}"}
    django_statuses = [
        DjangoClient(headers=bearer)
        .post("/v1/chat/completions", data=chat(), content_type="application/json")
        .status_code
        for _ in range(2)
    ]
    wrapped = []
    for _ in range(2):  # each answer read to its end, as a client reads it: then it is settled
        answer = Client(application).post("/v1/chat/completions", json=chat(), headers=bearer)
        answer.get_data()
        wrapped.append(answer.status_code)
    print("Django's Client:", django_statuses, "werkzeug's Client(application):", wrapped)
    assert django_statuses == [200, 200] and wrapped == [200, 402]


@pytest.mark.parametrize("first", [False, True], ids=["listed-last", "listed-first"])
@pytest.mark.parametrize(
    "middleware",
    ["budget_middleware.wsgi.BudgetWSGIMiddleware", "budget_middleware.BudgetMiddleware"],
)
def test_a_middleware_listed_in_django_s_middleware_setting_fails_saying_where_it_goes(
    site: None, middleware: str, first: bool
) -> None:
    """Listed in `settings.MIDDLEWARE` (a Django user's first guess), either middleware was
    built around Django's request handler and failed every request with a `TypeError`
    (`__call__() missing 1 required positional argument: 'start_response'`), under the WSGI
    and the ASGI handler alike. Django loading its middleware now stops with a
    `ConfigurationError` that says to wrap the application in wsgi.py or asgi.py. Listed first,
    above another middleware (where an outermost middleware goes), it was not recognised: the
    handler Django gives it takes the other middleware's module name (`functools.wraps`), and
    every request was a bare 500 page, the `TypeError` logged nowhere with `DEBUG = False`."""
    from django.test import AsyncClient, Client, override_settings

    from budget_middleware import ConfigurationError

    common = "django.middleware.common.CommonMiddleware"
    chain = [middleware, common] if first else [common, middleware]
    failures: list[str] = []
    with override_settings(MIDDLEWARE=chain):
        for call in (
            lambda: Client().post(
                "/v1/chat/completions", data=chat(), content_type="application/json"
            ),
            lambda: asyncio.run(
                AsyncClient().post(
                    "/v1/chat/completions", data=chat(), content_type="application/json"
                )
            ),
        ):
            with pytest.raises(ConfigurationError) as raised:
                call()
            failures.append(str(raised.value))
    print(failures)
    assert all(
        "settings.MIDDLEWARE" in text and "get_wsgi_application()" in text for text in failures
    )


def test_the_admin_urls_included_under_a_path_that_begins_with_their_prefix_serve(
    site: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`admin_urls("admin/")` included under `admin-tools/`: the view found its mount by the
    first "/admin" in the path, the one of `/admin-tools`, and passed the admin API the path
    `-tools/admin/health` (a 404 for every call). The mount is where Django matched it."""
    from django.conf import settings
    from django.test import Client
    from django.urls import clear_url_caches

    (tmp_path / "nested_urls.py").write_text(
        "from django.urls import include, path\n"
        "from budget_middleware.wsgi.django import admin_urls\n"
        'urlpatterns = [path("admin-tools/", include(admin_urls("admin/")))]\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(settings, "ROOT_URLCONF", "nested_urls")
    clear_url_caches()
    try:
        client = Client()
        health = client.get("/admin-tools/admin/health")
        keys = client.get(
            "/admin-tools/admin/virtual-keys", HTTP_AUTHORIZATION="Bearer admin-secret"
        )
        slash = client.get(
            "/admin-tools/admin/customers/", HTTP_AUTHORIZATION="Bearer admin-secret"
        )
    finally:
        clear_url_caches()
    print(
        f"health {health.status_code}, virtual-keys {keys.status_code}, "
        f"customers/ {slash.status_code} -> {slash.headers.get('location')}"
    )
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert keys.status_code == 200
    assert slash.status_code == 307
    assert slash.headers["location"].endswith("/admin-tools/admin/customers")


def test_the_admin_urls_included_under_a_path_that_captures_serve(
    site: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Included under a path that captures (`<str:tenant>/`): Django passes the capture to the
    view, which took only `rest`: a TypeError, a 500 for every admin call. It is ignored."""
    from django.conf import settings
    from django.test import Client
    from django.urls import clear_url_caches

    (tmp_path / "tenant_urls.py").write_text(
        "from django.urls import include, path\n"
        "from budget_middleware.wsgi.django import admin_urls\n"
        'urlpatterns = [path("<str:tenant>/", include(admin_urls("budget-admin/")))]\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(settings, "ROOT_URLCONF", "tenant_urls")
    clear_url_caches()
    try:
        client = Client(raise_request_exception=False)
        health = client.get("/acme/budget-admin/health")
        keys = client.get(
            "/acme/budget-admin/virtual-keys", HTTP_AUTHORIZATION="Bearer admin-secret"
        )
    finally:
        clear_url_caches()
    print(f"under <str:tenant>/: health {health.status_code}, virtual-keys {keys.status_code}")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert keys.status_code == 200 and "virtual_keys" in keys.json()


def _records(engine: Any) -> list[dict[str, Any]]:
    from sqlalchemy import text

    with engine.store.engine.connect() as conn:
        return [
            dict(r._mapping)
            for r in conn.execute(
                text(
                    "SELECT direction, outcome, status, cost_nanos, estimated, input_tokens,"
                    " output_tokens, virtual_key_id FROM bm_usage_records"
                )
            )
        ]


@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume")
async def test_a_client_gone_after_the_headers_of_a_sync_django_stream_is_charged_its_most(
    site: None,
) -> None:
    """Under Django's ASGI handler a `StreamingHttpResponse` over a sync iterator (the usual
    relay of a sync SDK's stream) sends its headers, then reads the iterator whole in a thread
    before its first chunk goes (README). A client that hangs up in between makes Django cancel
    the sending; asgiref waits for the thread, so the provider serves the whole answer (usage
    included), and Django drops all of it. The middleware saw a started answer with no byte of
    body and charged an estimate of "what was streamed": the prompt alone. README ("What an
    answer cost"): a request whose client went away before the app answered, and which the app
    then ended without an answer, "is charged the most it could have cost ... the call was
    made, and its answer is never seen". It cost 0.5 % of what it served (6,000 of 1,201,650
    nano-USD): a client that always hung up after the headers spent without limit. Headers
    with no byte of body are no answer (a fault hunt's)."""
    import time

    import llmsite.urls
    from django.http import StreamingHttpResponse
    from django.urls import clear_url_caches, path

    from budget_middleware import get_engine

    served: list[int] = []

    def relay(request: Any) -> Any:  # a sync view relaying a provider's stream (sync SDK)
        def provider_stream() -> Iterator[bytes]:
            chunk = {"id": "c1", "object": "chat.completion.chunk"}
            for _ in range(40):
                time.sleep(0.02)  # the provider generating
                delta = {**chunk, "choices": [{"index": 0, "delta": {"content": " word"}}]}
                yield f"data: {json.dumps(delta)}\n\n".encode()
            usage = {"prompt_tokens": 11, "completion_tokens": 2000, "total_tokens": 2011}
            served.append(11 * 150 + 2000 * 600)  # gpt-4o-mini: $0.15 / $0.60 per Mtok
            yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingHttpResponse(provider_stream(), content_type="text/event-stream")

    llmsite.urls.urlpatterns.append(path("relay/v1/chat/completions", relay))
    clear_url_caches()
    from llmsite.asgi import application

    async with running(application):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(application), base_url="http://t"
        ) as c:
            created = await c.post(
                "/budget-admin/virtual-keys",
                json={"name": "alice", "budgets": [{"max_limit": 1}]},
                headers=ADMIN,
            )
            key = created.json()["virtual_key"]["value"]
        body = json.dumps(chat(stream=True, max_tokens=2000)).encode()
        receive = BodyThenGone(body)
        sent: list[dict[str, Any]] = []

        async def send(m: dict[str, Any]) -> None:
            sent.append(m)

        scope = post_scope(
            "/relay/v1/chat/completions",
            [
                (b"authorization", f"Bearer {key}".encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        )
        call = asyncio.create_task(application(scope, receive, send))
        await asyncio.sleep(0.3)  # the headers have gone; the thread reads the stream
        receive.gone.set()  # the client hangs up
        await call
        engine = get_engine()
        await engine.flush()
        rows = _records(engine)
    charged = sum(r["cost_nanos"] for r in rows)
    print("sent:", [m["type"] for m in sent], f"served {sum(served):,} nano-USD,",
          f"charged {charged:,} nano-USD", rows)  # fmt: skip
    assert served and len(rows) == 1
    # the most it could have cost: at least the 2,000 tokens of output it was allowed
    assert charged >= 2000 * 600


def test_the_admin_urls_serve_a_site_that_requires_login_everywhere(site: None) -> None:
    """Django 5.1's `LoginRequiredMiddleware` (a site private by default) sends every view not
    marked `login_not_required` to the login page. The admin API authenticates with its bearer
    (`BUDGET_ADMIN_KEY`), never a Django session, as it is CSRF-exempt for: every call of the
    admin URLs, the admin key's included, was a 302 to `/accounts/login/`."""
    import django
    from django.test import Client, override_settings

    if django.VERSION < (5, 1):
        pytest.skip("LoginRequiredMiddleware came with Django 5.1")

    chain = [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.auth.middleware.LoginRequiredMiddleware",
    ]
    apps = ["django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions"]
    with override_settings(
        INSTALLED_APPS=apps,
        MIDDLEWARE=chain,
        SESSION_ENGINE="django.contrib.sessions.backends.signed_cookies",
    ):
        client = Client()
        created = client.post(
            "/budget-admin/virtual-keys",
            data={"name": "alice"},
            content_type="application/json",
            HTTP_AUTHORIZATION="Bearer admin-secret",
        )
        health = client.get("/budget-admin/health")
        anonymous = client.get("/budget-admin/virtual-keys")
    print(
        f"create a key: {created.status_code} {created.headers.get('location')}; health: "
        f"{health.status_code}; without the admin key: {anonymous.status_code}"
    )
    assert created.status_code == 201 and created.json()["virtual_key"]["name"] == "alice"
    assert health.status_code == 200
    assert anonymous.status_code == 401  # the admin API's own answer, not the login page
