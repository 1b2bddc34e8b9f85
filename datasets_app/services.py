"""Writes for datasets. Pages, API and admin all come through here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.files.base import ContentFile, File
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.dispatch import Signal

from datasets_app.formats import PREFERENCE
from datasets_app.models import Dataset
from datasets_app.uploads import max_upload_bytes, too_large_message
from datasets_app.validation import DEFAULT_MAX_SEQ_LENGTH, JsonlValidator, fingerprint, iter_examples
from tuna_core import quotas
from tuna_core.disk import DiskFull, DiskLow, check_free_space, disk_full
from tuna_core.errors import Conflict, Invalid, NotFound, TooLarge
from tuna_llm.catalog import get_base_model_spec
from tuna_llm.tokencount import token_counter_for

logger = logging.getLogger("tuna.datasets")

MIN_EVAL_FRACTION = 0.05
MAX_EVAL_FRACTION = 0.5
DEFAULT_EVAL_FRACTION = 0.2
LENGTH_BUCKET = 16


# Sent inside dataset_delete's transaction when the user asked to delete the dataset's training jobs with it:
# the app that owns those rows (training) deletes them, or raises DatasetInUse and nothing is deleted.
dataset_deleting = Signal()


class UploadRejected(Invalid):
    """An upload that cannot become a dataset at all (as opposed to one kept as invalid)."""


class UploadTooLarge(TooLarge, UploadRejected):
    """Larger than TUNA_MAX_UPLOAD_MB."""


class StorageFull(quotas.StorageFull, UploadRejected):
    """The user's files (datasets, jobs, exports) would take more than TUNA_MAX_STORAGE_MB_PER_USER."""


class StorageDiskFull(DiskFull, UploadRejected):
    """The server's disk filled while the file was stored (503): nothing was kept."""


class StorageDiskLow(DiskLow, UploadRejected):
    """The server's disk keeps less free than TUNA_MIN_FREE_DISK_MB plus the upload (503): refused before it is read."""


class DatasetInUse(Conflict):
    """A dataset that training jobs use, deleted without them (or with one that cannot go yet)."""

    def __init__(self, message: str, *, job_ids: list[int] | None = None) -> None:
        super().__init__(message)
        self.job_ids = job_ids or []


@dataclass(frozen=True)
class _Validated:
    report: dict[str, Any]
    total_lens: list[int]
    fingerprints: list[bytes]


def _check_upload(upload: UploadedFile | None) -> UploadedFile:
    if upload is None:
        raise UploadRejected('No file was sent. Attach a .jsonl file in the "file" field.')
    if not upload.name.lower().endswith(".jsonl"):
        raise UploadRejected(
            f'"{upload.name}" is not a .jsonl file. Upload JSON Lines: one JSON object per line, in a file ending in .jsonl.'
        )
    if upload.size > max_upload_bytes():
        raise UploadTooLarge(too_large_message())
    if upload.size == 0:
        raise UploadRejected(f'"{upload.name}" is empty. Add one JSON object per line.')
    check_free_space(upload.size, "This file", error=StorageDiskLow)
    upload.seek(0)
    head = upload.read(8192)
    upload.seek(0)
    if b"\x00" in head:
        raise UploadRejected(
            f'"{upload.name}" is a binary file, not JSON Lines text. Export your examples as UTF-8 text, one JSON object per line.'
        )
    return upload


# An invalid file cannot be trained whatever the rest holds: validation goes on this many lines past its first error,
# or to this many errors, then stops (the request thread is not held for minutes by a file that is invalid anyway).
LINES_AFTER_FIRST_ERROR = 5_000
MAX_ERRORS_VALIDATED = 1_000


def _validate(upload: UploadedFile, *, max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH) -> _Validated:
    counter = token_counter_for(get_base_model_spec())
    validator = JsonlValidator(counter, max_seq_length=max_seq_length)
    upload.seek(0)
    stopped_at = None

    def lines():  # File.__iter__ yields lines across chunk boundaries: streamed
        nonlocal stopped_at
        first_error = None
        for number, line in enumerate(upload, start=1):
            if first_error is None and validator.errors.count:
                first_error = number
            if first_error is not None and (
                number - first_error >= LINES_AFTER_FIRST_ERROR or validator.errors.count >= MAX_ERRORS_VALIDATED
            ):
                stopped_at = number
                return
            yield line

    validator.feed(lines())
    if stopped_at is not None:
        validator.errors.add(
            None,
            f"Validation stopped after line {stopped_at - 1} ({validator.errors.count} errors by then): the file cannot be trained "
            "as it is. Fix the errors shown and upload it again to check the rest.",
        )
    return _Validated(validator.report(), validator.total_lens.tolist(), validator.fingerprints)


def length_counts(lengths: list[int]) -> dict[str, int]:
    """Token lengths rounded up to LENGTH_BUCKET, counted: enough for estimates at any max_seq_length."""
    counts: dict[str, int] = {}
    for length in lengths:
        key = str(-(-length // LENGTH_BUCKET) * LENGTH_BUCKET)
        counts[key] = counts.get(key, 0) + 1
    return counts


def _overlap(held_out: list[bytes], trained: set[bytes]) -> list[int]:
    """Positions of held-out examples that also occur among the trained ones (never scored)."""
    return [index for index, key in enumerate(held_out) if key in trained]


def split_counts(examples: int, eval_fraction: float) -> tuple[int, int]:
    """Train and held-out counts: the last `eval_fraction` of examples, at least one, held out."""
    held_out = min(examples - 1, max(1, round(examples * eval_fraction))) if examples > 1 else 0
    return examples - held_out, held_out


def _check_eval_fraction(eval_fraction: float) -> float:
    if not MIN_EVAL_FRACTION <= eval_fraction <= MAX_EVAL_FRACTION:
        raise UploadRejected(
            f"eval_fraction must be between {MIN_EVAL_FRACTION} and {MAX_EVAL_FRACTION} "
            f"(the share of examples held out for evaluation); got {eval_fraction:g}."
        )
    return eval_fraction


storage_limit_bytes = quotas.storage_limit_bytes


def invalid_keep_bytes() -> int:
    return int(settings.TUNA_INVALID_UPLOAD_KEEP_KB * 1024)


def _check_storage(owner, adding: int) -> None:
    """Everything the user keeps (datasets, checkpoints, adapters, exports) plus `adding` within their quota; takes the
    user's row lock (inside a transaction, two uploads count in turn)."""
    quotas.check_storage(owner, adding=adding, action="This file", error=StorageFull)


def _save_file(dataset: Dataset, field: str, filename: str, content) -> str:
    """FieldFile.save without the row, except that a write cut short (a full disk) leaves no partial file behind: the
    partial file goes and the user is told the disk is full (503), whatever the storage left."""
    model_field = dataset._meta.get_field(field)
    storage, target = model_field.storage, model_field.generate_filename(dataset, filename)
    existed = storage.exists(target)  # never true with its random name; never removed if it were
    try:
        saved = storage.save(target, content, max_length=model_field.max_length)
    except OSError as exc:
        if not existed:
            storage.delete(target)
        if disk_full(exc):
            raise StorageDiskFull(f"The file {filename!r}") from exc
        raise
    setattr(dataset, field, saved)
    return saved


def _store(dataset: Dataset, field: str, name: str, content, *, adding: int) -> None:
    """Store the file, then write the row if the user's storage allows it; on any failure the file goes again.

    The row is written under the user's row lock, so two concurrent uploads cannot both squeeze under the limit.
    """
    _save_file(dataset, field, name, content)
    try:
        with transaction.atomic():
            _check_storage(dataset.owner_id, adding)
            dataset.save()
    except BaseException:
        getattr(dataset, field).delete(save=False)  # no orphaned file when the row is not written
        raise


def _stored_size(field) -> int:
    """The size of a stored file; 0 for none (or one removed behind the database's back)."""
    if not field:
        return 0
    try:
        return field.storage.size(field.name)
    except OSError:
        return 0


def dataset_files_remove(sender, *, instance: Dataset, **kwargs) -> None:
    """post_delete receiver: a deleted dataset's files go once the deletion is committed, whoever deleted it (a page, the
    admin, or the deletion of its owner)."""
    files = [(f.storage, f.name) for f in (instance.file, instance.eval_file) if f]
    transaction.on_commit(lambda: [storage.delete(name) for storage, name in files])


def _invalid_head(upload: UploadedFile) -> tuple[ContentFile | UploadedFile, dict[str, int] | None]:
    """An invalid upload keeps only its first TUNA_INVALID_UPLOAD_KEEP_KB (whole lines): enough to see the
    first errors in place, while the report keeps every error of the whole file."""
    limit = invalid_keep_bytes()
    if upload.size <= limit:
        return upload, None
    upload.seek(0)
    head = upload.read(limit)
    cut = head.rfind(b"\n")
    head = head[: cut + 1] if cut >= 0 else head
    return ContentFile(head), {"bytes": len(head), "of_bytes": upload.size, "lines": head.count(b"\n")}


def dataset_create(*, owner, upload: UploadedFile | None, name: str = "", eval_fraction: float = DEFAULT_EVAL_FRACTION) -> Dataset:
    """Validate an upload and store it as a dataset, valid or not (an invalid one keeps its report and the
    first TUNA_INVALID_UPLOAD_KEEP_KB of the file); the user's stored datasets stay within their quota."""
    eval_fraction = _check_eval_fraction(eval_fraction)
    upload = _check_upload(upload)
    # Charged its whole size before it is read: a user at the quota cannot make the server validate file after file.
    _check_storage(owner, upload.size)
    validated = _validate(upload)
    report = validated.report
    valid = report["errors"]["count"] == 0
    examples = report["valid_examples"]
    train, held_out = split_counts(examples, eval_fraction) if valid else (0, 0)
    overlap = _overlap(validated.fingerprints[train:], set(validated.fingerprints[:train])) if valid else []
    held_out -= len(overlap)
    report["split"] = {
        "train": train,
        "eval": held_out,
        "eval_fraction": eval_fraction,
        "train_tokens": sum(min(t, DEFAULT_MAX_SEQ_LENGTH) for t in validated.total_lens[:train]),
        "train_length_counts": length_counts(validated.total_lens[:train]),
        "source": "split",
        "overlap": len(overlap),
        "overlap_indexes": overlap,
    }
    content, kept = (upload, None) if valid else _invalid_head(upload)
    if kept is not None:
        report["kept"] = kept
    dataset = Dataset(
        owner=owner,
        name=(name.strip() or upload.name.rsplit(".", 1)[0])[:200],
        original_filename=upload.name[:255],
        size_bytes=content.size,
        format=report["format"],
        validation_status=Dataset.Status.VALID if valid else Dataset.Status.INVALID,
        validation_report=report,
        num_examples=examples,
        num_train=train,
        num_eval=held_out,
        eval_fraction=eval_fraction,
    )
    content.seek(0)
    _store(dataset, "file", upload.name, content, adding=content.size)
    logger.info("Dataset %s created by %s: %s, %s examples", dataset.pk, owner, dataset.validation_status, examples)
    return dataset


def dataset_attach_eval_file(*, dataset: Dataset, upload: UploadedFile | None) -> dict[str, Any]:
    """Use a separate held-out file instead of the split. Returns the held-out file's report.

    An invalid held-out file is not stored; its report says what to fix.
    """
    if not dataset.is_valid:
        raise UploadRejected("This dataset is invalid; fix the training file first.")
    upload = _check_upload(upload)
    _check_storage(dataset.owner_id, upload.size - _stored_size(dataset.eval_file))  # charged before it is read
    validated = _validate(upload)
    report = validated.report
    if report["errors"]["count"]:
        # Fewer than MIN_EXAMPLES is fine for a held-out set: only real line errors block it.
        line_errors = [e for e in report["errors"]["items"] if e["line"] is not None]
        if line_errors or report["valid_examples"] == 0:
            raise UploadRejected(_first_errors(report))
    if (report["format"] == PREFERENCE) != dataset.is_preference:
        raise UploadRejected(_kind_mismatch(dataset.original_filename, upload.name, dataset.is_preference))
    overlap = _overlap(validated.fingerprints, _file_fingerprints(dataset))
    if len(overlap) == len(validated.fingerprints):
        raise UploadRejected(
            f"Every example of {upload.name!r} also occurs in the training file. Held-out examples must be ones the model "
            "was not trained on, or the comparison flatters the fine-tune: upload examples that are not in the training file."
        )
    upload.seek(0)
    # The row is locked while the file is stored and the reference replaced: concurrent uploads to one dataset go in
    # turn, each removing the file it replaced, so exactly one held-out file is left and it is the one the row names.
    with transaction.atomic():
        locked = Dataset.objects.select_for_update().get(pk=dataset.pk)
        field = locked.eval_file
        old_name = field.name or None
        old_size = _stored_size(field) if old_name else 0
        new_name = _save_file(locked, "eval_file", upload.name, upload)
        field = locked.eval_file
        try:
            _check_storage(locked.owner_id, upload.size - old_size)
            locked.eval_original_filename = upload.name[:255]
            locked.num_eval = report["valid_examples"] - len(overlap)
            locked.num_train = locked.num_examples
            split = dict(locked.validation_report.get("split", {}))
            stats = locked.validation_report.get("stats", {})
            split.update(
                train=locked.num_train,
                eval=locked.num_eval,
                source="file",
                train_tokens=stats.get("total_tokens", split.get("train_tokens", 0)),
                train_length_counts=length_counts(validated.total_lens),
                overlap=len(overlap),
                overlap_indexes=overlap,
            )
            locked.validation_report = {**locked.validation_report, "split": split}
            locked.save(update_fields=["eval_file", "eval_original_filename", "num_eval", "num_train", "validation_report"])
        except BaseException:
            field.storage.delete(new_name)  # the row keeps its file; the new one goes
            raise
        if old_name and old_name != new_name:
            transaction.on_commit(lambda: field.storage.delete(old_name))
    for name in ("eval_file", "eval_original_filename", "num_eval", "num_train", "validation_report"):
        setattr(dataset, name, getattr(locked, name))
    return report


def dataset_with_held_out(*, owner, training: Dataset, held_out: Dataset) -> Dataset:
    """A new valid dataset that trains on every example of `training` and holds out the examples of `held_out`
    (its held-out file), for a job given both a training and a validation file (OpenAI's validation_file).

    Both files are copied, so deleting either source later leaves this one whole. The held-out file may have
    fewer examples than a training file needs, but no line errors.
    """
    if training.owner_id != owner.pk or held_out.owner_id != owner.pk:
        raise NotFound("No such dataset.")  # another user's dataset is never confirmed to exist
    if not training.is_valid:
        raise Invalid(f"The training file {training.original_filename!r} is invalid: {_errors_text(training.validation_report)}")
    report = held_out.validation_report
    line_errors = [e for e in report.get("errors", {}).get("items", []) if e["line"] is not None]
    if not held_out.is_valid and (line_errors or not held_out.num_examples or report.get("kept")):
        raise Invalid(f"The held-out file {held_out.original_filename!r} is invalid: {_errors_text(report)}")
    if training.is_preference != held_out.is_preference:
        raise Invalid(_kind_mismatch(training.original_filename, held_out.original_filename, training.is_preference))
    with held_out.file.open("rb") as handle:
        held_out_keys = [fingerprint(messages) for messages in iter_examples(handle)]
    overlap = _overlap(held_out_keys, _file_fingerprints(training))
    if len(overlap) == len(held_out_keys):
        raise Invalid(
            f"Every example of {held_out.original_filename!r} also occurs in {training.original_filename!r}. Held-out examples "
            "must be ones the model is not trained on, or the comparison flatters the fine-tune."
        )
    split = dict(training.validation_report.get("split", {}))
    stats = training.validation_report.get("stats", {})
    split.update(
        train=training.num_examples,
        eval=len(held_out_keys) - len(overlap),
        source="file",
        train_tokens=stats.get("total_tokens", split.get("train_tokens", 0)),
        overlap=len(overlap),
        overlap_indexes=overlap,
    )
    dataset = Dataset(
        owner=owner,
        name=training.name,
        original_filename=training.original_filename,
        size_bytes=training.size_bytes,
        format=training.format,
        validation_status=Dataset.Status.VALID,
        validation_report={**training.validation_report, "split": split},
        num_examples=training.num_examples,
        num_train=training.num_examples,
        num_eval=len(held_out_keys) - len(overlap),
        eval_fraction=training.eval_fraction,
        eval_original_filename=held_out.original_filename,
    )
    with training.file.open("rb") as train_handle, held_out.file.open("rb") as held_handle:
        _save_file(dataset, "file", training.original_filename, File(train_handle))
        try:
            _store(dataset, "eval_file", held_out.original_filename, File(held_handle), adding=training.size_bytes + held_out.file.size)
        except BaseException:
            dataset.file.delete(save=False)
            raise
    logger.info("Dataset %s created by %s from datasets %s (training) and %s (held out)", dataset.pk, owner, training.pk, held_out.pk)
    return dataset


def _kind_mismatch(training_name: str, held_out_name: str, training_is_preference: bool) -> str:
    preference, plain = (training_name, held_out_name) if training_is_preference else (held_out_name, training_name)
    return (
        f"{preference!r} holds preference data (input, preferred_output, non_preferred_output) and {plain!r} does not; "
        "a held-out file must be of the same kind as the training file."
    )


def _errors_text(report: dict[str, Any], limit: int = 3) -> str:
    items = report.get("errors", {}).get("items", [])[:limit]
    parts = [f"line {e['line']}: {e['message']}" if e["line"] else e["message"] for e in items]
    return "; ".join(parts) or "it has no examples"


def _file_fingerprints(dataset: Dataset) -> set[bytes]:
    with dataset.file.open("rb") as handle:
        return {fingerprint(messages) for messages in iter_examples(handle)}


def _first_errors(report: dict[str, Any], limit: int = 5) -> str:
    items = report["errors"]["items"][:limit]
    parts = [f"line {e['line']}: {e['message']}" if e["line"] else e["message"] for e in items]
    more = report["errors"]["count"] - len(items)
    return "The held-out file has errors: " + "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


@transaction.atomic
def dataset_delete(*, dataset: Dataset, with_jobs: bool = False) -> None:
    """Delete a dataset and its files (once committed); its training jobs too when `with_jobs`, or refuse.

    All or nothing: when one of the jobs cannot go yet (training, or being evaluated), nothing is deleted.
    """
    jobs = list(dataset.training_jobs.order_by("pk"))
    if jobs and not with_jobs:
        many = len(jobs) != 1
        raise DatasetInUse(
            f"This dataset is used by {len(jobs)} training job{'s' if many else ''} ({', '.join(f'#{job.pk}' for job in jobs)}). "
            f"Delete {'them' if many else 'it'} with the dataset ({'their' if many else 'its'} evaluations and files go too).",
            job_ids=[job.pk for job in jobs],
        )
    if jobs:
        dataset_deleting.send(sender=Dataset, dataset=dataset)
    dataset.delete()  # its files go once committed (dataset_files_remove, however a dataset is deleted)
