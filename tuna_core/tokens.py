"""API keys: made, found and revoked here; stored as a SHA-256 digest only (tuna_core.models.ApiToken).

A key is "tuna_" and 43 random URL-safe characters (256 bits), so a fast digest is enough: nobody can guess
one from its digest, and a slow password hasher would cost every API call its time.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from tuna_core.errors import LimitReached, NotFound
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


def max_keys_per_user() -> int:
    return settings.TUNA_MAX_API_KEYS_PER_USER


def api_tokens_for(user):
    """The user's keys, newest first (rows only: the keys themselves are not stored)."""
    return ApiToken.objects.filter(user=user)


@transaction.atomic
def api_token_issue(*, user, name: str) -> tuple[ApiToken, str]:
    """A new key made on the user's request: like api_token_create, within the per-user limit."""
    get_user_model().objects.select_for_update().filter(pk=user.pk).first()  # one key made at a time per user
    limit = max_keys_per_user()
    if ApiToken.objects.filter(user=user).count() >= limit:
        raise LimitReached(f"You have {limit} API keys, the most allowed (TUNA_MAX_API_KEYS_PER_USER): revoke one you no longer use first.")
    return api_token_create(user=user, name=name)


@transaction.atomic
def api_token_rotate(*, token: ApiToken) -> tuple[ApiToken, str]:
    """A new key under the same name for `token`'s user; the old key stops working at once.

    Only the call whose delete removed the row makes the new key: a second rotation of the same key racing
    with this one (it read the row before this delete) finds it gone and is refused, so no key is made that
    nobody is shown. The delete takes the row's lock, so a concurrent delete waits for this commit.
    """
    deleted, _ = ApiToken.objects.filter(pk=token.pk, user_id=token.user_id).delete()
    if not deleted:
        raise NotFound("This API key no longer exists (it was rotated or revoked meanwhile): reload the Account page.")
    return api_token_create(user=token.user, name=token.name)


def api_token_revoke(*, token: ApiToken) -> None:
    """The key stops working at once (its row is deleted)."""
    ApiToken.objects.filter(pk=token.pk).delete()
