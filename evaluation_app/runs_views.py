"""The Runs page of a dataset: its fine-tunes on the same examples, scoring them, two compared side by side."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from datasets_app.selectors import get_dataset_for_user
from evaluation_app import runs
from training_app.models import TrainingJob
from training_app.selectors import get_job_for_user
from tuna_core.errors import UserError
from tuna_core.pages import refused


def _job(request: HttpRequest, field: str) -> TrainingJob:
    """The user's job named in a POST field; another user's (or no such) job is a 404."""
    raw = request.POST.get(field, "")
    if not raw.isdigit():
        raise Http404(f"No job given in {field}.")
    return get_job_for_user(request.user, int(raw))


@login_required
@require_GET
def dataset_runs(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_dataset_for_user(request.user, pk)
    table = runs.runs_table(dataset, request.user, sort=request.GET.get("sort"))
    if request.htmx and request.GET.get("fragment") == "table":
        return render(request, "evaluation_app/_runs_table.html", {"table": table})
    jobs = [row["job"] for row in table["rows"]]
    chosen = runs.chosen_runs(jobs, request.GET.getlist("show"))
    context = {
        "dataset": dataset,
        "table": table,
        "curves": runs.validation_curves(chosen),
        "chosen": {job.pk for job in chosen},
        "jobs": sorted(jobs, key=lambda job: job.pk, reverse=True),
    }
    return render(request, "evaluation_app/runs.html", context)


@login_required
@require_POST
def dataset_runs_score(request: HttpRequest, pk: int) -> HttpResponse:
    """Score one run ("Score", with ``job``) or every run not scored yet ("Score all")."""
    dataset = get_dataset_for_user(request.user, pk)
    back = reverse("dataset-runs", args=[dataset.pk])
    job_ids = [_job(request, "job").pk] if "job" in request.POST else None
    try:
        results = runs.runs_score(owner=request.user, dataset=dataset, job_ids=job_ids)
    except UserError as exc:
        return refused(request, exc, redirect_to=back)
    started = [r for r in results if r["created"]]
    waiting = [r for r in results if r["refused"]]
    if started:
        messages.success(
            request, f"Scoring {len(started)} run{'s' if len(started) != 1 else ''} on the same {dataset.scoring_size} examples."
        )
    elif not waiting:
        messages.info(request, "Every run is already scored or being scored.")
    reasons: dict[str, list[int]] = {}
    for r in waiting:
        reasons.setdefault(r["refused"], []).append(r["job"].pk)
    for reason, ids in reasons.items():
        messages.warning(request, f"Not started yet: job {', '.join(f'#{pk}' for pk in ids)}. {reason}")
    return redirect(back)


@login_required
@require_POST
def dataset_runs_compare(request: HttpRequest, pk: int) -> HttpResponse:
    """Two fine-tunes of the dataset side by side on its scoring set, on the comparison page."""
    dataset = get_dataset_for_user(request.user, pk)
    job, baseline = _job(request, "job"), _job(request, "baseline_job")
    try:
        job, baseline = runs.get_run(dataset, job.pk), runs.get_run(dataset, baseline.pk)
        evaluation, created = runs.runs_compare(owner=request.user, job=job, baseline=baseline)
    except UserError as exc:
        return refused(request, exc, redirect_to=reverse("dataset-runs", args=[dataset.pk]))
    if not created:
        messages.info(request, f"Job #{job.pk} and job #{baseline.pk} are already compared (or being compared); here is that comparison.")
    return redirect(evaluation)
