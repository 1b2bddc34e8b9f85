"""API keys on the request: ``Authorization: Bearer <key>`` (what OpenAI clients send) or ``Token <key>``.

Keys are looked up by their digest (tuna_core.tokens); the database holds no key.
"""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header


class BearerOrTokenAuthentication(BaseAuthentication):
    """An API key sent as ``Bearer <key>`` or ``Token <key>``; a wrong, revoked or rotated key is a 401."""

    def authenticate(self, request):
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() not in (b"token", b"bearer"):
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed("Invalid Authorization header: send 'Bearer <token>'.")
        try:
            key = parts[1].decode()
        except UnicodeError:
            raise exceptions.AuthenticationFailed("Invalid token.") from None
        from tuna_core.tokens import api_token_find  # here: DRF imports this module while tuna_core.errors loads

        token = api_token_find(key)
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid token: it is wrong, revoked or replaced by a rotation.")
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        return token.user, token

    def authenticate_header(self, request):
        return "Bearer"


class BearerOrTokenScheme(OpenApiAuthenticationExtension):
    """How /api/schema describes the key (drf-spectacular finds this extension when this module is imported)."""

    target_class = "tuna_site.authentication.BearerOrTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key from the Account page, as `Authorization: Bearer <key>` (or `Token <key>`).",
        }
