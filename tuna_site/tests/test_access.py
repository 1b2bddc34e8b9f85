"""Every page and endpoint needs a login; another user's objects are 404."""

import pytest
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from evaluation_app.models import Evaluation
from tests.support import job_row
from training_app.models import TrainingJob

PUBLIC = {"login", "logout"}


def _named_patterns(resolver=None, prefix=""):
    resolver = resolver or get_resolver()
    for entry in resolver.url_patterns:
        if isinstance(entry, URLResolver):
            if entry.app_name == "admin":
                continue
            yield from _named_patterns(entry, prefix + str(entry.pattern))
        elif isinstance(entry, URLPattern) and entry.name:
            yield entry


def _concrete_urls():
    for pattern in _named_patterns():
        if pattern.name in PUBLIC:
            continue
        kwargs = {key: 1 for key in pattern.pattern.converters}
        yield pattern.name, reverse(pattern.name, kwargs=kwargs)


URLS = sorted(set(_concrete_urls()))


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "url"), URLS, ids=[name for name, _ in URLS])
def test_it_refuses_anonymous_requests_everywhere(client, name, url):
    for method in ("get", "post"):
        response = getattr(client, method)(url)
        if url.startswith(("/api/", "/v1/")):
            assert response.status_code == 401, (method, url, response.status_code)
            if name != "api-schema":
                assert "detail" in response.json() or "error" in response.json()
        elif url == "/docs":
            assert response.status_code in (401, 403) or response.status_code == 302
        else:
            assert response.status_code == 302, (method, url, response.status_code)
            assert response["Location"].startswith(reverse("login"))


def test_it_covers_the_main_pages_and_endpoints():
    urls = {url for _, url in URLS}
    for expected in [
        "/",
        "/datasets",
        "/training",
        "/evaluations",
        "/playground",
        "/api/datasets",
        "/api/training",
        "/api/schema",
        "/docs",
    ]:
        assert expected in urls


@pytest.mark.django_db
def test_it_redirects_admin_to_its_login(client):
    response = client.get("/admin/")
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


@pytest.fixture
def alice_objects(alice, valid_dataset):
    job = job_row(alice, valid_dataset, config={"num_epochs": 3})
    evaluation = Evaluation.objects.create(owner=alice, training_job=job)
    return valid_dataset, job, evaluation


@pytest.mark.django_db
def test_it_answers_404_for_another_users_pages(client, bob, alice_objects):
    dataset, job, evaluation = alice_objects
    client.force_login(bob)
    for url in [
        reverse("dataset-detail", args=[dataset.pk]),
        reverse("dataset-examples", args=[dataset.pk]),
        reverse("training-new", args=[dataset.pk]),
        reverse("training-detail", args=[job.pk]),
        reverse("training-adapter", args=[job.pk]),
        reverse("evaluation-detail", args=[evaluation.pk]),
    ]:
        assert client.get(url).status_code == 404, url
    for url in [
        reverse("dataset-delete", args=[dataset.pk]),
        reverse("training-cancel", args=[job.pk]),
        reverse("training-resume", args=[job.pk]),
    ]:
        assert client.post(url).status_code == 404, url
    assert TrainingJob.objects.get(pk=job.pk).status == TrainingJob.Status.QUEUED
    assert dataset.__class__.objects.filter(pk=dataset.pk).exists()


@pytest.mark.django_db
def test_it_answers_404_for_another_users_api_objects(bob_api, alice_objects):
    dataset, job, _ = alice_objects
    assert bob_api.get(f"/api/datasets/{dataset.pk}").status_code == 404
    assert bob_api.delete(f"/api/datasets/{dataset.pk}").status_code == 404
    assert bob_api.get(f"/api/training/{job.pk}").status_code == 404
    assert bob_api.delete(f"/api/training/{job.pk}").status_code == 404
    assert bob_api.post("/api/training/start", {"dataset_id": dataset.pk}, format="json").status_code == 404
    assert bob_api.get("/api/datasets").json()["results"] == []
    assert bob_api.get("/api/training").json()["results"] == []


@pytest.mark.django_db
def test_it_accepts_bearer_and_token_headers(alice, valid_dataset):
    from rest_framework.test import APIClient

    from tests.support import api_key

    key = api_key(alice)
    for scheme in ("Bearer", "Token", "bearer"):
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION=f"{scheme} {key}")
        response = api.get("/api/datasets")
        assert response.status_code == 200, scheme
        assert response.json()["results"][0]["name"] == "Orders"
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION="Bearer wrong-key")
    assert api.get("/api/datasets").status_code == 401


@pytest.mark.django_db
def test_it_answers_unknown_api_paths_with_json(client, alice_api):
    assert client.get("/api/nope").status_code == 401
    response = alice_api.get("/api/training/null,null")
    assert response.status_code == 404 and response.json() == {"detail": "No such API endpoint or object.", "errors": {}}
    assert alice_api.get("/v1/nope").status_code == 404


@pytest.mark.django_db
def test_it_documents_error_answers_in_the_schema(alice_client):
    import yaml

    schema = yaml.safe_load(alice_client.get("/api/schema").content)
    operation = schema["paths"]["/api/training/{id}"]["get"]
    assert {"200", "401", "404"} <= set(operation["responses"])
    assert schema["paths"]["/v1/chat/completions"]["post"]["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "OpenAIError"
    )
