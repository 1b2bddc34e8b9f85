from __future__ import annotations

from django.db import models


class JobFiles(models.Model):
    """The files a job made through /v1/fine_tuning/jobs was asked for, as the caller named them.

    With a validation file the job trains on a dataset made of both (datasets_app.services.dataset_with_held_out),
    so the job's own dataset is neither; the job still answers with the files it was given. A job made in the
    pages has no row here: its training file is its dataset.
    """

    job = models.OneToOneField("training_app.TrainingJob", on_delete=models.CASCADE, primary_key=True, related_name="openai_files")
    training_file = models.ForeignKey("datasets_app.Dataset", on_delete=models.SET_NULL, null=True, related_name="+")
    validation_file = models.ForeignKey("datasets_app.Dataset", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")

    class Meta:
        verbose_name = "OpenAI job files"
        verbose_name_plural = "OpenAI job files"

    def __str__(self) -> str:
        return f"files of job #{self.job_id}"
