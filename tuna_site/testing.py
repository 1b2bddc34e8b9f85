"""Helpers for tests: small JSONL files built in memory."""

from __future__ import annotations

import json

from django.core.files.uploadedfile import SimpleUploadedFile


def jsonl_file(rows: list, name: str = "data.jsonl") -> SimpleUploadedFile:
    """Rows may be dicts (dumped as JSON) or raw strings/bytes (written as they are)."""
    lines = []
    for row in rows:
        if isinstance(row, bytes):
            lines.append(row)
        elif isinstance(row, str):
            lines.append(row.encode("utf-8"))
        else:
            lines.append(json.dumps(row).encode("utf-8"))
    return SimpleUploadedFile(name, b"\n".join(lines) + b"\n", content_type="application/jsonl")


def pc_rows(count: int, start: int = 0) -> list[dict]:
    """Distinct, clean prompt/completion examples."""
    return [
        {
            "prompt": f"Summarise order number {i}: two blue shirts and one red hat for customer {i}.",
            "completion": f"Order {i} contains three items: two blue shirts and a red hat.",
        }
        for i in range(start, start + count)
    ]


def job_row(owner, dataset, **fields):
    """A training job row in any state, for tests that need one without training: the embedded model and
    an empty config unless ``fields`` say otherwise."""
    from training_app.models import TrainingJob

    return TrainingJob.objects.create(owner=owner, dataset=dataset, **{"base_model": "smollm2-135m-instruct", "config": {}, **fields})
