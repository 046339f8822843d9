"""The ASGI adapter: the middleware and its per-request exchange."""
