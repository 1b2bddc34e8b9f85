from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.urls import reverse


def dataset_upload_path(instance: Dataset, filename: str) -> str:
    return f"datasets/{instance.owner_id}/{uuid.uuid4().hex}.jsonl"


class Dataset(models.Model):
    class Status(models.TextChoices):
        VALID = "valid", "Valid"
        INVALID = "invalid", "Invalid"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(max_length=200)
    original_filename = models.CharField(max_length=255)
    file = models.FileField(upload_to=dataset_upload_path, max_length=300)
    size_bytes = models.BigIntegerField(default=0)
    format = models.CharField(max_length=32, blank=True)
    validation_status = models.CharField(max_length=16, choices=Status.choices)
    validation_report = models.JSONField(default=dict)
    num_examples = models.PositiveIntegerField(default=0)
    num_train = models.PositiveIntegerField(default=0)
    num_eval = models.PositiveIntegerField(default=0)
    eval_fraction = models.FloatField(default=0.2)
    # A separate held-out file replaces the split: then every example of `file` is trained on.
    eval_file = models.FileField(upload_to=dataset_upload_path, max_length=300, blank=True)
    eval_original_filename = models.CharField(max_length=255, blank=True)
    # The user's own checks of an answer, scored per example in every evaluation of this dataset:
    # [{"name": "...", "kind": "regex" | "contains" | "not_contains" | "one_of", "value": "..." or ["...", ...]}].
    answer_checks = models.JSONField(default=list, blank=True)
    # How many held-out examples the runs of this dataset are scored on (the first N of the held-out set), fixed
    # the first time a run is scored so that every run's figures come from the same examples.
    scoring_size = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["owner", "-created_at"])]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("dataset-detail", args=[self.pk])

    @property
    def is_valid(self) -> bool:
        return self.validation_status == self.Status.VALID

    @property
    def is_preference(self) -> bool:
        """Preference (DPO) data: each example has a chosen and a rejected answer."""
        return self.format == "openai_preference"

    @property
    def has_eval_file(self) -> bool:
        return bool(self.eval_file)

    @property
    def error_count(self) -> int:
        return self.validation_report.get("errors", {}).get("count", 0)

    @property
    def warning_count(self) -> int:
        return self.validation_report.get("warning_count", 0)
