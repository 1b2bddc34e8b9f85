"""API keys: made, found and revoked here; stored as a SHA-256 digest only (tuna_core.models.ApiToken).

A key is "tuna_" and 43 random URL-safe characters (256 bits), so a fast digest is enough: nobody can guess
one from its digest, and a slow password hasher would cost every API call its time.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.utils import timezone

from tuna_core.models import ApiToken

KEY_PREFIX = "tuna_"
PREFIX_CHARS = 12  # what pages show of a key: "tuna_" and its first 7 random characters
# last_used_at is written at most this often per key, so busy clients do not write on every call.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def api_token_create(*, user, name: str) -> tuple[ApiToken, str]:
    """A new key for `user`: the row, and the key itself, which is shown once and never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken.objects.create(user=user, name=name.strip()[:100] or "API key", prefix=key[:PREFIX_CHARS], digest=key_digest(key))
    return row, key


def api_token_find(key: str) -> ApiToken | None:
    """The active key's row (with its user), or None; marks it used."""
    if not key or len(key) > 200:
        return None
    row = ApiToken.objects.select_related("user").filter(digest=key_digest(key)).first()
    if row is None:
        return None
    now = timezone.now()
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=row.pk).update(last_used_at=now)
        row.last_used_at = now
    return row
