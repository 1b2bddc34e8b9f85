import pytest
from django.urls import reverse

from training_app.models import TrainingJob


@pytest.mark.django_db
def test_it_logs_in_and_shows_the_dashboard_with_empty_states(client, alice):
    response = client.post(reverse("login"), {"username": "alice", "password": "alice-pass-123"})
    assert response.status_code == 302
    assert response["Location"] == reverse("dashboard")
    page = client.get(reverse("dashboard")).content.decode()
    assert "Start here" in page
    assert "Try the sample dataset" in page
    for link in ["/datasets", "/training", "/evaluations", "/playground", "/docs"]:
        assert f'href="{link}"' in page


@pytest.mark.django_db
def test_it_rejects_a_wrong_password_with_a_message(client, alice):
    response = client.post(reverse("login"), {"username": "alice", "password": "nope"})
    assert response.status_code == 200
    assert "correct username and password" in response.content.decode()


@pytest.mark.django_db
def test_it_counts_and_lists_recent_items_on_the_dashboard(alice_client, alice, valid_dataset):
    TrainingJob.objects.create(owner=alice, dataset=valid_dataset, base_model="smollm2-135m-instruct", config={})
    page = alice_client.get(reverse("dashboard")).content.decode()
    assert "Start here" not in page
    assert "Orders" in page
    assert "Job #" in page


@pytest.mark.django_db
def test_it_logs_out_with_a_post(alice_client):
    response = alice_client.post(reverse("logout"))
    assert response.status_code == 302
    assert alice_client.get(reverse("dashboard")).status_code == 302


@pytest.mark.django_db
def test_it_shows_a_new_api_key_on_the_account_page_once(alice_client, alice):
    from tuna_core.tokens import KEY_PREFIX

    made = alice_client.post(reverse("api-key-create"), {"name": "laptop"})
    key = made.context["new_key"]
    assert made.status_code == 200 and key.startswith(KEY_PREFIX) and key in made.content.decode()
    page = alice_client.get(reverse("account")).content.decode()
    assert key not in page and key[:12] in page and "laptop" in page


@pytest.mark.django_db
def test_it_serves_the_schema_and_swagger_ui_from_local_files(alice_client):
    schema = alice_client.get("/api/schema")
    assert schema.status_code == 200
    assert b"/api/datasets" in schema.content
    docs = alice_client.get("/docs").content.decode()
    assert "swagger-ui" in docs
    assert "cdn" not in docs.lower()
    assert "https://" not in docs.split("<body")[0]


@pytest.mark.django_db
def test_it_loads_no_resource_from_another_host(alice_client, valid_dataset):
    import re

    for url in ["/", "/datasets", f"/datasets/{valid_dataset.pk}", "/training", "/evaluations", "/playground"]:
        page = alice_client.get(url).content.decode()
        external = re.findall(r'(?:src|href)="(https?://[^"]+)"', page)
        assert external == [], (url, external)
