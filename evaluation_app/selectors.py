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
from tuna_llm.toolcalls import parse_tool_calls

# Verdict thresholds: a change in exact matches of at least max(1, 10% of the examples), or in mean
# ROUGE-L of at least 0.05 while exact matches do not move the other way. Below that, small test sets
# mostly measure noise, so the page says "No clear difference" rather than guess.
VERDICT_EXACT_SHARE = 0.10
VERDICT_ROUGE_DELTA = 0.05
VERDICTS = {"better": "Better", "worse": "Worse", "no_difference": "No clear difference"}
EXAMPLES_PER_PAGE = 10
# Diff tokens: whitespace, the metric's words (a single character in CJK/Thai), any other character.
_DIFF_TOKEN = re.compile(rf"\s+|{metrics.TOKEN_PATTERN}|.", re.DOTALL)


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
    """Did fine-tuning help? "better", "worse" or "no_difference", with the figures behind it.

    Better: exact matches rise by at least max(1, 10% of n), or mean ROUGE-L rises by at least 0.05
    with exact matches not falling. Worse: the mirror image. Held-out loss is shown, not judged: it can
    fall while the answers stay the same.
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
    if exact_delta >= bar or (rouge_delta >= VERDICT_ROUGE_DELTA and exact_delta >= 0):
        key = "better"
    elif exact_delta <= -bar or (rouge_delta <= -VERDICT_ROUGE_DELTA and exact_delta <= 0):
        key = "worse"
    else:
        key = "no_difference"
    return {
        "key": key,
        "label": VERDICTS[key],
        "n": n,
        "exact": exact,
        "rouge": rouge,
        "loss": (base.get("heldout_loss"), tuned.get("heldout_loss")),
        "exact_bar": bar,
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
    """An answer as the voting panel shows it: as written, or, for an example with tools, its text and its calls."""
    if not example.tools:
        return {"text": output, "calls": None}
    content, calls = parse_tool_calls(output)
    return {"text": content, "calls": readable_calls(calls)}


def _answer(label: str, output: str, example: EvaluationExample, scores: dict) -> dict:
    reference = example.reference
    exact = scores.get("exact_match")
    rouge = scores.get("rouge_l")
    answer = {
        "label": label,
        "output": output,
        "exact": bool(exact if exact is not None else metrics.exact_match(output, reference)),
        "rouge": rouge if rouge is not None else metrics.rouge_l(output, reference),
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
