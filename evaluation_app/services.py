"""Writes for evaluations: start, run (in the worker), vote."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from datasets_app.examples import held_out_examples
from evaluation_app.models import Evaluation, EvaluationExample, Rating
from training_app.models import TrainingJob
from tuna_llm import metrics
from tuna_llm.evaluation import EvaluationHooks, ExampleResult, run_evaluation
from tuna_llm.registry import registry
from tuna_site.costs import cost_usd
from tuna_site.jobs import job_claim, job_enqueue, job_fail, job_heartbeat

logger = logging.getLogger("tuna.evaluation")

DEFAULT_TEST_SIZE = 50


class EvaluationConflict(Exception):
    pass


class VoteInvalid(ValueError):
    pass


def evaluation_start(*, owner, job: TrainingJob, test_size: int | None = None) -> tuple[Evaluation, bool]:
    """Queue an evaluation of a completed job. Returns (evaluation, created).

    An evaluation of this job that is already queued or running is returned instead of a second one,
    so a double click or a second tab never starts two runs.
    """
    if job.status != TrainingJob.Status.COMPLETED:
        raise EvaluationConflict(f"Job #{job.pk} is {job.get_status_display().lower()}; only a completed fine-tune can be evaluated.")
    held_out = job.dataset.num_eval
    if held_out < 1:
        raise EvaluationConflict("This dataset has no held-out examples to evaluate on.")
    size = min(held_out, test_size or DEFAULT_TEST_SIZE)
    with transaction.atomic():
        # Lock the job row so two concurrent requests cannot both create a run.
        TrainingJob.objects.select_for_update().get(pk=job.pk)
        active = Evaluation.objects.filter(training_job=job, status__in=[Evaluation.Status.QUEUED, Evaluation.Status.RUNNING]).first()
        if active is not None:
            return active, False
        evaluation = Evaluation.objects.create(owner=owner, training_job=job, test_size=size)
        job_enqueue(evaluation)
    return evaluation, True


def evaluation_run(*, evaluation_id: int) -> None:
    if not job_claim(Evaluation, evaluation_id):
        return
    evaluation = Evaluation.objects.select_related("training_job", "training_job__dataset").get(pk=evaluation_id)
    started = time.monotonic()
    try:
        _run(evaluation)
    except Exception as exc:
        logger.exception("Evaluation %s failed", evaluation_id)
        job_fail(evaluation, exc, run_seconds=time.monotonic() - started)
    else:
        Evaluation.objects.filter(pk=evaluation_id).update(run_seconds=time.monotonic() - started)


def _run(evaluation: Evaluation) -> None:
    job = evaluation.training_job
    examples = held_out_examples(job.dataset)[: evaluation.test_size]
    loaded = registry.get(job.base_model)
    adapter = f"job-{job.pk}"
    loaded.attach_adapter(adapter, job.adapter_dir)
    EvaluationExample.objects.filter(evaluation=evaluation).delete()
    sides = random.Random(f"evaluation-{evaluation.pk}")  # the blind A/B mapping, drawn once per example

    def on_start(budget: int, count: int) -> None:
        Evaluation.objects.filter(pk=evaluation.pk).update(max_new_tokens=budget, test_size=count)

    def on_example(r: ExampleResult) -> None:
        EvaluationExample.objects.create(
            evaluation=evaluation,
            index=r.index,
            messages=r.prompt,
            reference=r.reference,
            base_output=r.base.text,
            finetuned_output=r.finetuned.text,
            base_latency_ms=r.base.latency_ms,
            finetuned_latency_ms=r.finetuned.latency_ms,
            base_prompt_tokens=r.base.prompt_tokens,
            finetuned_prompt_tokens=r.finetuned.prompt_tokens,
            base_tokens=r.base.completion_tokens,
            finetuned_tokens=r.finetuned.completion_tokens,
            base_cost_usd=cost_usd(r.base.compute_ms / 1000),
            finetuned_cost_usd=cost_usd(r.finetuned.compute_ms / 1000),
            base_scores=r.base_scores,
            finetuned_scores=r.finetuned_scores,
            finetuned_side=sides.choice("AB"),
        )
        job_heartbeat(Evaluation, evaluation.pk, done=r.index + 1)

    price = settings.TUNA_GPU_HOURLY_USD
    result = run_evaluation(loaded, examples, adapter, hourly_usd=price, hooks=EvaluationHooks(on_start=on_start, on_example=on_example))
    Evaluation.objects.filter(pk=evaluation.pk).update(
        status=Evaluation.Status.COMPLETED, metrics=result.as_dict(price), completed_at=timezone.now()
    )
    logger.info("Evaluation %s completed on %s examples", evaluation.pk, len(examples))


def rating_set(*, user, evaluation: Evaluation, example_index: int, preferred_model: str, blind: bool) -> tuple[Rating, bool]:
    """Record (or change) one user's vote on one example; ``blind``: the model names were hidden when it was cast."""
    if preferred_model not in Rating.Choice.values:
        raise VoteInvalid(f"preferred_model must be one of {', '.join(Rating.Choice.values)}; got {preferred_model!r}.")
    if evaluation.status != Evaluation.Status.COMPLETED:
        raise VoteInvalid("Votes open when the evaluation has completed.")
    example = EvaluationExample.objects.filter(evaluation=evaluation, index=example_index).first()
    if example is None:
        raise VoteInvalid(f"example_index must be between 0 and {evaluation.test_size - 1}; got {example_index}.")
    # A changed vote takes the new blind flag: a vote changed after the reveal is no longer blind.
    rating, created = Rating.objects.update_or_create(
        example=example, user=user, defaults={"preferred_model": preferred_model, "blind": blind}
    )
    return rating, created


def rating_set_from_page(*, user, evaluation: Evaluation, example_index: int, choice: str, blind_mode: bool) -> Rating:
    """A vote from the comparison page, where the choice is a side (A or B), tie or both_bad.

    The page hides the names only in blind mode and only until the first vote on an example (then it
    reveals them), so a first vote in blind mode is blind and any other is not.
    """
    example = EvaluationExample.objects.filter(evaluation=evaluation, index=example_index).first()
    preferred = example.model_for_side(choice) if example is not None and choice in ("A", "B") else choice
    revealed = example is not None and Rating.objects.filter(example=example, user=user).exists()
    rating, _ = rating_set(
        user=user, evaluation=evaluation, example_index=example_index, preferred_model=preferred, blind=blind_mode and not revealed
    )
    return rating


def vote_summary(evaluation: Evaluation, user) -> dict[str, Any]:
    """The user's votes; the win rate and its interval count blind votes only, the others are reported apart."""
    counts = {choice: 0 for choice in Rating.Choice.values}
    shown = 0
    for choice, blind in Rating.objects.filter(example__evaluation=evaluation, user=user).values_list("preferred_model", "blind"):
        if blind:
            counts[choice] += 1
        else:
            shown += 1
    cast = sum(counts.values()) + shown
    decisive = counts["finetuned"] + counts["base"]
    return {
        "counts": counts,
        "cast": cast,
        "blind": cast - shown,
        "shown": shown,
        "remaining": max(0, evaluation.test_size - cast),
        "decisive": decisive,
        "win_rate": counts["finetuned"] / decisive if decisive else None,
        "interval": metrics.wilson_interval(counts["finetuned"], decisive),
    }
