"""Writes behind OpenAI's fine-tuning API. Each is the same service the pages use (datasets_app, training_app),
reached with OpenAI's names: a file is a dataset, a fine-tuning job is a training job."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from django.core.files.uploadedfile import UploadedFile
from django.db import transaction

from datasets_app import services as datasets
from datasets_app.models import Dataset
from openai_api.models import JobFiles
from openai_api.objects import FILE_PREFIX, first_error, number_in
from openai_api.selectors import jobs_using
from training_app import services as training
from training_app.models import TrainingJob
from tuna_core.errors import Conflict, Invalid
from tuna_llm.catalog import get_catalog

logger = logging.getLogger("tuna.openai_api")

BASE_PREFIX = "base:"
TUNA_JOB_PREFIX = "tuna-job-"
FINE_TUNE_PREFIX = "ft:"


class FileInUse(Conflict):
    param = "file_id"


class ModelNotUsable(Invalid):
    param = "model"


@dataclass(frozen=True)
class JobRequest:
    """A checked POST /v1/fine_tuning/jobs body. `settings` holds only what the caller set (an "auto" value is
    left out, so the product chooses it) under LLM Tuna's names: num_epochs, batch_size, learning_rate_multiplier,
    beta, seed."""

    model: str
    training_file: str
    method: str = "supervised"  # or "dpo"
    validation_file: str | None = None
    suffix: str = ""
    metadata: dict[str, str] | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def file_upload(*, owner, upload: UploadedFile | None, purpose: str) -> Dataset:
    """POST /v1/files: the upload becomes a dataset through the pages' upload path, valid or not (an invalid one
    is kept with its report; a job that uses it fails with the first bad line, as OpenAI's does)."""
    if purpose != "fine-tune":
        raise Invalid(
            f"purpose {purpose!r} is not taken here: LLM Tuna stores files for fine-tuning only (purpose 'fine-tune').", param="purpose"
        )
    return datasets.dataset_create(owner=owner, upload=upload)


def file_delete(*, dataset: Dataset) -> None:
    """DELETE /v1/files/{id}: refused while jobs use the file, since a job keeps its data (to resume, evaluate
    and export it)."""
    jobs = jobs_using(dataset)
    if jobs:
        names = ", ".join(f"ftjob-{pk}" for pk in jobs)
        raise FileInUse(
            f"file-{dataset.pk} is used by fine-tuning job{'s' if len(jobs) != 1 else ''} {names}, which keep their training data "
            "(to resume, evaluate and export them). Delete those jobs on LLM Tuna's Training page first, or delete the dataset there "
            "with its jobs."
        )
    datasets.dataset_delete(dataset=dataset)


# -- jobs ------------------------------------------------------------------------------------------
def starting_model(owner, model: str) -> tuple[str, TrainingJob | None]:
    """The base model name and the fine-tune to start from (None: the base itself) for a job's `model`:
    a base model of this server (its catalog name, with or without "base:"), or one of the user's completed
    fine-tunes by its ft: name or tuna-job-<id>."""
    name = model.strip()
    catalog = get_catalog()
    if name.removeprefix(BASE_PREFIX) in catalog:
        return name.removeprefix(BASE_PREFIX), None
    parent = _fine_tune(owner, name)
    if parent is None:
        known = ", ".join(sorted(catalog))
        raise ModelNotUsable(
            f"Model {model!r} is not available for fine-tuning here. Use a base model of this server ({known}; "
            "also written base:<name>), or one of your completed fine-tunes by its ft: name or tuna-job-<id>."
        )
    if parent.status != TrainingJob.Status.COMPLETED or not parent.adapter_dir:
        raise ModelNotUsable(
            f"Model {model!r} is not ready to train further: its job ftjob-{parent.pk} is {parent.get_status_display().lower()}."
        )
    return parent.base_model, parent


def _fine_tune(owner, name: str) -> TrainingJob | None:
    if name.startswith(TUNA_JOB_PREFIX):
        number = number_in(name, TUNA_JOB_PREFIX)
        return TrainingJob.objects.filter(owner=owner, pk=number).first() if number is not None else None
    if name.startswith(FINE_TUNE_PREFIX):
        if ":ckpt-step-" in name:
            raise ModelNotUsable(
                f"Model {name!r} is a checkpoint: start a new job from the fine-tune's final model (its fine_tuned_model), "
                "or from the base model."
            )
        number = number_in(name.rsplit(":", 1)[-1], "ftjob-")
        job = TrainingJob.objects.filter(owner=owner, pk=number).first() if number is not None else None
        return job if job is not None and job.fine_tuned_model == name else None
    return None


def _named_file(owner, identifier: str | None, param: str) -> Dataset | None:
    if identifier is None:
        return None
    number = number_in(identifier, FILE_PREFIX)
    dataset = Dataset.objects.filter(owner=owner, pk=number).first() if number is not None else None
    if dataset is None:
        raise Invalid(f"invalid {param}: {identifier!r} is not one of your files (upload it with POST /v1/files first).", param=param)
    return dataset


def _file_refusal(training: Dataset, method: str) -> tuple[str, str, str] | None:
    """(code, message, param) when the training file cannot be used as asked: the job is then created failed, as
    OpenAI's is. The validation file is judged by dataset_with_held_out (a held-out file may be smaller than a
    training file must be)."""
    if not training.is_valid:
        return "invalid_training_file", f"The training file file-{training.pk} is invalid: {first_error(training)}", "training_file"
    if method == "dpo" and not training.is_preference:
        return (
            "invalid_training_file",
            f"The dpo method trains on a preference file (lines with input, preferred_output and non_preferred_output); "
            f"file-{training.pk} ({training.original_filename}) holds {training.format or 'other'} examples.",
            "training_file",
        )
    if method == "supervised" and training.is_preference:
        return (
            "invalid_training_file",
            f"file-{training.pk} ({training.original_filename}) is a preference file: train on it with method type 'dpo'.",
            "training_file",
        )
    return None


def fine_tuning_job_create(*, owner, request: JobRequest) -> TrainingJob:
    """POST /v1/fine_tuning/jobs. A file that cannot be used gives a job that is `failed` at once, with OpenAI's
    error code and the first bad line, and nothing else is made (training_app.services.training_job_refused).
    A validation file becomes the held-out set of a dataset made of both files."""
    base_model, parent = starting_model(owner, request.model)
    training_file = _named_file(owner, request.training_file, "training_file")
    validation_file = _named_file(owner, request.validation_file, "validation_file")
    refusal = _file_refusal(training_file, request.method)
    dataset = training_file
    if refusal is None and validation_file is not None:
        try:
            dataset = datasets.dataset_with_held_out(owner=owner, training=training_file, held_out=validation_file)
        except Invalid as exc:
            if exc.status != Invalid.status:
                raise  # storage full: a limit of the account, not a fault of the file
            refusal = (
                "invalid_validation_file",
                f"The validation file file-{validation_file.pk} cannot be used: {exc.message}",
                "validation_file",
            )
    if refusal is not None:
        code, message, param = refusal
        job = training.training_job_refused(
            owner=owner,
            dataset=training_file,
            base_model=base_model,
            code=code,
            message=message,
            param=param,
            suffix=request.suffix,
            metadata=request.metadata,
            method=TrainingJob.Method.DPO if request.method == "dpo" else TrainingJob.Method.SFT,
        )
        JobFiles.objects.create(job=job, training_file=training_file, validation_file=validation_file)
        logger.info("Fine-tuning job %s refused for %s: %s", job.pk, owner, code)
        return job
    config_data = {"base_model": base_model, **request.settings}
    common = {"owner": owner, "dataset": dataset, "config_data": config_data, "parent": parent, "suffix": request.suffix}
    try:
        with transaction.atomic():
            if request.method == "dpo":
                job = training.preference_file_job_start(**common, metadata=request.metadata)
            else:
                job = training.training_job_start(**common, metadata=request.metadata)
            JobFiles.objects.create(job=job, training_file=training_file, validation_file=validation_file)
    except BaseException:
        if dataset is not training_file:  # nothing half-made: the dataset made for this job goes with it
            datasets.dataset_delete(dataset=dataset)
        raise
    return job
