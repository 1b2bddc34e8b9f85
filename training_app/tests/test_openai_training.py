"""Training jobs as OpenAI's fine-tuning API drives them (contract E): preference files, a fine-tune started from
another, the learning-rate multiplier, refused jobs, pause and resume, checkpoints. Real model, tiny settings."""

from functools import partial
from pathlib import Path

import pytest
from transformers import TrainerCallback

from tests.support import jsonl_file
from training_app import services
from training_app.models import TrainingJob
from training_app.selectors import job_checkpoints
from tuna_core.jobs import job_run, run_next_job
from tuna_llm.preference import DPO_BETA, DPO_LEARNING_RATE

pytestmark = pytest.mark.django_db

TINY = {"max_steps": 4, "batch_size": 2, "max_seq_length": 128, "eval_examples": 0, "save_steps": 100}


def preference_rows(count: int) -> list[dict]:
    """Lines in OpenAI's DPO format."""
    return [
        {
            "input": {"messages": [{"role": "user", "content": f"Give order {i} as JSON."}]},
            "preferred_output": [{"role": "assistant", "content": f'{{"order": {i}}}'}],
            "non_preferred_output": [{"role": "assistant", "content": f"Order number {i}, I think."}],
        }
        for i in range(count)
    ]


@pytest.fixture
def preference_dataset(alice):
    from datasets_app.services import dataset_create

    dataset = dataset_create(owner=alice, upload=jsonl_file(preference_rows(12)), name="Prefs")
    assert dataset.is_valid and dataset.is_preference, dataset.validation_report
    return dataset


class AtStepBegin(TrainerCallback):
    """Acts while step `step` runs (before its end), as a request from the page would land."""

    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            self.action()


def lora_b(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if "lora_B" in k}


@pytest.mark.model
def test_it_preference_tunes_a_preference_file_from_the_base_model(alice, preference_dataset):
    job = services.preference_file_job_start(
        owner=alice, dataset=preference_dataset, config_data={"max_steps": 2, "batch_size": 2, "max_seq_length": 96, "beta": 0.2}
    )
    assert job.is_preference and job.is_file_preference and job.parent is None and job.source_evaluation is None
    assert len(job.preference_pairs) == preference_dataset.num_train
    assert job.preference_pairs[0]["chosen"]["content"].startswith('{"order"')
    assert (job.config["dpo_beta"], job.config_reasons["dpo_beta"]) == (0.2, "set by you")
    assert job.config["learning_rate"] == DPO_LEARNING_RATE
    run_next_job()
    job.refresh_from_db()
    assert job.status == "completed", job.error_message
    assert (job.current_step, job.total_steps) == (2, 2)
    adapter = Path(job.adapter_dir)
    assert {"adapter_model.safetensors", "adapter_config.json", "tuna_training_config.json"} <= {p.name for p in adapter.iterdir()}
    assert not (adapter / "ref").exists()  # a fresh adapter: the reference is the base, no copy saved
    weights = lora_b(adapter)
    assert weights and any(w.abs().sum() > 0 for w in weights.values())  # LoRA B starts at zero: it learned
    assert list(job.loss_points.exclude(loss=None).values_list("step", flat=True)) == [1, 2]


def test_it_refuses_the_training_method_that_does_not_fit_the_file(alice, valid_dataset, preference_dataset):
    with pytest.raises(services.DatasetNotTrainable, match="holds preference pairs .* preference tuning \\(DPO\\)"):
        services.training_job_start(owner=alice, dataset=preference_dataset, config_data={})
    with pytest.raises(services.DatasetNotTrainable, match="holds chat examples, not preference pairs"):
        services.preference_file_job_start(owner=alice, dataset=valid_dataset, config_data={})
    with pytest.raises(services.ConfigInvalid) as refused:
        services.preference_file_job_start(owner=alice, dataset=preference_dataset, config_data={"beta": 0})
    assert refused.value.errors == {"beta": ["Must be greater than 0 and at most 5."]}
    with pytest.raises(services.ConfigInvalid, match="preference tuning only"):
        services.training_job_start(owner=alice, dataset=valid_dataset, config_data={"dpo_beta": 0.1})
    assert not TrainingJob.objects.exists()


def test_it_scales_the_chosen_learning_rate_and_checks_names_and_labels(alice, valid_dataset):
    plain = services.training_plan(dataset=valid_dataset, config_data={})
    job = services.training_job_start(
        owner=alice, dataset=valid_dataset, config_data={"learning_rate_multiplier": 0.5}, suffix="orders-v1", metadata={"team": "ops"}
    )
    assert job.config["learning_rate"] == pytest.approx(plain.config.learning_rate * 0.5)
    assert job.config_reasons["learning_rate"].startswith(f"{plain.config.learning_rate:g} × 0.5 (your learning_rate_multiplier)")
    assert job.fine_tuned_model == f"ft:smollm2-135m-instruct:alice:orders-v1:ftjob-{job.pk}"
    assert job.checkpoint_model(2) == f"{job.fine_tuned_model}:ckpt-step-2"
    assert job.metadata == {"team": "ops"}
    for config, field, message in [
        ({"learning_rate_multiplier": 0}, "learning_rate_multiplier", "greater than 0"),
        ({"learning_rate_multiplier": 11}, "learning_rate_multiplier", "between 0 and 10"),
        ({"learning_rate_multiplier": "x"}, "learning_rate_multiplier", "Must be a number"),
        ({"learning_rate_multiplier": 2, "learning_rate": 1e-4}, "learning_rate_multiplier", "not both"),
    ]:
        with pytest.raises(services.ConfigInvalid) as refused:
            services.training_job_start(owner=alice, dataset=valid_dataset, config_data=config)
        assert message in refused.value.errors[field][0]
    for labels, field in [
        ({"suffix": "a:b"}, "suffix"),
        ({"suffix": "x" * 65}, "suffix"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": 1}}, "metadata"),
    ]:
        with pytest.raises(services.ConfigInvalid) as refused:
            services.training_job_start(owner=alice, dataset=valid_dataset, config_data={}, **labels)
        assert field in refused.value.errors
    assert TrainingJob.objects.count() == 1


def test_it_records_a_refused_job_as_failed_with_the_reason(alice, alice_client, valid_dataset):
    job = services.training_job_refused(
        owner=alice,
        dataset=valid_dataset,
        base_model="smollm2-135m-instruct",
        code="invalid_training_file",
        message="Line 3: message 2 is missing the field content.",
        param="training_file",
        suffix="x",
    )
    job.refresh_from_db()
    assert (job.status, job.error_code, job.error_param) == ("failed", "invalid_training_file", "training_file")
    assert job.error_message.startswith("Line 3") and job.completed_at and job.suffix == "x"
    assert not services.job_dir(job).exists() and not run_next_job()  # no task, no files
    page = alice_client.get(f"/training/{job.pk}").content.decode()
    assert "Line 3: message 2 is missing the field content." in page and "invalid_training_file" in page
    with pytest.raises(services.JobConflict, match="saved no checkpoint"):
        services.training_job_resume(job=job)


@pytest.mark.model
def test_it_pauses_with_a_checkpoint_at_the_step_and_resumes_to_the_same_end(alice, alice_client, valid_dataset):
    import torch
    from peft import PeftModel

    from tuna_llm.catalog import get_base_model_spec
    from tuna_llm.loading import load_tokenizer_and_model, pick_device

    job = services.training_job_start(owner=alice, dataset=valid_dataset, config_data=TINY, suffix="p")
    pause = AtStepBegin(2, lambda: services.training_job_pause(job=TrainingJob.objects.get(pk=job.pk)))
    assert job_run(TrainingJob, job.pk, partial(services.training_job_work, extra_callbacks=(pause,)))
    job.refresh_from_db()
    assert (job.status, job.paused, job.is_paused, job.current_step) == ("cancelled", True, True, 2)
    assert [c.step for c in job_checkpoints(job)] == [2]  # saved at the stop; save_steps alone would save none
    page = alice_client.get(f"/training/{job.pk}").content.decode()
    assert ">Paused</span>" in page and 'id="resume-button"' in page and 'id="pause-button"' not in page

    services.training_job_resume(job=job)
    run_next_job()
    job.refresh_from_db()
    assert job.status == "completed" and not job.paused, job.error_message
    assert (job.current_step, job.total_steps, job.resume_count) == (4, 4, 1)
    assert list(job.loss_points.exclude(loss=None).values_list("step", flat=True)) == [1, 2, 3, 4]

    checkpoints = job_checkpoints(job)
    assert [c.step for c in checkpoints] == [2, 4]  # the pause's, and the Trainer's own at the last step
    step, path, train_loss, valid_loss, created_at = checkpoints[0]
    assert step == 2 and valid_loss is None and created_at is not None
    assert train_loss == job.loss_points.get(step=2).loss
    assert job.checkpoint_model(step).endswith(f":p:ftjob-{job.pk}:ckpt-step-2")
    spec, plan = get_base_model_spec(), pick_device()
    tokenizer, base = load_tokenizer_and_model(spec, plan)
    model = PeftModel.from_pretrained(base, str(path))  # the checkpoint is a PEFT adapter on the job's base model
    ids = tokenizer("Summarise order number 3", return_tensors="pt")
    with torch.no_grad():
        tuned = model(**ids).logits
        with model.disable_adapter():
            plain = model(**ids).logits
    assert not torch.allclose(tuned, plain)


@pytest.mark.model
def test_it_trains_from_a_fine_tune_on_its_base_model_and_adapter(alice, valid_dataset, finetuned_job, preference_dataset):
    import json

    shape = json.loads((Path(finetuned_job.adapter_dir) / "adapter_config.json").read_text())
    with pytest.raises(services.ConfigInvalid, match="lora_r"):
        services.training_job_start(owner=alice, dataset=valid_dataset, config_data={"lora_r": shape["r"] + 1}, parent=finetuned_job)
    job = services.training_job_start(
        owner=alice, dataset=valid_dataset, config_data={**TINY, "max_steps": 2, "learning_rate_multiplier": 2}, parent=finetuned_job
    )
    assert job.parent_id == finetuned_job.pk and job.step_offset == 0 and not job.is_continuation
    assert (job.config["lora_r"], sorted(job.config["target_modules"])) == (shape["r"], sorted(shape["target_modules"]))
    assert job.config_reasons["lora_r"] == f"job #{finetuned_job.pk}'s adapter, which this run starts from"
    run_next_job()
    job.refresh_from_db()
    assert job.status == "completed", job.error_message
    started, trained = lora_b(Path(finetuned_job.adapter_dir)), lora_b(Path(job.adapter_dir))
    assert started.keys() == trained.keys() and any(not torch_equal(started[k], trained[k]) for k in started)

    dpo = services.preference_file_job_start(owner=alice, dataset=preference_dataset, parent=finetuned_job, config_data={})
    assert dpo.parent_id == finetuned_job.pk and dpo.config["lora_r"] == shape["r"] and dpo.config["dpo_beta"] == DPO_BETA


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


OPENAI_SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "openai"


@pytest.mark.model
def test_it_trains_on_every_openai_sample_file(tmp_path):
    """Each shape of OpenAI's guide (weights, tools, text parts, ShareGPT, the preferred side of DPO lines) reaches
    the trainer with OpenAI's meaning: one run trains on a mix of them all, every example keeps tokens to learn,
    a weight-0 turn and a tool's result are never learned, a tool call is learned as the template writes it."""
    from transformers import AutoTokenizer

    from datasets_app.examples import file_examples
    from tuna_llm.catalog import get_base_model_spec
    from tuna_llm.loading import pick_device
    from tuna_llm.training import IGNORE_INDEX, run_lora_training, tokenize_examples
    from tuna_llm.training_config import TrainingConfig

    spec = get_base_model_spec()
    files = {path.stem: file_examples(path) for path in sorted(OPENAI_SAMPLES.glob("*.jsonl"))}
    assert set(files) == {"chat_weight", "content_parts", "preference", "sharegpt", "tools"}

    mix = [example for examples in files.values() for example in examples[:2]]
    config = TrainingConfig(
        base_model=spec.name, max_steps=2, batch_size=5, learning_rate=1e-3, max_seq_length=1024, eval_examples=0, save_steps=100
    )
    result = run_lora_training(config, spec=spec, plan=pick_device(), train_examples=mix, output_dir=tmp_path)
    assert result.global_step == 2 and result.final_loss is not None and result.final_loss > 0
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()

    tokenizer = AutoTokenizer.from_pretrained(str(spec.prepared_dir), local_files_only=True)

    def learned(row) -> str:
        return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX])

    for name, examples in files.items():
        rows = tokenize_examples(tokenizer, examples, 1024)
        assert len(rows) == len(examples) == 30, name
        for example, row in zip(examples, rows, strict=True):
            text = learned(row)
            for message in example:
                if message["role"] in ("tool", "user") or (message["role"] == "assistant" and message.get("weight") == 0):
                    assert message["content"] not in text, (name, message)
                for call in message.get("tool_calls") or []:
                    assert "<tool_call>" in text and f'"name": "{call["function"]["name"]}"' in text, (name, text)
    assert sum(bool(m.get("tool_calls")) for example in files["tools"] for m in example) >= 15
