"""An example host app: a FastAPI service that answers like OpenAI and Anthropic (offline mock),
with budget-middleware in front of it and the admin API mounted.

Run it under uvicorn (uvicorn[standard] is the fastest setup we measured):

    BUDGET_ADMIN_KEY=admin-secret uvicorn examples.app:app --port 8000

Set BUDGET_NO_MIDDLEWARE=1 to serve the same app without the middleware (the benchmark's baseline).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fastapi import FastAPI

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mock_upstream import mock_router

from budget_middleware import BudgetMiddleware, create_admin_app


def build_app() -> FastAPI:
    app = FastAPI(title="example LLM service")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(mock_router("/v1"))
    if os.environ.get("BUDGET_NO_MIDDLEWARE") != "1":
        app.add_middleware(BudgetMiddleware)  # the one line
        app.mount("/budget-admin", create_admin_app())
    return app


app = build_app()
