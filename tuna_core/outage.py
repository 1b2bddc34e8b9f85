"""While the database cannot be reached (a restart, a failover), every request answers 503, never 500.

`DatabaseOutageMiddleware` turns an OperationalError or InterfaceError into a 503 with Retry-After:

- a page gets a readable page (rendered without the database: no user, no session, no context processors);
- /api/ gets the API's error object ``{"detail", "errors"}``, /v1/ OpenAI's ``{"error": {...}}``
  (the shapes of tuna_core.errors), code ``database_unavailable``.

A database that refuses connections (restarting) is found before any other middleware runs: the request's
connection is opened first (it would be for the session anyway; CONN_MAX_AGE=0 opens one per request). A
connection lost later reaches `process_exception` from a view; from another middleware (reading the session or
the user, saving the session) Django's own handler has already made it a 500 (and logged it): the
`got_request_exception` signal marks such a request, and this middleware, placed outside the others, answers
503 instead. The answer does not claim that nothing was changed: a write the request made in a transaction is rolled
back, but one made in autocommit before the connection was lost stays, so the request may have been saved in part
(the messages say to check before trying again). The connection is closed when the request ends (CONN_MAX_AGE=0;
a broken one is never reused).
"""

from __future__ import annotations

import logging
import sys

from django.conf import settings
from django.core.signals import got_request_exception
from django.db import InterfaceError, OperationalError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string

logger = logging.getLogger("tuna.outage")

# What a database that is not there raises through Django (the same pair the worker retries, tuna_core.jobs).
UNREACHABLE = (OperationalError, InterfaceError)
# Seconds a client is asked to wait: a database restart takes a few.
RETRY_AFTER_S = 10
CODE = "database_unavailable"
MARK = "_tuna_database_unreachable"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def outage_response(request: HttpRequest) -> HttpResponse:
    """The 503 for this request: the API's error object under /api/ and /v1/, a readable page elsewhere."""
    message = (
        "The database is unreachable for a moment (restarting or failing over). What this request did may not have been "
        f"saved, or only in part: check before trying again, in {RETRY_AFTER_S} seconds."
    )
    path = request.path_info
    if path.startswith("/v1/"):
        response = JsonResponse({"error": {"message": message, "type": "overloaded_error", "param": None, "code": CODE}}, status=503)
    elif path.startswith("/api/"):
        response = JsonResponse({"detail": message, "errors": {}, "code": CODE}, status=503)
    else:
        page = render_to_string("tuna_core/database_unavailable.html", {"retry_after": RETRY_AFTER_S, "retry_s": settings.TUNA_DB_RETRY_S})
        response = HttpResponse(page, status=503)
    response["Retry-After"] = str(RETRY_AFTER_S)
    response["Cache-Control"] = "no-store"
    return response


def _mark_unreachable(sender, request=None, **kwargs) -> None:
    """got_request_exception receiver: remember that this request failed because the database is away."""
    exc = sys.exc_info()[1]
    if request is not None and isinstance(exc, UNREACHABLE):
        setattr(request, MARK, exc)


got_request_exception.connect(_mark_unreachable, dispatch_uid="tuna_core.outage")


class DatabaseOutageMiddleware:
    """503 with Retry-After, not 500, while the database is unreachable (see the module docstring)."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        try:
            connection.ensure_connection()
        except UNREACHABLE as exc:
            logger.warning("%s %s: 503, the database is unreachable (%s)", request.method, request.path, _reason(exc))
            return outage_response(request)
        response = self.get_response(request)
        exc = getattr(request, MARK, None)
        if exc is not None and response.status_code == 500:
            logger.warning("%s %s: 503, the database is unreachable (%s)", request.method, request.path, _reason(exc))
            return outage_response(request)
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, UNREACHABLE):
            return None
        logger.warning("%s %s: 503, the database is unreachable (%s)", request.method, request.path, _reason(exception))
        return outage_response(request)
