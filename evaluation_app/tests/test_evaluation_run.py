"""A real evaluation on the embedded model with the session's trained adapter (conftest.trained_adapter, tiny settings)."""

import logging
import math

import pytest

from datasets_app.examples import held_out_examples, training_examples
from datasets_app.services import dataset_create
from evaluation_app import services
from evaluation_app.models import Evaluation
from tests.support import job_row
from tuna_core.jobs import run_next_job

pytestmark = [pytest.mark.django_db, pytest.mark.model]


class _LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_it_compares_base_and_fine_tuned_on_held_out_examples(alice, sample_upload, trained_adapter, settings):

    from django.utils import timezone

    from tuna_llm.catalog import get_base_model_spec
    from tuna_llm.loading import pick_device
    from tuna_llm.serving.batching import generate_chat
    from tuna_llm.serving.registry import load_for_serving, registry

    # The session's adapter was trained on the first 40 examples of this file: the held-out ones come after them.
    dataset = dataset_create(owner=alice, upload=sample_upload, name="Orders")
    assert dataset.num_train >= 40
    job = job_row(alice, dataset, status="completed", adapter_dir=str(trained_adapter), completed_at=timezone.now())

    evaluation, created = services.evaluation_start(owner=alice, job=job, test_size=3)
    assert created
    loaded_before = registry.get(job.base_model)
    weight = loaded_before.base_model.get_input_embeddings().weight
    loads = _LogLines()
    logging.getLogger("tuna.models").addHandler(loads)
    try:
        run_next_job()
    finally:
        logging.getLogger("tuna.models").removeHandler(loads)
    evaluation.refresh_from_db()
    assert evaluation.status == "completed", evaluation.error_message
    assert (evaluation.done, evaluation.test_size) == (3, 3) and evaluation.max_new_tokens >= 32
    assert evaluation.precision == pick_device().describe()  # what both models computed in, shown on the page
    assert evaluation.run_seconds > 0 and evaluation.started_at <= evaluation.completed_at
    assert evaluation.worker_host and evaluation.heartbeat_at is not None
    assert evaluation.error_message == "" and evaluation.error_traceback == ""
    # No second copy of the base: nothing was loaded during the run, the same weights were used.
    assert not [line for line in loads.lines if line.startswith("Loading base model")], loads.lines
    assert registry.get(job.base_model) is loaded_before
    assert loaded_before.base_model.get_input_embeddings().weight.data_ptr() == weight.data_ptr()
    examples = list(evaluation.examples.all())
    assert [e.index for e in examples] == [0, 1, 2]

    held_out = held_out_examples(dataset)[:3]
    trained_prompts = {m[0]["content"] for m in training_examples(dataset)}
    for example, messages in zip(examples, held_out, strict=True):
        assert example.messages == messages[:-1] and example.reference == messages[-1]["content"]
        assert example.prompt not in trained_prompts  # never a training example
        assert example.base_output and example.finetuned_output
        assert example.base_latency_ms > 0 and example.finetuned_latency_ms > 0
        assert example.base_prompt_tokens == example.finetuned_prompt_tokens > 0
        assert example.base_tokens > 0 and example.finetuned_tokens > 0
        assert example.base_cost_usd == pytest.approx(example.base_latency_ms / 3_600_000 * settings.TUNA_GPU_HOURLY_USD)
        assert example.finetuned_cost_usd == pytest.approx(example.finetuned_latency_ms / 3_600_000 * settings.TUNA_GPU_HOURLY_USD)
        # The sample's references are JSON: its answers are scored on their fields too (tuna_llm.task_scores).
        scored = {"exact_match", "rouge_l", "bleu", "json_valid", "field_accuracy", "fields_differ"}
        assert set(example.base_scores) == set(example.finetuned_scores) == scored
        rates = [v for scores in (example.base_scores, example.finetuned_scores) for k, v in scores.items() if k != "fields_differ"]
        assert all(0 <= v <= 1 for v in rates)
        assert all(isinstance(scores["fields_differ"], list) for scores in (example.base_scores, example.finetuned_scores))
        assert example.finetuned_side in ("A", "B")

    m = evaluation.metrics
    for side in ("base_model", "finetuned_model"):
        assert {
            "exact_match",
            "rouge_l",
            "bleu",
            "heldout_loss",
            "perplexity",
            "latency_mean_ms",
            "latency_p50_ms",
            "latency_p95_ms",
            "avg_length",
            "avg_latency_ms",
            "cost_per_1k_usd",
        } <= set(m[side])
        assert m[side]["heldout_loss"] > 0
        assert m[side]["perplexity"] == pytest.approx(math.exp(m[side]["heldout_loss"]))
        prefix = "base" if side == "base_model" else "finetuned"
        latencies = [getattr(e, f"{prefix}_latency_ms") for e in examples]
        for metric in ("exact_match", "rouge_l", "bleu"):
            assert m[side][metric] == pytest.approx(sum(getattr(e, f"{prefix}_scores")[metric] for e in examples) / 3)
        assert m[side]["latency_mean_ms"] == pytest.approx(sum(latencies) / 3) == m[side]["avg_latency_ms"]
        assert m[side]["latency_p50_ms"] == pytest.approx(sorted(latencies)[1])
        assert m[side]["avg_length"] == pytest.approx(sum(getattr(e, f"{prefix}_tokens") for e in examples) / 3)
        assert m[side]["cost_per_1k_usd"] == pytest.approx(sum(latencies) / 3 / 3_600_000 * 1000 * settings.TUNA_GPU_HOURLY_USD)
    for name, change in m["improvements"].items():
        assert change["delta"] == pytest.approx(m["finetuned_model"][name] - m["base_model"][name])
    assert m["improvements"]["heldout_loss"]["direction"] == "better"  # trained on the same kind of answers
    assert m["decoding"] == {"greedy": True, "max_new_tokens": evaluation.max_new_tokens}

    # One copy of the base weights: the registry holds the base with the job's adapter attached ...
    loaded = registry.get(job.base_model)
    assert f"job-{job.pk}" in loaded.adapters
    # ... and the outputs are what separately loaded models give with the adapter off and on.
    spec, plan = get_base_model_spec(), pick_device()
    pristine = load_for_serving(spec, plan)
    budget = evaluation.max_new_tokens
    assert generate_chat(pristine, examples[0].messages, max_new_tokens=budget).text == examples[0].base_output
    tuned = load_for_serving(spec, plan)
    tuned.attach_adapter("tuned", job.adapter_dir)
    assert generate_chat(tuned, examples[0].messages, adapter="tuned", max_new_tokens=budget).text == examples[0].finetuned_output

    # The held-out set is never re-run twice for one request.
    again, created = services.evaluation_start(owner=alice, job=job, test_size=3)
    assert created and again.pk != evaluation.pk  # a finished run can be repeated on purpose
    assert Evaluation.objects.filter(status="queued").count() == 1
