"""The WSGI application, metered: `gunicorn --chdir examples/django_app llmsite.wsgi`,
`waitress-serve --threads 8 llmsite.wsgi:application`, or `python manage.py runserver`."""

import os

from django.core.wsgi import get_wsgi_application

from budget_middleware.wsgi import BudgetWSGIMiddleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")

application = BudgetWSGIMiddleware(get_wsgi_application())  # configured from BUDGET_* variables
