"""The smallest Django settings that serve the example: no database, no sessions.

budget-middleware reads its own BUDGET_* environment variables (BUDGET_DATABASE_URL,
BUDGET_ADMIN_KEY, BUDGET_REDIS_URL, ...), not these settings.
"""

SECRET_KEY = "example-only-not-secret"  # an offline example
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "llmsite.urls"
WSGI_APPLICATION = "llmsite.wsgi.application"  # `runserver` serves it, middleware included
INSTALLED_APPS: list[str] = []
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
