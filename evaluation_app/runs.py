"""Runs compared on the same examples: every completed fine-tune of a dataset scored on one scoring set.

The scoring set of a dataset is the first ``Dataset.scoring_size`` examples of its held-out set
(``datasets_app.examples.held_out_examples``), fixed the first time a run is scored, so every run's figures
come from the same examples (``EvaluationExample.index`` is the example id). A run's scoring evaluation is
its evaluation against the base model on exactly that many examples. Two fine-tunes of a dataset are
compared side by side on the same scoring set (an evaluation whose ``baseline_job`` is the other one).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import transaction
from django.urls import NoReverseMatch, reverse

from datasets_app.examples import held_out_examples
from datasets_app.models import Dataset
from evaluation_app.models import Evaluation, EvaluationExample
from evaluation_app.services import DEFAULT_TEST_SIZE, EvaluationConflict, evaluation_baseline_check, evaluation_start, vote_summary
from training_app.models import LossPoint, TrainingJob
from training_app.selectors import EXTRA_SETTINGS
from tuna_core.errors import Invalid, NotFound
from tuna_core.quotas import LimitExceeded
from tuna_llm.training_config import RANGES

# A scoring evaluation that counts: done, or on its way (a failed or cancelled one is started again).
SCORING_STATES = [Evaluation.Status.COMPLETED, Evaluation.Status.QUEUED, Evaluation.Status.RUNNING]

# The Runs table's sortable columns: ?sort=<key> (ascending) or ?sort=-<key> (descending); empty values sort last.
SORTS = {
    "job": "Job",
    "eval_loss": "Validation loss",
    "heldout_loss": "Held-out loss",
    "exact_match": "Exact match",
    "task_score": "Task score",
    "rouge_l": "ROUGE-L",
    "win_rate": "Blind win rate vs base",
    "train_seconds": "Training time",
    "cost_usd": "Cost",
    "tokens_per_second": "Tokens/s",
}
DEFAULT_SORT = "-job"
# Settings compared between runs, in this order, with their labels.
SETTING_LABELS = {
    "base_model": "Base model",
    "method": "Method",
    "target_modules": "LoRA layers",
    **{name: spec.label for name, spec in RANGES.items()},
    **EXTRA_SETTINGS,
}


class RunsInvalid(Invalid):
    pass


class RunNotFound(NotFound):
    pass


# -- the scoring set -----------------------------------------------------------------------------
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


def _on_scoring_set(evaluation_ids: list[int], dataset: Dataset) -> set[int]:
    """Those completed evaluations whose examples are still the dataset's held-out ones, prompt for prompt (a held-out
    file uploaded later changes them, and an older run's figures then describe other examples)."""
    if not evaluation_ids:
        return set()
    prompts = [list(example[:-1]) for example in held_out_examples(dataset)]
    same = set(evaluation_ids)
    rows = EvaluationExample.objects.filter(evaluation_id__in=evaluation_ids).values_list("evaluation_id", "index", "messages")
    for evaluation_id, index, messages in rows:
        if index >= len(prompts) or messages != prompts[index]:
            same.discard(evaluation_id)
    return same


def _evaluations_on_scoring_set(jobs: list[TrainingJob], baseline_ids: dict[int, int | None]) -> dict[int, Evaluation]:
    """Per job id: its evaluation against ``baseline_ids[job id]`` (None: the base model) on its dataset's scoring set,
    the newest completed one, else the one queued or running. A job with none is missing from the answer."""
    sizes = {job.pk: job.dataset.scoring_size for job in jobs if job.dataset.scoring_size}
    if not sizes:
        return {}
    candidates = [
        e
        for e in Evaluation.objects.filter(training_job__in=list(sizes), status__in=SCORING_STATES)
        if e.test_size == sizes[e.training_job_id] and e.baseline_job_id == baseline_ids.get(e.training_job_id)
    ]
    datasets = {job.dataset_id: job.dataset for job in jobs}
    dataset_of = {job.pk: job.dataset_id for job in jobs}
    current: set[int] = set()
    for dataset_id, dataset in datasets.items():
        done = [e.pk for e in candidates if e.status == Evaluation.Status.COMPLETED and dataset_of[e.training_job_id] == dataset_id]
        current |= _on_scoring_set(done, dataset)
    found: dict[int, Evaluation] = {}
    for evaluation in candidates:  # newest first (the model's ordering)
        if evaluation.status == Evaluation.Status.COMPLETED and evaluation.pk not in current:
            continue
        held = found.get(evaluation.training_job_id)
        if held is None or (held.status != Evaluation.Status.COMPLETED and evaluation.status == Evaluation.Status.COMPLETED):
            found[evaluation.training_job_id] = evaluation
    return found


def scoring_evaluations(jobs) -> dict[int, Evaluation]:
    """Each job's scoring evaluation (against the base model, on its dataset's scoring set), by job id."""
    jobs = list(jobs)
    return _evaluations_on_scoring_set(jobs, {job.pk: None for job in jobs})


def _refuse_other_run_in_progress(job: TrainingJob, baseline: TrainingJob | None, size: int) -> None:
    """evaluation_start returns a run of the same pair already in progress, whatever its size: one on another number of
    examples is not on the scoring set, so say so rather than hand it back."""
    other = (
        Evaluation.objects.filter(training_job=job, baseline_job=baseline, status__in=[Evaluation.Status.QUEUED, Evaluation.Status.RUNNING])
        .exclude(test_size=size)
        .first()
    )
    if other is not None:
        against = f"job #{baseline.pk}" if baseline else "the base model"
        raise EvaluationConflict(
            f"Job #{job.pk} is already being evaluated against {against} on {other.test_size} examples (evaluation #{other.pk}); "
            f"once that run has finished it can be run on the {size} examples every run of the dataset is scored on."
        )


def scoring_start(*, owner, job: TrainingJob) -> tuple[Evaluation, bool]:
    """The job's evaluation against the base model on its dataset's scoring set: the one already completed, queued
    or running if there is one (created False), else a new one queued (created True)."""
    if job.status != TrainingJob.Status.COMPLETED:
        raise EvaluationConflict(f"Job #{job.pk} is {job.get_status_display().lower()}; only a completed fine-tune can be scored.")
    size = scoring_size(job.dataset)
    existing = scoring_evaluations([job]).get(job.pk)
    if existing is not None:
        return existing, False
    _refuse_other_run_in_progress(job, None, size)
    return evaluation_start(owner=owner, job=job, test_size=size, baseline=None)


# -- runs of a dataset ---------------------------------------------------------------------------
def dataset_runs(dataset: Dataset) -> list[TrainingJob]:
    """Every completed fine-tune of the dataset (SFT and preference-tuned), oldest first."""
    return list(
        TrainingJob.objects.filter(dataset=dataset, owner_id=dataset.owner_id, status=TrainingJob.Status.COMPLETED)
        .select_related("dataset")
        .order_by("pk")
    )


def get_run(dataset: Dataset, job_id: Any) -> TrainingJob:
    """One completed run of the dataset; anything else (another dataset's job, an unfinished one) is refused."""
    try:
        pk = int(job_id)
    except (TypeError, ValueError):
        raise RunsInvalid(f"job must be a job id; got {str(job_id)[:40]!r}.", errors={"job": ["Not a job id."]}) from None
    job = TrainingJob.objects.filter(pk=pk, owner_id=dataset.owner_id).select_related("dataset").first()
    if job is None:
        raise RunNotFound(f"No job #{pk} of yours.")
    if job.dataset_id != dataset.pk:
        raise RunsInvalid(f"Job #{pk} is a fine-tune of another dataset.", errors={"job": [f"Job #{pk} is not a run of this dataset."]})
    if job.status != TrainingJob.Status.COMPLETED:
        raise EvaluationConflict(f"Job #{pk} is {job.get_status_display().lower()}; only completed fine-tunes are scored and compared.")
    return job


def _setting(job: TrainingJob, name: str) -> Any:
    if name == "base_model":
        return job.base_model
    if name == "method":
        return job.get_method_display()
    value = (job.config or {}).get(name)
    return ", ".join(value) if isinstance(value, list) else value


def differing_settings(jobs: list[TrainingJob]) -> list[dict[str, str]]:
    """The settings whose values are not the same in every run: [{"name", "label"}]."""
    if len(jobs) < 2:
        return []
    return [
        {"name": name, "label": label} for name, label in SETTING_LABELS.items() if len({repr(_setting(job, name)) for job in jobs}) > 1
    ]


def _experiment_url(experiment_id: int | None) -> str:
    if experiment_id is None:
        return ""
    try:
        return reverse("experiment-detail", args=[experiment_id])
    except NoReverseMatch:  # no sweep pages in this deployment
        return ""


def _example_ids(evaluations: list[Evaluation]) -> dict[int, list[int]]:
    ids: dict[int, list[int]] = {e.pk: [] for e in evaluations}
    rows = EvaluationExample.objects.filter(evaluation__in=[e.pk for e in evaluations]).order_by("evaluation_id", "index")
    for evaluation_id, index in rows.values_list("evaluation_id", "index"):
        ids[evaluation_id].append(index)
    return ids


def _row(job: TrainingJob, evaluation: Evaluation | None, user, names: list[str], example_ids: dict[int, list[int]]) -> dict[str, Any]:
    scored = evaluation is not None and evaluation.status == Evaluation.Status.COMPLETED
    tuned = (evaluation.metrics or {}).get("finetuned_model", {}) if scored else {}
    votes = vote_summary(evaluation, user) if scored else None
    return {
        "job": job,
        "job_id": job.pk,
        "method": job.method,
        "parent_id": job.parent_id,
        "experiment_id": job.experiment_id,
        "experiment_url": _experiment_url(job.experiment_id),
        "settings": {name: _setting(job, name) for name in names},
        "setting_values": [(name, _setting(job, name)) for name in names],  # in the table's column order
        "eval_loss": job.best_eval_loss,
        "best_step": job.best_step,
        "heldout_loss": tuned.get("heldout_loss"),
        "exact_match": tuned.get("exact_match"),
        "task_score": tuned.get("task_score"),
        "task_score_label": tuned.get("task_score_label", ""),
        "rouge_l": tuned.get("rouge_l"),
        "win_rate": votes["win_rate"] if votes else None,
        "win_interval": list(votes["interval"]) if votes and votes["interval"] else None,
        "blind_votes": votes["decisive"] if votes else 0,
        "train_seconds": job.train_seconds,
        "cost_usd": job.cost_usd,
        "tokens_per_second": job.tokens_per_second,
        "evaluation": evaluation,
        "evaluation_id": evaluation.pk if evaluation else None,
        "scoring": "scored" if scored else (evaluation.status if evaluation else "unscored"),
        "example_ids": example_ids.get(evaluation.pk) if scored else None,
    }


def sort_key(raw: str | None) -> str:
    """The sort asked for if it is one of SORTS (optionally with "-"), else the default."""
    raw = (raw or "").strip()
    return raw if raw.lstrip("-") in SORTS else DEFAULT_SORT


def _sorted(rows: list[dict], sort: str) -> list[dict]:
    key, descending = sort.lstrip("-"), sort.startswith("-")
    key = "job_id" if key == "job" else key
    present = sorted((r for r in rows if r[key] is not None), key=lambda r: (r[key], r["job_id"]), reverse=descending)
    return present + [r for r in rows if r[key] is None]


def runs_table(dataset: Dataset, user, *, sort: str | None = None) -> dict[str, Any]:
    """The Runs view of a dataset: every completed run with its figures on the scoring set (the page and the API)."""
    jobs = dataset_runs(dataset)
    scoring = scoring_evaluations(jobs)
    completed = [e for e in scoring.values() if e.status == Evaluation.Status.COMPLETED]
    settings_shown = differing_settings(jobs)
    names = [s["name"] for s in settings_shown]
    ids = _example_ids(completed)
    sort = sort_key(sort)
    rows = _sorted([_row(job, scoring.get(job.pk), user, names, ids) for job in jobs], sort)
    newest = max(completed, key=lambda e: e.pk, default=None)
    base = (newest.metrics or {}).get("base_model", {}) if newest else {}
    return {
        "dataset": dataset,
        "scoring_size": dataset.scoring_size,
        "settings": settings_shown,
        "rows": rows,
        "sort": sort,
        "sorts": list(SORTS.items()),
        "base": {key: base.get(key) for key in ("heldout_loss", "exact_match", "task_score", "task_score_label", "rouge_l")}
        if base
        else None,
        "unscored": [r["job_id"] for r in rows if r["scoring"] == "unscored"],
        "scoring_now": any(r["scoring"] in (Evaluation.Status.QUEUED, Evaluation.Status.RUNNING) for r in rows),
    }


def validation_curves(jobs: list[TrainingJob]) -> dict[str, Any]:
    """The validation-loss points of each run, by step, for one chart: {"runs": [{"label", "job", "data": [{x, y}]}]}.

    A continued run's own steps follow its parent's (step_offset), as on its job page."""
    points: dict[int, list[dict]] = {job.pk: [] for job in jobs}
    offsets = {job.pk: job.step_offset for job in jobs}
    rows = LossPoint.objects.filter(job__in=list(points), eval_loss__isnull=False).order_by("job_id", "step")
    for job_id, step, eval_loss in rows.values_list("job_id", "step", "eval_loss"):
        points[job_id].append({"x": offsets[job_id] + step, "y": eval_loss})
    return {"runs": [{"label": f"Job #{job.pk}", "job": job.pk, "data": points[job.pk]} for job in jobs]}


def chosen_runs(jobs: list[TrainingJob], raw: list[str]) -> list[TrainingJob]:
    """The runs picked for the chart (``?show=<job id>`` repeated); all of them when none is picked."""
    wanted = {int(value) for value in raw if str(value).isdigit()}
    picked = [job for job in jobs if job.pk in wanted]
    return picked or jobs


# -- writes --------------------------------------------------------------------------------------
def runs_score(*, owner, dataset: Dataset, job_ids: list | None = None) -> list[dict[str, Any]]:
    """Score runs on the dataset's scoring set: the given ones, or every run not yet scored ("Score all").

    Returns one entry per run: {"job", "evaluation", "created", "refused"}. Runs past the user's limit on queued
    jobs, or being evaluated on other examples right now, are not started (``refused`` says why); when none could be
    started the first refusal is raised instead.
    """
    if job_ids:
        jobs = [get_run(dataset, job_id) for job_id in job_ids]
    else:
        jobs = dataset_runs(dataset)
        scored = scoring_evaluations(jobs)
        jobs = [job for job in jobs if job.pk not in scored]
    if not jobs:
        return []
    scoring_size(dataset)
    results: list[dict[str, Any]] = []
    limit: LimitExceeded | None = None
    first_refusal: EvaluationConflict | LimitExceeded | None = None
    for job in jobs:
        if limit is not None:  # past the limit: the others would be refused the same way
            results.append({"job": job, "evaluation": None, "created": False, "refused": limit.message})
            continue
        try:
            evaluation, created = scoring_start(owner=owner, job=job)
        except (LimitExceeded, EvaluationConflict) as exc:
            limit = exc if isinstance(exc, LimitExceeded) else None
            first_refusal = first_refusal or exc
            results.append({"job": job, "evaluation": None, "created": False, "refused": exc.message})
            continue
        results.append({"job": job, "evaluation": evaluation, "created": created, "refused": ""})
    if first_refusal is not None and not any(r["evaluation"] for r in results):
        raise first_refusal
    return results


def runs_compare(*, owner, job: TrainingJob, baseline: TrainingJob) -> tuple[Evaluation, bool]:
    """Two fine-tunes of one dataset (and one base model) side by side on the dataset's scoring set: ``job``'s answers
    against ``baseline``'s, with the comparison page's verdict, per-example diff and blind voting. Returns the
    comparison already completed, queued or running if there is one (created False), else a new one."""
    evaluation_baseline_check(owner=owner, job=job, baseline=baseline)
    if job.dataset_id != baseline.dataset_id:  # even a job's parent: both are scored on one dataset's scoring set
        raise RunsInvalid(
            f"Job #{job.pk} is trained on dataset #{job.dataset_id} and job #{baseline.pk} on dataset #{baseline.dataset_id}; "
            "only fine-tunes of the same dataset are compared, on that dataset's held-out examples.",
            errors={"baseline_job": ["Not a fine-tune of the same dataset."]},
        )
    if job.status != TrainingJob.Status.COMPLETED:
        raise EvaluationConflict(f"Job #{job.pk} is {job.get_status_display().lower()}; only a completed fine-tune can be compared.")
    size = scoring_size(job.dataset)
    existing = _evaluations_on_scoring_set([job], {job.pk: baseline.pk}).get(job.pk)
    if existing is not None:
        return existing, False
    _refuse_other_run_in_progress(job, baseline, size)
    return evaluation_start(owner=owner, job=job, test_size=size, baseline=baseline)
