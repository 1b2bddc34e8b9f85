"""Writes for evaluations: start, run (in the worker), vote."""

from __future__ import annotations

import logging
import random
from typing import Any

from django.conf import settings
from django.db import transaction

from datasets_app.examples import held_out_examples
from evaluation_app.models import Evaluation, EvaluationExample, Rating
from training_app.models import TrainingJob
from training_app.tracking import log_evaluation
from tuna_core.costs import cost_usd
from tuna_core.errors import Conflict, Invalid, NotFound
from tuna_core.jobs import job_complete, job_enqueue, job_write
from tuna_core.quotas import LimitExceeded, check_active_jobs
from tuna_llm import metrics
from tuna_llm.evaluation import EvaluationHooks, ExampleResult, run_evaluation
from tuna_llm.serving.registry import registry
from tuna_llm.toolcalls import calls_of

logger = logging.getLogger("tuna.evaluation")

DEFAULT_TEST_SIZE = 50


class EvaluationConflict(Conflict):
    pass


class EvaluationNotFound(NotFound):
    pass


class VoteInvalid(Invalid, ValueError):
    pass


class EvaluationInvalid(Invalid, ValueError):
    """A bad value for one field of an evaluation request; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, errors={field: [message]})
        self.field = field


def evaluation_test_size(raw: Any) -> int | None:
    """The number of held-out examples asked for: None (the default) or a whole number from 1 to TUNA_MAX_EVAL_EXAMPLES."""
    if raw is None or raw == "":
        return None
    limit = settings.TUNA_MAX_EVAL_EXAMPLES
    shown = repr(raw) if len(repr(raw)) <= 40 else repr(raw)[:40] + "..."
    message = f"test_size must be a whole number from 1 to {limit} (TUNA_MAX_EVAL_EXAMPLES); got {shown}."
    try:
        value = int(raw) if not isinstance(raw, (bool, float)) else None
    except (TypeError, ValueError):
        value = None
    if isinstance(raw, float) and raw.is_integer():
        value = int(raw)
    if value is None or not 1 <= value <= limit:
        raise EvaluationInvalid("test_size", message)
    return value


# evaluation_start's default other side: as the job's kind says (a preference-tuned job's start, else the base model).
AS_USUAL: Any = object()


def evaluation_start(
    *, owner, job: TrainingJob, test_size: int | None = None, baseline: TrainingJob | None = AS_USUAL
) -> tuple[Evaluation, bool]:
    """Queue an evaluation of a completed job. Returns (evaluation, created).

    ``baseline`` picks what the job is compared with: left out, a preference-tuned job's start (its parent) or else the
    base model; ``None``, the base model; a TrainingJob, that fine-tune (the owner's, completed, of the same dataset and
    base model; the job's own parent may be of another dataset).

    An evaluation of this job against the same side that is already queued or running is returned instead of a second
    one, so a double click or a second tab never starts two runs.
    """
    if job.status != TrainingJob.Status.COMPLETED:
        raise EvaluationConflict(f"Job #{job.pk} is {job.get_status_display().lower()}; only a completed fine-tune can be evaluated.")
    if baseline is AS_USUAL:
        # A preference-tuned job is compared with its start: the fine-tune it was tuned from (its votes' job, or the one
        # chosen for a preference file), or the base model when it was tuned from the base. Any other job with the base.
        baseline = job.parent if job.is_preference else None
    elif baseline is not None:
        evaluation_baseline_check(owner=owner, job=job, baseline=baseline)
    test_size = evaluation_test_size(test_size)
    held_out = job.dataset.num_eval
    if held_out < 1:
        raise EvaluationConflict("This dataset has no held-out examples to evaluate on.")
    size = min(held_out, test_size or min(DEFAULT_TEST_SIZE, settings.TUNA_MAX_EVAL_EXAMPLES))
    with transaction.atomic():
        # Lock the job row so two concurrent requests cannot both create a run.
        TrainingJob.objects.select_for_update().get(pk=job.pk)
        active = Evaluation.objects.filter(
            training_job=job, baseline_job=baseline, status__in=[Evaluation.Status.QUEUED, Evaluation.Status.RUNNING]
        ).first()
        if active is not None:
            return active, False
        check_active_jobs(owner)
        evaluation = Evaluation.objects.create(owner=owner, training_job=job, baseline_job=baseline, test_size=size)
        job_enqueue(evaluation)
    return evaluation, True


def evaluation_baseline_check(*, owner, job: TrainingJob, baseline: TrainingJob) -> None:
    """Refuse a fine-tune ``job`` cannot be compared with, saying why (both sides must answer the same examples)."""
    if baseline.owner_id != owner.pk:
        raise EvaluationNotFound(f"No job #{baseline.pk} of yours to compare with.")
    if baseline.pk == job.pk:
        raise EvaluationInvalid("baseline_job", f"Job #{job.pk} cannot be compared with itself; pick another fine-tune.")
    if baseline.status != TrainingJob.Status.COMPLETED:
        raise EvaluationConflict(
            f"Job #{baseline.pk} is {baseline.get_status_display().lower()}; only a completed fine-tune can be compared with."
        )
    if baseline.base_model != job.base_model:
        raise EvaluationInvalid(
            "baseline_job",
            f"Job #{job.pk} fine-tunes {job.base_model} and job #{baseline.pk} {baseline.base_model}; "
            "only fine-tunes of the same base model can be compared side by side.",
        )
    if baseline.dataset_id != job.dataset_id and baseline.pk != job.parent_id:
        raise EvaluationInvalid(
            "baseline_job",
            f"Job #{job.pk} is trained on dataset #{job.dataset_id} and job #{baseline.pk} on dataset #{baseline.dataset_id}; "
            "only fine-tunes of the same dataset are compared, on that dataset's held-out examples.",
        )


@transaction.atomic
def evaluation_delete(*, evaluation: Evaluation) -> None:
    """Delete an evaluation that is not running, with its answers and votes (it keeps no files)."""
    evaluation = Evaluation.objects.select_for_update().get(pk=evaluation.pk)
    if evaluation.status == Evaluation.Status.RUNNING:
        raise EvaluationConflict(
            f"Evaluation #{evaluation.pk} is running ({evaluation.done} of {evaluation.test_size} examples done); "
            "delete it once it has finished."
        )
    judging = evaluation.judge_runs.filter(status="running").first()
    if judging is not None:
        raise EvaluationConflict(
            f"A judge is working on evaluation #{evaluation.pk} ({judging.done} of {judging.total} examples judged); "
            "delete it once the judge has finished."
        )
    evaluation.delete()


def evaluation_work(evaluation: Evaluation) -> None:
    """The worker's work for a claimed evaluation (tuna_core.jobs keeps its run time however it ends)."""
    job = evaluation.training_job
    examples = held_out_examples(job.dataset)[: evaluation.test_size]
    loaded = registry.get(job.base_model)
    adapter = f"job-{job.pk}"
    loaded.attach_adapter(adapter, job.adapter_dir)
    baseline = evaluation.baseline_job
    baseline_adapter = None
    if baseline is not None:  # the other side is a fine-tune too (a preference-tuned job's parent)
        baseline_adapter = f"job-{baseline.pk}"
        loaded.attach_adapter(baseline_adapter, baseline.adapter_dir)
    EvaluationExample.objects.filter(evaluation=evaluation).delete()
    sides = random.Random(f"evaluation-{evaluation.pk}")  # the blind A/B mapping, drawn once per example

    def on_start(budget: int, count: int) -> None:
        job_write(Evaluation, evaluation.pk, max_new_tokens=budget, test_size=count, precision=loaded.plan.describe())

    def on_example(r: ExampleResult) -> None:
        with transaction.atomic():  # the row and the progress land together, and only while this process holds it
            job_write(Evaluation, evaluation.pk, done=r.index + 1)
            EvaluationExample.objects.create(
                evaluation=evaluation,
                index=r.index,
                messages=list(r.prompt),
                tools=r.prompt.tools,
                reference=r.reference,
                reference_calls=calls_of(r.reference_message),
                base_output=r.base.text,
                finetuned_output=r.finetuned.text,
                # Each answer's own share of the batched decoding time (as an API call is billed).
                base_latency_ms=r.base.compute_ms,
                finetuned_latency_ms=r.finetuned.compute_ms,
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

    price = settings.TUNA_GPU_HOURLY_USD
    hooks = EvaluationHooks(on_start=on_start, on_example=on_example)
    result = run_evaluation(
        loaded, examples, adapter, hourly_usd=price, hooks=hooks, baseline_adapter=baseline_adapter, checks=job.dataset.answer_checks or []
    )
    job_complete(evaluation, metrics=result.as_dict(price))
    log_evaluation(job, result.as_dict(price), baseline=baseline)  # into the job's TensorBoard / MLflow / W&B runs; never raises
    logger.info("Evaluation %s completed on %s examples", evaluation.pk, len(examples))
    if evaluation.against_start:  # not a run's score against the base, nor a chosen comparison
        _judge_against_start(evaluation)


def _judge_against_start(evaluation: Evaluation) -> None:
    """A preference-tuned job's evaluation against its start is judged at once when a judge is configured."""
    from evaluation_app.judging import JudgeUnavailable, judge_endpoint, judge_start

    if judge_endpoint() is None:
        return
    try:
        judge_start(owner=evaluation.owner, evaluation=Evaluation.objects.get(pk=evaluation.pk))
    except (JudgeUnavailable, LimitExceeded) as exc:
        logger.warning("Evaluation %s: no automatic judge run: %s", evaluation.pk, exc)


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
