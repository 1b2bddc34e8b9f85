"""Runs compared on the same examples: every completed fine-tune of a dataset scored on one scoring set.

The scoring set of a dataset is the first ``Dataset.scoring_size`` examples of its held-out set
(``datasets_app.examples.held_out_examples``), fixed the first time a run is scored, so every run's figures
come from the same examples (``EvaluationExample.index`` is the example id). A run's scoring evaluation is
its evaluation against the base model on exactly that many examples.
"""

from __future__ import annotations

from django.conf import settings
from django.db import transaction

from datasets_app.models import Dataset
from evaluation_app.models import Evaluation
from evaluation_app.services import DEFAULT_TEST_SIZE, EvaluationConflict, evaluation_start
from training_app.models import TrainingJob

# A scoring evaluation that counts: done, or on its way (a failed or cancelled one is started again).
SCORING_STATES = [Evaluation.Status.COMPLETED, Evaluation.Status.QUEUED, Evaluation.Status.RUNNING]


def scoring_size(dataset: Dataset) -> int:
    """How many held-out examples every run of ``dataset`` is scored on; fixed (saved) the first time it is asked."""
    if dataset.scoring_size:
        return dataset.scoring_size
    with transaction.atomic():
        locked = Dataset.objects.select_for_update().get(pk=dataset.pk)
        if not locked.scoring_size:
            size = min(locked.num_eval, DEFAULT_TEST_SIZE, settings.TUNA_MAX_EVAL_EXAMPLES)
            if size < 1:
                raise EvaluationConflict("This dataset has no held-out examples to score runs on.")
            locked.scoring_size = size
            locked.save(update_fields=["scoring_size"])
    dataset.scoring_size = locked.scoring_size
    return dataset.scoring_size


def scoring_evaluations(jobs) -> dict[int, Evaluation]:
    """Each job's scoring evaluation (the newest completed one, else the one queued or running), by job id."""
    found: dict[int, Evaluation] = {}
    jobs = list(jobs)
    sizes = {job.pk: job.dataset.scoring_size for job in jobs}
    candidates = Evaluation.objects.filter(
        training_job__in=[job.pk for job in jobs], baseline_job__isnull=True, status__in=SCORING_STATES
    ).order_by("-created_at", "-id")
    for evaluation in candidates:
        if evaluation.test_size != sizes.get(evaluation.training_job_id):
            continue
        held = found.get(evaluation.training_job_id)
        if held is None or (held.status != Evaluation.Status.COMPLETED and evaluation.status == Evaluation.Status.COMPLETED):
            found[evaluation.training_job_id] = evaluation
    return found


def scoring_start(*, owner, job: TrainingJob) -> tuple[Evaluation, bool]:
    """The job's evaluation against the base model on its dataset's scoring set: the one already completed, queued
    or running if there is one (created False), else a new one queued (created True)."""
    if job.status != TrainingJob.Status.COMPLETED:
        raise EvaluationConflict(f"Job #{job.pk} is {job.get_status_display().lower()}; only a completed fine-tune can be scored.")
    size = scoring_size(job.dataset)
    existing = scoring_evaluations([job]).get(job.pk)
    if existing is not None:
        return existing, False
    return evaluation_start(owner=owner, job=job, test_size=size, baseline=None)
