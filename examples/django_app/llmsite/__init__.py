"""An example Django project with budget-middleware (see ../README in the main README's WSGI
section): an offline fake of OpenAI's chat completions, metered, and the admin API under
/budget-admin/."""
