from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRefresh

from evaluation_app import judging, selectors, services
from evaluation_app.models import Rating
from evaluation_app.preference import TooFewPairs, preference_job_start
from evaluation_app.selectors import evaluations_for_user, get_evaluation_for_user
from training_app.selectors import get_job_for_user
from training_app.services import ConfigInvalid, JobConflict
from training_app.views import training_page
from tuna_core.jobs import queue_position
from tuna_core.quotas import LimitExceeded


@login_required
@require_GET
def evaluation_list(request: HttpRequest) -> HttpResponse:
    return render(request, "evaluation_app/evaluation_list.html", {"evaluations": evaluations_for_user(request.user)})


@login_required
@require_POST
def evaluation_start(request: HttpRequest, job_pk: int) -> HttpResponse:
    job = get_job_for_user(request.user, job_pk)
    try:
        evaluation, created = services.evaluation_start(owner=request.user, job=job, test_size=request.POST.get("test_size"))
    except services.EvaluationInvalid as exc:
        return training_page(request, job, status=400, errors={exc.field: exc.message})
    except (services.EvaluationConflict, LimitExceeded) as exc:
        messages.error(request, str(exc))
        return redirect(job)
    if not created:
        messages.info(request, "This fine-tune is already being evaluated; here is that run.")
    return redirect(evaluation)


@login_required
@require_POST
def evaluation_rerun(request: HttpRequest, pk: int) -> HttpResponse:
    """Start a new evaluation of the same fine-tune against the same side (the base model or that fine-tune), on as many
    examples as this one."""
    evaluation = get_evaluation_for_user(request.user, pk)
    size = min(evaluation.test_size, settings.TUNA_MAX_EVAL_EXAMPLES) or None  # the limit may have been lowered since
    try:
        fresh, _ = services.evaluation_start(
            owner=request.user, job=evaluation.training_job, test_size=size, baseline=evaluation.baseline_job
        )
    except (services.EvaluationConflict, services.EvaluationInvalid, LimitExceeded) as exc:
        messages.error(request, str(exc))
        return redirect(evaluation)
    return redirect(fresh)


def _int(raw) -> int | None:
    try:
        return int(raw) if raw else None
    except ValueError:
        return None


def _blind(request: HttpRequest) -> bool:
    return request.GET.get("blind", request.POST.get("blind", "1")) != "0"


def _progress_context(evaluation) -> dict:
    queued = evaluation.status == evaluation.Status.QUEUED
    return {"evaluation": evaluation, "queue_position": queue_position(evaluation) if queued else None}


def _example_context(request: HttpRequest, evaluation, index: int | None, last_vote=None) -> dict:
    """The voting panel for one example, or its "all voted" state when ``index`` is None."""
    example = selectors.example_at(evaluation, index) if index is not None else None
    vote = selectors.user_vote(example, request.user) if example else None
    blind = _blind(request)
    return {
        "evaluation": evaluation,
        "example": example,
        "index": index,
        "vote": vote,
        "blind": blind,
        "revealed": not blind or vote is not None,
        "sides": [(side, selectors.shown_answer(example, example.side_output(side)), example.model_for_side(side)) for side in "AB"]
        if example
        else [],
        "reference_calls": selectors.readable_calls(example.reference_calls) if example else [],
        "summary": services.vote_summary(evaluation, request.user),
        "last_vote": selectors.vote_reveal(last_vote) if last_vote else "",
    }


@login_required
@require_GET
def evaluation_detail(request: HttpRequest, pk: int) -> HttpResponse:
    evaluation = get_evaluation_for_user(request.user, pk)
    if request.htmx and request.GET.get("fragment") == "progress":
        if evaluation.is_finished:
            return HttpResponseClientRefresh()  # results replace the progress bar: load the full page once
        return render(request, "evaluation_app/_eval_progress.html", _progress_context(evaluation))
    if request.htmx and request.GET.get("fragment") == "judge":
        context = _judge_context(request, evaluation)
        if context["judge"]["run"] is None or context["judge"]["run"].is_finished:
            return HttpResponseClientRefresh()  # verdicts show in the results too: load the full page once
        return render(request, "evaluation_app/_judge.html", context)
    index = _int(request.GET.get("example"))
    if index is None:
        index = selectors.next_unvoted_index(evaluation, request.user)
    else:
        index = max(0, min(index, max(evaluation.test_size - 1, 0)))
    context = _example_context(request, evaluation, index)
    context.update(
        _progress_context(evaluation),
        verdict=selectors.comparison_verdict(evaluation),
        comparison=selectors.comparison_page(evaluation, request.GET.get("page")),
        rows=selectors.metric_rows(evaluation),
        chart=selectors.chart_data(evaluation),
    )
    if evaluation.status == evaluation.Status.COMPLETED:
        context.update(_judge_context(request, evaluation))
        context.update(_preference_context(request, evaluation))
    return render(request, "evaluation_app/evaluation_detail.html", context)


def _judge_context(request: HttpRequest, evaluation, *, error: str = "", rubric: str | None = None) -> dict:
    endpoint = judging.judge_endpoint()
    completed = judging.latest_completed_run(evaluation)
    figures = judging.agreement(completed, request.user) if completed else None
    return {
        "evaluation": evaluation,
        "judge": {
            "configured": endpoint is not None,
            "not_configured": judging.NOT_CONFIGURED,
            "url": endpoint.shown_url if endpoint else "",  # never its credentials
            "model": endpoint.model if endpoint else "",
            "run": judging.latest_run(evaluation),
            "completed": completed,
            "summary": judging.run_summary(completed) if completed else None,
            "agreement": figures,
            "trust": judging.trust_text(figures) if figures else None,
            "rubric": rubric if rubric is not None else judging.latest_rubric(evaluation),
            "error": error,
        },
    }


def _preference_context(request: HttpRequest, evaluation) -> dict:
    votes = len(selectors.training_pairs(evaluation, request.user))
    judged = judging.latest_completed_run(evaluation) is not None  # without a judge's run, the judge adds no pair
    prefs = {
        "votes": votes,
        "with_judge": len(selectors.training_pairs(evaluation, request.user, include_judge=True)) if judged else votes,
        "needed": settings.TUNA_MIN_PREFERENCE_PAIRS,
        "jobs": evaluation.preference_jobs.order_by("-pk").prefetch_related("evaluations"),
    }
    context = {"prefs": prefs}
    if evaluation.against_start:
        job = evaluation.training_job
        completed = judging.latest_completed_run(evaluation)
        summary = services.vote_summary(evaluation, request.user)
        trained = {pair.get("example_index") for pair in job.preference_pairs}
        same_examples = job.source_evaluation is not None and job.source_evaluation.training_job_id == evaluation.baseline_job_id
        context["pref"] = {
            "pairs": len(job.preference_pairs),
            "source": job.source_evaluation,
            "file": job.dataset if job.dataset.is_preference else None,
            "trained_here": len([i for i in trained if i is not None and i < evaluation.test_size]) if same_examples else 0,
            "judge": judging.run_summary(completed)["win_rate"] if completed else None,
            "votes": judging.win_rate(summary["counts"]["finetuned"], summary["counts"]["base"]),
        }
    return context


@login_required
@require_POST
def evaluation_judge(request: HttpRequest, pk: int) -> HttpResponse:
    """Ask the configured judge about every example of this evaluation (in the worker)."""
    evaluation = get_evaluation_for_user(request.user, pk)
    rubric = request.POST.get("rubric", "")
    try:
        _, created = judging.judge_start(owner=request.user, evaluation=evaluation, rubric=rubric)
    except (judging.RubricInvalid, judging.JudgeUnavailable, LimitExceeded) as exc:
        messages.error(request, str(exc))
        return redirect(f"{evaluation.get_absolute_url()}#judge")
    if not created:
        messages.info(request, "The judge is already working on this evaluation.")
    return redirect(f"{evaluation.get_absolute_url()}#judge")


@login_required
@require_POST
def evaluation_train_preferences(request: HttpRequest, pk: int) -> HttpResponse:
    """Start a preference-tuning job on this evaluation's votes (and, opted in, the judge's verdicts)."""
    evaluation = get_evaluation_for_user(request.user, pk)
    epochs = request.POST.get("epochs", "").strip()
    try:
        job = preference_job_start(
            owner=request.user,
            evaluation=evaluation,
            include_judge=request.POST.get("include_judge") == "1",
            epochs=(int(epochs) if epochs.isdigit() else epochs) if epochs else None,  # a non-number is refused by name
        )
    except (TooFewPairs, JobConflict, ConfigInvalid, LimitExceeded) as exc:
        messages.error(request, str(exc))
        return redirect(f"{evaluation.get_absolute_url()}#train-preferences")
    messages.success(request, f"Job #{job.pk} is preference-tuning job #{evaluation.training_job_id} on {len(job.preference_pairs)} pairs.")
    return redirect(job)


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
    """Record the vote, then show the next example not voted on yet (or the "all voted" state)."""
    evaluation = get_evaluation_for_user(request.user, pk)
    first_vote = not Rating.objects.filter(example__evaluation=evaluation, example__index=index, user=request.user).exists()
    try:
        rating = services.rating_set_from_page(
            user=request.user, evaluation=evaluation, example_index=index, choice=request.POST.get("choice", ""), blind_mode=_blind(request)
        )
    except services.VoteInvalid as exc:
        if request.htmx:  # the panel again with the refusal in it, escaped like every value a template shows
            shown = index if selectors.example_at(evaluation, index) else selectors.next_unvoted_index(evaluation, request.user)
            context = {**_example_context(request, evaluation, shown), "vote_error": str(exc)}
            return render(request, "evaluation_app/_example_view.html", context, status=400)
        messages.error(request, str(exc))
        return redirect(f"{evaluation.get_absolute_url()}?example={index}")
    following = selectors.next_unvoted_index(evaluation, request.user, after=index)
    if request.htmx:
        context = _example_context(request, evaluation, following, last_vote=rating)
        response = render(request, "evaluation_app/_example_view.html", context)
        response.write(_vote_figures(request, evaluation, context["summary"], first_vote=first_vote))
        return response
    messages.success(request, selectors.vote_reveal(rating))
    where = f"&example={following}" if following is not None else ""  # none left: the page opens on "all voted"
    return redirect(f"{evaluation.get_absolute_url()}?blind={'1' if _blind(request) else '0'}{where}")


def _vote_figures(request: HttpRequest, evaluation, summary: dict, *, first_vote: bool) -> str:
    """Every figure outside the voting panel that a vote changes, as htmx out-of-band swaps sent with the next
    example (the win-rate card comes with the panel itself): the pair counts of "Train on preferences", a
    preference-tuned job's blind-vote win rate, the judge's agreement with the votes, and, while voting blind, the
    comparison (its count of examples left, then, after the last one, every answer with its model name)."""
    context = {"evaluation": evaluation, "summary": summary, "blind": _blind(request), "oob": True}
    context.update(_preference_context(request, evaluation))
    context.update(_judge_context(request, evaluation))
    names = ["evaluation_app/_train_preferences.html"]
    if context.get("pref"):
        names.append("evaluation_app/_preference_result.html")
    if context["judge"]["configured"] and context["judge"]["summary"]:  # where the page shows the card
        names.append("evaluation_app/_judge_agreement.html")
    if context["blind"] and (summary["remaining"] or first_vote):  # a changed vote after the reveal leaves the page as it is
        context["comparison"] = [] if summary["remaining"] else selectors.comparison_page(evaluation, None)  # hidden until then
        names.append("evaluation_app/_comparison.html")
    return "".join(render_to_string(name, context, request=request) for name in names)


@login_required
@require_GET
def evaluation_preferences(request: HttpRequest, pk: int) -> HttpResponse:
    evaluation = get_evaluation_for_user(request.user, pk)
    response = HttpResponse(selectors.preferences_jsonl(evaluation, request.user), content_type="application/jsonl; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="evaluation-{evaluation.pk}-preferences.jsonl"'
    return response


@login_required
@require_http_methods(["GET", "POST"])
def evaluation_delete(request: HttpRequest, pk: int) -> HttpResponse:
    """GET: what deleting the evaluation removes (or why it cannot go yet); POST: delete it."""
    evaluation = get_evaluation_for_user(request.user, pk)
    error = None
    if request.method == "POST":
        try:
            services.evaluation_delete(evaluation=evaluation)
        except services.EvaluationConflict as exc:
            error = str(exc)
        else:
            messages.success(request, f"Deleted evaluation #{pk} with its answers and votes.")
            return redirect(evaluation.training_job)
    votes = Rating.objects.filter(example__evaluation=evaluation).count()
    context = {"evaluation": evaluation, "answers": evaluation.examples.count(), "votes": votes, "error": error}
    return render(request, "evaluation_app/evaluation_delete.html", context, status=409 if error else 200)
