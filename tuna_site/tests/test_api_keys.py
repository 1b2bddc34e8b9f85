"""API keys: stored as digests only, shown once, several per user, rotated and revoked by their owner."""

from __future__ import annotations

import importlib
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.urls import reverse
from rest_framework.test import APIClient

from tests.support import api_key
from tuna_core.models import ApiToken
from tuna_core.tokens import KEY_PREFIX, api_token_create

pytestmark = pytest.mark.django_db


def api_status(key: str, scheme: str = "Bearer") -> int:
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"{scheme} {key}")
    return api.get("/api/datasets").status_code


def make_key(client, name: str = "laptop") -> tuple[str, object]:
    """A key made through the account page, and that page's answer."""
    response = client.post(reverse("api-key-create"), {"name": name})
    assert response.status_code == 200
    return response.context["new_key"], response


def database_text() -> str:
    """Everything the database holds, as a thief with a copy of its file would read it."""
    if connection.vendor == "sqlite":
        return "\n".join(connection.connection.iterdump())
    parts = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
            parts.extend(repr(row) for row in cursor.fetchall())
    return "\n".join(parts)


def test_it_keeps_no_usable_key_in_a_stolen_copy_of_the_database(alice_client, alice):
    key, _ = make_key(alice_client)
    other = api_key(alice, "CI")
    assert api_status(key) == 200 and api_status(other) == 200
    dump = database_text()
    assert "CREATE TABLE" in dump or connection.vendor != "sqlite"
    for secret in (key, other):
        assert secret not in dump
        assert secret[len(KEY_PREFIX) :] not in dump  # nor its random part on its own
    rows = list(ApiToken.objects.filter(user=alice).values("prefix", "digest", "name"))
    assert len(rows) == 2
    # What the rows do hold opens nothing.
    for row in rows:
        for value in row.values():
            assert api_status(value) == 401
            assert api_status(KEY_PREFIX + value) == 401


def test_it_shows_a_key_once_and_lists_name_prefix_created_and_last_used(alice_client, alice):
    key, made = make_key(alice_client, "laptop")
    assert key.startswith(KEY_PREFIX) and len(key) > 40
    assert key in made.content.decode()
    assert "shown only this once" in made.content.decode()
    token = ApiToken.objects.get(user=alice)
    assert token.name == "laptop" and token.prefix == key[:12] and token.last_used_at is None

    page = alice_client.get(reverse("account")).content.decode()
    assert key not in page
    assert "laptop" in page and f"{key[:12]}…" in page and "never" in page

    assert api_status(key, "Token") == 200
    token.refresh_from_db()
    assert token.last_used_at is not None
    page = alice_client.get(reverse("account")).content.decode()
    assert "never" not in page and "now" in page


def test_it_sends_no_store_on_every_key_page(alice_client, alice):
    key, made = make_key(alice_client)
    token = ApiToken.objects.get(user=alice)
    rotated = alice_client.post(reverse("api-key-rotate", args=[token.pk]))
    listed = alice_client.get(reverse("account"))
    revoked = alice_client.post(reverse("api-key-revoke", args=[rotated.context["new_token"].pk]))
    for response in (made, rotated, listed, revoked):
        assert "no-store" in response["Cache-Control"], response


def test_it_refuses_a_revoked_key(alice_client, alice):
    key, _ = make_key(alice_client)
    keep = api_key(alice, "kept")
    token = ApiToken.objects.get(user=alice, name="laptop")
    assert api_status(key) == 200
    response = alice_client.post(reverse("api-key-revoke", args=[token.pk]), follow=True)
    assert response.status_code == 200
    assert "Revoked the key “laptop”" in response.content.decode()
    assert not ApiToken.objects.filter(pk=token.pk).exists()
    assert api_status(key) == 401
    assert api_status(keep) == 200  # the user's other keys go on working


def test_it_rotates_a_key_old_refused_new_accepted(alice_client, alice):
    old, _ = make_key(alice_client, "CI")
    token = ApiToken.objects.get(user=alice)
    response = alice_client.post(reverse("api-key-rotate", args=[token.pk]))
    new = response.context["new_key"]
    assert response.status_code == 200 and new != old and new in response.content.decode()
    assert api_status(old) == 401
    assert api_status(new) == 200
    assert list(ApiToken.objects.filter(user=alice).values_list("name", flat=True)) == ["CI"]
    assert not ApiToken.objects.filter(pk=token.pk).exists()


def test_it_lets_only_one_of_two_concurrent_rotations_of_a_key_make_a_new_one(alice_client, alice, monkeypatch):
    """Two posts of the same rotate, both past the key's lookup before either deletes it: one 200, one 404."""
    from tuna_site import token_views

    make_key(alice_client, "CI")
    token = ApiToken.objects.get(user=alice)
    url = reverse("api-key-rotate", args=[token.pk])
    lookup = token_views._get_token_for_user
    answers = []

    def lookup_then_let_the_other_post_run(request, pk):
        row = lookup(request, pk)  # this post has read the row ...
        if not answers:
            answers.append(None)
            answers.append(alice_client.post(url))  # ... and the other post runs to its end meanwhile
        return row

    monkeypatch.setattr(token_views, "_get_token_for_user", lookup_then_let_the_other_post_run)
    first = alice_client.post(url)
    second = answers[1]
    assert sorted([first.status_code, second.status_code]) == [200, 404]
    assert "no longer exists" in (first if first.status_code == 404 else second).content.decode()
    rows = list(ApiToken.objects.filter(user=alice))
    assert len(rows) == 1
    shown = (first if first.status_code == 200 else second).context["new_key"]
    assert api_status(shown) == 200


def test_it_answers_404_for_another_users_key_ids(alice, bob, client):
    row, key = api_token_create(user=alice, name="alice's")
    client.force_login(bob)
    assert client.post(reverse("api-key-rotate", args=[row.pk])).status_code == 404
    assert client.post(reverse("api-key-revoke", args=[row.pk])).status_code == 404
    assert client.post(reverse("api-key-revoke", args=[row.pk + 1000])).status_code == 404
    assert "alice's" not in client.get(reverse("account")).content.decode()
    assert ApiToken.objects.filter(pk=row.pk, digest=row.digest).exists()
    assert api_status(key) == 200


def test_it_refuses_a_key_over_the_per_user_limit_naming_the_setting(alice_client, alice, settings):
    settings.TUNA_MAX_API_KEYS_PER_USER = 2
    make_key(alice_client, "one")
    make_key(alice_client, "two")
    response = alice_client.post(reverse("api-key-create"), {"name": "three"})
    assert response.status_code == 409
    assert "TUNA_MAX_API_KEYS_PER_USER" in response.content.decode()
    assert not response.context["new_key"]
    assert ApiToken.objects.filter(user=alice).count() == 2


def test_it_refuses_key_pages_to_anonymous_users_and_gets(client, alice):
    assert client.get(reverse("account")).status_code == 302
    assert client.post(reverse("api-key-create"), {"name": "x"}).status_code == 302
    client.force_login(alice)
    assert client.get(reverse("api-key-create")).status_code == 405
    assert ApiToken.objects.count() == 0


def test_it_refuses_the_key_of_an_inactive_user(alice):
    key = api_key(alice)
    alice.is_active = False
    alice.save()
    assert api_status(key) == 401


def test_it_turns_keys_from_before_the_upgrade_into_digests_that_still_work(alice, bob):
    """The data migration: DRF's plaintext tokens become ApiToken rows; the plaintext is gone."""
    migration = importlib.import_module("tuna_core.migrations.0002_api_tokens_from_drf")
    old = {"alice": "0123456789abcdef0123456789abcdef01234567", "bob": "fedcba9876543210fedcba9876543210fedcba98"}
    table = connection.ops.quote_name("authtoken_token")
    with connection.cursor() as cursor:
        if "authtoken_token" not in connection.introspection.table_names():
            cursor.execute(f'CREATE TABLE {table} ("key" varchar(40) PRIMARY KEY, created timestamp NOT NULL, user_id integer NOT NULL)')
        for user in (alice, bob):
            cursor.execute(
                f'INSERT INTO {table} ("key", created, user_id) VALUES (%s, %s, %s)',
                [old[user.username], datetime(2025, 1, 2, tzinfo=UTC), user.pk],
            )

    token_type = ContentType.objects.get_or_create(app_label="authtoken", model="token")[0]
    Permission.objects.get_or_create(content_type=token_type, codename="view_token", defaults={"name": "Can view Token"})

    editor = SimpleNamespace(connection=connection, quote_name=connection.ops.quote_name)
    migration.hash_old_tokens(django_apps(), editor)

    for user in (alice, bob):
        token = ApiToken.objects.get(user=user)
        assert token.name == "Key from before the upgrade"
        assert token.prefix == old[user.username][:7]
        assert token.created_at.year == 2025
        assert api_status(old[user.username], "Token") == 200
        assert api_status(old[user.username], "Bearer") == 200
    assert "authtoken_token" not in connection.introspection.table_names()  # the plaintext table is gone
    assert not ContentType.objects.filter(app_label="authtoken").exists()
    assert not Permission.objects.filter(codename="view_token").exists()
    dump = database_text()
    assert old["alice"] not in dump and old["bob"] not in dump


def django_apps():
    from django.apps import apps

    return apps


def test_it_shows_staff_the_prefix_only_and_no_add_form(admin_client, alice):
    row, key = api_token_create(user=alice, name="laptop")
    listing = admin_client.get("/admin/tuna_core/apitoken/").content.decode()
    assert row.prefix in listing and key not in listing and row.digest not in listing
    detail = admin_client.get(f"/admin/tuna_core/apitoken/{row.pk}/change/")
    assert detail.status_code == 200 and key not in detail.content.decode()
    assert admin_client.get("/admin/tuna_core/apitoken/add/").status_code == 403
    # Changing a row is refused; deleting it revokes the key.
    admin_client.post(f"/admin/tuna_core/apitoken/{row.pk}/change/", {"name": "renamed", "user": alice.pk})
    assert ApiToken.objects.get(pk=row.pk).name == "laptop"
    assert admin_client.post(f"/admin/tuna_core/apitoken/{row.pk}/delete/", {"post": "yes"}).status_code == 302
    assert api_status(key) == 401


def test_it_describes_the_bearer_key_in_the_schema(alice_client):
    schema = alice_client.get("/api/schema").content.decode()
    assert "bearerAuth" in schema and "scheme: bearer" in schema


def test_it_calls_them_api_keys_made_on_the_account_page_wherever_pages_mention_them(alice_client):
    """Keys are made on the Account page and shown once: no page says a token is waiting there to be copied."""
    menu = alice_client.get(reverse("account")).content.decode()
    assert "Account &amp; API keys" in menu and "API token" not in menu
    openai = alice_client.get(reverse("coming-from-openai")).content.decode()
    assert "Your token is on" not in openai and "API token" not in openai and "LLM Tuna token" not in openai
    assert "Make an API key on the" in openai and "shown once" in openai
