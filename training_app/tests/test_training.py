"""LoRA training on the real embedded model, through the worker's code path (tiny settings)."""

import io
import zipfile
from functools import partial
from pathlib import Path

import pytest
from transformers import TrainerCallback

from tests.support import job_row
from training_app import services
from training_app.models import LossPoint, ThroughputMeasurement, TrainingJob
from tuna_core.jobs import job_run, jobs_reap, run_next_job

pytestmark = [pytest.mark.django_db, pytest.mark.model]

TINY = {"max_steps": 4, "batch_size": 2, "max_seq_length": 128, "save_steps": 2, "eval_steps": 2, "eval_examples": 2}


def start(alice, dataset, **overrides):
    return services.training_job_start(owner=alice, dataset=dataset, config_data={**TINY, **overrides})


def train(job, *callbacks) -> bool:
    """Run one given queued job as the worker does (tuna_core.jobs), with extra trainer callbacks that stop
    or crash it at a given step."""
    return job_run(TrainingJob, job.pk, partial(services.training_job_work, extra_callbacks=callbacks))


class SimulatedCrash(BaseException):
    """Escapes like a killed process would: nothing in the job's own error handling sees it."""


class AtStep(TrainerCallback):
    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.action()


def test_it_trains_end_to_end_and_saves_a_working_adapter(alice, valid_dataset):
    import torch
    from peft import PeftModel

    from tuna_llm.catalog import get_base_model_spec
    from tuna_llm.loading import load_tokenizer_and_model, pick_device

    job = start(alice, valid_dataset)
    run_next_job()
    job.refresh_from_db()
    assert job.status == "completed", job.error_message
    assert (job.current_step, job.total_steps) == (4, 4)
    assert job.tokens_seen > 0 and job.tokens_per_second > 0 and job.train_seconds > 0
    assert job.started_at and job.completed_at and job.device == "cpu"
    losses = list(job.loss_points.exclude(loss=None).values_list("step", flat=True))
    assert losses == [1, 2, 3, 4]
    # Validation before the first update, then every 2 updates (the last one included).
    assert list(job.loss_points.exclude(eval_loss=None).values_list("step", flat=True)) == [0, 2, 4]
    assert 0 < job.eval_seconds < job.train_seconds
    assert ThroughputMeasurement.objects.filter(source=f"training job #{job.pk}").exists()

    adapter = Path(job.adapter_dir)
    assert {"adapter_model.safetensors", "adapter_config.json", "tuna_training_config.json"} <= {p.name for p in adapter.iterdir()}
    checkpoints = sorted(p.name for p in (adapter.parent / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]

    spec, plan = get_base_model_spec(), pick_device()
    tokenizer, base = load_tokenizer_and_model(spec, plan)
    _, pristine = load_tokenizer_and_model(spec, plan)
    model = PeftModel.from_pretrained(base, str(adapter))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: it changed
    reloaded = dict(model.get_base_model().named_parameters())
    for name, param in pristine.named_parameters():
        module, leaf = name.rsplit(".", 1)
        key = name if name in reloaded else f"{module}.base_layer.{leaf}"  # layers wrapped by LoRA
        assert torch.equal(reloaded[key], param), name  # base weights untouched

    ids = tokenizer("Extract the order: two red caps", return_tensors="pt")
    with torch.no_grad():
        tuned = model(**ids).logits
        with model.disable_adapter():
            plain = model(**ids).logits
    assert not torch.allclose(tuned, plain)


def test_it_cancels_a_running_job_within_one_step(alice, valid_dataset):
    job = start(alice, valid_dataset, max_steps=8)
    cancel = AtStep(3, lambda: services.training_job_cancel(job=TrainingJob.objects.get(pk=job.pk)))
    train(job, cancel)
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert job.current_step in (3, 4)  # the request landed during step 3: stopped by the end of the next one
    assert job.adapter_dir == ""
    assert (Path(services.job_dir(job)) / "checkpoints" / "checkpoint-2").is_dir()  # what it saved stays


def test_it_resumes_from_the_last_checkpoint_after_a_crash(alice, valid_dataset):
    job = start(alice, valid_dataset, max_steps=6)

    def crash():
        raise SimulatedCrash()

    with pytest.raises(SimulatedCrash):
        train(job, AtStep(3, crash))
    job.refresh_from_db()
    assert job.status == "training"  # as a dead worker leaves it

    assert jobs_reap()["training jobs"] == 1
    job.refresh_from_db()
    assert job.status == "failed" and "worker stopped" in job.error_message
    assert services.resumable_checkpoint(job).name == "checkpoint-2"
    before_crash = dict(job.loss_points.exclude(loss=None).values_list("step", "loss"))
    assert set(before_crash) == {1, 2}  # the crash came at step 3, before its loss was written
    seconds_before = job.train_seconds

    services.training_job_resume(job=job)
    run_next_job()
    job.refresh_from_db()
    assert job.status == "completed", job.error_message
    assert (job.current_step, job.total_steps, job.resume_count) == (6, 6, 1)
    assert list(job.loss_points.exclude(loss=None).values_list("step", flat=True)) == [1, 2, 3, 4, 5, 6]
    # The history up to the checkpoint is the one recorded before the crash (kept, not rewritten).
    after = dict(job.loss_points.exclude(loss=None).values_list("step", "loss"))
    assert [after[1], after[2]] == [before_crash[1], before_crash[2]]
    assert job.train_seconds > seconds_before
    assert Path(job.adapter_dir, "adapter_model.safetensors").exists()


def test_it_fails_a_bad_runtime_config_with_a_readable_reason(alice, valid_dataset):
    job = job_row(alice, valid_dataset, config={**TINY, "base_model": "smollm2-135m-instruct", "target_modules": ["not_a_layer"]})
    run_next_job()
    job.refresh_from_db()
    assert job.status == "failed"
    assert "not_a_layer" in job.error_message
    assert "Traceback" in job.error_traceback
    assert "Traceback" not in job.error_message


def test_it_never_trains_a_job_twice(alice, valid_dataset):
    job = start(alice, valid_dataset, max_steps=1)
    run_next_job()
    job.refresh_from_db()
    points = job.loss_points.count()
    run_next_job()  # a redelivered task
    assert LossPoint.objects.filter(job=job).count() == points


def test_it_downloads_the_adapter_as_a_zip(alice_api, finetuned_job):
    job = finetuned_job  # a completed job with the session's trained adapter
    response = alice_api.get(f"/api/training/{job.pk}/adapter")
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))).namelist()
    assert f"tuna-job-{job.pk}-adapter/adapter_model.safetensors" in names
    assert f"tuna-job-{job.pk}-adapter/tuna_training_config.json" in names


def test_it_trains_on_neither_validation_nor_held_out_examples(alice, valid_dataset):
    from datasets_app.examples import held_out_examples, training_examples, validation_examples

    trained = training_examples(valid_dataset, validation=2)
    validation = validation_examples(valid_dataset, validation=2)
    held_out = held_out_examples(valid_dataset)
    assert (len(trained), len(validation), len(held_out)) == (14, 2, 4)
    prompts = [[m["content"] for m in example] for example in trained]
    assert not any(example_prompts in prompts for example_prompts in ([m["content"] for m in e] for e in validation + held_out))


def test_it_keeps_the_checkpoint_with_the_lowest_validation_loss_and_continues_from_it(alice, alice_client, valid_dataset):
    from safetensors.torch import load_file

    from training_app.selectors import loss_chart_data
    from tuna_llm.training import checkpoint_to_keep

    job = start(alice, valid_dataset, max_steps=6, learning_rate=5e-3)
    run_next_job()
    job.refresh_from_db()
    assert job.status == "completed", job.error_message
    validations = list(job.loss_points.exclude(eval_loss=None).values_list("step", "eval_loss"))
    assert [step for step, _ in validations] == [0, 2, 4, 6]
    assert (job.best_step, job.best_eval_loss) == pytest.approx(checkpoint_to_keep(validations))
    kept = load_file(str(Path(job.adapter_dir) / "adapter_model.safetensors"))
    best = load_file(str(services.job_dir(job) / "checkpoints" / f"checkpoint-{job.best_step}" / "adapter_model.safetensors"))
    assert kept.keys() == best.keys() and all((kept[k] == best[k]).all() for k in kept)
    page = alice_client.get(f"/training/{job.pk}").content.decode()
    assert "are kept (served, evaluated, downloaded)" in page or f"the checkpoint of step {job.best_step} is kept" in page
    assert "on examples 15–16 of the file, set aside from training" in page  # where validation came from

    child = services.training_job_continue(job=job, epochs=1)
    assert child.parent_id == job.pk and child.step_offset == job.best_step
    run_next_job()
    child.refresh_from_db()
    assert child.status == "completed", child.error_message
    assert child.current_step == 7  # one epoch of the 14 trained examples at batch 2
    chart = loss_chart_data(child)
    steps = [point["x"] for point in chart["train"]]
    # One history: the parent's points up to the checkpoint it kept, then the continued run's.
    assert steps == list(range(1, job.best_step + 1)) + [job.best_step + s for s in range(1, 8)]
    assert chart["total_steps"] == job.best_step + 7
    continued = load_file(str(Path(child.adapter_dir) / "adapter_model.safetensors"))
    assert continued.keys() == kept.keys() and any(not (continued[k] == kept[k]).all() for k in kept)
