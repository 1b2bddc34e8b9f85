from __future__ import annotations

import json

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseClientRefresh

from evaluation_app import selectors, services
from evaluation_app.selectors import evaluations_for_user, get_evaluation_for_user
from training_app.selectors import get_job_for_user

SIDE_CHOICES = {"A": None, "B": None, "tie": "tie", "both_bad": "both_bad"}


@login_required
@require_GET
def evaluation_list(request: HttpRequest) -> HttpResponse:
    return render(request, "evaluation_app/evaluation_list.html", {"evaluations": evaluations_for_user(request.user)})


@login_required
@require_POST
def evaluation_start(request: HttpRequest, job_pk: int) -> HttpResponse:
    job = get_job_for_user(request.user, job_pk)
    try:
        evaluation, created = services.evaluation_start(owner=request.user, job=job, test_size=_int(request.POST.get("test_size")))
    except services.EvaluationConflict as exc:
        messages.error(request, str(exc))
        return redirect(job)
    if not created:
        messages.info(request, "This fine-tune is already being evaluated; here is that run.")
    return redirect(evaluation)


def _int(raw) -> int | None:
    try:
        return int(raw) if raw else None
    except ValueError:
        return None


def _example_context(request: HttpRequest, evaluation, index: int) -> dict:
    example = selectors.example_at(evaluation, index)
    vote = selectors.user_vote(example, request.user) if example else None
    blind = request.GET.get("blind", request.POST.get("blind", "1")) != "0"
    return {
        "evaluation": evaluation,
        "example": example,
        "index": index,
        "vote": vote,
        "blind": blind,
        "revealed": not blind or vote is not None,
        "sides": [
            ("A", example.side_output("A"), example.model_for_side("A")),
            ("B", example.side_output("B"), example.model_for_side("B")),
        ]
        if example
        else [],
        "summary": services.vote_summary(evaluation, request.user),
    }


@login_required
@require_GET
def evaluation_detail(request: HttpRequest, pk: int) -> HttpResponse:
    evaluation = get_evaluation_for_user(request.user, pk)
    if request.htmx and request.GET.get("fragment") == "progress":
        if evaluation.is_finished:
            return HttpResponseClientRefresh()  # results replace the progress bar: load the full page once
        return render(request, "evaluation_app/_eval_progress.html", {"evaluation": evaluation})
    index = _int(request.GET.get("example"))
    index = selectors.first_unvoted_index(evaluation, request.user) if index is None else index
    context = _example_context(request, evaluation, max(0, min(index, max(evaluation.test_size - 1, 0))))
    context.update(rows=selectors.metric_rows(evaluation), chart=selectors.chart_data(evaluation))
    return render(request, "evaluation_app/evaluation_detail.html", context)


@login_required
@require_GET
def evaluation_example(request: HttpRequest, pk: int, index: int) -> HttpResponse:
    evaluation = get_evaluation_for_user(request.user, pk)
    if not request.htmx:
        return redirect(f"{evaluation.get_absolute_url()}?example={index}")
    return render(request, "evaluation_app/_example_view.html", _example_context(request, evaluation, index))


@login_required
@require_POST
def evaluation_vote(request: HttpRequest, pk: int, index: int) -> HttpResponse:
    evaluation = get_evaluation_for_user(request.user, pk)
    example = selectors.example_at(evaluation, index)
    choice = request.POST.get("choice", "")
    preferred = example.model_for_side(choice) if example and choice in ("A", "B") else SIDE_CHOICES.get(choice, choice)
    try:
        services.rating_set(user=request.user, evaluation=evaluation, example_index=index, preferred_model=preferred)
    except services.VoteInvalid as exc:
        if request.htmx:
            return HttpResponse(str(exc), status=400)
        messages.error(request, str(exc))
    if request.htmx:
        return render(request, "evaluation_app/_example_view.html", _example_context(request, evaluation, index))
    return redirect(f"{evaluation.get_absolute_url()}?example={index}")


@login_required
@require_GET
def evaluation_preferences(request: HttpRequest, pk: int) -> HttpResponse:
    evaluation = get_evaluation_for_user(request.user, pk)
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in selectors.preference_rows(evaluation, request.user))
    response = HttpResponse(body, content_type="application/jsonl; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="evaluation-{evaluation.pk}-preferences.jsonl"'
    return response
