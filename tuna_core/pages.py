"""The page side of the one error path: a service's `UserError` shown where the user acted."""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from tuna_core.errors import UserError


def refused(request: HttpRequest, exc: UserError, *, redirect_to, fragment: str | None = None) -> HttpResponse:
    """Answer an action a service refused: to htmx, `fragment` rendered with the message as ``error`` and the
    refusal's status (htmx swaps it in place); otherwise the message shown on `redirect_to` (a URL, a URL
    name or an object with get_absolute_url) after a redirect."""
    if fragment and getattr(request, "htmx", False):
        return render(request, fragment, {"error": exc.message}, status=exc.status)
    messages.error(request, exc.message)
    return redirect(redirect_to)
