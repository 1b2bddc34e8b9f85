"""OpenAI's fine-tuning API driven by the official `openai` client against the live server: files, jobs, the
refusals and their error objects, and who sees what. No training here (test_openai_fine_tuning_script.py trains)."""

import io
import json

import openai
import pytest
from openai import OpenAI

from openai_api.models import JobFiles
from tests.support import api_key, job_row
from training_app.models import TrainingJob

pytestmark = pytest.mark.django_db(transaction=True)

BASE = "smollm2-135m-instruct"


def chat_lines(count: int, start: int = 0) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "You turn orders into JSON."},
                {"role": "user", "content": f"Order {i}: two blue shirts for customer {i}."},
                {"role": "assistant", "content": f'{{"order": {i}, "items": [{{"name": "shirt", "colour": "blue", "qty": 2}}]}}'},
            ]
        }
        for i in range(start, start + count)
    ]


def jsonl(rows: list) -> bytes:
    return b"".join((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n" for row in rows)


def client_for(live_server, user) -> OpenAI:
    key = api_key(user)
    return OpenAI(base_url=f"{live_server.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture
def alice_openai(live_server, alice):
    return client_for(live_server, alice)


@pytest.fixture
def bob_openai(live_server, bob):
    return client_for(live_server, bob)


def upload(client: OpenAI, rows: list, name: str = "train.jsonl"):
    return client.files.create(file=(name, io.BytesIO(jsonl(rows))), purpose="fine-tune")


def test_it_stores_lists_reads_and_deletes_files(alice_openai):
    content = jsonl(chat_lines(12))
    first = alice_openai.files.create(file=("orders.jsonl", io.BytesIO(content)), purpose="fine-tune")
    assert (first.object, first.purpose, first.status, first.filename, first.bytes) == (
        "file",
        "fine-tune",
        "processed",
        "orders.jsonl",
        len(content),
    )
    assert first.id.startswith("file-") and first.status_details is None
    others = [upload(alice_openai, chat_lines(12, start=100 * n), f"more-{n}.jsonl") for n in range(2)]

    assert alice_openai.files.retrieve(first.id).filename == "orders.jsonl"
    assert alice_openai.files.content(first.id).read() == content  # the original bytes
    newest_first = [f.id for f in alice_openai.files.list()]
    assert newest_first == [others[1].id, others[0].id, first.id]
    page = alice_openai.files.list(limit=2)
    assert [f.id for f in page.data] == newest_first[:2] and page.has_more
    assert [f.id for f in page.get_next_page().data] == newest_first[2:]
    assert [f.id for f in alice_openai.files.list(limit=1, order="asc")] == [first.id, others[0].id, others[1].id]  # auto-paged
    assert list(alice_openai.files.list(purpose="assistants")) == []

    deleted = alice_openai.files.delete(first.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (first.id, "file", True)
    with pytest.raises(openai.NotFoundError) as missing:
        alice_openai.files.retrieve(first.id)
    assert missing.value.body["param"] == "file_id" and first.id in missing.value.message
    assert missing.value.body["code"] is None and missing.value.body["type"] == "not_found_error"


def test_it_refuses_other_purposes_and_unusable_uploads_with_error_objects(alice_openai):
    with pytest.raises(openai.BadRequestError) as purpose:
        alice_openai.files.create(file=("train.jsonl", io.BytesIO(jsonl(chat_lines(12)))), purpose="assistants")
    assert purpose.value.body["param"] == "purpose" and "fine-tune" in purpose.value.message
    assert purpose.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as binary:
        alice_openai.files.create(file=("train.jsonl", io.BytesIO(b"\x00\x01\x02")), purpose="fine-tune")
    assert "binary" in binary.value.message


def test_it_keeps_an_invalid_file_and_fails_the_job_that_uses_it_with_the_line(alice_openai):
    rows = chat_lines(12)
    rows[3] = b'{"messages": [{"role": "user", "content": "no answer here"}'  # line 4: not even JSON
    bad = upload(alice_openai, rows, "broken.jsonl")
    assert bad.status == "processed" and "line 4" in bad.status_details

    job = alice_openai.fine_tuning.jobs.create(model=BASE, training_file=bad.id, suffix="broken", metadata={"team": "a"})
    assert job.status == "failed" and job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert "line 4" in job.error.message and bad.id in job.error.message
    assert (job.training_file, job.fine_tuned_model, job.metadata, job.user_provided_suffix) == (bad.id, None, {"team": "a"}, "broken")
    row = TrainingJob.objects.get(pk=int(job.id.removeprefix("ftjob-")))
    assert row.status == "failed" and row.started_at is None and not row.adapter_dir  # nothing else made
    events = alice_openai.fine_tuning.jobs.list_events(job.id).data
    assert events[0].level == "error" and "line 4" in events[0].message
    assert events[-1].message == f"Created fine-tuning job: {job.id}"
    assert alice_openai.fine_tuning.jobs.checkpoints.list(job.id).data == []

    with pytest.raises(openai.ConflictError) as in_use:
        alice_openai.files.delete(bad.id)
    assert job.id in in_use.value.message


def test_it_refuses_bad_job_requests_with_openai_error_objects(alice_openai):
    good = upload(alice_openai, chat_lines(12))
    cases = [
        ({"model": "gpt-4o-mini-2024-07-18", "training_file": good.id}, "model", "not available for fine-tuning"),
        ({"model": BASE, "training_file": "file-999999"}, "training_file", "file-999999"),
        ({"model": BASE, "training_file": good.id, "validation_file": "file-x"}, "validation_file", "file-x"),
        ({"model": BASE, "training_file": good.id, "hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", '"auto"'),
        ({"model": BASE, "training_file": good.id, "hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs", "many"),
        (
            {
                "model": BASE,
                "training_file": good.id,
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate": 1}}},
            },
            "method.supervised.hyperparameters.learning_rate",
            "Unrecognized",
        ),
        ({"model": BASE, "training_file": good.id, "method": {"type": "reinforcement"}}, "method.type", "not offered"),
        ({"model": BASE, "training_file": good.id, "suffix": "has:colon"}, "suffix", "letters"),
        (
            {"model": BASE, "training_file": good.id, "integrations": [{"type": "wandb", "wandb": {"project": "p"}}]},
            "integrations",
            "not offered",
        ),
        ({"model": "tuna-job-424242", "training_file": good.id}, "model", "not available"),
    ]
    for body, param, words in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            alice_openai.fine_tuning.jobs.create(**body)
        error = refused.value.body
        assert error["param"] == param and words in error["message"], (body, error)
        assert error["type"] == "invalid_request_error"
    for missing in ("ftjob-999999", "ftjob-abc", "tuna-job-1"):
        with pytest.raises(openai.NotFoundError) as not_found:
            alice_openai.fine_tuning.jobs.retrieve(missing)
        assert not_found.value.body["param"] == "fine_tuning_job_id"
    assert not TrainingJob.objects.exists()  # a refused request makes nothing


def test_it_queues_cancels_and_lists_jobs_made_here_and_in_the_pages(alice_openai, alice, valid_dataset):
    page_job = job_row(alice, valid_dataset, status="completed", tokens_seen=1234, config={"num_epochs": 2, "batch_size": 4, "seed": 7})
    train = upload(alice_openai, chat_lines(12))
    job = alice_openai.fine_tuning.jobs.create(
        model=f"base:{BASE}",
        training_file=train.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 0.5}}},
        seed=42,
        suffix="orders",
    )
    assert (job.status, job.model, job.seed, job.training_file, job.error, job.fine_tuned_model) == (
        "queued",
        BASE,
        42,
        train.id,
        None,
        None,
    )
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size, job.hyperparameters.learning_rate_multiplier) == (2, 2, 0.5)
    assert job.method.type == "supervised" and job.method.supervised.hyperparameters.n_epochs == 2
    row = TrainingJob.objects.get(pk=int(job.id.removeprefix("ftjob-")))
    assert row.suffix == "orders" and row.config["num_epochs"] == 2 and row.config["seed"] == 42  # an ordinary training job

    listed = alice_openai.fine_tuning.jobs.list()
    assert [j.id for j in listed.data] == [job.id, f"ftjob-{page_job.pk}"] and listed.has_more is False
    from_page = listed.data[1]
    assert (from_page.status, from_page.trained_tokens, from_page.training_file) == ("succeeded", 1234, f"file-{valid_dataset.pk}")
    assert from_page.fine_tuned_model == f"ft:{BASE}:alice::ftjob-{page_job.pk}"
    first = alice_openai.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in first.data] == [job.id] and first.has_more
    assert [j.id for j in first.get_next_page().data] == [f"ftjob-{page_job.pk}"]

    tagged = alice_openai.fine_tuning.jobs.create(model=BASE, training_file=train.id, metadata={"team": "orders", "a__b": "x"})
    assert [j.id for j in alice_openai.fine_tuning.jobs.list(metadata={"team": "orders"})] == [tagged.id]
    assert [j.id for j in alice_openai.fine_tuning.jobs.list(metadata={"a__b": "x", "team": "orders"})] == [tagged.id]
    assert list(alice_openai.fine_tuning.jobs.list(metadata={"team": "other"})) == []
    alice_openai.fine_tuning.jobs.cancel(tagged.id)

    cancelled = alice_openai.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert alice_openai.fine_tuning.jobs.list_events(job.id).data[0].message == "Fine-tuning job cancelled"
    with pytest.raises(openai.ConflictError):
        alice_openai.fine_tuning.jobs.cancel(job.id)


def test_it_pauses_a_queued_job_and_resumes_it(alice_openai):
    train = upload(alice_openai, chat_lines(12))
    job = alice_openai.fine_tuning.jobs.create(model=BASE, training_file=train.id)
    paused = alice_openai.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    assert "paused" in alice_openai.fine_tuning.jobs.list_events(job.id).data[0].message
    assert alice_openai.fine_tuning.jobs.resume(job.id).status == "queued"


def test_it_keeps_the_validation_file_as_the_held_out_set(alice_openai):
    train, held_out = upload(alice_openai, chat_lines(12)), upload(alice_openai, chat_lines(4, start=500), "valid.jsonl")
    job = alice_openai.fine_tuning.jobs.create(model=BASE, training_file=train.id, validation_file=held_out.id)
    assert (job.status, job.training_file, job.validation_file) == ("queued", train.id, held_out.id)
    row = TrainingJob.objects.select_related("dataset").get(pk=int(job.id.removeprefix("ftjob-")))
    assert row.dataset.has_eval_file and row.dataset.num_train == 12 and row.dataset.num_eval == 4
    assert JobFiles.objects.get(job=row).validation_file_id == int(held_out.id.removeprefix("file-"))
    assert [f.id for f in alice_openai.files.list()] == [held_out.id, train.id]  # the dataset made of both: pages only
    with pytest.raises(openai.ConflictError):
        alice_openai.files.delete(held_out.id)  # the job keeps its data


def test_it_shows_no_one_else_s_files_or_jobs(alice_openai, bob_openai):
    train = upload(alice_openai, chat_lines(12))
    job = alice_openai.fine_tuning.jobs.create(model=BASE, training_file=train.id)
    assert list(bob_openai.files.list()) == [] and list(bob_openai.fine_tuning.jobs.list()) == []
    for call in (
        lambda: bob_openai.files.retrieve(train.id),
        lambda: bob_openai.files.content(train.id),
        lambda: bob_openai.files.delete(train.id),
        lambda: bob_openai.fine_tuning.jobs.retrieve(job.id),
        lambda: bob_openai.fine_tuning.jobs.cancel(job.id),
        lambda: bob_openai.fine_tuning.jobs.list_events(job.id),
        lambda: bob_openai.fine_tuning.jobs.checkpoints.list(job.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError) as refused:
        bob_openai.fine_tuning.jobs.create(model=BASE, training_file=train.id)
    assert refused.value.body["param"] == "training_file"
    assert alice_openai.fine_tuning.jobs.retrieve(job.id).status == "queued"


def test_it_answers_without_a_token_with_an_openai_error(live_server):
    anonymous = OpenAI(base_url=f"{live_server.url}/v1", api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.fine_tuning.jobs.list()


def test_it_explains_the_move_on_the_coming_from_openai_page(alice_client):
    page = alice_client.get("/coming-from-openai")
    text = page.content.decode()
    assert page.status_code == 200
    for expected in ("base_url=", "/v1", "invalid_training_file", "learning_rate_multiplier", "validating_files", "ft:"):
        assert expected in text, expected
    assert 'href="/coming-from-openai"' in alice_client.get("/").content.decode()


def test_it_starts_a_job_from_a_fine_tune_by_its_ft_name(alice_openai, alice, valid_dataset, tmp_path):
    parent = job_row(alice, valid_dataset, status="completed", adapter_dir=str(tmp_path), suffix="first")
    train = upload(alice_openai, chat_lines(12))
    for name in (parent.fine_tuned_model, parent.model_id):
        job = alice_openai.fine_tuning.jobs.create(model=name, training_file=train.id)
        assert (job.status, job.model) == ("queued", parent.fine_tuned_model)
        assert TrainingJob.objects.get(pk=int(job.id.removeprefix("ftjob-"))).parent_id == parent.pk
    for refused in (f"{parent.fine_tuned_model}:ckpt-step-2", parent.fine_tuned_model.replace(":first:", ":other:")):
        with pytest.raises(openai.BadRequestError) as caught:
            alice_openai.fine_tuning.jobs.create(model=refused, training_file=train.id)
        assert caught.value.body["param"] == "model"


def test_it_refuses_bodies_that_are_not_objects_in_openai_shape(alice_api):
    for body in ('{"model":', "[]", '"text"'):
        response = alice_api.post("/v1/fine_tuning/jobs", data=body, content_type="application/json")
        error = response.json()["error"]
        assert response.status_code == 400 and error["type"] == "invalid_request_error", (body, error)
    response = alice_api.post("/v1/files", data={"purpose": "fine-tune"}, format="multipart")
    assert response.status_code == 400 and "No file was sent" in response.json()["error"]["message"]
    response = alice_api.post("/v1/files", data={}, format="multipart")
    assert response.status_code == 400 and response.json()["error"]["param"] == "purpose"
    for query in ("limit=0", "limit=many", "after=file-x"):
        response = alice_api.get(f"/v1/files?{query}")
        assert response.status_code == 400 and response.json()["error"]["param"] in ("limit", "after"), query
