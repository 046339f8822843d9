"""The ASGI application, metered: `uvicorn llmsite.asgi:application` from this directory. The
middleware answers the server's lifespan itself (Django's ASGI handler does not), so that a
server's shutdown writes every pending charge."""

import os

from django.core.asgi import get_asgi_application

from budget_middleware import BudgetMiddleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")

application = BudgetMiddleware(get_asgi_application())  # configured from BUDGET_* variables
