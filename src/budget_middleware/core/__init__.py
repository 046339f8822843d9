"""The HTTP-free core: money, windows, scopes, admission, usage, streams, prices.

No I/O and no web, database, Redis, httpx or event-loop library: every adapter (ASGI, WSGI,
the outbound transport) and every backend calls it.
"""
