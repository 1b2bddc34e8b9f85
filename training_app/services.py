"""Writes for training jobs. Pages, API, admin actions and the worker task all come through here."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.dispatch import Signal
from django.utils import timezone

from datasets_app.examples import training_examples, validation_examples
from datasets_app.models import Dataset
from datasets_app.services import DatasetInUse
from training_app.limits import check_epochs, limited_settings
from training_app.models import LossPoint, ThroughputMeasurement, TrainingJob
from tuna_core.errors import Conflict, Invalid
from tuna_core.jobs import job_enqueue, job_held, job_is_stuck, job_write
from tuna_core.quotas import check_active_jobs
from tuna_llm.autoconfig import DataFacts, choose_settings, model_facts
from tuna_llm.catalog import get_base_model_spec, get_catalog
from tuna_llm.loading import pick_device
from tuna_llm.preference import PreferencePair, run_preference_training
from tuna_llm.training import Progress, TrainingHooks, latest_checkpoint, run_lora_training
from tuna_llm.training_config import ConfigResult, TrainingConfig, build_config

logger = logging.getLogger("tuna.training")

# Sent once a job completes, in the worker, with `job=` the completed row. Apps above training connect to it
# (evaluation evaluates a preference-tuned job against its parent); training never imports them.
job_completed = Signal()


class JobConflict(Conflict):
    """An action that does not fit the job's state (e.g. cancelling a finished job)."""


class ConfigInvalid(Invalid):
    """Settings refused, field by field (``errors``: setting to its messages)."""

    def __init__(self, errors: dict[str, str | list[str]]) -> None:
        summary = "; ".join(f"{k}: {' '.join(v) if isinstance(v, list) else v}" for k, v in errors.items())
        super().__init__(f"Invalid settings: {summary}", errors=errors)


class DatasetNotTrainable(Invalid):
    pass


def job_dir(job: TrainingJob) -> Path:
    return Path(settings.TUNA_DATA_DIR) / "jobs" / str(job.pk)


def validate_training_config(data: dict[str, Any]) -> ConfigResult:
    catalog = get_catalog()
    model_dirs = {name: spec.config_dir() for name, spec in catalog.items()}
    return build_config(data, catalog=catalog, default_model=settings.TUNA_DEFAULT_BASE_MODEL, model_dirs=model_dirs)


@dataclass(frozen=True)
class TrainingPlan:
    """What a job would run with: the user's settings, the chosen ones and why."""

    config: TrainingConfig | None
    reasons: dict[str, str]
    errors: dict[str, str]


def training_plan(*, dataset: Dataset, config_data: dict[str, Any]) -> TrainingPlan:
    """Check the user's settings and choose the rest from the dataset and the base model."""
    result = validate_training_config(config_data)
    if result.errors:
        return TrainingPlan(None, {}, result.errors)
    explicit = dict(result.explicit)
    base_model = explicit.pop("base_model")
    stats = dataset.validation_report.get("stats", {}).get("example_tokens", {})
    facts = DataFacts(
        train_pool=dataset.num_train,
        longest_tokens=stats.get("max"),
        p95_tokens=stats.get("p95"),
        **model_facts(get_base_model_spec(base_model).config_dir()),
    )
    config, reasons, errors = limited_settings(explicit, facts, base_model=base_model)
    return TrainingPlan(config, reasons, errors)


def training_job_start(*, owner, dataset: Dataset, config_data: dict[str, Any]) -> TrainingJob:
    if not dataset.is_valid:
        raise DatasetNotTrainable(f"Dataset {dataset.name!r} is invalid ({dataset.error_count} errors); fix the file and upload it again.")
    plan = training_plan(dataset=dataset, config_data=config_data)
    if plan.errors:
        raise ConfigInvalid(plan.errors)
    config = plan.config
    with transaction.atomic():
        check_active_jobs(owner)
        job = TrainingJob.objects.create(
            owner=owner, dataset=dataset, base_model=config.base_model, config=config.to_dict(), config_reasons=plan.reasons
        )
        job_enqueue(job)
    logger.info("Training job %s queued by %s on dataset %s", job.pk, owner, dataset.pk)
    return job


@transaction.atomic
def training_job_cancel(*, job: TrainingJob) -> TrainingJob:
    job = TrainingJob.objects.select_for_update().get(pk=job.pk)
    if job.is_finished:
        raise JobConflict(f"Job #{job.pk} has already finished ({job.get_status_display().lower()}); there is nothing to cancel.")
    if job.status == TrainingJob.Status.QUEUED or job_is_stuck(job):
        # Not started, or its worker stopped answering: no process will look at the flag, so cancel now
        # (a worker that comes back finds the row is not its own any more and writes nothing).
        job.status = TrainingJob.Status.CANCELLED
        job.completed_at = timezone.now()
        job.eta_seconds = None
    job.cancel_requested = True
    job.save(update_fields=["status", "completed_at", "cancel_requested", "eta_seconds"])
    return job


MAX_CONTINUE_EPOCHS = 50


@transaction.atomic
def training_job_continue(*, job: TrainingJob, epochs: int | None = None) -> TrainingJob:
    """A new run that starts from a completed job's adapter and trains `epochs` more epochs."""
    job = TrainingJob.objects.select_for_update().get(pk=job.pk)
    if job.status != TrainingJob.Status.COMPLETED or not job.adapter_dir:
        raise JobConflict(f"Only a completed fine-tune can be trained further; job #{job.pk} is {job.get_status_display().lower()}.")
    if job.is_preference:
        raise JobConflict(
            f"Job #{job.pk} was preference-tuned on votes; it is not trained further on the dataset. Evaluate it, vote, and train on "
            "preferences again from that evaluation."
        )
    parent = TrainingConfig.from_dict(job.config)
    epochs = parent.num_epochs if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= MAX_CONTINUE_EPOCHS:
        raise ConfigInvalid({"epochs": f"Must be a whole number from 1 to {MAX_CONTINUE_EPOCHS}; got {epochs!r}."})
    errors = check_epochs(epochs, parent, max(1, job.dataset.num_train - parent.eval_examples))
    if errors:
        raise ConfigInvalid(errors)
    check_active_jobs(job.owner)
    # The parent's settings, with the validation and checkpoint intervals chosen again for the new length.
    same = {k: v for k, v in parent.to_dict().items() if k not in ("base_model", "eval_steps", "save_steps")}
    config, _ = choose_settings(
        {**same, "num_epochs": epochs, "max_steps": 0}, DataFacts(train_pool=job.dataset.num_train), base_model=parent.base_model
    )
    reasons = {**job.config_reasons, "num_epochs": f"{epochs} more epoch{'s' if epochs != 1 else ''} from job #{job.pk}'s adapter"}
    child = TrainingJob.objects.create(
        owner=job.owner,
        dataset=job.dataset,
        base_model=job.base_model,
        config=config.to_dict(),
        config_reasons=reasons,
        parent=job,
        step_offset=job.step_offset + (job.best_step if job.best_step is not None else job.current_step),
    )
    job_enqueue(child)
    return child


def resumable_checkpoint(job: TrainingJob) -> Path | None:
    return latest_checkpoint(job_dir(job))


@transaction.atomic
def training_job_resume(*, job: TrainingJob) -> TrainingJob:
    job = TrainingJob.objects.select_for_update().get(pk=job.pk)
    if job.status not in (TrainingJob.Status.FAILED, TrainingJob.Status.CANCELLED) and not job_is_stuck(job):
        raise JobConflict(f"Only failed or cancelled jobs can be resumed; job #{job.pk} is {job.get_status_display().lower()}.")
    if resumable_checkpoint(job) is None:
        raise JobConflict(f"Job #{job.pk} saved no checkpoint to resume from; start a new job instead.")
    if not job.is_active:  # a stuck "training" job is counted already
        check_active_jobs(job.owner)
    job.status = TrainingJob.Status.QUEUED
    job.cancel_requested = False
    job.error_message = ""
    job.error_traceback = ""
    job.completed_at = None
    job.eta_seconds = None
    job.resume_count += 1
    job.save()
    job_enqueue(job)
    return job


@transaction.atomic
def training_job_delete(*, job: TrainingJob) -> None:
    """Delete a job that is not training, with its evaluations and loss history; its files go once committed.

    A job that other runs continue is refused (they start from its adapter and draw its loss history):
    delete those first, newest first, or delete the dataset with all its jobs.
    """
    training_jobs_delete(jobs=[job])


def training_jobs_delete(*, jobs: list[TrainingJob]) -> None:
    """Delete jobs (continuations before the runs they continue) inside the caller's transaction.

    Refused as a whole, with nothing deleted, when one of them is training or being evaluated. A queued job
    is simply deleted: the worker finds no row and skips it. Usage logs stay: they record calls that happened.
    """
    ids = [job.pk for job in jobs]
    locked = list(TrainingJob.objects.select_for_update().filter(pk__in=ids).order_by("-pk"))
    outside = TrainingJob.objects.filter(parent_id__in=ids).exclude(pk__in=ids).order_by("pk")
    if outside:
        parent = outside[0].parent_id
        children = [child.pk for child in outside if child.parent_id == parent]
        many = len(children) != 1
        raise JobConflict(
            f"Job #{parent} is continued by job{'s' if many else ''} {', '.join(f'#{pk}' for pk in children)}, which "
            f"start{'' if many else 's'} from its adapter; delete {'those' if many else 'that one'} first."
        )
    busy = [job for job in locked if job.status == TrainingJob.Status.RUNNING]
    if busy:
        raise JobConflict(f"Job #{busy[0].pk} is training; cancel it first (it stops after the current step), then delete it.")
    for job in locked:
        evaluating = job.evaluations.filter(status=job.evaluations.model.Status.RUNNING).first()
        if evaluating is not None:
            raise JobConflict(f"Evaluation #{evaluating.pk} of job #{job.pk} is running; delete the job once it has finished.")
    directories = [job_dir(job) for job in locked]
    for job in locked:  # newest first: a continuation goes before the run it continues (on_delete=PROTECT)
        job.delete()
    transaction.on_commit(lambda: [_remove_tree(directory) for directory in directories])
    logger.info("Training jobs %s deleted", ", ".join(f"#{pk}" for pk in ids))


def _remove_tree(directory: Path) -> None:
    def report(function, path, exc_info) -> None:
        logger.warning("Could not remove %s: %s", path, exc_info[1])

    if directory.exists():
        shutil.rmtree(directory, onerror=report)


# -- the worker side --------------------------------------------------------------------------
def training_job_work(job: TrainingJob, extra_callbacks: tuple = ()) -> None:
    """The worker's work for a claimed training job; `extra_callbacks` go to the trainer (tests stop or
    crash a run at a given step with them)."""
    config = TrainingConfig.from_dict(job.config)
    spec = get_base_model_spec(config.base_model)
    plan = pick_device()
    out = job_dir(job)
    resume_from = latest_checkpoint(out) if job.resume_count else None
    if resume_from is not None:
        step = int(resume_from.name.split("-")[-1])
        # The resumed run logs these steps again: keep the history identical to an unbroken run.
        LossPoint.objects.filter(job=job, step__gt=step).delete()
    elif out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    previous_seconds = job.train_seconds
    previous_eval_seconds = job.eval_seconds if resume_from else 0.0
    run_started = time.monotonic()
    tokens_at_start = job.tokens_seen if resume_from else 0

    def on_start(total: int) -> None:
        job_write(TrainingJob, job.pk, total_steps=total, device=plan.device)

    def on_progress(p: Progress) -> None:
        run_tokens = p.tokens_seen - tokens_at_start
        with transaction.atomic():  # progress and its loss point land together, and only while this process holds the job
            job_write(
                TrainingJob,
                job.pk,
                current_step=p.step,
                total_steps=p.total_steps,
                epoch=p.epoch,
                tokens_seen=p.tokens_seen,
                tokens_per_second=run_tokens / (p.train_seconds - p.eval_seconds)
                if p.train_seconds > p.eval_seconds and run_tokens > 0
                else F("tokens_per_second"),
                train_seconds=previous_seconds + (time.monotonic() - run_started),
                eta_seconds=p.eta_seconds,
                eval_seconds=previous_eval_seconds + p.eval_seconds,
            )
            LossPoint.objects.create(job=job, step=p.step, epoch=p.epoch, loss=p.loss, eval_loss=p.eval_loss, learning_rate=p.learning_rate)

    def should_stop() -> bool:
        # Cancelled, or no longer this process's job (reaped, or resumed elsewhere): stop at once.
        return not job_held(TrainingJob, job.pk).filter(cancel_requested=False).exists()

    hooks = TrainingHooks(on_progress=on_progress, should_stop=should_stop, on_start=on_start)
    if job.is_preference:
        result = run_preference_training(
            config,
            spec=spec,
            plan=plan,
            pairs=[PreferencePair(pair["messages"], pair["chosen"], pair["rejected"]) for pair in job.preference_pairs],
            init_adapter=Path(job.parent.adapter_dir),
            output_dir=out,
            hooks=hooks,
            resume_from=resume_from,
            extra_callbacks=extra_callbacks,
            hf_token=settings.HF_TOKEN,
        )
    else:
        result = run_lora_training(
            config,
            spec=spec,
            plan=plan,
            train_examples=training_examples(job.dataset, validation=config.eval_examples),
            eval_examples=validation_examples(job.dataset, validation=config.eval_examples),
            output_dir=out,
            hooks=hooks,
            resume_from=resume_from,
            init_adapter=Path(job.parent.adapter_dir) if job.parent_id else None,
            extra_callbacks=extra_callbacks,
            hf_token=settings.HF_TOKEN,
        )
    finished = timezone.now()
    fields: dict[str, Any] = {
        "current_step": result.global_step,
        "total_steps": result.total_steps,
        "tokens_seen": result.tokens_seen,
        "train_seconds": previous_seconds + (time.monotonic() - run_started),
        "completed_at": finished,
        "eta_seconds": None,
        "eval_seconds": previous_eval_seconds + result.eval_seconds,
        "best_step": result.best_step,
        "best_eval_loss": result.best_eval_loss,
    }
    run_tokens = result.tokens_seen - tokens_at_start
    # Training speed without the validation passes: estimates add those apart.
    training_seconds = result.train_seconds - result.eval_seconds
    if training_seconds > 0 and run_tokens > 0:
        fields["tokens_per_second"] = run_tokens / training_seconds
    if result.stopped_early:
        fields["status"] = TrainingJob.Status.CANCELLED
    else:
        fields.update(status=TrainingJob.Status.COMPLETED, adapter_dir=str(result.adapter_dir))
    job_write(TrainingJob, job.pk, **fields)  # JobLost (nothing written) if the row is not this process's any more
    logger.info("Training job %s %s after %s steps", job.pk, fields["status"], result.global_step)
    if fields["status"] == TrainingJob.Status.COMPLETED:
        job_completed.send(sender=TrainingJob, job=TrainingJob.objects.get(pk=job.pk))
    if fields["status"] == TrainingJob.Status.COMPLETED and "tokens_per_second" in fields and not job.is_preference:
        ThroughputMeasurement.objects.create(
            base_model=spec.name, device=plan.device, tokens_per_second=fields["tokens_per_second"], source=f"training job #{job.pk}"
        )


def dataset_jobs_delete(sender, *, dataset: Dataset, **kwargs) -> None:
    """datasets_app.services.dataset_deleting receiver: the dataset's jobs go with it, all or none."""
    jobs = list(dataset.training_jobs.order_by("pk"))
    try:
        training_jobs_delete(jobs=jobs)
    except JobConflict as exc:
        raise DatasetInUse(f"The dataset and its jobs were not deleted: {exc}", job_ids=[job.pk for job in jobs]) from None
