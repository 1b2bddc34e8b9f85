"""Reads for evaluations."""

from __future__ import annotations

import difflib
import json
import math
import re

from django.core.paginator import Page, Paginator
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from evaluation_app.judging import latest_completed_run
from evaluation_app.models import Evaluation, EvaluationExample, Rating
from tuna_llm import metrics
from tuna_llm.metrics import METRICS
from tuna_llm.task_scores import OTHER_LABEL
from tuna_llm.toolcalls import parse_tool_calls

# Verdict thresholds: a change in exact matches of at least max(1, 10% of the examples), or in mean
# ROUGE-L of at least 0.05 while exact matches do not move the other way. Below that, small test sets
# mostly measure noise, so the page says "No clear difference" rather than guess.
VERDICT_EXACT_SHARE = 0.10
VERDICT_ROUGE_DELTA = 0.05
VERDICTS = {"better": "Better", "worse": "Worse", "no_difference": "No clear difference"}
# Task-aware shares of answers: their changes read in percentage points.
RATE_METRICS = {"json_valid_rate", "field_accuracy", "label_accuracy"}
EXAMPLES_PER_PAGE = 10
# Diff tokens: whitespace, the metric's words (a single character in CJK/Thai), any other character.
_DIFF_TOKEN = re.compile(rf"\s+|{metrics.TOKEN_PATTERN}|.", re.DOTALL)


def evaluations_for_user(user) -> QuerySet[Evaluation]:
    return Evaluation.objects.filter(owner=user).select_related("training_job", "training_job__dataset")


def get_evaluation_for_user(user, pk: int) -> Evaluation:
    """Another user's evaluation is a 404, never a 403 that confirms it exists."""
    return get_object_or_404(evaluations_for_user(user), pk=pk)


def metric_rows(evaluation: Evaluation) -> list[dict]:
    """The metrics table: every metric both summaries have, the task-aware ones (JSON validity and field accuracy,
    label accuracy, each of the dataset's checks) beside exact match; ``decides`` marks what decided the verdict."""
    m = evaluation.metrics or {}
    base, tuned, diff = m.get("base_model", {}), m.get("finetuned_model", {}), m.get("improvements", {})
    decider = task_score_key(base, tuned)
    rows = []
    for name, (label, _higher, help_text) in METRICS.items():
        if name != "task_score" and name in base:  # the headline is one of the other rows, marked
            decides = decider == name or (decider is None and name in ("exact_match", "rouge_l"))
            rows.append(_metric_row(name, label, help_text, base.get(name), tuned.get(name), diff.get(name, {}), decides))
        if name == "field_accuracy":  # the last task-aware entry of METRICS: the nested ones follow it
            rows.extend(_task_rows(base, tuned, decider))
    return rows


def _metric_row(name: str, label: str, help_text: str, base, tuned, diff: dict, decides: bool) -> dict:
    return {
        "name": name,
        "label": label,
        "help": help_text,
        "base": base,
        "finetuned": tuned,
        "diff": diff,
        "change": change_text(name, diff),
        "decides": decides,
    }


def _rate_diff(base: float | None, tuned: float | None) -> dict:
    """A higher-is-better rate's change, as ``metrics.improvements`` writes it."""
    if base is None or tuned is None:
        return {}
    delta = tuned - base
    direction = "same" if abs(delta) < 1e-12 else ("better" if delta > 0 else "worse")
    return {"delta": delta, "relative": delta / base if base else None, "direction": direction}


def task_score_key(base: dict, tuned: dict) -> str | None:
    """Which task-aware score is the headline of this evaluation ("field_accuracy", "labels", "checks"), if any."""
    key = tuned.get("task_score_key") or base.get("task_score_key")
    return key if key and base.get("task_score") is not None and tuned.get("task_score") is not None else None


def _task_rows(base: dict, tuned: dict, decider: str | None) -> list[dict]:
    """Label accuracy and each check's pass rate (nested in the summaries, so not in METRICS)."""
    rows = []
    if "labels" in base and "labels" in tuned:
        b, f = base["labels"].get("accuracy"), tuned["labels"].get("accuracy")
        help_text = (
            "The references come from a small fixed set of labels: the share of answers that are the right label "
            "(case, surrounding quotes and a final full stop ignored). Per label and the confusion table below."
        )
        rows.append(_metric_row("label_accuracy", "Label accuracy", help_text, b, f, _rate_diff(b, f), decider == "labels"))
    checks_b, checks_f = base.get("checks") or {}, tuned.get("checks") or {}
    for name in checks_b:
        if name in checks_f:
            b, f = checks_b[name], checks_f[name]
            help_text = "Your check on this dataset: the share of answers that pass it."
            rows.append(_metric_row(f"check:{name}", f"Check “{name}”", help_text, b, f, _rate_diff(b, f), decider == "checks"))
    return rows


def change_text(name: str, diff: dict) -> str:
    """The fine-tuned minus base difference in the metric's own unit, with the relative change."""
    delta = diff.get("delta")
    if delta is None:
        return ""
    sign = "+" if delta >= 0 else "−"
    if name in RATE_METRICS or name.startswith("check:"):  # shares of answers: percentage points
        text = f"{sign}{abs(delta) * 100:.1f} pts"
        relative = diff.get("relative")
        return text + (f" ({sign}{abs(relative) * 100:.0f}%)" if relative is not None and abs(relative) < 1000 else "")
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


def label_tables(evaluation: Evaluation) -> dict | None:
    """A classification task's per-label accuracy of both sides and their confusion tables, ready for the page (rows
    and cells in the labels' order, "(other)" last when some answer was no label); None when the task is not one."""
    m = evaluation.metrics or {}
    base, tuned = (m.get("base_model") or {}).get("labels"), (m.get("finetuned_model") or {}).get("labels")
    if not base or not tuned:
        return None
    labels = base.get("order") or sorted(base.get("per_label") or {})
    other = OTHER_LABEL if any(OTHER_LABEL in row for side in (base, tuned) for row in (side.get("confusion") or {}).values()) else None
    columns = [*labels, *([other] if other else [])]
    empty = {"correct": 0, "total": 0, "accuracy": None}
    per_label = [
        {"label": label, "base": base["per_label"].get(label, empty), "finetuned": (tuned.get("per_label") or {}).get(label, empty)}
        for label in labels
    ]
    confusion = []
    for name, side in ((evaluation.baseline_label, base), (evaluation.candidate_label, tuned)):
        table = side.get("confusion") or {}
        rows = [
            {
                "label": label,
                "cells": [{"count": table.get(label, {}).get(col, 0), "right": col == label} for col in columns],
                "total": sum(table.get(label, {}).values()),
            }
            for label in labels
        ]
        confusion.append({"side": name, "columns": columns, "rows": rows})
    return {"per_label": per_label, "confusion": confusion, "accuracy": (base.get("accuracy"), tuned.get("accuracy"))}


def chart_data(evaluation: Evaluation) -> dict:
    m = evaluation.metrics or {}
    names = ["exact_match", "rouge_l", "bleu"]
    return {
        "labels": [METRICS[n][0] for n in names],
        "datasets": [
            {
                "label": evaluation.baseline_label,
                "data": [m.get("base_model", {}).get(n) for n in names],
                "backgroundColor": "rgba(95,107,122,.7)",
            },
            {
                "label": evaluation.candidate_label,
                "data": [m.get("finetuned_model", {}).get(n) for n in names],
                "backgroundColor": "rgba(36,86,214,.8)",
            },
        ],
    }


def example_at(evaluation: Evaluation, index: int) -> EvaluationExample | None:
    return EvaluationExample.objects.filter(evaluation=evaluation, index=index).first()


def user_vote(example: EvaluationExample, user) -> Rating | None:
    return Rating.objects.filter(example=example, user=user).first()


def next_unvoted_index(evaluation: Evaluation, user, *, after: int = -1) -> int | None:
    """The first example after ``after`` the user has not voted on, wrapping round; None when all are voted."""
    voted = set(Rating.objects.filter(example__evaluation=evaluation, user=user).values_list("example__index", flat=True))
    order = [*range(after + 1, evaluation.test_size), *range(0, after + 1)]
    return next((i for i in order if i not in voted), None)


def vote_reveal(rating: Rating) -> str:
    """What a vote just cast chose, with the names the blind page hid until then."""
    example = rating.example
    tuned, base = example.finetuned_side, "B" if example.finetuned_side == "A" else "A"
    if rating.preferred_model == Rating.Choice.FINETUNED:
        chose = f"you preferred {tuned}"
    elif rating.preferred_model == Rating.Choice.BASE:
        chose = f"you preferred {base}"
    else:
        chose = f"you voted {rating.get_preferred_model_display().lower()}"
    evaluation = example.evaluation
    if evaluation.baseline_job_id:
        return f"Example {example.index + 1}: {chose}. {tuned} was job #{evaluation.training_job_id}, {base} job #{evaluation.baseline_job_id}."
    return f"Example {example.index + 1}: {chose}. {tuned} was the fine-tuned model, {base} the base model."


def comparison_verdict(evaluation: Evaluation) -> dict | None:
    """Did fine-tuning help? "better", "worse" or "no_difference", with the figures behind it and what decided it.

    Where a task-aware score applies (``task_score``: JSON field accuracy, label accuracy or checks passed) it decides:
    better when it rises by the worth of at least max(1, 10% of n) examples (n: the examples it is measured on), worse
    when it falls as much. Otherwise exact match and ROUGE-L decide: better when exact matches rise by at least
    max(1, 10% of n), or mean ROUGE-L rises by at least 0.05 with exact matches not falling; worse the mirror image.
    Held-out loss is shown, not judged: it can fall while the answers stay the same.
    """
    m = evaluation.metrics or {}
    base, tuned = m.get("base_model"), m.get("finetuned_model")
    if not base or not tuned:
        return None
    n = int(base.get("count") or evaluation.test_size or 0)
    exact = (round(base.get("exact_match", 0) * n), round(tuned.get("exact_match", 0) * n))
    rouge = (base.get("rouge_l"), tuned.get("rouge_l"))
    exact_delta = exact[1] - exact[0]
    rouge_delta = rouge[1] - rouge[0] if None not in rouge else 0.0
    bar = max(1, math.ceil(VERDICT_EXACT_SHARE * n))  # exact-match counts are whole numbers
    task = None
    task_key = task_score_key(base, tuned)
    if task_key is not None:
        task_n = int(base.get("json_examples") or n) if task_key == "field_accuracy" else n
        task_bar = max(1, math.ceil(VERDICT_EXACT_SHARE * task_n))
        scores = (base["task_score"], tuned["task_score"])
        worth = (scores[1] - scores[0]) * task_n  # the change in examples' worth
        key = "better" if worth >= task_bar - 1e-9 else "worse" if worth <= -task_bar + 1e-9 else "no_difference"
        label = tuned.get("task_score_label") or base.get("task_score_label") or "Task score"
        task = {"key": task_key, "label": label, "scores": scores, "n": task_n, "bar": task_bar, "bar_share": task_bar / task_n}
        decided_by = label
    else:
        if exact_delta >= bar or (rouge_delta >= VERDICT_ROUGE_DELTA and exact_delta >= 0):
            key = "better"
        elif exact_delta <= -bar or (rouge_delta <= -VERDICT_ROUGE_DELTA and exact_delta <= 0):
            key = "worse"
        else:
            key = "no_difference"
        decided_by = "Exact match and ROUGE-L"
    return {
        "key": key,
        "label": VERDICTS[key],
        "n": n,
        "exact": exact,
        "rouge": rouge,
        "loss": (base.get("heldout_loss"), tuned.get("heldout_loss")),
        "exact_bar": bar,
        "task": task,
        "decided_by": decided_by,
        "labels": label_tables(evaluation),  # a classification task's per-label accuracy and confusion tables, for the page
    }


def word_diff(reference: str, answer: str) -> list[tuple[str, str]]:
    """Word-level differences of an answer from the reference, as (op, text) runs: "same", "del" (in the
    reference, missing from the answer) and "ins" (in the answer only). The template escapes the text."""
    ref, out = _DIFF_TOKEN.findall(reference), _DIFF_TOKEN.findall(answer)
    runs: list[tuple[str, str]] = []

    def add(op: str, tokens: list[str]) -> None:
        if not tokens:
            return
        if runs and runs[-1][0] == op:
            runs[-1] = (op, runs[-1][1] + "".join(tokens))
        else:
            runs.append((op, "".join(tokens)))

    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ref, out, autojunk=False).get_opcodes():
        if tag == "equal":
            add("same", ref[i1:i2])
        else:
            add("del", ref[i1:i2])
            add("ins", out[j1:j2])
    return runs


def readable_calls(calls: list[dict]) -> list[dict]:
    """Tool calls for a page: each name with its arguments as indented JSON (the template escapes both)."""
    return [{"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False, indent=2)} for call in calls]


def shown_answer(example: EvaluationExample, output: str) -> dict:
    """An answer as the voting panel shows it: as written, or, for an example with tools, its text and its calls; with
    its task-aware scores (``task_marks``), which the panel shows only once the names are revealed."""
    scores = example.finetuned_scores if output == example.finetuned_output else example.base_scores
    task = task_marks(scores or {})
    if not example.tools:
        return {"text": output, "calls": None, "task": task}
    content, calls = parse_tool_calls(output)
    return {"text": content, "calls": readable_calls(calls), "task": task}


def task_marks(scores: dict) -> dict | None:
    """One answer's task-aware scores as the page shows them: JSON validity, field accuracy and the fields that differ
    from the reference, and each check passed or failed; None when none applies."""
    checks = [{"name": name, "passed": value >= 1.0} for name, value in (scores.get("checks") or {}).items()]
    json_scores = None
    if "field_accuracy" in scores:
        json_scores = {
            "valid": bool(scores.get("json_valid")),
            "accuracy": scores["field_accuracy"],
            "differ": list(scores.get("fields_differ") or []),
        }
    if json_scores is None and not checks:
        return None
    return {"json": json_scores, "checks": checks, "failed": [c["name"] for c in checks if not c["passed"]]}


def _answer(label: str, output: str, example: EvaluationExample, scores: dict) -> dict:
    reference = example.reference
    exact = scores.get("exact_match")
    rouge = scores.get("rouge_l")
    answer = {
        "label": label,
        "output": output,
        "exact": bool(exact if exact is not None else metrics.exact_match(output, reference)),
        "rouge": rouge if rouge is not None else metrics.rouge_l(output, reference),
        "task": task_marks(scores or {}),
    }
    if example.reference_calls:  # scored on its calls: show them, and diff the text around them
        content, calls = parse_tool_calls(output)
        expected_content = parse_tool_calls(reference)[0]
        return {
            **answer,
            "calls": readable_calls(calls),
            "diff": word_diff(expected_content, content) if content or expected_content else [],
        }
    return {**answer, "calls": None, "diff": word_diff(reference, output)}


def comparison_page(evaluation: Evaluation, page_number) -> Page:
    """One page of examples, each with the base and fine-tuned answers scored and diffed against the reference."""
    page = Paginator(EvaluationExample.objects.filter(evaluation=evaluation), EXAMPLES_PER_PAGE).get_page(page_number)
    run = latest_completed_run(evaluation)
    verdicts = {v.example_id: v for v in run.verdicts.filter(example__in=page.object_list)} if run else {}
    page.object_list = [
        {
            "example": example,
            "answers": [
                _answer(evaluation.baseline_label, example.base_output, example, example.base_scores),
                _answer(evaluation.candidate_label, example.finetuned_output, example, example.finetuned_scores),
            ],
            "reference_calls": readable_calls(example.reference_calls),
            "reference_content": parse_tool_calls(example.reference)[0] if example.reference_calls else "",
            "verdict": verdicts.get(example.pk),
        }
        for example in page.object_list
    ]
    return page


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
        row = {"prompt": example.prompt, "messages": example.messages, "chosen": chosen, "rejected": rejected}
        rows.append({**row, "tools": example.tools} if example.tools else row)
    return rows


def preferences_jsonl(evaluation: Evaluation, user) -> str:
    """The user's votes as a preference dataset file: one JSON object per line."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in preference_rows(evaluation, user))


def training_pairs(evaluation: Evaluation, user, *, include_judge: bool = False) -> list[dict]:
    """Chosen / rejected pairs to train on: the user's decisive blind votes, and (``include_judge``) the latest
    judge run's consistent decisive verdicts on the examples the user did not vote on.

    A vote cast with the names shown is not used (it may follow the label, not the answer); nor is a tie, a
    "both bad", or a judge verdict that changed when the answers swapped places.
    """
    ratings = list(Rating.objects.filter(example__evaluation=evaluation, user=user).values_list("example_id", "preferred_model", "blind"))
    voted = {example for example, _, _ in ratings}
    blind = {example: choice for example, choice, is_blind in ratings if is_blind}
    judged: dict[int, str] = {}
    run = latest_completed_run(evaluation) if include_judge else None
    if run is not None:
        judged = dict(run.verdicts.filter(consistent=True).exclude(winner="tie").values_list("example_id", "winner"))
    pairs = []
    for example in EvaluationExample.objects.filter(evaluation=evaluation):
        if example.pk in blind:
            preferred, source = blind[example.pk], "vote"
        elif example.pk not in voted and example.pk in judged:
            preferred, source = judged[example.pk], "judge"
        else:
            continue
        if preferred not in ("base", "finetuned") or example.base_output == example.finetuned_output:
            continue  # no preference, or nothing to choose between
        chosen, rejected = (
            (example.finetuned_output, example.base_output) if preferred == "finetuned" else (example.base_output, example.finetuned_output)
        )
        pairs.append(
            {
                "messages": example.messages,
                "tools": example.tools,
                "chosen": chosen,
                "rejected": rejected,
                "source": source,
                "example_index": example.index,
            }
        )
    return pairs
