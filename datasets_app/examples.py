"""The examples a job trains, validates and evaluates on: the split is decided here and nowhere else.

A dataset's file is split by position: the first `num_train` examples are for training, the rest are
held out for the comparison (unless a separate held-out file was uploaded). A job may set the last
`validation` training examples aside: it never trains on them, and their loss picks the checkpoint
that is kept. Held-out examples that also occur among the training examples are never scored.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from datasets_app.models import Dataset
from datasets_app.validation import iter_examples
from tuna_llm.prompting import Message

SAMPLE_PATH = Path(__file__).resolve().parents[1] / "samples" / "orders_to_json.jsonl"


def file_examples(path: Path) -> list[list[Message]]:
    """Every example of a valid JSONL file on disk (the sample, a bench's data), as chat messages."""
    with path.open("rb") as handle:
        return list(iter_examples(handle))


def training_examples(dataset: Dataset, *, validation: int = 0) -> list[list[Message]]:
    """The first `num_train` examples, less the last `validation` of them; never a held-out one."""
    with dataset.file.open("rb") as handle:
        return list(islice(iter_examples(handle), max(0, dataset.num_train - validation)))


def validation_examples(dataset: Dataset, *, validation: int) -> list[list[Message]]:
    if validation <= 0:
        return []
    with dataset.file.open("rb") as handle:
        return list(islice(iter_examples(handle), max(0, dataset.num_train - validation), dataset.num_train))


def validation_lines(dataset: Dataset, *, validation: int) -> tuple[int, int] | None:
    """First and last example number (1-based, blank lines not counted) of the validation examples."""
    if validation <= 0:
        return None
    return dataset.num_train - validation + 1, dataset.num_train


def held_out_examples(dataset: Dataset) -> list[list[Message]]:
    """The examples the comparison scores: the held-out split or file, without those also trained on."""
    overlap = set(dataset.validation_report.get("split", {}).get("overlap_indexes", []))
    if dataset.has_eval_file:
        with dataset.eval_file.open("rb") as handle:
            examples = list(iter_examples(handle))
    else:
        with dataset.file.open("rb") as handle:
            examples = list(islice(iter_examples(handle), dataset.num_train, None))
    return [example for index, example in enumerate(examples) if index not in overlap]
