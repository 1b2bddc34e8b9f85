"""Rate limits: API calls per user (DRF throttle), page form posts per user, and log-in attempts per address.

Every limit reads its setting at each request (not once at import, as DRF's own classes do), so an operator's
change and a test's ``settings`` override apply at once. Counters live in Django's cache and are counted with
``cache.add`` + ``cache.incr``, which are atomic in the local-memory cache the settings use (and in Redis or
Memcached): parallel requests can never all read "below the limit" and pass together.

Written here rather than taken from django-axes or django-ratelimit: axes locks by user name (the weapon this
module avoids) and stores attempts in the database; ratelimit counts after the view runs. What is needed is ~100 lines.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from dataclasses import dataclass, field

from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import cache
from rest_framework.exceptions import Throttled
from rest_framework.throttling import UserRateThrottle

_PERIODS = {"s": "second", "m": "minute", "h": "hour", "d": "day"}
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

# Log-in: one address may fail this many times TUNA_LOGIN_FAILURES over all the names it tries (several people
# behind one address each get their own TUNA_LOGIN_FAILURES per name).
LOGIN_ADDRESS_FACTOR = 3
# Each lock of the same (address, name) or address lasts twice the one before, up to this; locks are remembered
# for a day after the first one.
LOGIN_MAX_LOCK_S = 24 * 3600
LOGIN_STRIKES_MEMORY_S = 24 * 3600


def _now() -> float:
    return time.time()


def parse_rate(rate: str) -> tuple[int, int, str]:
    """"60/min" -> (60, 60, "minute"): calls, seconds, the period's name."""
    count, period = rate.split("/")
    return int(count), _SECONDS[period[0]], _PERIODS[period[0]]


def client_ip(request) -> str:
    """The client's address: from TUNA_CLIENT_IP_HEADER (its last address: the one the trusted proxy saw) when
    that is set and holds an address, else the connection's own address. Client-sent headers are never trusted
    otherwise."""
    remote = request.META.get("REMOTE_ADDR", "") if request is not None else ""
    header = settings.TUNA_CLIENT_IP_HEADER
    if header and request is not None:
        raw = request.META.get("HTTP_" + header.upper().replace("-", "_"), "")
        last = raw.split(",")[-1].strip() if raw else ""
        try:
            return str(ipaddress.ip_address(last))
        except ValueError:
            pass
    return remote


def _hit(key: str, seconds: float) -> int:
    """Counts one hit on `key` (created with a lifetime of `seconds`) and returns the count, atomically."""
    for _ in range(3):
        cache.add(key, 0, math.ceil(seconds))
        try:
            return cache.incr(key)
        except ValueError:  # expired between add and incr
            continue
    return 1


def _unhit(key: str) -> None:
    try:
        cache.decr(key)
    except ValueError:  # expired meanwhile: nothing to give back
        pass


def wait_text(seconds: float) -> str:
    seconds = math.ceil(seconds)
    if seconds < 90:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    if seconds < 90 * 60:
        return f"{math.ceil(seconds / 60)} minutes"
    return f"{math.ceil(seconds / 3600)} hours"


def rate_hit(key: str, rate: str) -> int:
    """One hit against `rate` ("60/min") in a fixed window: 0 when allowed, else the seconds until it is."""
    limit, seconds, _ = parse_rate(rate)
    now = _now()
    window = int(now // seconds)
    if _hit(f"tuna-rate:{key}:{window}", seconds) <= limit:
        return 0
    return max(1, math.ceil((window + 1) * seconds - now))


class ApiRateThrottle(UserRateThrottle):
    """TUNA_API_RATE calls per user (per address before authentication); beyond it 429 with Retry-After."""

    def get_rate(self) -> str | None:
        return settings.TUNA_API_RATE

    def get_ident(self, request) -> str:
        # DRF's own trusts any X-Forwarded-For; an anonymous caller could pick a new address for every call.
        return client_ip(request)

    def throttle_failure(self) -> bool:
        wait = self.wait()
        wait = math.ceil(wait if wait is not None else self.duration)
        count, _, period = parse_rate(settings.TUNA_API_RATE)
        raise Throttled(
            wait=wait,
            detail=f"Too many API calls: the limit is {count} per {period} per user (TUNA_API_RATE).",
        )


@dataclass(frozen=True)
class _LoginCounter:
    key: str
    limit: int
    refusal: str  # what the refusal says, before "Try again in ..."


def _login_counters(request, username: str) -> list[_LoginCounter]:
    """Per (address, name) and per address; never per name alone, which would let anyone lock the owner out."""
    ip = client_ip(request)
    name = hashlib.sha256(username.strip().lower().encode("utf-8", "surrogatepass")).hexdigest()[:32]
    failures, window = settings.TUNA_LOGIN_FAILURES, wait_text(settings.TUNA_LOGIN_WINDOW_S)
    return [
        _LoginCounter(
            f"tuna-login:{ip}:{name}",
            failures,
            f"Too many failed log-ins for this user name from your address "
            f"(more than {failures} in {window}: TUNA_LOGIN_FAILURES, TUNA_LOGIN_WINDOW_S).",
        ),
        _LoginCounter(
            f"tuna-login:{ip}",
            failures * LOGIN_ADDRESS_FACTOR,
            f"Too many failed log-ins from your address "
            f"(more than {failures * LOGIN_ADDRESS_FACTOR} in {window}: {LOGIN_ADDRESS_FACTOR} × TUNA_LOGIN_FAILURES, TUNA_LOGIN_WINDOW_S).",
        ),
    ]


def _lock(counter: _LoginCounter, now: float) -> float:
    """Locks `counter` (once, however many refused attempts race here): each lock twice as long as the last."""
    window, key = settings.TUNA_LOGIN_WINDOW_S, f"{counter.key}:lock"
    until = cache.get(key)
    if until is not None and until > now:
        return until
    if until is not None:  # over, but not yet evicted
        cache.delete(key)
    if cache.add(key, now + window, window):
        strikes = _hit(f"{counter.key}:strikes", LOGIN_STRIKES_MEMORY_S)
        duration = min(window * 2 ** min(strikes - 1, 32), LOGIN_MAX_LOCK_S)
        cache.set(key, now + duration, math.ceil(duration))
    return cache.get(key, now + window)


@dataclass
class LoginAttempt:
    """One log-in attempt, counted before the password is checked. `refused` is the message when it may not
    go on (`retry_after` seconds); otherwise `succeeded()` gives the count back once the password was right."""

    counters: list[_LoginCounter]
    refused: str = ""
    retry_after: int = 0
    counted: list[str] = field(default_factory=list)

    @classmethod
    def begin(cls, request, username: str) -> LoginAttempt:
        now = _now()
        counters = _login_counters(request, username)
        locks = [(cache.get(f"{counter.key}:lock") or 0, counter) for counter in counters]
        until, counter = max(locks, key=lambda lock: lock[0])
        if until > now:  # the longest lock is the one to wait for
            return cls([], counter.refusal, max(1, math.ceil(until - now)))
        # Counted in fixed windows of TUNA_LOGIN_WINDOW_S; a lock lasts at least one, so each starts afresh.
        window = settings.TUNA_LOGIN_WINDOW_S
        suffix = f":n:{int(now // window)}"
        counted: list[str] = []
        for counter in counters:
            counted.append(counter.key + suffix)
            if _hit(counter.key + suffix, window) > counter.limit:
                for key in counted:
                    _unhit(key)
                return cls([], counter.refusal, max(1, math.ceil(_lock(counter, now) - now)))
        return cls(counters, counted=counted)

    def succeeded(self) -> None:
        for key in self.counted:
            _unhit(key)
        if self.counters:  # the owner proved the name from this address: its next lock starts short again
            cache.delete(f"{self.counters[0].key}:strikes")


class LoginRateLimitMixin:
    """Counts each log-in attempt before its password is checked and refuses it while its address, or its
    (address, name), is locked: see LoginAttempt. A right password gives its count back."""

    retry_after = 0

    def clean(self):
        username = self.cleaned_data.get("username")
        if not username or not self.cleaned_data.get("password"):
            return super().clean()  # no password is checked: nothing to count
        attempt = LoginAttempt.begin(self.request, username)
        if attempt.refused:
            self.retry_after = attempt.retry_after
            raise forms.ValidationError(f"{attempt.refused} Try again in {wait_text(attempt.retry_after)}.", code="throttled")
        cleaned = super().clean()  # raises on a wrong password: the attempt stays counted
        attempt.succeeded()
        return cleaned


class RateLimitedAuthenticationForm(LoginRateLimitMixin, AuthenticationForm):
    pass


class RateLimitedAdminAuthenticationForm(LoginRateLimitMixin, AdminAuthenticationForm):
    pass
