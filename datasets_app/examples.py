"""The examples a job trains and evaluates on: the split is decided here and nowhere else."""

from __future__ import annotations

from itertools import islice

from datasets_app.models import Dataset
from datasets_app.validation import iter_examples
from inference_app.prompting import Message


def training_examples(dataset: Dataset) -> list[list[Message]]:
    """The first `num_train` examples; the held-out ones are never among them."""
    with dataset.file.open("rb") as handle:
        return list(islice(iter_examples(handle), dataset.num_train))


def held_out_examples(dataset: Dataset) -> list[list[Message]]:
    if dataset.has_eval_file:
        with dataset.eval_file.open("rb") as handle:
            return list(iter_examples(handle))
    with dataset.file.open("rb") as handle:
        return list(islice(iter_examples(handle), dataset.num_train, None))
