"""Rate limits: API calls per user (429 + Retry-After)."""

import pytest
from django.core.exceptions import ImproperlyConfigured

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


# Log-in limits (per address and name, per address, counted before the password is checked): test_login_attacks.py.
