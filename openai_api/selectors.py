"""Reads for the OpenAI-compatible fine-tuning API: a user's files and jobs by their OpenAI ids.

Another user's object, like a malformed id, is a 404: never a 403 that confirms it exists.
"""

from __future__ import annotations

from django.db.models import CharField, F, Q, QuerySet
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Cast

from datasets_app.models import Dataset
from datasets_app.selectors import datasets_for_user
from openai_api.models import JobFiles
from openai_api.objects import FILE_PREFIX, JOB_PREFIX, number_in
from training_app.models import TrainingJob
from training_app.selectors import jobs_for_user
from tuna_core.errors import Invalid, NotFound


class FileNotFound(NotFound):
    param = "file_id"


class JobNotFound(NotFound):
    param = "fine_tuning_job_id"


def get_file_for_user(user, identifier: str) -> Dataset:
    number = number_in(identifier, FILE_PREFIX)
    dataset = datasets_for_user(user).filter(pk=number).first() if number is not None else None
    if dataset is None:
        raise FileNotFound(f"No such File object: {identifier}")
    return dataset


def get_job_for_user(user, identifier: str) -> TrainingJob:
    number = number_in(identifier, JOB_PREFIX)
    job = jobs_for_user(user).select_related("owner", "parent").filter(pk=number).first() if number is not None else None
    if job is None:
        raise JobNotFound(f"No such fine-tuning job: {identifier}")
    return job


def files_page(user, *, after: str | None, limit: int, ascending: bool) -> tuple[list[Dataset], bool]:
    """The user's files in upload order (newest first unless `ascending`), those past the `after` file. The dataset
    made for a job from its training and validation files is not one the caller uploaded: it stays on the Datasets
    page only."""
    made = JobFiles.objects.exclude(job__dataset=F("training_file")).values("job__dataset")
    rows = datasets_for_user(user).exclude(pk__in=made).order_by("pk" if ascending else "-pk")
    if after:
        rows = rows.filter(pk__gt=_cursor(after, FILE_PREFIX)) if ascending else rows.filter(pk__lt=_cursor(after, FILE_PREFIX))
    found = list(rows[: limit + 1])
    return found[:limit], len(found) > limit


def jobs_page(user, *, after: str | None, limit: int, metadata: dict[str, str]) -> tuple[list[TrainingJob], bool]:
    """Every training job of the user (made here or in the pages), newest first, past the `after` job."""
    rows: QuerySet[TrainingJob] = jobs_for_user(user).select_related("owner", "parent").order_by("-pk")
    if after:
        rows = rows.filter(pk__lt=_cursor(after, JOB_PREFIX))
    for index, (key, value) in enumerate(metadata.items()):  # the key read as it is, never as a lookup path
        rows = rows.alias(**{f"metadata_{index}": Cast(KeyTextTransform(key, "metadata"), CharField())}).filter(
            **{f"metadata_{index}": value}
        )
    found = list(rows[: limit + 1])
    return found[:limit], len(found) > limit


def _cursor(identifier: str, prefix: str) -> int:
    number = number_in(identifier, prefix)
    if number is None:
        raise Invalid(f"after must be an id such as {prefix}12 from a previous page; got {identifier!r}.", param="after")
    return number


def job_files(jobs: list[TrainingJob]) -> dict[int, JobFiles]:
    """The files each job was created with through this API (jobs made in the pages have none)."""
    rows = JobFiles.objects.filter(job__in=jobs).select_related("training_file", "validation_file")
    return {row.job_id: row for row in rows}


def jobs_using(dataset: Dataset) -> list[int]:
    """Ids of the jobs that train on this file, or were given it as their training or validation file."""
    direct = set(dataset.training_jobs.values_list("pk", flat=True))
    named = JobFiles.objects.filter(Q(training_file=dataset) | Q(validation_file=dataset)).values_list("job_id", flat=True)
    return sorted(direct | set(named))
