"""Sweeps ("Try several settings"): several ordinary fine-tunes of one dataset around the chosen settings, picked on
validation loss.

- The grid: one point per run, each varying the four settings that matter most on small data (learning rate,
  epochs, LoRA rank, LoRA layers) around the settings the user chose; every other setting is the user's, for every
  run. `default_grid` proposes one change at a time around the chosen point; the user may edit it.
- Before anything is created: every run's settings are checked as a job's would be, the sweep's estimate is the sum
  of its runs' (training_app.estimates), and tuna_core.quotas refuses a sweep over TUNA_MAX_SWEEP_RUNS or
  TUNA_MAX_SWEEP_HOURS, or a user at TUNA_MAX_ACTIVE_JOBS_PER_USER (a sweep's runs count as one).
- The runs are ordinary TrainingJobs with `experiment` set, queued at once; tuna_core.jobs picks fairly between
  owners, so another user's job goes before a sweep's next run.
- Early stopping (`early_stop_reason`, the median stopping rule; docs/training.md says it in words).
- The pick (`experiment_run_ended`, once every run has ended): the completed run with the lowest validation loss at
  the checkpoint it kept, never a score on the held-out examples. `Experiment.pick` lists every run compared and every
  run left out with why; a failed run is left out and never stops the others. `experiment_finished` is then sent:
  evaluation_app evaluates the winner against the base model.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, QuerySet
from django.dispatch import Signal
from django.shortcuts import get_object_or_404
from django.utils import timezone

from datasets_app.models import Dataset
from training_app.estimates import training_estimate
from training_app.models import Experiment, LossPoint, TrainingJob
from tuna_core.errors import Conflict, Invalid
from tuna_core.jobs import JobLost, job_enqueue, job_fail, job_write
from tuna_core.quotas import LimitExceeded, check_active_jobs, check_sweep_size
from tuna_llm.catalog import UnknownBaseModel, get_base_model_spec
from tuna_llm.training_config import RANGES, TrainingConfig, known_modules_for

logger = logging.getLogger("tuna.training")

# Sent once a sweep's runs have all ended and the pick is made (`experiment=`, winner or not). Apps above training
# connect to it (evaluation_app evaluates the winner against the base model); training never imports them.
experiment_finished = Signal()

GRID_KEYS = ("learning_rate", "num_epochs", "lora_r", "lora_layers")
GRID_NUMBERS = ("learning_rate", "num_epochs", "lora_r")
GRID_LABELS = {"learning_rate": "Learning rate", "num_epochs": "Epochs", "lora_r": "LoRA rank", "lora_layers": "LoRA layers"}
# The projections that make the "attention" choice of LoRA layers, for the architectures tuna_llm knows.
ATTENTION_MODULES = ("q_proj", "v_proj", "qkv_proj", "c_attn")

# Early stopping, the median stopping rule (docs/training.md, "Sweeps"): a run is stopped at a validation once
# EARLY_STOP_MIN_COMPLETED other runs of its sweep have completed, once it is past EARLY_STOP_GRACE of its updates, when
# its lowest validation loss so far is more than EARLY_STOP_MARGIN above the median of those runs' lowest validation
# losses by the same share of their own training.
EARLY_STOP_MIN_COMPLETED = 2
EARLY_STOP_GRACE = 0.25
EARLY_STOP_MARGIN = 0.10


class SweepInvalid(Invalid):
    """A sweep that cannot pick by validation, or a grid with errors (``errors``: "grid[i].setting" to messages)."""


class SweepConflict(Conflict):
    pass


def _services():
    # training_app.services imports this module (the worker's hooks below), so it is imported where it is used.
    from training_app import services

    return services


# -- the grid ---------------------------------------------------------------------------------
def layer_choices(base_model: str) -> dict[str, tuple[str, ...]]:
    """The named choices of LoRA layers for a base model: "all" (every linear projection) and "attention" (its query and
    value projections); empty when the architecture's layers are not known here."""
    try:
        known = known_modules_for(get_base_model_spec(base_model).config_dir())
    except UnknownBaseModel:  # a base model no longer in this deployment's catalog
        return {}
    if not known:
        return {}
    return {"all": tuple(known), "attention": tuple(m for m in known if m in ATTENTION_MODULES)}


def _layers_name(modules, choices: dict[str, tuple[str, ...]]) -> str:
    modules = tuple(modules)
    for name, chosen in choices.items():
        if sorted(chosen) == sorted(modules):
            return name
    return ",".join(modules)


def grid_point(config: dict[str, Any] | TrainingConfig, choices: dict[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """The four grid settings of a run's (or a plan's) settings."""
    if isinstance(config, dict):
        config = TrainingConfig.from_dict({"base_model": "", **config})
    choices = layer_choices(config.base_model) if choices is None else choices
    return {
        "learning_rate": config.learning_rate,
        "num_epochs": config.num_epochs,
        "lora_r": config.lora_r,
        "lora_layers": _layers_name(config.target_modules, choices),
    }


def _round(value: float) -> float:
    return float(f"{value:.3g}")


def _base_plan(dataset: Dataset, config_data: dict[str, Any]):
    plan = _services().training_plan(dataset=dataset, config_data=config_data)
    if plan.errors:
        raise _services().ConfigInvalid(plan.errors)
    return plan


def default_grid(dataset: Dataset, config_data: dict[str, Any]) -> list[dict]:
    """The chosen settings, then one change at a time around them: half and twice the learning rate, half as many epochs
    again (not when max_steps sets the length), twice the rank, and the other choice of LoRA layers. A change the server's
    limits refuse is left out. [] when the settings themselves have errors."""
    plan = _services().training_plan(dataset=dataset, config_data=config_data)
    if plan.config is None:
        return []
    config = plan.config
    choices = layer_choices(config.base_model)
    chosen = grid_point(config, choices)
    lr_max = RANGES["learning_rate"].maximum
    changes = [
        {"learning_rate": _round(config.learning_rate / 2)},
        {"learning_rate": _round(min(lr_max, config.learning_rate * 2))},
        {}
        if config.max_steps
        else {"num_epochs": min(settings.TUNA_MAX_EPOCHS, max(config.num_epochs + 1, math.ceil(config.num_epochs * 1.5)))},
        {"lora_r": min(int(RANGES["lora_r"].maximum), config.lora_r * 2)},
    ]
    if chosen["lora_layers"] in choices and len(choices) > 1 and choices["all"] != choices["attention"]:
        changes.append({"lora_layers": "attention" if chosen["lora_layers"] == "all" else "all"})
    grid = [chosen]
    for change in changes:
        point = {**chosen, **change}
        if point in grid:
            continue
        run = _services().training_plan(dataset=dataset, config_data=_run_data(config_data, point, chosen, choices))
        if not run.errors:
            grid.append(point)
    return grid[: settings.TUNA_MAX_SWEEP_RUNS]


def _run_data(config_data: dict[str, Any], point: dict[str, Any], chosen: dict[str, Any], choices) -> dict[str, Any]:
    """A run's settings: the user's, with the grid point's values where they differ from the chosen ones."""
    data = dict(config_data)
    for name in GRID_NUMBERS:
        if point[name] != chosen[name]:
            data[name] = point[name]
    if point["lora_layers"] != chosen["lora_layers"]:
        data["target_modules"] = list(choices.get(point["lora_layers"]) or point["lora_layers"].split(","))
    if "learning_rate" in data:
        data.pop("learning_rate_multiplier", None)  # the point sets the rate itself
    return data


def _points(grid: Any, base: TrainingConfig, choices) -> tuple[list[dict], dict[str, str]]:
    """The grid's points, each with its four settings (a setting left empty is the chosen one), and the errors by
    "grid[i].setting"."""
    if not isinstance(grid, list):
        return [], {"grid": "A list of runs, each an object of learning_rate, num_epochs, lora_r and lora_layers."}
    chosen = grid_point(base, choices)
    points, errors = [], {}
    for i, raw in enumerate(grid):
        if not isinstance(raw, dict):
            errors[f"grid[{i}]"] = "An object of learning_rate, num_epochs, lora_r and lora_layers (any left out: the chosen value)."
            continue
        for name in sorted(set(raw) - set(GRID_KEYS)):
            errors[f"grid[{i}].{name}"] = (
                "Not a grid setting: a sweep varies learning_rate, num_epochs, lora_r and lora_layers; set the others once, for every run."
            )
        given = {name: raw[name] for name in GRID_NUMBERS if raw.get(name) not in (None, "")}
        result = _services().validate_training_config({**given, "base_model": base.base_model})
        for name, message in result.errors.items():
            errors[f"grid[{i}].{name}"] = message
        point = {**chosen, **{name: result.explicit[name] for name in given}} if not result.errors else dict(chosen)
        layers = raw.get("lora_layers")
        if layers not in (None, ""):
            if not isinstance(layers, str):
                errors[f"grid[{i}].lora_layers"] = (
                    f"A name ({', '.join(choices) or 'none known for this model'}) or comma-separated module names."
                )
            else:
                layers = layers.strip()
                if layers not in choices:
                    modules = [m.strip() for m in layers.split(",") if m.strip()]
                    checked = _services().validate_training_config({"target_modules": modules, "base_model": base.base_model})
                    if checked.errors or not modules:
                        known = ", ".join(choices) or "none known for this model"
                        errors[f"grid[{i}].lora_layers"] = f"{checked.errors.get('target_modules', 'Empty.')} Named choices: {known}."
                    layers = _layers_name(modules, choices)
                point["lora_layers"] = layers
        points.append(point)
    return points, errors


def _run_plans(dataset: Dataset, config_data: dict[str, Any], grid: Any) -> tuple[Any, list[tuple[dict, Any]]]:
    """The base plan and each grid point's plan; ConfigInvalid naming the row and setting of any error."""
    base = _base_plan(dataset, config_data)
    choices = layer_choices(base.config.base_model)
    points, errors = _points(grid, base.config, choices)
    chosen = grid_point(base.config, choices)
    plans = []
    for i, point in enumerate(points):
        run = _services().training_plan(dataset=dataset, config_data=_run_data(config_data, point, chosen, choices))
        for name, message in run.errors.items():
            errors[f"grid[{i}].{GRID_KEYS[3] if name == 'target_modules' else name}"] = message
        plans.append((point, run))
    if not errors:
        seen: dict[str, int] = {}
        for i, (_, run) in enumerate(plans):
            key = repr(sorted(run.config.to_dict().items()))
            if key in seen:
                errors[f"grid[{i}]"] = f"The same settings as grid[{seen[key]}]: each run must try something else."
            seen.setdefault(key, i)
    if errors:
        raise _services().ConfigInvalid(errors)
    return base, plans


def _estimate(dataset: Dataset, plans: list[tuple[dict, Any]]) -> dict[str, Any]:
    runs = [training_estimate(dataset=dataset, config=run.config) for _, run in plans]
    summary: dict[str, Any] = {
        "runs": [
            {"settings": point, "steps": e["updates"], "seconds": e.get("seconds"), "cost_usd": e.get("cost_usd")}
            for (point, _), e in zip(plans, runs, strict=True)
        ],
        "steps": sum(e["updates"] for e in runs),
        "available": bool(runs) and all(e["available"] for e in runs),
    }
    if not summary["available"]:
        summary["reason"] = runs[0]["reason"] if runs else "No runs."
        return summary
    first = runs[0]
    summary.update(
        seconds=sum(e["seconds"] for e in runs),
        low_seconds=sum(e["low_seconds"] for e in runs),
        high_seconds=sum(e["high_seconds"] for e in runs),
        cost_usd=sum(e["cost_usd"] for e in runs),
        tokens_per_second=first["tokens_per_second"],
        device=first["device"],
        certainty=first["certainty"],
        hourly_usd=first["hourly_usd"],
    )
    return summary


def sweep_estimate(dataset: Dataset, config_data: dict[str, Any], grid: Any) -> dict[str, Any]:
    """The sweep's total time and cost before it starts: {"available", "seconds", "low_seconds", "high_seconds",
    "cost_usd", "steps", "runs": [{"settings", "steps", "seconds", "cost_usd"}], ...} ("reason" when no speed has been
    measured), and "refused": the limit it is over, in words, or ""; ConfigInvalid when the settings have errors."""
    if isinstance(grid, list) and len(grid) > settings.TUNA_MAX_SWEEP_RUNS:  # refused before each run's settings are planned
        try:
            check_sweep_size(runs=len(grid), estimated_seconds=None)
        except LimitExceeded as exc:
            return {"available": False, "reason": "", "runs": [], "steps": 0, "refused": exc.message}
    base, plans = _run_plans(dataset, config_data, grid)
    estimate = _estimate(dataset, plans)
    estimate["eval_examples"] = base.config.eval_examples  # 0: nothing to pick on, experiment_start refuses it
    try:
        check_sweep_size(runs=len(plans), estimated_seconds=estimate.get("seconds"))
        estimate["refused"] = ""
    except LimitExceeded as exc:  # shown before starting; experiment_start refuses it again
        estimate["refused"] = exc.message
    return estimate


def _check_sweepable(dataset: Dataset) -> None:
    if not dataset.is_valid:
        raise _services().DatasetNotTrainable(
            f"Dataset {dataset.name!r} is invalid ({dataset.error_count} errors); fix the file and upload it again."
        )
    if dataset.is_preference:
        raise _services().DatasetNotTrainable(
            f"Dataset {dataset.name!r} holds preference pairs: a sweep tries supervised fine-tunes, which need a chat file."
        )


def experiment_start(
    *, owner, dataset: Dataset, config_data: dict[str, Any], grid: list[dict] | None = None, early_stopping: bool = True, name: str = ""
) -> Experiment:
    """Queue a sweep: one fine-tune per grid point (`grid` None: `default_grid`), all of them refused before anything
    is created when a setting, the size or the estimate is over a limit."""
    _check_sweepable(dataset)
    if not isinstance(name, str) or len(name) > 200:
        raise SweepInvalid("The name is at most 200 characters.", errors={"name": "At most 200 characters."})
    if grid is None:
        grid = default_grid(dataset, config_data)
    if isinstance(grid, list):
        check_sweep_size(runs=len(grid), estimated_seconds=None)  # before checking each run's settings
    base, plans = _run_plans(dataset, config_data, grid)
    if not base.config.eval_examples:
        raise SweepInvalid(
            f"A sweep picks its winner on validation loss, and this dataset's {dataset.num_train} training examples are too few "
            "to set validation examples aside (from 20 on), or eval_examples is 0. Train one job instead, or upload more examples.",
            errors={"eval_examples": "A sweep needs validation examples."},
        )
    if len(plans) < 2:
        raise SweepInvalid("A sweep compares at least two runs: give the grid two rows or more.", errors={"grid": "At least 2 runs."})
    estimate = _estimate(dataset, plans)
    check_sweep_size(runs=len(plans), estimated_seconds=estimate.get("seconds"))
    chosen = grid_point(base.config)
    with transaction.atomic():
        check_active_jobs(owner)
        _services().check_job_storage(owner, "A sweep", _services().runs_storage_estimate([run.config for _, run in plans]))
        experiment = Experiment.objects.create(
            owner=owner,
            dataset=dataset,
            name=name or f"{len(plans)} settings on {dataset.name}"[:200],
            base_model=base.config.base_model,
            base_config=_services().validate_training_config(config_data).explicit,
            grid=[point for point, _ in plans],
            estimate=estimate,
            early_stopping=bool(early_stopping),
        )
        for point, run in plans:
            reasons = dict(run.reasons)
            for key in GRID_KEYS:
                if point[key] != chosen[key]:
                    setting = "target_modules" if key == "lora_layers" else key
                    reasons[setting] = f"sweep #{experiment.pk} tries {point[key]} (chosen: {chosen[key]})"
            job = TrainingJob.objects.create(
                owner=owner,
                dataset=dataset,
                base_model=run.config.base_model,
                config=run.config.to_dict(),
                config_reasons=reasons,
                experiment=experiment,
            )
            job_enqueue(job)
    logger.info("Sweep %s of %s runs queued by %s on dataset %s", experiment.pk, len(plans), owner, dataset.pk)
    return experiment


def experiment_cancel(*, experiment: Experiment) -> Experiment:
    """Cancel every run not finished yet (a training one stops after its current step); no winner is picked."""
    if experiment.status != Experiment.Status.RUNNING:
        raise SweepConflict(f"Sweep #{experiment.pk} has already finished ({experiment.get_status_display().lower()}); nothing to cancel.")
    services = _services()
    for run in experiment.runs.filter(status__in=[TrainingJob.Status.QUEUED, TrainingJob.Status.RUNNING]):
        try:
            services.training_job_cancel(job=run)
        except services.JobConflict:
            pass  # it finished meanwhile
    Experiment.objects.filter(pk=experiment.pk, status=Experiment.Status.RUNNING).update(
        status=Experiment.Status.CANCELLED, finished_at=timezone.now()
    )
    experiment.refresh_from_db()
    return experiment


# -- the worker's side: early stopping and the end of a run -----------------------------------------
def early_stop_reason(job: TrainingJob, step: int, eval_loss: float) -> str | None:
    """Why a sweep's run should stop after its validation at `step` (loss `eval_loss`), or None (the median stopping
    rule with a margin; see the constants above)."""
    experiment = Experiment.objects.filter(pk=job.experiment_id).values("early_stopping").first()
    if not experiment or not experiment["early_stopping"]:
        return None
    total = TrainingJob.objects.values_list("total_steps", flat=True).get(pk=job.pk)
    if not total or step >= total or step / total < EARLY_STOP_GRACE:
        return None
    fraction = step / total
    others = list(
        TrainingJob.objects.filter(
            experiment_id=job.experiment_id, status=TrainingJob.Status.COMPLETED, best_eval_loss__isnull=False, total_steps__gt=0
        )
        .exclude(pk=job.pk)
        .order_by("pk")
        .values_list("pk", "total_steps")
    )
    if len(others) < EARLY_STOP_MIN_COMPLETED:
        return None
    points = LossPoint.objects.filter(job_id__in=[pk for pk, _ in others + [(job.pk, 0)]], eval_loss__isnull=False)
    curves: dict[int, list[tuple[int, float]]] = {}
    for run, at, loss in points.values_list("job_id", "step", "eval_loss"):
        curves.setdefault(run, []).append((at, loss))
    best = min([eval_loss, *(loss for at, loss in curves.get(job.pk, []) if at <= step)])
    reference = {}
    for pk, steps in others:
        reached = [loss for at, loss in curves.get(pk, []) if at <= fraction * steps]
        if reached:
            reference[pk] = min(reached)
    if len(reference) < EARLY_STOP_MIN_COMPLETED:
        return None
    median = statistics.median(reference.values())
    if best <= median * (1 + EARLY_STOP_MARGIN):
        return None
    names = ", ".join(f"#{pk}" for pk in reference)
    return (
        f"Stopped early after its validation at step {step} of {total} ({fraction:.0%} of its training): its lowest validation "
        f"loss so far, {best:.4f}, was more than {EARLY_STOP_MARGIN:.0%} above {median:.4f}, the median of the lowest validation "
        f"losses of the completed runs {names} by the same share of their training."
    )


def early_stop_check(job: TrainingJob) -> Callable[[], bool]:
    """The early-stopping half of training_job_work's stop check: True from the step after a validation that
    early_stop_reason condemns (the reason is saved in `stop_reason`). Always False outside a sweep."""
    if job.experiment_id is None:
        return lambda: False
    if job.stop_reason:  # a resumed run starts without its old verdict
        job_write(TrainingJob, job.pk, stop_reason="")
    state = {"step": -1, "stopped": False}

    def stop() -> bool:
        if state["stopped"]:
            return True
        newer = LossPoint.objects.filter(job_id=job.pk, eval_loss__isnull=False, step__gt=state["step"]).order_by("-step")
        point = newer.values_list("step", "eval_loss").first()
        if point is None:
            return False
        state["step"] = point[0]
        reason = early_stop_reason(job, *point)
        if reason:
            job_write(TrainingJob, job.pk, stop_reason=reason)
            logger.info("Training job %s of sweep %s stopped early: %s", job.pk, job.experiment_id, reason)
            state["stopped"] = True
        return state["stopped"]

    return stop


def reports_to_experiment(work: Callable[..., None]) -> Callable[..., None]:
    """Wraps training_job_work: a sweep's run tells its sweep how it ended, however it ended. A failure is recorded here
    as tuna_core.jobs.job_work would record it (failed, with a readable reason), so that the sweep goes on and picks
    among its other runs."""

    @functools.wraps(work)
    def run(job: TrainingJob, *args, **kwargs) -> None:
        if job.experiment_id is None:
            return work(job, *args, **kwargs)
        try:
            work(job, *args, **kwargs)
        except JobLost:
            experiment_run_ended(job)
            raise
        except Exception as exc:
            logger.exception("Training job %s of sweep %s failed", job.pk, job.experiment_id)
            job_fail(job, exc)
        experiment_run_ended(job)
        return None

    return run


def experiment_run_ended(job: TrainingJob) -> None:
    """Called when a sweep's run ends in any state: once none of its runs is queued or training, the pick is made."""
    if job.experiment_id is not None:
        experiment_settle(experiment=Experiment(pk=job.experiment_id))


def experiment_settle(*, experiment: Experiment) -> Experiment | None:
    """Pick the winner of a running sweep whose runs have all ended (and send experiment_finished); otherwise nothing.
    The worker calls it as each run ends; pages call it too, for a run that ended without a worker (cancelled while
    queued, or reaped after its worker died)."""
    unfinished = TrainingJob.objects.filter(experiment_id=experiment.pk, status__in=[TrainingJob.Status.QUEUED, TrainingJob.Status.RUNNING])
    if unfinished.exists():  # the usual case while it runs: no lock taken
        return experiment
    with transaction.atomic():
        experiment = Experiment.objects.select_for_update().filter(pk=experiment.pk).first()
        if experiment is None or experiment.status != Experiment.Status.RUNNING:
            return experiment
        runs = list(experiment.runs.order_by("pk"))
        if any(run.is_active for run in runs):
            return experiment
        _pick(experiment, runs)
    logger.info("Sweep %s %s: %s", experiment.pk, experiment.status, experiment.pick.get("reason"))
    for receiver, result in experiment_finished.send_robust(sender=Experiment, experiment=experiment):
        if isinstance(result, Exception):
            logger.error("Sweep %s: %s failed: %s", experiment.pk, getattr(receiver, "__name__", receiver), result, exc_info=result)
    return experiment


def left_out_why(run: TrainingJob) -> str:
    if run.status == TrainingJob.Status.FAILED:
        return f"failed: {run.error_message or 'no reason recorded'}"
    if run.status == TrainingJob.Status.CANCELLED and run.stop_reason:
        return run.stop_reason
    if run.is_paused:
        return f"paused at step {run.current_step} of {run.total_steps}: a paused run is not waited for"
    if run.status == TrainingJob.Status.CANCELLED:
        return f"cancelled at step {run.current_step} of {run.total_steps}"
    if run.status == TrainingJob.Status.COMPLETED:
        return "completed without a validation loss (no validation examples)"
    return f"{run.status_label.lower()}"


def _pick(experiment: Experiment, runs: list[TrainingJob]) -> None:
    compared, left_out = [], []
    for run in runs:
        if run.status == TrainingJob.Status.COMPLETED and run.best_eval_loss is not None:
            compared.append(
                {
                    "job": run.pk,
                    "eval_loss": run.best_eval_loss,
                    "best_step": run.best_step,
                    "status": run.status,
                    "stop_reason": run.stop_reason,
                    "settings": grid_point(run.config),
                }
            )
        else:
            left_out.append({"job": run.pk, "why": left_out_why(run), "settings": grid_point(run.config)})
    compared.sort(key=lambda entry: (entry["eval_loss"], entry["job"]))
    experiment.finished_at = timezone.now()
    if compared:
        best = compared[0]
        others = "; the others: " + ", ".join(f"#{e['job']} {e['eval_loss']:.4f}" for e in compared[1:]) if len(compared) > 1 else ""
        reason = (
            f"Job #{best['job']} has the lowest validation loss of the {len(compared)} completed run{'s' if len(compared) != 1 else ''} "
            f"compared: {best['eval_loss']:.4f} at its kept step {best['best_step']}{others}."
        )
        experiment.winner_id = best["job"]
        experiment.status = Experiment.Status.COMPLETED
    else:
        reason = "No run completed with a validation loss: there is nothing to pick."
        experiment.winner_id = None
        experiment.status = Experiment.Status.FAILED
    if left_out:
        reason += " Left out: " + "; ".join(f"#{e['job']} ({e['why']})" for e in left_out) + "."
    experiment.pick = {
        "metric": "best_eval_loss",
        "rule": "the lowest validation loss at the checkpoint each completed run kept (never a score on the held-out examples)",
        "compared": compared,
        "left_out": left_out,
        "reason": reason,
    }
    experiment.save(update_fields=["status", "winner", "pick", "finished_at"])


# -- reads ------------------------------------------------------------------------------------
def experiments_for_user(user) -> QuerySet[Experiment]:
    return (
        Experiment.objects.filter(owner=user)
        .select_related("dataset", "winner")
        .annotate(run_count=Count("runs"))
        .order_by("-created_at", "-id")
    )


def get_experiment_for_user(user, pk: int) -> Experiment:
    """Another user's sweep is a 404, never a 403 that confirms it exists."""
    return get_object_or_404(Experiment.objects.select_related("dataset", "winner", "owner"), pk=pk, owner=user)


def experiment_runs(experiment: Experiment) -> list[dict[str, Any]]:
    """One row per run, in grid order: the run, its four grid settings, its validation losses (the lowest so far and the
    latest), whether it won, and why it was left out of the pick."""
    runs = list(experiment.runs.order_by("pk"))
    curves: dict[int, list[tuple[int, float]]] = {}
    points = LossPoint.objects.filter(job__in=runs, eval_loss__isnull=False).order_by("step")
    for run, step, loss in points.values_list("job_id", "step", "eval_loss"):
        curves.setdefault(run, []).append((step, loss))
    left_out = {entry["job"]: entry["why"] for entry in experiment.pick.get("left_out", [])}
    choices = layer_choices(experiment.base_model)
    rows = []
    for run in runs:
        curve = curves.get(run.pk, [])
        rows.append(
            {
                "job": run,
                "settings": grid_point(run.config, choices),
                "lowest_eval_loss": min((loss for _, loss in curve), default=None),
                "latest_eval_loss": curve[-1][1] if curve else None,
                "latest_eval_step": curve[-1][0] if curve else None,
                "is_winner": run.pk == experiment.winner_id,
                "left_out": left_out.get(run.pk, ""),
            }
        )
    return rows

