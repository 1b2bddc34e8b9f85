"""The pairwise judge on an evaluation: start a run, run it in the worker, and read what it found.

A run asks the configured OpenAI-compatible endpoint about every example, in both orders (tuna_llm.judge).
Its verdicts are stored together when the run completes, or not at all: a run that fails (the endpoint
refused, timed out or gave no verdict after its retries) keeps no verdicts, only the reason.

A run is bounded: TUNA_JUDGE_RUN_MAX_S in all (past it, the examples left are skipped and the run completes with
the verdicts it has), and TUNA_JUDGE_MAX_EXAMPLE_CHARS per example (a longer one is cut). What was skipped or cut
is said in the completed run's `error_message`, which the page shows as a note. The judge's URL is stored and
shown without its credentials (`redact_url`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from django.conf import settings
from django.db import transaction

from evaluation_app.models import Evaluation, JudgeRun, JudgeVerdict, Rating
from tuna_core.errors import Conflict, Invalid
from tuna_core.jobs import job_complete, job_enqueue, job_write
from tuna_core.quotas import check_active_jobs
from tuna_llm import metrics
from tuna_llm.judge import DEFAULT_RUBRIC, JudgeEndpoint, JudgeError, JudgeTimeUp, compare, fit_example
from tuna_llm.prompting import answer_text

logger = logging.getLogger("tuna.judge")

MAX_RUBRIC_CHARS = 4000
WINNER = {"first": JudgeVerdict.Winner.BASE, "second": JudgeVerdict.Winner.FINETUNED, "tie": JudgeVerdict.Winner.TIE}


class JudgeUnavailable(Conflict):
    """No judge endpoint is configured, or the evaluation cannot be judged (yet)."""


class RubricInvalid(Invalid, ValueError):
    def __init__(self, message: str) -> None:
        super().__init__(message, errors={"rubric": [message]})


def judge_endpoint() -> JudgeEndpoint | None:
    """The operator's judge (TUNA_JUDGE_URL and TUNA_JUDGE_MODEL), or None when there is none."""
    if not settings.TUNA_JUDGE_URL or not settings.TUNA_JUDGE_MODEL:
        return None
    return JudgeEndpoint(
        url=settings.TUNA_JUDGE_URL,
        model=settings.TUNA_JUDGE_MODEL,
        api_key=settings.TUNA_JUDGE_API_KEY,
        timeout_s=settings.TUNA_JUDGE_TIMEOUT_S,
        retries=settings.TUNA_JUDGE_RETRIES,
        max_tokens=settings.TUNA_JUDGE_MAX_TOKENS,
    )


NOT_CONFIGURED = (
    "No judge is configured on this server. The operator sets TUNA_JUDGE_URL (an OpenAI-compatible base URL ending in /v1, "
    "e.g. a local Ollama at http://localhost:11434/v1) and TUNA_JUDGE_MODEL (and TUNA_JUDGE_API_KEY if it needs one)."
)


def latest_rubric(evaluation: Evaluation) -> str:
    """The rubric of the last run on this evaluation (or on the one its votes came from), else the default."""
    sources = [evaluation]
    source = getattr(evaluation.training_job, "source_evaluation", None)
    if source is not None:
        sources.append(source)
    for candidate in sources:
        run = candidate.judge_runs.order_by("-created_at", "-id").first()
        if run is not None:
            return run.rubric
    return DEFAULT_RUBRIC


def judge_start(*, owner, evaluation: Evaluation, rubric: str | None = None) -> tuple[JudgeRun, bool]:
    """Queue a judge run on a completed evaluation; a run already queued or running is returned instead."""
    endpoint = judge_endpoint()
    if endpoint is None:
        raise JudgeUnavailable(NOT_CONFIGURED)
    if evaluation.status != Evaluation.Status.COMPLETED:
        raise JudgeUnavailable(f"Evaluation #{evaluation.pk} is {evaluation.get_status_display().lower()}; a judge reads completed ones.")
    rubric = (rubric or "").strip() or latest_rubric(evaluation)
    if len(rubric) > MAX_RUBRIC_CHARS:
        raise RubricInvalid(f"The rubric is {len(rubric):,} characters long; keep it under {MAX_RUBRIC_CHARS:,}.")
    with transaction.atomic():
        Evaluation.objects.select_for_update().get(pk=evaluation.pk)
        active = evaluation.judge_runs.filter(status__in=[JudgeRun.Status.QUEUED, JudgeRun.Status.RUNNING]).first()
        if active is not None:
            return active, False
        check_active_jobs(owner)
        run = JudgeRun.objects.create(
            owner=owner,
            evaluation=evaluation,
            endpoint=endpoint.shown_url,
            judge_model=endpoint.model,
            rubric=rubric,
            total=evaluation.examples.count(),
        )
        job_enqueue(run)
    return run, True


def judge_work(run: JudgeRun) -> None:
    """The worker's work for a claimed judge run (tuna_core.jobs keeps its run time however it ends)."""
    endpoint = judge_endpoint()
    if endpoint is None:
        raise JudgeError(NOT_CONFIGURED)
    examples = list(run.evaluation.examples.all())
    job_write(JudgeRun, run.pk, total=len(examples), done=0)
    limit_s, max_chars = settings.TUNA_JUDGE_RUN_MAX_S, settings.TUNA_JUDGE_MAX_EXAMPLE_CHARS
    deadline = time.monotonic() + limit_s
    verdicts, requests, cut = [], 0, 0
    for position, example in enumerate(examples, start=1):
        texts = [judged_prompt(example.messages, example.tools), example.reference, example.base_output, example.finetuned_output]
        (prompt, reference, base, finetuned), shortened = fit_example(texts, max_chars)
        cut += bool(shortened)
        try:
            pair = compare(endpoint, run.rubric, prompt, reference, base, finetuned, deadline=deadline)
        except JudgeTimeUp:
            if not verdicts:
                raise JudgeError(
                    f"The judge run reached its time limit ({limit_s:g} s, TUNA_JUDGE_RUN_MAX_S) before it judged any example; "
                    f"the judge ({endpoint.model} at {endpoint.shown_url}) answers too slowly for it."
                ) from None
            break
        except JudgeError as exc:
            raise JudgeError(
                f"The judge ({endpoint.model} at {endpoint.shown_url}) failed on example {example.index + 1}: {exc}. "
                "No verdicts were stored; ask again once it answers."
            ) from None
        requests += pair.tries
        verdicts.append(
            JudgeVerdict(
                run=run,
                example=example,
                winner=WINNER[pair.winner],
                consistent=pair.consistent,
                base_first=WINNER[pair.forward],
                finetuned_first=WINNER[pair.backward],
                base_first_reason=pair.forward_reason,
                finetuned_first_reason=pair.backward_reason,
            )
        )
        job_write(JudgeRun, run.pk, done=position, requests=requests)
    notes = []
    if len(verdicts) < len(examples):
        notes.append(
            f"Stopped at the run's time limit ({limit_s:g} s, TUNA_JUDGE_RUN_MAX_S): {len(verdicts)} of {len(examples)} examples "
            f"judged, the other {len(examples) - len(verdicts)} skipped."
        )
    if cut:
        notes.append(
            f"{cut} example{'s were' if cut != 1 else ' was'} longer than {max_chars:,} characters (TUNA_JUDGE_MAX_EXAMPLE_CHARS): "
            "the judge read the request, the reference and the answers cut to fit, each marked where it was cut."
        )
    with transaction.atomic():  # every verdict and the completed status land together, or nothing does
        JudgeVerdict.objects.bulk_create(verdicts)
        job_complete(run, error_message=" ".join(notes))
    logger.info(
        "Judge run %s completed: %s verdicts in %s requests%s", run.pk, len(verdicts), requests, f" ({' '.join(notes)})" if notes else ""
    )


def judged_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """What the judge reads as the request: the last message, with any earlier turns (an assistant turn with its tool
    calls) and the tools the models were offered above it."""
    if len(messages) <= 1 and not tools:
        return messages[-1]["content"] if messages else ""
    offered = [f"[tools offered]\n{json.dumps(tools, ensure_ascii=False, indent=2)}"] if tools else []
    return "\n\n".join(offered + [f"[{m['role']}]\n{answer_text(m) if m['role'] == 'assistant' else m['content']}" for m in messages])


# -- reads ------------------------------------------------------------------------------------
def latest_run(evaluation: Evaluation) -> JudgeRun | None:
    return evaluation.judge_runs.order_by("-created_at", "-id").first()


def latest_completed_run(evaluation: Evaluation) -> JudgeRun | None:
    return evaluation.judge_runs.filter(status=JudgeRun.Status.COMPLETED).order_by("-created_at", "-id").first()


def noise_verdict(interval: tuple[float, float] | None) -> dict[str, str] | None:
    """Better, worse or within noise, from the 95% interval of a win rate against 0.5."""
    if interval is None:
        return None
    if interval[0] > 0.5:
        return {"key": "better", "text": "Better: the whole 95% interval is above 0.5."}
    if interval[1] < 0.5:
        return {"key": "worse", "text": "Worse: the whole 95% interval is below 0.5."}
    return {"key": "noise", "text": "Within noise: the 95% interval includes 0.5, so these examples cannot tell the two apart."}


def win_rate(wins: int, losses: int) -> dict[str, Any]:
    decisive = wins + losses
    interval = metrics.wilson_interval(wins, decisive)
    return {
        "wins": wins,
        "losses": losses,
        "decisive": decisive,
        "rate": wins / decisive if decisive else None,
        "interval": list(interval) if interval else None,
        "verdict": noise_verdict(interval),
    }


def run_summary(run: JudgeRun) -> dict[str, Any]:
    """The judge's counts, its win rate for the fine-tuned side with a 95% interval, and the inconsistent pairs."""
    verdicts = list(run.verdicts.values_list("winner", "consistent"))
    count = {choice: sum(1 for winner, _ in verdicts if winner == choice) for choice in JudgeVerdict.Winner.values}
    return {
        "verdicts": len(verdicts),
        "finetuned": count["finetuned"],
        "base": count["base"],
        "tie": count["tie"],
        "inconsistent": sum(1 for _, consistent in verdicts if not consistent),
        "win_rate": win_rate(count["finetuned"], count["base"]),
    }


def agreement(run: JudgeRun, user) -> dict[str, Any]:
    """How often the judge agrees with the user's blind votes, on the examples that have both.

    A vote of "both bad" counts as a tie (neither answer preferred), as does a judge's inconsistent pair.
    Cohen's kappa corrects the agreement rate for what chance alone would give.
    """
    judged = dict(run.verdicts.values_list("example_id", "winner"))
    votes = Rating.objects.filter(example__evaluation=run.evaluation, user=user, blind=True, example_id__in=judged)
    pairs = [
        (judged[example], "tie" if vote == Rating.Choice.BOTH_BAD else vote)
        for example, vote in votes.values_list("example_id", "preferred_model")
    ]
    agree = sum(1 for judge, human in pairs if judge == human)
    return {
        "count": len(pairs),
        "agree": agree,
        "rate": agree / len(pairs) if pairs else None,
        "kappa": metrics.cohen_kappa(pairs),
    }


# When a judge may stand in for the team's votes: Cohen's kappa of at least this ("substantial" agreement on
# Landis and Koch's scale) over at least this many examples both rated.
TRUST_KAPPA = 0.6
TRUST_MIN_COUNT = 20


def trust_text(figures: dict[str, Any]) -> dict[str, str]:
    """Whether the agreement figures let a team use the judge's verdicts where nobody voted, in words."""
    count, kappa = figures["count"], figures["kappa"]
    if not count:
        return {
            "key": "unknown",
            "text": "No example has both a blind vote and a verdict yet: vote blind on some to see how far the judge agrees with you.",
        }
    if kappa is None:
        return {
            "key": "unknown",
            "text": "Kappa is undefined here (every vote and every verdict was the same): vote on more varied examples.",
        }
    if kappa >= TRUST_KAPPA and count >= TRUST_MIN_COUNT:
        return {
            "key": "trust",
            "text": f"Substantial agreement (kappa ≥ {TRUST_KAPPA}) over {count} examples: its verdicts are a fair stand-in for your votes on the rest.",
        }
    if kappa >= TRUST_KAPPA:
        return {
            "key": "early",
            "text": f"Agreement looks substantial, but over {count} example{'s' if count != 1 else ''} only; vote on at least {TRUST_MIN_COUNT} before relying on it.",
        }
    return {
        "key": "distrust",
        "text": f"Kappa below {TRUST_KAPPA}: the judge does not agree with you well enough to stand in for your votes.",
    }
