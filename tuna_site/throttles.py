"""Rate limits: API calls per user (DRF throttle) and failed log-ins per user name and per address.

Both read their limits from settings at each request (not once at import, as DRF's own classes do), so an
operator's change and a test's ``settings`` override apply at once; counters live in Django's cache.
"""

from __future__ import annotations

import hashlib
import math
import time

from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import cache
from rest_framework.exceptions import Throttled
from rest_framework.throttling import UserRateThrottle

_PERIODS = {"s": "second", "m": "minute", "h": "hour", "d": "day"}


class ApiRateThrottle(UserRateThrottle):
    """TUNA_API_RATE calls per user (per address before authentication); beyond it 429 with Retry-After."""

    def get_rate(self) -> str | None:
        return settings.TUNA_API_RATE

    def throttle_failure(self) -> bool:
        wait = self.wait()
        wait = math.ceil(wait if wait is not None else self.duration)
        count, period = settings.TUNA_API_RATE.split("/")
        raise Throttled(
            wait=wait,
            detail=f"Too many API calls: the limit is {count} per {_PERIODS[period[0]]} per user (TUNA_API_RATE).",
        )


def _now() -> float:
    return time.time()


def _login_keys(request, username: str | None) -> list[str]:
    keys = [f"tuna-login-ip:{request.META.get('REMOTE_ADDR', '')}"]
    if username:
        digest = hashlib.sha256(username.strip().lower().encode("utf-8", "surrogatepass")).hexdigest()
        keys.append(f"tuna-login-user:{digest}")
    return keys


def _recent(key: str, now: float) -> list[float]:
    return [t for t in cache.get(key, []) if t > now - settings.TUNA_LOGIN_WINDOW_S]


def login_retry_after(request, username: str | None) -> int:
    """Seconds until a log-in may be tried again for this user name or from this address (0: now)."""
    now = _now()
    wait = 0.0
    for key in _login_keys(request, username):
        failures = _recent(key, now)
        if len(failures) >= settings.TUNA_LOGIN_FAILURES:
            # The window slides: one more try is allowed once the oldest counted failure leaves it.
            oldest = sorted(failures)[-settings.TUNA_LOGIN_FAILURES]
            wait = max(wait, oldest + settings.TUNA_LOGIN_WINDOW_S - now)
    return math.ceil(wait)


def login_failed(request, username: str | None) -> None:
    now = _now()
    for key in _login_keys(request, username):
        cache.set(key, [*_recent(key, now), now], settings.TUNA_LOGIN_WINDOW_S)


def _wait_text(seconds: int) -> str:
    if seconds < 90:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} minutes"


class LoginRateLimitMixin:
    """Refuses a log-in after TUNA_LOGIN_FAILURES failures in TUNA_LOGIN_WINDOW_S, per user name and per address."""

    retry_after = 0

    def clean(self):
        username = self.cleaned_data.get("username")
        self.retry_after = login_retry_after(self.request, username)
        if self.retry_after:
            raise forms.ValidationError(
                f"Too many failed log-ins for this user name or from this address "
                f"({settings.TUNA_LOGIN_FAILURES} in {_wait_text(settings.TUNA_LOGIN_WINDOW_S)}). "
                f"Try again in {_wait_text(self.retry_after)}.",
                code="throttled",
            )
        try:
            return super().clean()
        except forms.ValidationError:
            login_failed(self.request, username)
            raise


class RateLimitedAuthenticationForm(LoginRateLimitMixin, AuthenticationForm):
    pass


class RateLimitedAdminAuthenticationForm(LoginRateLimitMixin, AdminAuthenticationForm):
    pass
