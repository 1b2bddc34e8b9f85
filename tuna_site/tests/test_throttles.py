"""Rate limits: API calls per user (429 + Retry-After) and failed log-ins per user name and per address."""

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.urls import reverse

from tuna_site import throttles
from tuna_site.env import env_rate

pytestmark = pytest.mark.django_db


def test_it_answers_429_with_retry_after_beyond_the_api_rate(alice_api, bob_api, settings):
    settings.TUNA_API_RATE = "3/min"
    assert [alice_api.get("/api/datasets").status_code for _ in range(3)] == [200, 200, 200]
    response = alice_api.get("/api/training")
    assert response.status_code == 429
    assert 1 <= int(response["Retry-After"]) <= 60
    assert response.json()["detail"].startswith("Too many API calls: the limit is 3 per minute per user (TUNA_API_RATE).")
    assert alice_api.get("/v1/models").status_code == 429  # one budget for every API
    assert bob_api.get("/api/datasets").status_code == 200  # per user


def test_it_lets_calls_through_again_when_the_window_has_passed(alice_api, settings, monkeypatch):
    settings.TUNA_API_RATE = "2/min"
    now = [1_000_000.0]
    monkeypatch.setattr(throttles.ApiRateThrottle, "timer", lambda self: now[0])
    assert [alice_api.get("/api/datasets").status_code for _ in range(3)] == [200, 200, 429]
    now[0] += 61
    assert alice_api.get("/api/datasets").status_code == 200


def test_it_turns_the_api_rate_off(alice_api, settings):
    settings.TUNA_API_RATE = None
    assert {alice_api.get("/api/datasets").status_code for _ in range(20)} == {200}


def test_it_reads_the_api_rate_from_the_environment(monkeypatch):
    monkeypatch.setenv("TUNA_API_RATE", "off")
    assert env_rate("TUNA_API_RATE", "300/min") is None
    monkeypatch.setenv("TUNA_API_RATE", "20/hour")
    assert env_rate("TUNA_API_RATE", "300/min") == "20/hour"
    for bad in ("20", "x/min", "20/fortnight", "-1/min"):
        monkeypatch.setenv("TUNA_API_RATE", bad)
        with pytest.raises(ImproperlyConfigured, match="TUNA_API_RATE must look like 300/min"):
            env_rate("TUNA_API_RATE", "300/min")


def login(client, username, password, ip="127.0.0.1", url=None):
    return client.post(url or reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=ip)


def test_it_refuses_log_ins_after_too_many_failures_for_a_user_name(client, alice, settings):
    settings.TUNA_LOGIN_FAILURES = 3
    for _ in range(3):
        response = login(client, "alice", "wrong")
        assert response.status_code == 200 and "correct username and password" in response.content.decode()
    response = login(client, "alice", "alice-pass-123", ip="10.0.0.9")  # the right password, from elsewhere
    assert response.status_code == 429
    assert 1 <= int(response["Retry-After"]) <= 300
    html = response.content.decode()
    assert "Too many failed log-ins for this user name or from this address (3 in 5 minutes). Try again in" in html
    assert "_auth_user_id" not in client.session


def test_it_refuses_log_ins_after_too_many_failures_from_one_address(client, alice, bob, settings):
    settings.TUNA_LOGIN_FAILURES = 3
    for name in ("carol", "dave", "erin"):
        login(client, name, "guess", ip="10.0.0.5")
    assert login(client, "bob", "bob-pass-123", ip="10.0.0.5").status_code == 429
    response = login(client, "bob", "bob-pass-123", ip="10.0.0.6")  # another address, another user name
    assert response.status_code == 302 and client.session["_auth_user_id"] == str(bob.pk)


def test_it_allows_log_ins_again_after_the_window(client, alice, settings, monkeypatch):
    settings.TUNA_LOGIN_FAILURES = 2
    now = [1_000_000.0]
    monkeypatch.setattr(throttles, "_now", lambda: now[0])
    login(client, "alice", "wrong")
    login(client, "alice", "wrong")
    assert login(client, "alice", "alice-pass-123").status_code == 429
    now[0] += settings.TUNA_LOGIN_WINDOW_S + 1
    assert login(client, "alice", "alice-pass-123").status_code == 302


def test_it_rate_limits_the_admin_log_in_too(client, django_user_model, settings):
    django_user_model.objects.create_superuser(username="root", password="root-pass-123")
    settings.TUNA_LOGIN_FAILURES = 2
    url = reverse("admin:login")
    login(client, "root", "wrong", url=url)
    login(client, "root", "wrong", url=url)
    response = login(client, "root", "root-pass-123", url=url)
    assert "Too many failed log-ins" in response.content.decode()
    assert "_auth_user_id" not in client.session
