"""The examples a job trains, validates and evaluates on: the split is decided here and nowhere else.

A dataset's file is split by position: the first `num_train` examples are for training, the rest are
held out for the comparison (unless a separate held-out file was uploaded). A job may set the last
`validation` training examples aside: it never trains on them, and their loss picks the checkpoint
that is kept. Held-out examples that also occur among the training examples are never scored.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

from datasets_app.formats import Conversation, to_preference
from datasets_app.models import Dataset
from datasets_app.validation import iter_examples, iter_records

SAMPLE_PATH = Path(__file__).resolve().parents[1] / "samples" / "orders_to_json.jsonl"


def file_examples(path: Path) -> list[Conversation]:
    """Every example of a valid JSONL file on disk (the sample, a bench's data), as chat messages."""
    with path.open("rb") as handle:
        return list(iter_examples(handle))


def training_examples(dataset: Dataset, *, validation: int = 0) -> list[Conversation]:
    """The first `num_train` examples, less the last `validation` of them; never a held-out one."""
    with dataset.file.open("rb") as handle:
        return list(islice(iter_examples(handle), max(0, dataset.num_train - validation)))


def validation_examples(dataset: Dataset, *, validation: int) -> list[Conversation]:
    if validation <= 0:
        return []
    with dataset.file.open("rb") as handle:
        return list(islice(iter_examples(handle), max(0, dataset.num_train - validation), dataset.num_train))


def validation_lines(dataset: Dataset, *, validation: int) -> tuple[int, int] | None:
    """First and last example number (1-based, blank lines not counted) of the validation examples."""
    if validation <= 0:
        return None
    return dataset.num_train - validation + 1, dataset.num_train


def held_out_examples(dataset: Dataset) -> list[Conversation]:
    """The examples the comparison scores: the held-out split or file, without those also trained on."""
    overlap = set(dataset.validation_report.get("split", {}).get("overlap_indexes", []))
    if dataset.has_eval_file:
        with dataset.eval_file.open("rb") as handle:
            examples = list(iter_examples(handle))
    else:
        with dataset.file.open("rb") as handle:
            examples = list(islice(iter_examples(handle), dataset.num_train, None))
    return [example for index, example in enumerate(examples) if index not in overlap]


def preference_pairs(dataset: Dataset) -> list[dict[str, Any]]:
    """The training split of a preference dataset as pairs: {"messages", "tools", "chosen", "rejected",
    "example_index"} (example_index: 0-based position among the file's examples)."""
    with dataset.file.open("rb") as handle:
        records = islice(iter_records(handle), dataset.num_train)
        pairs = []
        for index, (obj, _fmt) in enumerate(records):
            prompt, chosen, rejected = to_preference(obj)
            pairs.append({"messages": list(prompt), "tools": prompt.tools, "chosen": chosen, "rejected": rejected, "example_index": index})
    return pairs
