"""The preference loop's writes: a DPO job started from an evaluation's votes, and its evaluation once it completes."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction

from evaluation_app.selectors import training_pairs
from evaluation_app.services import EvaluationConflict, evaluation_start
from training_app.models import TrainingJob
from training_app.services import MAX_CONTINUE_EPOCHS, ConfigInvalid, JobConflict
from tuna_core.errors import Invalid
from tuna_core.jobs import job_enqueue
from tuna_core.quotas import LimitExceeded, check_active_jobs
from tuna_llm.preference import preference_settings
from tuna_llm.training_config import TrainingConfig

logger = logging.getLogger("tuna.evaluation")


class TooFewPairs(Invalid):
    """Not enough chosen / rejected pairs to preference-tune on; the message says how many more are needed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errors={"pairs": [message]})


def preference_job_start(*, owner, evaluation, include_judge: bool = False, epochs: int | None = None) -> TrainingJob:
    """Preference-tune the evaluated fine-tune on the user's blind votes (and, opted in, the judge's verdicts).

    The new job starts from the evaluated job's adapter, learns with DPO, and is evaluated against that job on
    the same held-out examples when it completes.
    """
    if evaluation.status != evaluation.Status.COMPLETED:
        raise JobConflict(f"Evaluation #{evaluation.pk} is {evaluation.get_status_display().lower()}; votes train once it has completed.")
    job = evaluation.training_job
    if job.status != TrainingJob.Status.COMPLETED or not job.adapter_dir:
        raise JobConflict(f"Job #{job.pk} is {job.get_status_display().lower()}; only a completed fine-tune can be preference-tuned.")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= MAX_CONTINUE_EPOCHS):
        raise ConfigInvalid({"epochs": f"Must be a whole number from 1 to {MAX_CONTINUE_EPOCHS}; got {epochs!r}."})
    pairs = training_pairs(evaluation, owner, include_judge=include_judge)
    needed = settings.TUNA_MIN_PREFERENCE_PAIRS
    if len(pairs) < needed:
        sources = "decisive blind votes" + (" and consistent judge verdicts" if include_judge else "")
        raise TooFewPairs(
            f"Training on preferences needs at least {needed} pairs; this evaluation gives {len(pairs)} ({sources}, where the two "
            f"answers differ). Vote on {needed - len(pairs)} more example{'s' if needed - len(pairs) != 1 else ''} (A or B, not tie)"
            + ("." if include_judge else ", or include the judge's verdicts.")
        )
    config, reasons = preference_settings(TrainingConfig.from_dict(job.config), len(pairs), epochs=epochs)
    with transaction.atomic():
        TrainingJob.objects.select_for_update().get(pk=job.pk)
        check_active_jobs(owner)
        child = TrainingJob.objects.create(
            owner=owner,
            dataset=job.dataset,
            base_model=job.base_model,
            method=TrainingJob.Method.DPO,
            config=config.to_dict(),
            config_reasons=reasons,
            parent=job,
            source_evaluation=evaluation,
            preference_pairs=pairs,
        )
        job_enqueue(child)
    logger.info("Preference job %s queued on %s pairs from evaluation %s", child.pk, len(pairs), evaluation.pk)
    return child


def evaluate_against_parent(sender, *, job: TrainingJob, **kwargs) -> None:
    """training_app.services.job_completed receiver: queue the evaluation of a completed preference-tuned job
    against its start (``evaluation_start`` picks it: the parent fine-tune, or the base model for a job tuned from the
    base on a preference file).

    A job tuned on an evaluation's votes is evaluated on as many of the same held-out examples as that evaluation;
    a job tuned on a preference file on its dataset's held-out examples, whose reference is the preferred answer."""
    if not job.is_preference:
        return
    source = job.source_evaluation
    try:
        evaluation_start(owner=job.owner, job=job, test_size=source.test_size if source else None)
    except (EvaluationConflict, LimitExceeded) as exc:  # the job page offers the button instead
        logger.warning("Preference job %s: no automatic evaluation against its start: %s", job.pk, exc)
