"""Reads for training jobs."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from django.db.models import QuerySet
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404

from training_app.models import LossPoint, TrainingJob
from training_app.services import job_dir
from tuna_llm.training import COMPLETE_MARKER, NOISE_SHARE
from tuna_llm.training_config import RANGES

# "Still improving" (more epochs would likely help) needs all of:
# - enough evidence: at least MIN_TREND_POINTS measurements (step 0 included); two points, before and after, show
#   that it learned, not whether it was still learning at the end;
# - a last improvement that counts against what was left: the last measurement is the lowest, below the best before
#   it by more than STILL_FALLING of that best and by more than the noise share of the starting loss;
# - something left to gain: the last loss above LITTLE_LEFT of the starting loss and above NOTHING_LEFT (a loss of
#   0.02 nats per token is about 98% probability on each answer token; 0.007 is 99.3%: nothing left to win).
STILL_FALLING = 0.03
MIN_TREND_POINTS = 3
LITTLE_LEFT = 0.05
NOTHING_LEFT = 0.02
LEARNED = 0.5  # best validation loss at most half the starting one
LEARNED_SOME = 0.9


def jobs_for_user(user) -> QuerySet[TrainingJob]:
    return TrainingJob.objects.filter(owner=user).select_related("dataset")


def get_job_for_user(user, pk: int) -> TrainingJob:
    """Another user's job is a 404, never a 403 that confirms it exists."""
    return get_object_or_404(TrainingJob.objects.select_related("dataset", "parent"), pk=pk, owner=user)


def adapter_archive(job: TrainingJob) -> tuple[io.BytesIO, str]:
    """The job's adapter directory as a zip (in memory) and its file name; Http404 when there is none."""
    if job.status != TrainingJob.Status.COMPLETED or not job.adapter_dir or not Path(job.adapter_dir).is_dir():
        raise Http404("This job has no adapter to download.")
    buffer = io.BytesIO()
    root = Path(job.adapter_dir)
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.write(path, Path(f"tuna-job-{job.pk}-adapter") / path.relative_to(root))
    buffer.seek(0)
    return buffer, f"tuna-job-{job.pk}-adapter.zip"


def adapter_download(job: TrainingJob) -> FileResponse:
    buffer, filename = adapter_archive(job)
    return FileResponse(buffer, as_attachment=True, filename=filename, content_type="application/zip")


def _lineage(job: TrainingJob) -> list[TrainingJob]:
    """The job and the runs it continues, oldest first (a preference-tuned run, and a fine-tune started from another
    one, have a history of their own)."""
    chain = [job]
    while chain[-1].is_continuation:
        chain.append(TrainingJob.objects.get(pk=chain[-1].parent_id))
    return chain[::-1]


def loss_chart_data(job: TrainingJob) -> dict:
    """One history: a continued run's points follow those of the runs it continues, up to where it took over."""
    chain = _lineage(job)
    train, evals = [], []
    for run, successor in zip(chain, [*chain[1:], None], strict=True):
        points = LossPoint.objects.filter(job=run)
        if successor is not None:
            points = points.filter(step__lte=successor.step_offset - run.step_offset)
        for step, loss, eval_loss in points.values_list("step", "loss", "eval_loss"):
            if loss is not None:
                train.append({"x": run.step_offset + step, "y": loss})
            if eval_loss is not None:
                evals.append({"x": run.step_offset + step, "y": eval_loss})
    return {"train": train, "eval": evals, "total_steps": job.step_offset + job.total_steps}


def training_logs(job: TrainingJob) -> tuple[list[dict], list[dict]]:
    """(training steps, validations) of one run. Every training row has a numeric loss; a validation
    measured at the same step also appears on that row as `eval_loss`, and every validation (step 0,
    before any update, included) is in the second list."""
    train, evals = [], []
    for point in LossPoint.objects.filter(job=job):
        if point.eval_loss is not None:
            evals.append({"step": point.step, "eval_loss": point.eval_loss, "epoch": point.epoch, "timestamp": point.created_at})
        if point.loss is not None:
            train.append(
                {
                    "step": point.step,
                    "loss": point.loss,
                    "eval_loss": None,
                    "learning_rate": point.learning_rate,
                    "epoch": point.epoch,
                    "timestamp": point.created_at,
                }
            )
    by_step = {row["step"]: row for row in train}
    for row in evals:
        if row["step"] in by_step:
            by_step[row["step"]]["eval_loss"] = row["eval_loss"]
    return train, evals


EXTRA_SETTINGS = {"learning_rate_multiplier": "Learning-rate multiplier", "dpo_beta": "DPO beta"}


def settings_rows(config: dict, reasons: dict) -> list[dict]:
    """Every setting with its readable name, value and why it has that value."""
    rows = [{"name": "target_modules", "label": "LoRA layers", "value": ", ".join(config.get("target_modules", []))}]
    rows += [{"name": name, "label": spec.label, "value": config.get(name)} for name, spec in RANGES.items() if name in config]
    rows += [{"name": name, "label": label, "value": config[name]} for name, label in EXTRA_SETTINGS.items() if name in reasons]
    for row in rows:
        row["reason"] = reasons.get(row["name"], "")
        row["auto"] = bool(row["reason"]) and row["reason"] != "set by you"
    return rows


@dataclass(frozen=True)
class LearningVerdict:
    """Whether a finished run learned, in plain words, from its validation (or training) loss.

    `still_improving` is True only when the evidence says more epochs would likely help (see the rule above); the
    page then offers to continue the run, or to try several settings. `trend` says why, in a word: "falling",
    "levelled" (the last fall was small against what was left), "little_left" (the loss is already near zero),
    "rising", "too_few" (too few measurements to tell) or "" (unknown)."""

    kind: str  # "learned", "some", "none", "unknown"
    headline: str
    detail: str
    still_improving: bool
    start: float | None = None
    best: float | None = None
    trend: str = ""


def _smoothed(series: list[tuple[int, float]], buckets: int = 5) -> list[tuple[int, float]]:
    """The training loss is measured on one batch at a time: a trend is read from the means of a few consecutive
    stretches (each at its last step), not from the last two noisy values."""
    if len(series) < 2 * buckets:
        return series
    size = len(series) / buckets
    chunks = [series[round(i * size) : round((i + 1) * size)] for i in range(buckets)]
    return [(chunk[-1][0], sum(value for _, value in chunk) / len(chunk)) for chunk in chunks]


def _trend(series: list[tuple[int, float]], start: float, *, validation: bool = True) -> tuple[str, str]:
    """(trend, sentence) of a run's last measurements: whether more epochs would likely help, and why (or why not)."""
    last = series[-1][1]
    best = min(value for _, value in series)
    if last <= max(LITTLE_LEFT * start, NOTHING_LEFT):
        share = f" ({last / start:.1%} of where it started)" if start else ""
        return "little_left", f" At {last:.3g} the loss has little left to gain{share}: more epochs would not help much."
    if len(series) < MIN_TREND_POINTS:
        return "too_few", (
            f" Measured only {len(series)} times (before and after training): too few points to tell whether it was still "
            "improving at the end" + (" (a smaller “Validate every” measures more often)." if validation else ".")
        )
    previous_best = min(value for _, value in series[:-1])
    gain = previous_best - last
    if last > best + NOISE_SHARE * start:
        return "rising", ""  # said with the checkpoint kept
    if gain > STILL_FALLING * previous_best and gain > NOISE_SHARE * start:
        return "falling", (
            f" The loss was still falling when training stopped: its last measurement was the lowest, {gain / previous_best:.0%} "
            f"below the best before it ({previous_best:.3g} → {last:.3g}): more epochs would likely help."
        )
    return "levelled", (
        f" The loss had levelled off (last {last:.3g}, best before it {previous_best:.3g}): more epochs of the same would "
        "likely not help much."
    )


def learning_verdict(job: TrainingJob) -> LearningVerdict | None:
    if job.status != TrainingJob.Status.COMPLETED:
        return None
    points = list(LossPoint.objects.filter(job=job).values_list("step", "loss", "eval_loss"))
    evals = [(step, value) for step, _, value in points if value is not None]
    source, trend_series = "validation loss", evals
    if len(evals) < 2:
        # No validation examples: judge from the training loss (a weaker sign, and said so).
        evals = [(step, value) for step, value, _ in points if value is not None]
        source, trend_series = "training loss (no validation examples)", _smoothed(evals)
    if len(evals) < 2:
        return LearningVerdict("unknown", "Not enough loss measurements to tell whether it learned.", "", False)
    start = evals[0][1] if job.parent_id is None else _parent_start(job, evals[0][1])
    best = min(value for _, value in evals)
    last = evals[-1][1]
    trend, sentence = _trend(trend_series, start, validation=source == "validation loss")
    if trend == "rising" and job.best_step is None:
        sentence = " The loss rose after its lowest point: more epochs would not help."
    change = f"{source} {start:.3g} → {best:.3g} ({(best - start) / start:+.0%})" if start else f"{source} {best:.3g}"
    if best <= LEARNED * start:
        kind, headline = "learned", "It learned."
    elif best <= LEARNED_SOME * start:
        kind, headline = "some", "It learned a little."
    else:
        kind, headline = "none", "It did not learn much."
    detail = change + "." + sentence
    if job.best_step is not None and job.best_step < job.current_step:
        detail += (
            f" It was lowest at step {job.step_offset + job.best_step} and rose clearly afterwards (over-fitting): the checkpoint of "
            f"step {job.step_offset + job.best_step} is kept (served, evaluated, downloaded) instead of the final weights."
        )
    elif job.best_step is not None and last <= best:
        detail += " The final weights, those with the lowest validation loss, are kept (served, evaluated, downloaded)."
    elif job.best_step is not None:
        detail += " The final weights are kept (served, evaluated, downloaded): after its lowest point the validation loss rose by no more than noise."
    return LearningVerdict(kind, headline, detail, trend == "falling", start, best, trend)


def _parent_start(job: TrainingJob, fallback: float) -> float:
    """A continued run is judged from where the whole history started."""
    root = _lineage(job)[0]
    first = LossPoint.objects.filter(job=root, eval_loss__isnull=False).order_by("step").values_list("eval_loss", flat=True).first()
    return first if first is not None else fallback


class Checkpoint(NamedTuple):
    """A checkpoint a run kept: a PEFT adapter directory (adapter_config.json, adapter_model.safetensors) that loads
    on the job's base model with its tokenizer. `step` is the run's own step."""

    step: int
    path: Path
    train_loss: float | None
    valid_loss: float | None
    created_at: datetime


def job_checkpoints(job: TrainingJob) -> list[Checkpoint]:
    """The checkpoints the job keeps on disk (saved whole), oldest first, with the losses measured at their step
    (the training loss of the last logged step up to it)."""
    root = job_dir(job) / "checkpoints"
    found = []
    for path in root.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        marker = path / COMPLETE_MARKER
        if step.isdigit() and marker.is_file() and (path / "adapter_config.json").is_file():
            found.append((int(step), path, datetime.fromtimestamp(marker.stat().st_mtime, tz=UTC)))
    if not found:
        return []
    points = list(LossPoint.objects.filter(job=job, step__lte=max(step for step, _, _ in found)).values_list("step", "loss", "eval_loss"))
    checkpoints = []
    for step, path, created in sorted(found, key=lambda item: item[0]):
        train = [loss for at, loss, _ in points if loss is not None and at <= step]
        valid = [loss for at, _, loss in points if loss is not None and at == step]
        checkpoints.append(Checkpoint(step, path, train[-1] if train else None, valid[-1] if valid else None, created))
    return checkpoints
