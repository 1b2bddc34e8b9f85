"""Starting, listing, cancelling and resuming jobs through the API and the pages (no training here)."""

import pytest
from django.urls import reverse
from django.utils import timezone

from tests.support import job_row
from training_app import services
from training_app.models import LossPoint, TrainingJob
from training_app.selectors import loss_chart_data
from tuna_core.jobs import queue_position, readable_error
from tuna_llm.training import IGNORE_INDEX

pytestmark = pytest.mark.django_db


def test_it_starts_a_job_with_settings_chosen_from_the_data_and_says_why(alice_api, valid_dataset, django_capture_on_commit_callbacks):
    from django_q.models import OrmQ

    with django_capture_on_commit_callbacks(execute=True):
        response = alice_api.post("/api/training/start", {"dataset_id": valid_dataset.pk, "config": {"batch_size": 2}}, format="json")
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "queued"
    config, reasons = body["config"], body["config_reasons"]
    # 16 training examples: too few to set validation aside; enough epochs for about 60 updates.
    assert config["eval_examples"] == 0 and "too few" in reasons["eval_examples"]
    assert config["batch_size"] == 2 and reasons["batch_size"] == "set by you"
    assert config["num_epochs"] * 8 >= 60 and reasons["num_epochs"].startswith("16 examples: ")
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (config["lora_r"], config["lora_alpha"], config["learning_rate"]) == (16, 32, 1e-3)
    assert "134M parameters" in reasons["learning_rate"]  # SmolLM2-135M has 134.5M
    assert config["base_model"] == "smollm2-135m-instruct"
    assert OrmQ.objects.count() == 1  # handed to the worker


def test_it_rejects_bad_settings_with_field_errors(alice_api, valid_dataset):
    config = {
        "num_epochs": 0,
        "learning_rate": "fast",
        "lora_dropout": 0.9,
        "target_modules": ["q_proj", "nope"],
        "base_model": "gpt-9",
        "colour": 1,
    }
    response = alice_api.post("/api/training/start", {"dataset_id": valid_dataset.pk, "config": config}, format="json")
    assert response.status_code == 400
    errors = response.json()["errors"]  # field -> list of messages, the one error shape of the API
    assert errors["num_epochs"] == ["Must be between 1 and 50."]
    assert "Must be a number" in errors["learning_rate"][0]
    assert "between 0 and 0.5" in errors["lora_dropout"][0]
    assert "gpt-9" in errors["base_model"][0]
    assert "Unknown setting" in errors["colour"][0]
    assert TrainingJob.objects.count() == 0
    response = alice_api.post(
        "/api/training/start", {"dataset_id": valid_dataset.pk, "config": {"target_modules": "q_proj, nope"}}, format="json"
    )
    assert "Unknown module nope" in response.json()["errors"]["target_modules"][0]
    assert "k_proj" in response.json()["errors"]["target_modules"][0]


def test_it_checks_target_modules_of_a_hub_model_from_the_local_hub_cache(settings, tmp_path, monkeypatch):
    import json

    from huggingface_hub import constants

    # The layout huggingface_hub leaves after a download: refs/main names the snapshot.
    repo = tmp_path / "hub" / "models--meta-llama--Llama-3.1-8B-Instruct"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    settings.TUNA_BASE_MODELS = {**settings.TUNA_BASE_MODELS, "llama": "meta-llama/Llama-3.1-8B-Instruct", "other": "org/not-downloaded"}

    bad = services.validate_training_config({"base_model": "llama", "target_modules": ["q_proj", "c_attn"]})
    assert "Unknown module c_attn" in bad.errors["target_modules"] and "gate_proj" in bad.errors["target_modules"]
    assert services.validate_training_config({"base_model": "llama", "target_modules": ["q_proj", "o_proj"]}).config is not None
    # Not downloaded yet: nothing to check against without the network; the worker reports it if wrong.
    assert services.validate_training_config({"base_model": "other", "target_modules": ["anything"]}).config is not None


def test_it_refuses_an_invalid_dataset(alice_api, alice):
    from datasets_app.services import dataset_create
    from tests.support import jsonl_file, pc_rows

    dataset = dataset_create(owner=alice, upload=jsonl_file(pc_rows(5)))
    response = alice_api.post("/api/training/start", {"dataset_id": dataset.pk}, format="json")
    assert response.status_code == 400 and "invalid" in response.json()["detail"]


def test_it_keeps_every_training_log_row_a_training_step_with_validations_beside(alice_api, alice, valid_dataset):
    """The seed's clients chart `loss` for every row of training_logs: no row may have a null loss."""
    job = services.training_job_start(owner=alice, dataset=valid_dataset, config_data={})
    LossPoint.objects.create(job=job, step=0, epoch=0, eval_loss=3.0)  # before any update
    LossPoint.objects.create(job=job, step=1, epoch=0.5, loss=2.5, learning_rate=1e-3)
    LossPoint.objects.create(job=job, step=2, epoch=1.0, loss=2.0, learning_rate=1e-3)
    LossPoint.objects.create(job=job, step=2, epoch=1.0, eval_loss=2.2)
    body = alice_api.get(f"/api/training/{job.pk}").json()
    assert [(r["step"], r["loss"], r["eval_loss"]) for r in body["training_logs"]] == [(1, 2.5, None), (2, 2.0, 2.2)]
    assert [(r["step"], r["eval_loss"]) for r in body["eval_logs"]] == [(0, 3.0), (2, 2.2)]
    chart = loss_chart_data(job)  # the page's chart still draws both curves
    assert [p["y"] for p in chart["train"]] == [2.5, 2.0] and [p["y"] for p in chart["eval"]] == [3.0, 2.2]


def test_it_answers_404_for_an_unknown_dataset(alice_api):
    assert alice_api.post("/api/training/start", {"dataset_id": 999}, format="json").status_code == 404


def test_it_shows_a_job_with_its_training_logs(alice_api, alice, valid_dataset):
    job = services.training_job_start(owner=alice, dataset=valid_dataset, config_data={})
    LossPoint.objects.create(job=job, step=1, epoch=0.1, loss=2.5)
    body = alice_api.get(f"/api/training/{job.pk}").json()
    assert body["training_logs"][0]["step"] == 1 and body["training_logs"][0]["loss"] == 2.5
    assert {"step", "loss", "epoch", "timestamp"} <= set(body["training_logs"][0])
    assert {"started_at", "completed_at", "error_message", "progress_percent", "cost_usd"} <= set(body)
    listing = alice_api.get("/api/training").json()
    assert listing["count"] == 1 and listing["results"][0]["id"] == job.pk


def test_it_cancels_a_queued_job_and_refuses_to_cancel_a_finished_one(alice_api, alice, valid_dataset):
    job = services.training_job_start(owner=alice, dataset=valid_dataset, config_data={})
    response = alice_api.post(f"/api/training/{job.pk}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    job.refresh_from_db()
    assert job.status == "cancelled" and job.cancel_requested
    response = alice_api.post(f"/api/training/{job.pk}/cancel")
    assert response.status_code == 409 and "already finished" in response.json()["detail"]


def test_it_refuses_to_resume_without_a_checkpoint(alice_api, alice, valid_dataset):
    job = job_row(alice, valid_dataset, status="failed")
    response = alice_api.post(f"/api/training/{job.pk}/resume")
    assert response.status_code == 409 and "no checkpoint" in response.json()["detail"]
    running = job_row(alice, valid_dataset, status="training")
    assert alice_api.post(f"/api/training/{running.pk}/resume").status_code == 409


def test_it_answers_404_for_an_adapter_that_does_not_exist(alice_api, alice, valid_dataset):
    job = services.training_job_start(owner=alice, dataset=valid_dataset, config_data={})
    assert alice_api.get(f"/api/training/{job.pk}/adapter").status_code == 404


def test_it_shows_the_start_form_with_every_chosen_setting_and_a_robust_estimate(alice_client, valid_dataset):
    from training_app.models import ThroughputMeasurement

    url = reverse("training-new", args=[valid_dataset.pk])
    page = alice_client.get(url).content.decode()
    assert "No training speed has been measured" in page
    for speed in (100, 400, 420):  # one slow run on a busy machine must not swing the estimate
        ThroughputMeasurement.objects.create(base_model="smollm2-135m-instruct", device="cpu", tokens_per_second=speed, source="job")
    page = alice_client.get(url).content.decode()
    assert "400 tokens/s, the median of measured runs on cpu" in page and "differ by up to" in page
    assert 'placeholder="auto: 0.001"' in page
    assert ">Epochs <input" in page and "num_epochs <input" not in page  # readable names, not raw setting names
    assert "auto: 16 examples: " in page and "LoRA layers" in page
    # A change re-renders the plan: the user's value, marked as theirs.
    preview = alice_client.post(url, {"num_epochs": "2", "preview": "1"}, headers={"HX-Request": "true"})
    assert preview.status_code == 200 and TrainingJob.objects.count() == 0
    assert '<tr data-setting="num_epochs"><th>Epochs</th><td class="num">2</td><td class="small ">set by you' in preview.content.decode()


def test_it_estimates_the_work_the_job_will_run(valid_dataset):
    from dataclasses import replace

    from training_app.estimates import training_estimate
    from training_app.models import ThroughputMeasurement

    ThroughputMeasurement.objects.create(base_model="smollm2-135m-instruct", device="cpu", tokens_per_second=400, source="job")
    config = services.training_plan(dataset=valid_dataset, config_data={"eval_examples": 0}).config
    full = training_estimate(dataset=valid_dataset, config=config)
    short = training_estimate(dataset=valid_dataset, config=replace(config, max_steps=2))
    assert short["updates"] == 2 and short["seconds"] < full["seconds"] / 5  # max_steps counts
    cut = training_estimate(dataset=valid_dataset, config=replace(config, max_seq_length=32))
    assert cut["tokens"] < full["tokens"] / 2  # examples cut at max_seq_length count as cut
    validated = training_estimate(dataset=valid_dataset, config=replace(config, eval_examples=4, eval_steps=2))
    assert validated["evaluations"] > 0 and validated["eval_seconds"] > 0  # validation passes take time too


def test_it_shows_field_errors_on_the_start_form(alice_client, valid_dataset):
    response = alice_client.post(reverse("training-new", args=[valid_dataset.pk]), {"num_epochs": "100", "batch_size": "4"})
    assert response.status_code == 400
    assert "Must be between 1 and 50." in response.content.decode()
    assert TrainingJob.objects.count() == 0
    response = alice_client.post(reverse("training-new", args=[valid_dataset.pk]), {"num_epochs": "2"})
    job = TrainingJob.objects.get()
    assert response["Location"] == job.get_absolute_url() and job.config["num_epochs"] == 2


def test_it_polls_while_running_and_stops_when_finished(alice_client, alice, valid_dataset):
    job = services.training_job_start(owner=alice, dataset=valid_dataset, config_data={})
    fragment = alice_client.get(reverse("training-detail", args=[job.pk]), HTTP_HX_REQUEST="true").content.decode()
    assert 'hx-trigger="every 2s"' in fragment  # paused while the tab is hidden by static/js/tuna.js (no eval: the CSP)
    assert "<html" not in fragment and "next in line" in fragment
    TrainingJob.objects.filter(pk=job.pk).update(status="completed", completed_at=timezone.now(), current_step=10, total_steps=10)
    fragment = alice_client.get(reverse("training-detail", args=[job.pk]), HTTP_HX_REQUEST="true").content.decode()
    assert "hx-trigger" not in fragment
    assert "Download adapter" in fragment


def test_it_tells_the_queue_position(alice, valid_dataset):
    first = services.training_job_start(owner=alice, dataset=valid_dataset, config_data={})
    second = services.training_job_start(owner=alice, dataset=valid_dataset, config_data={})
    assert queue_position(first) == 0 and queue_position(second) == 1


def test_it_explains_out_of_memory_in_plain_words():
    message = readable_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "ran out of memory" in message and "batch_size" in message


def embedded_tokenizer():
    """The embedded model's tokenizer alone (its weights are not loaded)."""
    from transformers import AutoTokenizer

    from tuna_llm.catalog import get_base_model_spec
    from tuna_llm.loading import prepare_embedded_model

    return AutoTokenizer.from_pretrained(prepare_embedded_model(get_base_model_spec()))


def test_it_masks_the_prompt_and_learns_the_end_of_turn_token():
    from tuna_llm.training import tokenize_example

    tokenizer = embedded_tokenizer()
    row = tokenize_example(tokenizer, [{"role": "user", "content": "Two red caps"}, {"role": "assistant", "content": "OK"}], 512)
    learned = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert row["labels"][0] == IGNORE_INDEX
    assert tokenizer.decode(learned).startswith("OK<|im_end|>")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in learned


def test_it_learns_every_assistant_turn_of_a_conversation_and_nothing_else():
    from tuna_llm.training import tokenize_example

    tokenizer = embedded_tokenizer()
    conversation = [
        {"role": "system", "content": "You take shop orders."},
        {"role": "user", "content": "Two red caps"},
        {"role": "assistant", "content": "Which size?"},
        {"role": "user", "content": "Medium"},
        {"role": "assistant", "content": '{"product": "cap", "size": "M"}'},
    ]
    row = tokenize_example(tokenizer, conversation, 512)
    assert len(row["input_ids"]) == len(row["labels"])
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label == IGNORE_INDEX:
            if current:
                spans.append(tokenizer.decode(current))
                current = []
        else:
            assert label == token
            current.append(token)
    spans.append(tokenizer.decode(current))
    assert [s.strip() for s in spans] == ["Which size?<|im_end|>", '{"product": "cap", "size": "M"}<|im_end|>']
    # The whole sequence is exactly the rendered conversation.
    from tuna_llm.prompting import render_chat

    assert tokenizer.decode(row["input_ids"]) == render_chat(tokenizer, conversation, add_generation_prompt=False)
    # Scoring a reference answer looks at the final turn only.
    final = tokenize_example(tokenizer, conversation, 512, final_turn_only=True)
    learned = [t for t in final["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(learned).strip() == '{"product": "cap", "size": "M"}<|im_end|>'
    assert final["input_ids"] == row["input_ids"]
