"""Log-in under attack: attempts counted before the password is checked, locks per (address, name) and per
address with doubling waits, never a lock on a name alone, and the client's address from a trusted proxy."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.contrib.auth.hashers import MD5PasswordHasher
from django.db import connection
from django.test import Client, RequestFactory
from django.urls import reverse

from tuna_site import throttles
from tuna_site.throttles import client_ip

pytestmark = pytest.mark.django_db

WRONG = "correct username and password"


class CountingHasher(MD5PasswordHasher):
    """MD5 (the tests' fast hasher) that counts its password checks and takes 50 ms over each, so parallel
    guesses overlap as they do with a real (slow) hasher."""

    algorithm = "counting_md5"
    checks = 0
    lock = threading.Lock()

    def verify(self, password, encoded):
        with CountingHasher.lock:
            CountingHasher.checks += 1
        time.sleep(0.05)
        return super().verify(password, encoded)


def login(client, username, password, ip="127.0.0.1", url=None, **headers):
    return client.post(url or reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=ip, **headers)


@pytest.fixture
def fake_now(monkeypatch):
    now = [1_000_000.0]
    monkeypatch.setattr(throttles, "_now", lambda: now[0])
    return now


@pytest.mark.django_db(transaction=True)
def test_it_counts_30_parallel_guesses_before_checking_any_password(alice, settings):
    settings.TUNA_LOGIN_FAILURES = 10
    settings.PASSWORD_HASHERS = [f"{__name__}.CountingHasher", *settings.PASSWORD_HASHERS]
    alice.set_password("alice-pass-123")
    alice.save()
    assert alice.password.startswith("counting_md5$")
    CountingHasher.checks = 0
    start = threading.Barrier(30)

    def guess(i: int) -> int:
        try:
            start.wait()
            return login(Client(), "alice", f"guess-{i}", ip="203.0.113.9").status_code
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=30) as pool:
        statuses = list(pool.map(guess, range(30)))
    assert sorted(statuses) == [200] * 10 + [429] * 20  # 10 wrong-password answers, the rest refused unchecked
    assert CountingHasher.checks == 10
    # and the right password from that address waits too
    assert login(Client(), "alice", "alice-pass-123", ip="203.0.113.9").status_code == 429


def test_it_lets_the_admin_log_in_from_another_address_during_an_attack_on_its_name(client, django_user_model, settings):
    admin = django_user_model.objects.create_superuser(username="root", password="root-pass-123")
    settings.TUNA_LOGIN_FAILURES = 5
    attacker = Client()
    statuses = [login(attacker, "root", f"guess-{i}", ip="198.51.100.66").status_code for i in range(40)]
    assert statuses[:5] == [200] * 5 and set(statuses[5:]) == {429}
    response = login(attacker, "root", "root-pass-123", ip="198.51.100.66")
    assert response.status_code == 429 and "_auth_user_id" not in attacker.session

    response = login(client, "root", "root-pass-123", ip="192.0.2.10")  # the owner, elsewhere
    assert response.status_code == 302 and client.session["_auth_user_id"] == str(admin.pk)
    admin_page = Client()
    response = login(admin_page, "root", "root-pass-123", ip="192.0.2.10", url=reverse("admin:login") + "?next=/admin/")
    assert response.status_code == 302 and admin_page.get("/admin/").status_code == 200


def test_it_refuses_with_retry_after_and_a_message_naming_the_limit(client, alice, settings):
    settings.TUNA_LOGIN_FAILURES = 3
    for _ in range(3):
        response = login(client, "alice", "wrong")
        assert response.status_code == 200 and WRONG in response.content.decode()
    response = login(client, "alice", "alice-pass-123")
    assert response.status_code == 429
    assert 1 <= int(response["Retry-After"]) <= settings.TUNA_LOGIN_WINDOW_S
    html = response.content.decode()
    assert "Too many failed log-ins for this user name from your address (more than 3 in 5 minutes: TUNA_LOGIN_FAILURES" in html
    assert "Try again in" in html and "_auth_user_id" not in client.session


def test_it_doubles_the_wait_at_each_lock_of_an_address_and_name(client, alice, settings, fake_now):
    settings.TUNA_LOGIN_FAILURES = 2
    settings.TUNA_LOGIN_WINDOW_S = 60
    waits = []
    for _ in range(4):
        assert [login(client, "alice", "wrong").status_code for _ in range(2)] == [200, 200]
        response = login(client, "alice", "alice-pass-123")
        assert response.status_code == 429
        waits.append(int(response["Retry-After"]))
        fake_now[0] += waits[-1] - 1
        assert login(client, "alice", "alice-pass-123").status_code == 429  # still locked a second before
        fake_now[0] += 1
    assert waits == [60, 120, 240, 480]
    assert login(client, "alice", "alice-pass-123").status_code == 302  # the owner, after the lock
    client.logout()
    # ... which forgets this pair's past locks: the next one is short again
    assert [login(client, "alice", "wrong").status_code for _ in range(3)] == [200, 200, 429]
    assert int(login(client, "alice", "wrong")["Retry-After"]) == 60


def test_it_caps_the_wait_at_a_day(client, alice, settings, fake_now):
    settings.TUNA_LOGIN_FAILURES = 1
    settings.TUNA_LOGIN_WINDOW_S = 3600
    for _ in range(8):
        login(client, "alice", "wrong")
        wait = int(login(client, "alice", "wrong")["Retry-After"])
        fake_now[0] += wait
    assert wait == throttles.LOGIN_MAX_LOCK_S


def test_it_locks_an_address_that_tries_many_names(client, bob, settings):
    settings.TUNA_LOGIN_FAILURES = 2  # per name; the address as a whole: 3 x 2
    for name in ("carol", "dave", "erin", "frank", "grace", "heidi"):
        assert login(client, name, "guess", ip="10.0.0.5").status_code == 200
    response = login(client, "bob", "bob-pass-123", ip="10.0.0.5")
    assert response.status_code == 429
    assert "Too many failed log-ins from your address (more than 6 in 5 minutes: 3 × TUNA_LOGIN_FAILURES" in response.content.decode()
    response = login(client, "bob", "bob-pass-123", ip="10.0.0.6")
    assert response.status_code == 302 and client.session["_auth_user_id"] == str(bob.pk)


def test_it_gives_back_the_count_of_a_right_password(alice, settings):
    settings.TUNA_LOGIN_FAILURES = 3
    client = Client()
    assert [login(client, "alice", "wrong").status_code for _ in range(2)] == [200, 200]
    for _ in range(5):  # right passwords use none of the budget
        assert login(client, "alice", "alice-pass-123").status_code == 302
        client.logout()
    assert [login(client, "alice", "wrong").status_code for _ in range(2)] == [200, 429]


def test_it_takes_the_address_from_the_trusted_proxy_header(client, alice, settings):
    settings.TUNA_LOGIN_FAILURES = 3
    settings.TUNA_CLIENT_IP_HEADER = "X-Forwarded-For"
    proxy = "10.0.0.1"  # every request arrives from the proxy
    for _ in range(3):
        login(Client(), "alice", "wrong", ip=proxy, HTTP_X_FORWARDED_FOR="1.2.3.4, 203.0.113.7")
    assert login(Client(), "alice", "alice-pass-123", ip=proxy, HTTP_X_FORWARDED_FOR="203.0.113.7").status_code == 429
    response = login(client, "alice", "alice-pass-123", ip=proxy, HTTP_X_FORWARDED_FOR="198.51.100.2")
    assert response.status_code == 302


def test_it_ignores_forwarded_addresses_without_a_trusted_proxy(alice, settings):
    settings.TUNA_LOGIN_FAILURES = 3
    settings.TUNA_CLIENT_IP_HEADER = ""
    statuses = [login(Client(), "alice", "wrong", ip="203.0.113.7", HTTP_X_FORWARDED_FOR=f"10.1.1.{i}").status_code for i in range(5)]
    assert statuses == [200, 200, 200, 429, 429]  # a new made-up address each time changes nothing


def test_it_reads_the_client_address(settings):
    factory = RequestFactory()
    request = factory.get("/", REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR="6.6.6.6, 203.0.113.7")
    settings.TUNA_CLIENT_IP_HEADER = ""
    assert client_ip(request) == "10.0.0.1"
    settings.TUNA_CLIENT_IP_HEADER = "X-Forwarded-For"
    assert client_ip(request) == "203.0.113.7"
    assert client_ip(factory.get("/", REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR="not-an-address")) == "10.0.0.1"
    assert client_ip(factory.get("/", REMOTE_ADDR="10.0.0.1")) == "10.0.0.1"
    settings.TUNA_CLIENT_IP_HEADER = "X-Real-IP"
    assert client_ip(factory.get("/", REMOTE_ADDR="10.0.0.1", HTTP_X_REAL_IP="2001:db8::1")) == "2001:db8::1"


def test_it_rate_limits_the_admin_log_in_too(django_user_model, settings):
    django_user_model.objects.create_superuser(username="root", password="root-pass-123")
    settings.TUNA_LOGIN_FAILURES = 2
    client = Client()
    url = reverse("admin:login")
    login(client, "root", "wrong", url=url)
    login(client, "root", "wrong", url=url)
    response = login(client, "root", "root-pass-123", url=url)
    assert "Too many failed log-ins for this user name from your address" in response.content.decode()
    assert "_auth_user_id" not in client.session


def test_it_does_not_count_a_post_without_a_password(client, alice, settings):
    settings.TUNA_LOGIN_FAILURES = 2
    for _ in range(5):
        assert client.post(reverse("login"), {"username": "alice"}).status_code == 200
    assert login(client, "alice", "alice-pass-123").status_code == 302


def test_it_names_the_longest_lock_when_both_hold(client, alice, settings, fake_now):
    settings.TUNA_LOGIN_FAILURES = 1  # per name; the address: 3
    settings.TUNA_LOGIN_WINDOW_S = 60
    fake_now[0] = 60 * 16_667.0  # the start of a window
    for name in ("carol", "dave"):
        login(client, name, "guess")
    login(client, "alice", "wrong")
    assert login(client, "alice", "wrong").status_code == 429  # (address, alice) locked for 60 s
    fake_now[0] += 30
    response = login(client, "erin", "guess")  # the address's 4th failure: the address locked for 60 s
    assert response.status_code == 429 and int(response["Retry-After"]) == 60
    response = login(client, "alice", "alice-pass-123")
    assert int(response["Retry-After"]) == 60 and "from your address (more than 3" in response.content.decode()
