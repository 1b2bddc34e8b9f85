"""Reads for evaluations."""

from __future__ import annotations

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from evaluation_app.metrics import METRICS
from evaluation_app.models import Evaluation, EvaluationExample, Rating


def evaluations_for_user(user) -> QuerySet[Evaluation]:
    return Evaluation.objects.filter(owner=user).select_related("training_job", "training_job__dataset")


def get_evaluation_for_user(user, pk: int) -> Evaluation:
    """Another user's evaluation is a 404, never a 403 that confirms it exists."""
    return get_object_or_404(evaluations_for_user(user), pk=pk)


def metric_rows(evaluation: Evaluation) -> list[dict]:
    m = evaluation.metrics or {}
    base, tuned, diff = m.get("base_model", {}), m.get("finetuned_model", {}), m.get("improvements", {})
    return [
        {
            "name": name,
            "label": label,
            "help": help_text,
            "base": base.get(name),
            "finetuned": tuned.get(name),
            "diff": diff.get(name, {}),
            "change": change_text(name, diff.get(name, {})),
        }
        for name, (label, _higher, help_text) in METRICS.items()
        if name in base
    ]


def change_text(name: str, diff: dict) -> str:
    """The fine-tuned minus base difference in the metric's own unit, with the relative change."""
    delta = diff.get("delta")
    if delta is None:
        return ""
    sign = "+" if delta >= 0 else "−"
    if "cost" in name:
        text = f"{sign}${abs(delta):.5f}"
    elif "latency" in name:
        text = f"{sign}{abs(delta):.0f} ms"
    else:
        text = f"{sign}{abs(delta):.3f}"
    relative = diff.get("relative")
    if relative is not None and abs(relative) < 1000:
        text += f" ({sign}{abs(relative) * 100:.0f}%)"
    return text


def chart_data(evaluation: Evaluation) -> dict:
    m = evaluation.metrics or {}
    names = ["exact_match", "rouge_l", "bleu"]
    return {
        "labels": [METRICS[n][0] for n in names],
        "datasets": [
            {"label": "Base", "data": [m.get("base_model", {}).get(n) for n in names], "backgroundColor": "rgba(95,107,122,.7)"},
            {"label": "Fine-tuned", "data": [m.get("finetuned_model", {}).get(n) for n in names], "backgroundColor": "rgba(36,86,214,.8)"},
        ],
    }


def example_at(evaluation: Evaluation, index: int) -> EvaluationExample | None:
    return EvaluationExample.objects.filter(evaluation=evaluation, index=index).first()


def user_vote(example: EvaluationExample, user) -> Rating | None:
    return Rating.objects.filter(example=example, user=user).first()


def first_unvoted_index(evaluation: Evaluation, user) -> int:
    voted = set(Rating.objects.filter(example__evaluation=evaluation, user=user).values_list("example__index", flat=True))
    return next((i for i in range(evaluation.test_size) if i not in voted), 0)


def preference_rows(evaluation: Evaluation, user) -> list[dict]:
    """Votes as a preference dataset: the preferred answer is chosen, the other rejected."""
    rows = []
    ratings = Rating.objects.filter(example__evaluation=evaluation, user=user, preferred_model__in=["base", "finetuned"]).select_related(
        "example"
    )
    for rating in ratings.order_by("example__index"):
        example = rating.example
        chosen, rejected = (
            (example.finetuned_output, example.base_output)
            if rating.preferred_model == "finetuned"
            else (example.base_output, example.finetuned_output)
        )
        rows.append({"prompt": example.prompt, "messages": example.messages, "chosen": chosen, "rejected": rejected})
    return rows
