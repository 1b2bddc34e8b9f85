"""The account page's API keys: list, create (the key shown once), rotate and revoke.

Every page here answers `Cache-Control: no-store` (never_cache), so a key shown once stays out of the
browser's and any proxy's cache.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from tuna_core.errors import UserError
from tuna_core.models import ApiToken
from tuna_core.tokens import api_token_issue, api_token_revoke, api_token_rotate, api_tokens_for, max_keys_per_user


def _get_token_for_user(request: HttpRequest, pk: int) -> ApiToken:
    """The user's own key row; another user's is a 404."""
    return get_object_or_404(ApiToken.objects.select_related("user"), pk=pk, user=request.user)


def _account_page(
    request: HttpRequest, *, new_key: str = "", new_token: ApiToken | None = None, error: str = "", status: int = 200
) -> HttpResponse:
    context = {
        "tokens": api_tokens_for(request.user),
        "new_key": new_key,
        "new_token": new_token,
        "error": error,
        "max_keys": max_keys_per_user(),
        "api_base": request.build_absolute_uri("/v1"),
    }
    return render(request, "account.html", context, status=status)


@never_cache
@login_required
def account(request: HttpRequest) -> HttpResponse:
    return _account_page(request)


@never_cache
@login_required
@require_POST
def api_key_create(request: HttpRequest) -> HttpResponse:
    """Makes a key and shows it on this one answer (no redirect: the key is not kept anywhere to show later)."""
    try:
        token, key = api_token_issue(user=request.user, name=request.POST.get("name", ""))
    except UserError as exc:
        return _account_page(request, error=exc.message, status=exc.status)
    return _account_page(request, new_key=key, new_token=token)


@never_cache
@login_required
@require_POST
def api_key_rotate(request: HttpRequest, pk: int) -> HttpResponse:
    try:
        token, key = api_token_rotate(token=_get_token_for_user(request, pk))
    except UserError as exc:
        return _account_page(request, error=exc.message, status=exc.status)
    return _account_page(request, new_key=key, new_token=token)


@never_cache
@login_required
@require_POST
def api_key_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    token = _get_token_for_user(request, pk)
    api_token_revoke(token=token)
    messages.success(request, f"Revoked the key “{token.name}” ({token.prefix}…): it no longer works.")
    return redirect("account")
