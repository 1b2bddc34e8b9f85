"""Reads for datasets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import islice
from typing import Any

from django.db.models import QuerySet, Sum
from django.shortcuts import get_object_or_404

from datasets_app.formats import ExampleError, Message, detect_format, normalise
from datasets_app.models import Dataset
from datasets_app.validation import unsafe_text

EXAMPLES_PER_PAGE = 20


def datasets_for_user(user) -> QuerySet[Dataset]:
    return Dataset.objects.filter(owner=user)


def dataset_storage_bytes(user) -> int:
    """What the user's stored dataset files take: training files (size_bytes) and held-out files."""
    datasets = Dataset.objects.filter(owner=user)
    total = datasets.aggregate(total=Sum("size_bytes"))["total"] or 0
    for dataset in datasets.exclude(eval_file="").only("eval_file"):
        try:
            total += dataset.eval_file.size
        except OSError:  # a file removed behind the database's back takes no room
            pass
    return total


def get_dataset_for_user(user, pk: int) -> Dataset:
    """Another user's dataset is a 404, never a 403 that confirms it exists."""
    return get_object_or_404(Dataset, pk=pk, owner=user)


@dataclass(frozen=True)
class ExampleRow:
    number: int  # 1-based position among non-blank lines
    line: int
    messages: list[dict[str, Any]] | None  # a Conversation (its tools in .tools); a preference line: prompt + chosen
    raw: str | None  # shown when the line could not be read as an example
    held_out: bool
    rejected: Message | None = None  # a preference line's rejected answer

    @property
    def tools(self) -> list[dict[str, Any]]:
        return getattr(self.messages, "tools", None) or []

    @property
    def prompt(self) -> list[dict[str, Any]]:
        return list(self.messages[:-1]) if self.messages else []


def dataset_examples(dataset: Dataset, *, offset: int = 0, limit: int = 5) -> list[ExampleRow]:
    """Examples in file order, read lazily: only the requested window is parsed."""
    rows = []
    with dataset.file.open("rb") as handle:
        numbered = ((line, raw) for line, raw in enumerate(handle, start=1) if raw.strip())
        for number, (line, raw) in enumerate(islice(numbered, offset, offset + limit), start=offset + 1):
            rows.append(_row(number, line, raw, dataset))
    return rows


def _row(number: int, line: int, raw: bytes, dataset: Dataset) -> ExampleRow:
    held_out = dataset.is_valid and not dataset.has_eval_file and number > dataset.num_train
    try:
        obj = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
        fmt = detect_format(obj) if isinstance(obj, dict) and not unsafe_text(obj) else None
        if fmt is None:
            raise ExampleError("unreadable")
        read = normalise(obj, fmt)
        return ExampleRow(number, line, read.conversation, None, held_out, read.rejected)
    except (ValueError, RecursionError, ExampleError):  # undecodable, not JSON, nested too deep, a 4300-digit number
        return ExampleRow(number, line, None, raw.decode("utf-8", errors="replace")[:2000], held_out)
