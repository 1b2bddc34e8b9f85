"""Upload through the page and the API: reports, splits, bad input, nothing left behind."""

from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from datasets_app.examples import held_out_examples, training_examples
from datasets_app.models import Dataset
from tests.support import job_row, jsonl_file, pc_rows

pytestmark = pytest.mark.django_db


def stored_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "datasets").rglob("*") if p.is_file()] if (data_dir / "datasets").exists() else []


def test_it_creates_a_valid_dataset_through_the_api(alice_api, data_dir):
    response = alice_api.post("/api/datasets", {"file": jsonl_file(pc_rows(20), "orders.jsonl"), "name": "My orders"}, format="multipart")
    assert response.status_code == 201
    body = response.json()
    assert body["name"] == "My orders" and body["validation_status"] == "valid" and body["format"] == "prompt_completion"
    assert body["num_examples"] == 20 and body["train_examples"] == 16 and body["eval_examples"] == 4
    assert body["validation_report"]["stats"]["examples"] == 20
    assert str(data_dir) not in response.content.decode()  # never a server path
    dataset = Dataset.objects.get(pk=body["id"])
    assert dataset.owner.username == "alice"
    assert len(stored_files(data_dir)) == 1


def test_it_keeps_an_invalid_file_with_its_report(alice_api):
    rows = pc_rows(20)
    rows[6] = '{"prompt": "broken line'
    response = alice_api.post("/api/datasets", {"file": jsonl_file(rows)}, format="multipart")
    assert response.status_code == 201
    body = response.json()
    assert body["validation_status"] == "invalid"
    assert body["validation_report"]["errors"]["items"][0]["line"] == 7
    assert body["train_examples"] == 0


def test_it_honours_the_held_out_fraction_and_never_trains_on_held_out_examples(alice_api):
    response = alice_api.post("/api/datasets", {"file": jsonl_file(pc_rows(20)), "eval_fraction": 0.1}, format="multipart")
    dataset = Dataset.objects.get(pk=response.json()["id"])
    assert (dataset.num_train, dataset.num_eval) == (18, 2)
    train, held_out = training_examples(dataset), held_out_examples(dataset)
    assert len(train) == 18 and len(held_out) == 2
    assert held_out[0][0]["content"] == pc_rows(20)[18]["prompt"]
    assert not {m[0]["content"] for m in train} & {m[0]["content"] for m in held_out}


@pytest.mark.parametrize(
    ("upload", "status", "message"),
    [
        (SimpleUploadedFile("data.csv", b"prompt,completion\n"), 400, "is not a .jsonl file"),
        (SimpleUploadedFile("data.jsonl", b""), 400, "is empty"),
        (SimpleUploadedFile("data.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10), 400, "binary file"),
    ],
    ids=["not-jsonl", "empty", "binary"],
)
def test_it_rejects_bad_files_and_leaves_nothing_behind(alice_api, data_dir, upload, status, message):
    response = alice_api.post("/api/datasets", {"file": upload}, format="multipart")
    assert response.status_code == status
    assert message in response.json()["detail"]
    assert Dataset.objects.count() == 0
    assert stored_files(data_dir) == []


def test_it_rejects_a_missing_file_field(alice_api):
    response = alice_api.post("/api/datasets", {"name": "nothing"}, format="multipart")
    assert response.status_code == 400
    assert "No file was sent" in response.json()["detail"]


def test_it_rejects_an_out_of_range_held_out_fraction(alice_api):
    response = alice_api.post("/api/datasets", {"file": jsonl_file(pc_rows(20)), "eval_fraction": 0.9}, format="multipart")
    assert response.status_code == 400
    assert "eval_fraction" in response.json()["detail"]
    assert Dataset.objects.count() == 0


def test_it_refuses_an_upload_over_the_limit_while_streaming(alice_api, settings, data_dir):
    settings.TUNA_MAX_UPLOAD_MB = 0.01  # ~10 KB
    big = jsonl_file(pc_rows(400))
    assert big.size > 20_000
    response = alice_api.post("/api/datasets", {"file": big}, format="multipart")
    assert response.status_code == 413
    assert "0.01 MB limit" in response.json()["detail"]
    assert Dataset.objects.count() == 0 and stored_files(data_dir) == []


def test_it_refuses_an_oversized_page_upload_too(alice_client, settings):
    settings.TUNA_MAX_UPLOAD_MB = 0.01
    response = alice_client.post(reverse("dataset-upload"), {"file": jsonl_file(pc_rows(400))}, HTTP_HX_REQUEST="true")
    assert response.status_code == 413
    assert "limit" in response.content.decode()
    assert Dataset.objects.count() == 0


def test_it_lists_only_my_datasets_newest_first(alice_api, bob, valid_dataset):
    from datasets_app.services import dataset_create

    dataset_create(owner=bob, upload=jsonl_file(pc_rows(10)), name="Bob's")
    newer = dataset_create(owner=valid_dataset.owner, upload=jsonl_file(pc_rows(10)), name="Newer")
    body = alice_api.get("/api/datasets").json()
    assert [d["name"] for d in body["results"]] == ["Newer", "Orders"]
    assert body["count"] == 2
    assert alice_api.get(f"/api/datasets/{newer.pk}").json()["validation_status"] == "valid"


def test_it_deletes_a_dataset_and_its_file(alice_api, valid_dataset, data_dir, django_capture_on_commit_callbacks):
    assert len(stored_files(data_dir)) == 1
    with django_capture_on_commit_callbacks(execute=True):
        response = alice_api.delete(f"/api/datasets/{valid_dataset.pk}")
    assert response.status_code == 204
    assert not Dataset.objects.filter(pk=valid_dataset.pk).exists()
    assert stored_files(data_dir) == []


def test_it_refuses_to_delete_a_dataset_that_jobs_use(alice_api, alice, valid_dataset):
    job_row(alice, valid_dataset)
    response = alice_api.delete(f"/api/datasets/{valid_dataset.pk}")
    assert response.status_code == 409
    assert "used by 1 training job" in response.json()["detail"]
    assert Dataset.objects.filter(pk=valid_dataset.pk).exists()


def test_it_swaps_in_the_report_after_an_htmx_upload(alice_client, sample_upload):
    response = alice_client.post(reverse("dataset-upload"), {"file": sample_upload, "eval_percent": 20}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    html = response.content.decode()
    assert "<html" not in html  # a fragment, not a page
    assert "160 examples" in html
    assert 'data-chart="histogram"' in html
    assert "Train with defaults" in html
    assert 'id="dataset-table" hx-swap-oob="true"' in html  # the list below updates too


def test_it_shows_the_broken_line_number_in_the_page_report(alice_client):
    rows = pc_rows(20)
    rows[6] = "{not json"
    response = alice_client.post(reverse("dataset-upload"), {"file": jsonl_file(rows)}, HTTP_HX_REQUEST="true")
    html = response.content.decode()
    assert "line 7" in html and "not valid JSON" in html
    assert "cannot be trained yet" in html


def test_it_shows_an_upload_error_in_the_page(alice_client):
    response = alice_client.post(reverse("dataset-upload"), {"file": SimpleUploadedFile("notes.txt", b"hello")}, HTTP_HX_REQUEST="true")
    assert response.status_code == 400
    assert "is not a .jsonl file" in response.content.decode()


def test_it_offers_the_sample_dataset_with_one_click(alice_client, alice):
    response = alice_client.post(reverse("dataset-sample"))
    dataset = Dataset.objects.get(owner=alice)
    assert response.status_code == 302 and response["Location"] == dataset.get_absolute_url()
    assert dataset.is_valid and dataset.num_examples == 160 and dataset.num_train == 128 and dataset.num_eval == 32


def test_it_escapes_dataset_text_in_preview_and_examples(alice_client, alice):
    from datasets_app.services import dataset_create

    rows = pc_rows(12)
    rows[0] = {"prompt": "<script>alert('x')</script> what is this tag?", "completion": "<b>bold</b> answer text here"}
    dataset = dataset_create(owner=alice, upload=jsonl_file(rows), name="<img src=x onerror=alert(1)>")
    for url in [reverse("dataset-detail", args=[dataset.pk]), reverse("dataset-examples", args=[dataset.pk]), reverse("dataset-list")]:
        html = alice_client.get(url).content.decode()
        assert "<script>alert" not in html and "<img src=x" not in html
    detail = alice_client.get(reverse("dataset-detail", args=[dataset.pk])).content.decode()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in detail


def test_it_previews_five_examples_then_pages_through_all(alice_client, alice):
    from datasets_app.services import dataset_create

    dataset = dataset_create(owner=alice, upload=jsonl_file(pc_rows(45)))
    detail = alice_client.get(reverse("dataset-detail", args=[dataset.pk])).content.decode()
    assert detail.count('class="example"') == 5
    page3 = alice_client.get(reverse("dataset-examples", args=[dataset.pk]), {"page": 3}).content.decode()
    assert page3.count('class="example"') == 5
    assert "Example 41 · line 41" in page3 and "Page 3 of 3" in page3
    assert "held out" in page3


def test_it_uses_a_separate_held_out_file(alice_client, valid_dataset):
    url = reverse("dataset-eval-file", args=[valid_dataset.pk])
    response = alice_client.post(url, {"file": jsonl_file(pc_rows(5, start=100), "heldout.jsonl")})
    assert response.status_code == 302
    valid_dataset.refresh_from_db()
    assert valid_dataset.has_eval_file and (valid_dataset.num_train, valid_dataset.num_eval) == (20, 5)
    assert len(training_examples(valid_dataset)) == 20 and len(held_out_examples(valid_dataset)) == 5
    bad = alice_client.post(url, {"file": jsonl_file(["{bad"], "heldout.jsonl")}, follow=True)
    assert "line 1" in bad.content.decode()
    valid_dataset.refresh_from_db()
    assert valid_dataset.num_eval == 5


def test_it_takes_a_separate_held_out_file_through_the_api(alice_api, bob_api, valid_dataset, data_dir):
    url = f"/api/datasets/{valid_dataset.pk}/eval-file"
    response = alice_api.post(url, {"file": jsonl_file(pc_rows(6, start=100), "heldout.jsonl")}, format="multipart")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["has_eval_file"] and (body["train_examples"], body["eval_examples"]) == (20, 6)
    stored = sorted(stored_files(data_dir))
    bad = alice_api.post(url, {"file": jsonl_file(["{bad"], "heldout.jsonl")}, format="multipart")
    assert bad.status_code == 400 and "line 1" in bad.json()["detail"]
    missing = alice_api.post(url, {}, format="multipart")
    assert missing.status_code == 400 and "file" in missing.json()["detail"]
    assert sorted(stored_files(data_dir)) == stored  # a refused file leaves nothing behind
    valid_dataset.refresh_from_db()
    assert valid_dataset.num_eval == 6
    assert bob_api.post(url, {"file": jsonl_file(pc_rows(6), "heldout.jsonl")}, format="multipart").status_code == 404


def test_it_never_scores_a_held_out_example_that_also_occurs_in_training(alice_client, alice):
    from datasets_app.services import dataset_create

    rows = pc_rows(19)
    twin = {"prompt": "  " + rows[3]["prompt"].upper(), "completion": rows[3]["completion"]}  # equal up to case and spaces
    dataset = dataset_create(owner=alice, upload=jsonl_file([*rows, twin]))
    assert (dataset.num_train, dataset.num_eval) == (16, 3)  # 4 held out by position, 1 of them seen in training
    assert dataset.validation_report["split"]["overlap"] == 1
    trained = training_examples(dataset)
    scored = held_out_examples(dataset)
    assert len(scored) == 3 and not any(example in trained for example in scored)
    assert all(example[0]["content"] != twin["prompt"] for example in scored)
    page = alice_client.get(dataset.get_absolute_url()).content.decode()
    assert "1 held-out example also occurs among the training examples: it is not scored" in page


def test_it_checks_a_held_out_file_against_the_training_file(alice_api, valid_dataset, data_dir):
    url = f"/api/datasets/{valid_dataset.pk}/eval-file"
    stored = sorted(stored_files(data_dir))
    same = alice_api.post(url, {"file": jsonl_file(pc_rows(20), "heldout.jsonl")}, format="multipart")
    assert same.status_code == 400 and "Every example of 'heldout.jsonl' also occurs in the training file" in same.json()["detail"]
    assert sorted(stored_files(data_dir)) == stored
    mixed = alice_api.post(url, {"file": jsonl_file([*pc_rows(2), *pc_rows(3, start=100)], "heldout.jsonl")}, format="multipart")
    assert mixed.status_code == 200
    valid_dataset.refresh_from_db()
    assert valid_dataset.num_eval == 3 and valid_dataset.validation_report["split"]["overlap"] == 2
    assert [e[0]["content"] for e in held_out_examples(valid_dataset)] == [r["prompt"] for r in pc_rows(3, start=100)]


def test_it_removes_the_files_when_the_admin_deletes_datasets(admin_client, alice, data_dir, django_capture_on_commit_callbacks):
    from datasets_app.services import dataset_attach_eval_file, dataset_create

    one = dataset_create(owner=alice, upload=jsonl_file(pc_rows(12)))
    dataset_attach_eval_file(dataset=one, upload=jsonl_file(pc_rows(3, start=100), "heldout.jsonl"))
    two = dataset_create(owner=alice, upload=jsonl_file(pc_rows(12, start=200)))
    assert len(stored_files(data_dir)) == 3
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(f"/admin/datasets_app/dataset/{one.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302 and not Dataset.objects.filter(pk=one.pk).exists()
    assert len(stored_files(data_dir)) == 1
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            "/admin/datasets_app/dataset/", {"action": "delete_selected", "_selected_action": [two.pk], "post": "yes"}
        )
    assert response.status_code == 302 and Dataset.objects.count() == 0
    assert stored_files(data_dir) == []
