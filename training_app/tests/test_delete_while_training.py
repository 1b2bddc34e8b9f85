"""A job (or its owner) deleted while it trains leaves no file: the trainer may write a checkpoint after the post_delete
receiver removed the folder, so the run removes it again once it finds its row gone."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from transformers import TrainerCallback

from training_app import services
from training_app.models import TrainingJob
from tuna_core.jobs import job_run


def files_under(folder: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names)


class DeleteTheOwnerAt(TrainerCallback):
    """At step `step`, once its progress is written and before its checkpoint is saved, the job's owner is deleted (the
    admin, or the ORM): their jobs and files go while this one trains (as a deletion during a long save would)."""

    def __init__(self, owner_id: int, step: int) -> None:
        self.owner_id, self.step = owner_id, step

    def on_log(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            get_user_model().objects.filter(pk=self.owner_id).delete()


@pytest.mark.model
@pytest.mark.django_db(transaction=True)
def test_it_leaves_no_file_of_a_user_deleted_while_their_job_trains(alice, valid_dataset, data_dir):
    config = {"max_steps": 4, "batch_size": 2, "max_seq_length": 96, "save_steps": 1, "eval_examples": 0}
    job = services.training_job_start(owner=alice, dataset=valid_dataset, config_data=config)
    job_run(TrainingJob, job.pk, partial(services.training_job_work, extra_callbacks=(DeleteTheOwnerAt(alice.pk, 2),)))
    assert not TrainingJob.objects.filter(pk=job.pk).exists()
    # The post_delete receiver removed the folder at step 2; the trainer saved checkpoint-2 after it (a new folder);
    # the run stopped at step 3 (its row gone) and removed the folder again.
    assert not (data_dir / "jobs" / str(job.pk)).exists(), files_under(data_dir / "jobs")
