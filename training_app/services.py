"""Writes for training jobs. Pages, API, admin actions and the worker task all come through here."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
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

from datasets_app import examples as dataset_examples
from datasets_app.examples import training_examples, validation_examples
from datasets_app.models import Dataset
from datasets_app.services import DatasetInUse
from training_app.estimates import per_device_speed
from training_app.experiments import early_stop_check, reports_to_experiment
from training_app.limits import check_epochs, check_preference_limits, limited_settings
from training_app.models import LossPoint, ThroughputMeasurement, TrainingJob
from training_app.tracking import training_tracking
from tuna_core.disk import check_free_space
from tuna_core.errors import Conflict, Invalid
from tuna_core.jobs import MAX_AUTO_RESUMES, JobLost, db_retry, job_enqueue, job_held, job_is_stuck, job_write
from tuna_core.quotas import check_active_jobs, check_storage
from tuna_llm import sizes
from tuna_llm.autoconfig import DataFacts, choose_settings, model_facts, train_processes
from tuna_llm.catalog import get_base_model_spec, get_catalog
from tuna_llm.loading import pick_device
from tuna_llm.preference import PreferencePair, preference_settings, run_preference_training
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


# The LoRA shape of a run that starts from a fine-tune's adapter is that adapter's (adapter_config.json names).
LORA_SHAPE = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "target_modules": "target_modules"}


def _parent_lora(parent: TrainingJob) -> dict[str, Any]:
    """The LoRA shape of a completed fine-tune's adapter, from the adapter itself (its settings where unreadable)."""
    path = Path(parent.adapter_dir) / "adapter_config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    shape = {name: saved.get(key, parent.config.get(name)) for name, key in LORA_SHAPE.items()}
    if isinstance(shape["target_modules"], (list, tuple, set)):
        shape["target_modules"] = tuple(sorted(shape["target_modules"]))
    return {name: value for name, value in shape.items() if value is not None}


def _with_parent(explicit: dict[str, Any], parent: TrainingJob) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """The user's settings for a run starting from `parent`'s adapter: (settings, reasons, errors). Its base model and
    LoRA shape are the parent's; a different one set by the user is an error naming the setting."""
    errors: dict[str, str] = {}
    if explicit.get("base_model") != parent.base_model:
        errors["base_model"] = (
            f"Job #{parent.pk} is a fine-tune of {parent.base_model}; training from it runs on that base model, not "
            f"{explicit.get('base_model')}."
        )
    shape = _parent_lora(parent)
    for name, value in shape.items():
        given = explicit.get(name)
        if given is not None and (tuple(sorted(given)) if name == "target_modules" else given) != value:
            errors[name] = f"Training starts from job #{parent.pk}'s adapter, whose {name} is {value!r}; leave it unset."
    reason = f"job #{parent.pk}'s adapter, which this run starts from"
    return {**explicit, **shape}, dict.fromkeys(shape, reason), errors


def _explicit_settings(
    config_data: dict[str, Any], parent: TrainingJob | None
) -> tuple[dict[str, Any] | None, dict[str, str], dict[str, str]]:
    """The user's settings, checked: (settings, reasons for those fixed by the parent, errors)."""
    data = dict(config_data)
    if parent is not None:
        data.setdefault("base_model", parent.base_model)
    result = validate_training_config(data)
    if result.errors:
        return None, {}, result.errors
    explicit, fixed = dict(result.explicit), {}
    if parent is not None:
        explicit, fixed, errors = _with_parent(explicit, parent)
        if errors:
            return None, {}, errors
    return explicit, fixed, {}


def training_plan(*, dataset: Dataset, config_data: dict[str, Any], parent: TrainingJob | None = None) -> TrainingPlan:
    """Check the user's settings and choose the rest from the dataset and the base model (and the fine-tune it
    starts from, if any)."""
    explicit, fixed, errors = _explicit_settings(config_data, parent)
    if errors:
        return TrainingPlan(None, {}, errors)
    if "dpo_beta" in explicit:
        return TrainingPlan(None, {}, {"dpo_beta": "DPO's beta applies to preference tuning only, not to supervised fine-tuning."})
    errors = checkpoint_errors(explicit)
    if errors:
        return TrainingPlan(None, {}, errors)
    config, reasons, errors = _limited(dataset, explicit, dataset.num_train)
    if config is not None and config.save_total_limit > settings.TUNA_MAX_CHECKPOINTS_PER_JOB:
        config = bounded_checkpoints(config)
        reasons = {**reasons, "save_total_limit": "the most checkpoints a job keeps on this server (TUNA_MAX_CHECKPOINTS_PER_JOB)"}
    return TrainingPlan(config, {**reasons, **fixed}, errors)


def checkpoint_errors(explicit: dict[str, Any]) -> dict[str, str]:
    """A checkpoint count asked for above the server's bound, by field."""
    asked, limit = explicit.get("save_total_limit"), settings.TUNA_MAX_CHECKPOINTS_PER_JOB
    if isinstance(asked, int) and asked > limit:
        return {
            "save_total_limit": f"At most {limit} checkpoints are kept per job on this server (TUNA_MAX_CHECKPOINTS_PER_JOB); got {asked}."
        }
    return {}


def bounded_checkpoints(config: TrainingConfig) -> TrainingConfig:
    """The config with at most TUNA_MAX_CHECKPOINTS_PER_JOB checkpoints kept (Trainer's save_total_limit)."""
    limit = settings.TUNA_MAX_CHECKPOINTS_PER_JOB
    return config if config.save_total_limit <= limit else dataclasses.replace(config, save_total_limit=limit)


def check_job_storage(owner, action: str, adding: int | None = None, elsewhere: int = 0) -> None:
    """Refuse work that writes files (a run, an export) when the user's files plus `adding` (an estimate of what it
    keeps; None where the base model's files are not on this server yet: refused only at the quota) would pass their
    quota, or when the data disk would keep less than TUNA_MIN_FREE_DISK_MB free after it (`elsewhere`: what it writes
    outside the user's files, e.g. a base's shared GGUF); inside the transaction that queues it."""
    check_storage(owner, adding=adding, action=action, estimated=adding is not None)
    check_free_space((adding or 0) + elsewhere, action)


def run_storage_estimate(config: TrainingConfig) -> int | None:
    """Bytes a run with `config` writes (its adapter and kept checkpoints), from its base model's config.json; None when
    that model's files are not on this server yet."""
    spec = get_base_model_spec(config.base_model)
    return sizes.run_estimate(
        spec.config_dir(), r=config.lora_r, target_modules=config.target_modules, kept_checkpoints=config.save_total_limit
    )


def runs_storage_estimate(configs: list[TrainingConfig]) -> int | None:
    """What several runs (a sweep's) write in all; None when one of them cannot be estimated."""
    estimates = [run_storage_estimate(config) for config in configs]
    return None if any(e is None for e in estimates) else sum(estimates)


def _limited(dataset: Dataset, explicit: dict[str, Any], train_pool: int) -> tuple[TrainingConfig | None, dict[str, str], dict[str, str]]:
    """limited_settings for these settings on this data and base model: (config, reasons, errors)."""
    explicit = dict(explicit)
    base_model = explicit.pop("base_model")
    stats = dataset.validation_report.get("stats", {}).get("example_tokens", {})
    facts = DataFacts(
        train_pool=train_pool,
        longest_tokens=stats.get("max"),
        p95_tokens=stats.get("p95"),
        # A new run trains on the server's processes (a continued or resumed one keeps its own: see their starts).
        processes=train_processes(settings.TUNA_TRAIN_PROCESSES, settings.TUNA_TRAIN_NNODES),
        **model_facts(get_base_model_spec(base_model).config_dir()),
    )
    return limited_settings(explicit, facts, base_model=base_model)


SUFFIX = re.compile(r"[A-Za-z0-9._-]*")
MAX_SUFFIX = 64
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


def label_errors(*, suffix: str, metadata: dict | None) -> dict[str, str]:
    """What is wrong with a job's suffix and metadata (OpenAI's rules), by field."""
    errors = {}
    if not isinstance(suffix, str) or len(suffix) > MAX_SUFFIX or not SUFFIX.fullmatch(suffix):
        errors["suffix"] = (
            f"At most {MAX_SUFFIX} characters of letters, digits, '-', '_' and '.' (it becomes part of the model name); got {suffix!r}."
        )
    if metadata is not None:
        if not isinstance(metadata, dict):
            errors["metadata"] = f"An object of string keys and string values; got {type(metadata).__name__}."
        elif len(metadata) > MAX_METADATA_PAIRS:
            errors["metadata"] = f"At most {MAX_METADATA_PAIRS} key-value pairs; got {len(metadata)}."
        else:
            for key, value in metadata.items():
                if not isinstance(key, str) or not key or len(key) > MAX_METADATA_KEY:
                    errors["metadata"] = f"Keys are strings of 1 to {MAX_METADATA_KEY} characters; got {key!r}."
                elif not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
                    errors["metadata"] = f"The value of {key!r} must be a string of at most {MAX_METADATA_VALUE} characters."
                if "metadata" in errors:
                    break
    return errors


def _check_parent(owner, parent: TrainingJob) -> None:
    if parent.owner_id != owner.pk:
        raise ConfigInvalid({"parent": "No such fine-tune."})
    if parent.status != TrainingJob.Status.COMPLETED or not parent.adapter_dir:
        raise JobConflict(f"Only a completed fine-tune can be trained from; job #{parent.pk} is {parent.status_label.lower()}.")


def _check_trainable(dataset: Dataset) -> None:
    if not dataset.is_valid:
        raise DatasetNotTrainable(f"Dataset {dataset.name!r} is invalid ({dataset.error_count} errors); fix the file and upload it again.")


def training_job_start(
    *,
    owner,
    dataset: Dataset,
    config_data: dict[str, Any],
    parent: TrainingJob | None = None,
    suffix: str = "",
    metadata: dict[str, str] | None = None,
) -> TrainingJob:
    """Queue supervised fine-tuning of `dataset`: from the base model with a fresh adapter, or from `parent` (a
    completed fine-tune: its base model, its adapter as the start). `config_data` may hold
    learning_rate_multiplier, which scales the learning rate chosen for the data and model."""
    _check_trainable(dataset)
    if dataset.is_preference:
        raise DatasetNotTrainable(
            f"Dataset {dataset.name!r} holds preference pairs (a preferred and a non-preferred answer): it trains with preference "
            "tuning (DPO), not supervised fine-tuning.",
            errors={"method": "Use preference tuning (DPO) for a preference file."},
        )
    errors = label_errors(suffix=suffix, metadata=metadata)
    if errors:
        raise ConfigInvalid(errors)
    if parent is not None:
        _check_parent(owner, parent)
    plan = training_plan(dataset=dataset, config_data=config_data, parent=parent)
    if plan.errors:
        raise ConfigInvalid(plan.errors)
    config = plan.config
    with transaction.atomic():
        check_active_jobs(owner)
        check_job_storage(owner, "A training job", run_storage_estimate(config))
        job = TrainingJob.objects.create(
            owner=owner,
            dataset=dataset,
            base_model=config.base_model,
            config=config.to_dict(),
            config_reasons=plan.reasons,
            parent=parent,
            suffix=suffix,
            metadata=metadata or {},
        )
        job_enqueue(job)
    logger.info("Training job %s queued by %s on dataset %s", job.pk, owner, dataset.pk)
    return job


def preference_file_job_start(
    *,
    owner,
    dataset: Dataset,
    parent: TrainingJob | None = None,
    config_data: dict[str, Any],
    suffix: str = "",
    metadata: dict[str, str] | None = None,
) -> TrainingJob:
    """Queue preference tuning (DPO) on a preference dataset's pairs: from the base model (a fresh adapter; the
    reference is the base weights) or from `parent`, a completed fine-tune (its adapter is the start and the
    reference). `config_data`: num_epochs, batch_size, learning_rate_multiplier, beta (or dpo_beta), seed, and any
    other training setting."""
    _check_trainable(dataset)
    if not dataset.is_preference:
        raise DatasetNotTrainable(
            f"Dataset {dataset.name!r} holds chat examples, not preference pairs: preference tuning (DPO) needs a preference file "
            "(input, preferred_output, non_preferred_output). Train it with supervised fine-tuning.",
            errors={"method": "Use supervised fine-tuning for a chat file."},
        )
    errors = label_errors(suffix=suffix, metadata=metadata)
    data = dict(config_data)
    if "beta" in data:
        if "dpo_beta" in data:
            errors["beta"] = "Set beta or dpo_beta, not both."
        data["dpo_beta"] = data.pop("beta")
    if errors:
        raise ConfigInvalid(errors)
    if parent is not None:
        _check_parent(owner, parent)
    explicit, fixed, errors = _explicit_settings(data, parent)
    if errors:
        raise ConfigInvalid({"beta" if name == "dpo_beta" else name: error for name, error in errors.items()})
    pairs = [{**pair, "source": "file"} for pair in dataset_examples.preference_pairs(dataset)]
    if not pairs:
        raise DatasetNotTrainable(f"Dataset {dataset.name!r} has no preference pairs to train on.")
    if parent is not None:
        start = TrainingConfig.from_dict({**parent.config, **{k: explicit[k] for k in fixed}, "base_model": parent.base_model})
        start_reasons = dict(fixed)
    else:
        # The adapter's shape and the sequence length as a supervised run on these examples would have them.
        start, start_reasons, errors = _limited(dataset, {k: v for k, v in explicit.items() if k != "num_epochs"}, len(pairs))
        if errors:
            raise ConfigInvalid(errors)
    config, reasons = preference_settings(start, len(pairs), epochs=explicit.get("num_epochs"), explicit=explicit)
    config = bounded_checkpoints(config)
    errors = check_preference_limits(config, len(pairs), explicit) or checkpoint_errors(explicit)
    if errors:
        raise ConfigInvalid(errors)
    reasons = {**{k: v for k, v in start_reasons.items() if k in LORA_SHAPE or k == "max_seq_length"}, **reasons}
    with transaction.atomic():
        check_active_jobs(owner)
        check_job_storage(owner, "A preference-tuning job", run_storage_estimate(config))
        job = TrainingJob.objects.create(
            owner=owner,
            dataset=dataset,
            base_model=config.base_model,
            method=TrainingJob.Method.DPO,
            config=config.to_dict(),
            config_reasons=reasons,
            parent=parent,
            preference_pairs=pairs,
            suffix=suffix,
            metadata=metadata or {},
        )
        job_enqueue(job)
    logger.info("Preference job %s queued by %s on %s pairs of dataset %s", job.pk, owner, len(pairs), dataset.pk)
    return job


def training_job_refused(
    *,
    owner,
    dataset: Dataset,
    base_model: str,
    code: str,
    message: str,
    param: str | None,
    suffix: str = "",
    metadata: dict[str, str] | None = None,
    method: str = TrainingJob.Method.SFT,
) -> TrainingJob:
    """A job refused before it ran (e.g. code "invalid_training_file"): a failed row with the reason, no task and no files."""
    return TrainingJob.objects.create(
        owner=owner,
        dataset=dataset,
        base_model=base_model,
        method=method,
        status=TrainingJob.Status.FAILED,
        completed_at=timezone.now(),
        error_code=code,
        error_param=param or "",
        error_message=message,
        suffix=suffix,
        metadata=metadata or {},
    )


def _stop_now_if_nobody_runs_it(job: TrainingJob) -> None:
    """A job not started, or whose worker stopped answering, has no process to look at its stop flag: it stops
    now (a worker that comes back finds the row is not its own any more and writes nothing). The caller saves."""
    if job.status == TrainingJob.Status.QUEUED or job_is_stuck(job):
        job.status = TrainingJob.Status.CANCELLED
        job.completed_at = timezone.now()
        job.eta_seconds = None


@transaction.atomic
def training_job_cancel(*, job: TrainingJob) -> TrainingJob:
    job = TrainingJob.objects.select_for_update().get(pk=job.pk)
    if job.is_paused:  # stopped already: it simply stays stopped, no longer resumable as "paused"
        job.paused = False
        job.save(update_fields=["paused"])
        return job
    if job.is_finished:
        raise JobConflict(f"Job #{job.pk} has already finished ({job.get_status_display().lower()}); there is nothing to cancel.")
    _stop_now_if_nobody_runs_it(job)
    job.cancel_requested = True
    job.save(update_fields=["status", "completed_at", "cancel_requested", "eta_seconds"])
    return job


@transaction.atomic
def training_job_pause(*, job: TrainingJob) -> TrainingJob:
    """Stop a job after its current step with a checkpoint saved at that step, to resume from it later
    (training_job_resume). A job not started yet (or whose worker stopped answering) is paused at once."""
    job = TrainingJob.objects.select_for_update().get(pk=job.pk)
    if job.paused:
        raise JobConflict(f"Job #{job.pk} is {job.status_label.lower()} already.")
    if job.is_finished:
        raise JobConflict(f"Job #{job.pk} has already finished ({job.get_status_display().lower()}); there is nothing to pause.")
    _stop_now_if_nobody_runs_it(job)
    job.paused = True
    job.cancel_requested = True  # the run stops at the end of its step; the flag above makes it save a checkpoint there
    job.save(update_fields=["status", "completed_at", "eta_seconds", "paused", "cancel_requested"])
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
            f"Job #{job.pk} was preference-tuned (DPO); it is not trained further on the dataset. Start a new job from it instead "
            "(preference tuning on votes or on a preference file, or supervised fine-tuning on a chat file)."
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
    config = bounded_checkpoints(config)
    check_job_storage(job.owner, "Training further", run_storage_estimate(config))
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
    if resumable_checkpoint(job) is None and not (job.paused and job.started_at is None):  # paused before it started: starts over
        raise JobConflict(f"Job #{job.pk} saved no checkpoint to resume from; start a new job instead.")
    if not job.is_active:  # a stuck "training" job is counted already
        check_active_jobs(job.owner)
    if job.config.get("save_total_limit", 0) > settings.TUNA_MAX_CHECKPOINTS_PER_JOB:  # a row from before the bound
        job.config = {**job.config, "save_total_limit": settings.TUNA_MAX_CHECKPOINTS_PER_JOB}
    config = TrainingConfig.from_dict({"base_model": job.base_model, **job.config})  # rows keep their base in its own field too
    check_job_storage(job.owner, "Resuming the job", run_storage_estimate(config))
    _queue_again(job)
    return job


def _queue_again(job: TrainingJob) -> None:
    """A stopped job queued once more, to go on from its last checkpoint (a resume, by its owner or the worker)."""
    job.status = TrainingJob.Status.QUEUED
    job.cancel_requested = False
    job.paused = False
    job.error_message = ""
    job.error_traceback = ""
    job.completed_at = None
    job.eta_seconds = None
    job.resume_count += 1
    job.save()
    job_enqueue(job)


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
    # Each job's folder goes once this is committed (the post_delete receiver, training_app.storage.job_files_remove).
    # A running export is cancelled by its row going: its next write finds no row (JobLost), it stops and removes the
    # job's folder itself (training_app.exports.export_work), so nothing it writes after this outlives the job.
    for job in locked:  # newest first: a continuation goes before the run it continues (on_delete=PROTECT)
        job.delete()
    logger.info("Training jobs %s deleted", ", ".join(f"#{pk}" for pk in ids))


# -- the worker side --------------------------------------------------------------------------
@reports_to_experiment  # a sweep's run tells its sweep how it ended, a failure included
def training_job_work(job: TrainingJob, extra_callbacks: tuple = ()) -> None:
    """The worker's work for a claimed training job; `extra_callbacks` go to the trainer (tests stop or
    crash a run at a given step with them). A job on several processes runs under torchrun (training_app.distributed;
    its ranks take no `extra_callbacks`)."""
    from training_app.distributed import runs_distributed, training_launch  # it imports this module

    try:
        if runs_distributed(job):
            training_launch(job)
        else:
            _training_run(job, extra_callbacks)
    except JobLost:
        # Deleted while it trained (the job, or its owner): the trainer went on writing checkpoints after the post_delete
        # receiver removed the folder, so the folder goes again now that the run has stopped.
        from training_app.storage import job_files_remove_if_deleted  # storage imports this module (job_dir)

        job_files_remove_if_deleted(job)
        raise


def training_rank0(job: TrainingJob) -> None:
    """Rank 0 of a job on several processes (under torchrun): the job's run, as one process runs it."""
    try:
        _training_run(job, ())
    except JobLost:
        from training_app.storage import job_files_remove_if_deleted

        job_files_remove_if_deleted(job)
        raise


def training_follow(job: TrainingJob) -> None:
    """A rank other than 0: the same run on its share of the rows; it writes nothing to the database, and of the
    files only the Trainer's rng_state_<rank>.pth in each checkpoint (tuna_llm.distributed.rank_hooks)."""
    config = TrainingConfig.from_dict(job.config)
    out = job_dir(job)
    _run_training(
        job,
        config,
        spec=get_base_model_spec(config.base_model),
        plan=pick_device(),
        out=out,
        hooks=TrainingHooks(),
        resume_from=latest_checkpoint(out) if job.resume_count else None,
        extra_callbacks=(),
    )


def _run_training(job: TrainingJob, config: TrainingConfig, *, spec, plan, out: Path, hooks: TrainingHooks, resume_from, extra_callbacks):
    init_adapter = Path(job.parent.adapter_dir) if job.parent_id else None
    if job.is_preference:
        return run_preference_training(
            config,
            spec=spec,
            plan=plan,
            pairs=[PreferencePair(pair["messages"], pair["chosen"], pair["rejected"], pair.get("tools")) for pair in job.preference_pairs],
            init_adapter=init_adapter,
            output_dir=out,
            hooks=hooks,
            resume_from=resume_from,
            extra_callbacks=extra_callbacks,
            hf_token=settings.HF_TOKEN,
        )
    return run_lora_training(
        config,
        spec=spec,
        plan=plan,
        train_examples=training_examples(job.dataset, validation=config.eval_examples),
        eval_examples=validation_examples(job.dataset, validation=config.eval_examples),
        output_dir=out,
        hooks=hooks,
        resume_from=resume_from,
        init_adapter=init_adapter,
        extra_callbacks=extra_callbacks,
        hf_token=settings.HF_TOKEN,
    )


def _training_run(job: TrainingJob, extra_callbacks: tuple) -> None:
    config = TrainingConfig.from_dict(job.config)
    spec = get_base_model_spec(config.base_model)
    plan = pick_device()
    out = job_dir(job)
    resume_from = latest_checkpoint(out) if job.resume_count else None
    if resume_from is not None:
        step = int(resume_from.name.split("-")[-1])
        # The resumed run logs these steps again: keep the history identical to an unbroken run.
        LossPoint.objects.filter(job=job, step__gt=step).delete()
    else:
        # A run from the start (a resumed job that saved no checkpoint starts over): its history starts over too.
        LossPoint.objects.filter(job=job).delete()
        if out.exists():
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    previous_seconds = job.train_seconds
    previous_eval_seconds = job.eval_seconds if resume_from else 0.0
    run_started = time.monotonic()
    tokens_at_start = job.tokens_seen if resume_from else 0

    def on_start(total: int) -> None:
        job_write(TrainingJob, job.pk, total_steps=total, device=plan.device)

    def on_progress(p: Progress) -> None:
        tries = 0

        def write() -> None:
            nonlocal tries
            tries += 1
            with transaction.atomic():  # progress and its loss point land together, and only while this process holds the job
                _write_progress(p, again=tries > 1)

        # The database away (a restart, a failover): the whole transaction is tried again on a fresh connection.
        db_retry(write, f"Training job #{job.pk}'s step {p.step}")

    def _write_progress(p: Progress, *, again: bool) -> None:
        run_tokens = p.tokens_seen - tokens_at_start
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
        point = {"step": p.step, "epoch": p.epoch, "loss": p.loss, "eval_loss": p.eval_loss, "learning_rate": p.learning_rate}
        # A try whose commit landed although its answer was lost must not add the point twice: one loss per step.
        if not (again and LossPoint.objects.filter(job=job, **point).exists()):
            LossPoint.objects.create(job=job, **point)

    stops_early = early_stop_check(job)  # a sweep's run, clearly losing on validation loss (training_app.experiments)

    def should_stop() -> bool:
        # Cancelled or paused, or no longer this process's job (reaped, or resumed elsewhere): stop at once.
        return db_retry(
            lambda: not job_held(TrainingJob, job.pk).filter(cancel_requested=False).exists() or stops_early(),
            f"Training job #{job.pk}'s stop check",
        )

    def checkpoint_on_stop() -> bool:
        return db_retry(lambda: TrainingJob.objects.filter(pk=job.pk, paused=True).exists(), f"Training job #{job.pk}'s pause check")

    tracked = training_tracking(job, resume_from)  # TensorBoard, and MLflow / W&B when configured: fed each point
    hooks = TrainingHooks(
        on_progress=tracked.feeding(on_progress), should_stop=should_stop, on_start=on_start, checkpoint_on_stop=checkpoint_on_stop
    )
    with tracked:  # a run that raises ends its tracked runs as failed
        result = _run_training(
            job, config, spec=spec, plan=plan, out=out, hooks=hooks, resume_from=resume_from, extra_callbacks=extra_callbacks
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
        fields.update(status=TrainingJob.Status.COMPLETED, adapter_dir=str(result.adapter_dir), paused=False)
    job_write(TrainingJob, job.pk, **fields)  # JobLost (nothing written) if the row is not this process's any more
    tracked.end(fields["status"])
    logger.info("Training job %s %s after %s steps", job.pk, fields["status"], result.global_step)
    if fields["status"] == TrainingJob.Status.COMPLETED:
        job_completed.send(sender=TrainingJob, job=db_retry(lambda: TrainingJob.objects.get(pk=job.pk), f"Reading training job #{job.pk}"))
    if fields["status"] == TrainingJob.Status.COMPLETED and "tokens_per_second" in fields and not job.is_preference:
        db_retry(
            lambda: ThroughputMeasurement.objects.create(
                base_model=spec.name,
                device=plan.device,
                # One device's speed: a run on several GPUs trained at about their sum (training_app.estimates).
                tokens_per_second=per_device_speed(fields["tokens_per_second"], plan.device, config.processes),
                source=f"training job #{job.pk}",
            ),
            f"Training job #{job.pk}'s measured speed",
        )


@transaction.atomic
def training_job_auto_resume(pk: int) -> bool:
    """TrainingJob.AUTO_RESUME_FUNCTION: a job that failed because the database stayed away longer than
    TUNA_DB_RETRY_S is queued again by the worker, at most MAX_AUTO_RESUMES times, from its last checkpoint (from
    the start when it saved none; training_job_work keeps one loss per step either way). False when it is not
    resumed: it was resumed so already, or its owner cancelled, paused or resumed it meanwhile. The job takes back
    its own place: the active-jobs limit counted it while it ran."""
    job = TrainingJob.objects.select_for_update().filter(pk=pk).first()
    if job is None or job.status != TrainingJob.Status.FAILED or job.cancel_requested or job.auto_resumes >= MAX_AUTO_RESUMES:
        return False
    checkpoint = resumable_checkpoint(job)
    job.auto_resumes += 1
    _queue_again(job)
    logger.warning(
        "Training job %s resumed by the worker after a database outage, from %s", pk, checkpoint.name if checkpoint else "the start"
    )
    return True


def dataset_jobs_delete(sender, *, dataset: Dataset, **kwargs) -> None:
    """datasets_app.services.dataset_deleting receiver: the dataset's jobs go with it, all or none."""
    jobs = list(dataset.training_jobs.order_by("pk"))
    try:
        training_jobs_delete(jobs=jobs)
    except JobConflict as exc:
        raise DatasetInUse(f"The dataset and its jobs were not deleted: {exc}", job_ids=[job.pk for job in jobs]) from None
