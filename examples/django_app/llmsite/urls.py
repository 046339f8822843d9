from django.urls import path

from budget_middleware.wsgi.django import admin_urls
from llmsite import views

urlpatterns = [
    *admin_urls("budget-admin/"),  # the admin API, on the engine the middleware uses
    path("health", views.health),
    path("v1/chat/completions", views.chat_completions),
]
