"""Task-aware scores: what exact match cannot see. Django-free.

Exact match counts a JSON answer with its keys in another order, or with one wrong field out of five, the same as
garbage. These scores look at the task instead:

- **JSON** (when the reference parses as a JSON object or array): ``json_valid`` (the answer, stripped, parses as a
  JSON object or array) and ``field_accuracy``: of every field path in the reference or the answer (``customer.name``,
  ``items[1].qty``; nested objects and arrays are walked, arrays by position), the share present in both with equal
  values (key order and whitespace ignored; 12 and 12.0 are equal, 12 and "12" are not). ``fields_differ`` lists the
  paths that differ (missing, extra or another value; at most ``MAX_FIELDS_SHOWN``). An answer that is not valid JSON
  scores 0 on both.
- **Labels** (classification, decided over the whole run by ``label_set``): when the references come from a small
  fixed set, each answer is read as a label (case, surrounding whitespace and quotes, and a final full stop ignored)
  or "(other)"; label accuracy, accuracy per label and a confusion table (reference label -> answer label -> count).
- **Checks**: the dataset's own checks (``Dataset.answer_checks``), each ``{"name", "kind", "value"}``:
  ``regex`` (``re.search`` finds the pattern in the answer: anchor it with ``^...$`` to match the whole answer),
  ``contains`` / ``not_contains`` (the text, case-sensitive, is / is not in the answer), ``one_of`` (the answer,
  surrounding whitespace ignored, equals one of the listed values). 1.0 passed, 0.0 failed, per example.

The headline ``task_score`` of a run is the first that applies of: JSON field accuracy, label accuracy, checks passed
(the mean of the checks' pass rates); ``task_score_label`` names it, ``task_score_key`` is "field_accuracy", "labels"
or "checks". Absent when none applies.

Functions:

- ``task_scores(answer_text: str, reference_text: str, checks: list[dict]) -> dict``: one example's scores (only the
  keys that apply: ``json_valid``, ``field_accuracy``, ``fields_differ``, ``checks``); ``metrics.answer_quality`` merges
  them into each example's scores.
- ``summarise_task_scores(scores: Sequence[dict], answers: Sequence[str], references: Sequence[str]) -> dict``: a
  run's summary keys from per-example scores (``json_valid_rate``, ``field_accuracy``, ``json_examples``, ``labels``,
  ``checks``, ``task_score``, ``task_score_label``, ``task_score_key``; only those that apply); ``metrics.summarise``
  merges them into each model's summary.
- ``summary_task_score(answers: Sequence[str], references: Sequence[str], checks: Sequence[dict] = ()) -> dict``: the
  same summary straight from answers and references (for benches: ``["task_score"]``, ``["task_score_label"]``).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

CHECK_KINDS = ("regex", "contains", "not_contains", "one_of")
MAX_FIELDS_SHOWN = 50  # fields_differ keeps at most this many paths (field_accuracy counts them all)

# Classification: at least MIN_LABEL_EXAMPLES references, from 2 to MAX_LABELS distinct labels, each at most
# MAX_LABEL_CHARS characters and MAX_LABEL_WORDS words, and at most half as many labels as references (so most
# labels repeat). References that parse as JSON are never labels.
MAX_LABELS = 20
MAX_LABEL_CHARS = 40
MAX_LABEL_WORDS = 5
MIN_LABEL_EXAMPLES = 4
OTHER_LABEL = "(other)"

TASK_SCORE_LABELS = {"field_accuracy": "JSON field accuracy", "labels": "Label accuracy", "checks": "Checks passed"}

_SPACE = re.compile(r"\s+")


# --- JSON ------------------------------------------------------------------------------------------------------------


def parse_json(text: str) -> dict | list | None:
    """The text as a JSON object or array, or None (any other JSON value, or not JSON)."""
    try:
        value = json.loads(text.strip())
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, (dict, list)) else None


def json_fields(value: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of a JSON value by its path: ``{"a": {"b": 1}, "c": [{"d": 2}]}`` -> ``{"a.b": 1, "c[0].d": 2}``.

    An empty object or array is a leaf itself; the root's own path is "(root)"."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(json_fields(item, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, item in enumerate(value):
            out.update(json_fields(item, f"{path}[{i}]"))
        return out
    return {path or "(root)": value}


def same_value(a: Any, b: Any) -> bool:
    """JSON values equal: numbers by value (12 == 12.0, but true is not 1), strings after Unicode NFC."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    if isinstance(a, str) and isinstance(b, str):
        return unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", b)
    return type(a) is type(b) and a == b  # None, and the empty {} / [] leaves


def json_scores(answer_text: str, reference: dict | list) -> dict[str, Any]:
    """``json_valid``, ``field_accuracy`` and ``fields_differ`` of an answer against a parsed JSON reference."""
    expected = json_fields(reference)
    answer = parse_json(answer_text)
    if answer is None:
        return {"json_valid": 0.0, "field_accuracy": 0.0, "fields_differ": list(expected)[:MAX_FIELDS_SHOWN]}
    got = json_fields(answer)
    paths = [*expected, *(path for path in got if path not in expected)]
    differ = [path for path in paths if not (path in expected and path in got and same_value(expected[path], got[path]))]
    return {
        "json_valid": 1.0,
        "field_accuracy": (len(paths) - len(differ)) / len(paths),
        "fields_differ": differ[:MAX_FIELDS_SHOWN],
    }


# --- checks ----------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _pattern(value: str) -> re.Pattern | None:
    try:
        return re.compile(value)
    except (re.error, TypeError, RecursionError):
        return None


def check_passes(check: dict, answer_text: str) -> bool | None:
    """Whether an answer passes one check; None when the check cannot be applied (an unknown kind, a bad regex)."""
    kind, value = check.get("kind"), check.get("value")
    if kind == "regex":
        pattern = _pattern(value) if isinstance(value, str) else None
        return None if pattern is None else pattern.search(answer_text) is not None
    if kind == "contains" and isinstance(value, str):
        return value in answer_text
    if kind == "not_contains" and isinstance(value, str):
        return value not in answer_text
    if kind == "one_of" and isinstance(value, list):
        return answer_text.strip() in {str(v).strip() for v in value}
    return None


def check_scores(answer_text: str, checks: Sequence[dict]) -> dict[str, float]:
    """{check name: 1.0 passed / 0.0 failed}; checks that cannot be applied are left out."""
    out = {}
    for check in checks:
        passed = check_passes(check, answer_text)
        if passed is not None:
            out[str(check.get("name") or check.get("kind"))] = 1.0 if passed else 0.0
    return out


# --- one example -----------------------------------------------------------------------------------------------------


def task_scores(answer_text: str, reference_text: str, checks: Sequence[dict] = ()) -> dict[str, Any]:
    """One example's task-aware scores: the JSON ones when the reference is a JSON object or array, the checks when
    the dataset has any (only the keys that apply)."""
    out: dict[str, Any] = {}
    reference = parse_json(reference_text)
    if reference is not None:
        out.update(json_scores(answer_text, reference))
    if checks:
        scored = check_scores(answer_text, checks)
        if scored:
            out["checks"] = scored
    return out


# --- labels ----------------------------------------------------------------------------------------------------------


def label_key(text: str) -> str:
    """How an answer is read as a label: case, surrounding whitespace and quotes, and a final full stop ignored."""
    text = _SPACE.sub(" ", unicodedata.normalize("NFC", text).strip())
    text = text.strip("\"'`").strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text.casefold()


def label_set(references: Sequence[str]) -> dict[str, str] | None:
    """The labels of a classification task ({label key: label as first written}), or None when the references do
    not look like labels (see the rule at the top of this module)."""
    if len(references) < MIN_LABEL_EXAMPLES:
        return None
    shown: dict[str, str] = {}
    for reference in references:
        text = reference.strip()
        if not text or len(text) > MAX_LABEL_CHARS or len(text.split()) > MAX_LABEL_WORDS or parse_json(text) is not None:
            return None
        shown.setdefault(label_key(text), text.rstrip(".").strip() if text.endswith(".") else text)
        if len(shown) > MAX_LABELS:
            return None
    if len(shown) < 2 or len(shown) > len(references) / 2:
        return None
    return shown


def label_scores(answers: Sequence[str], references: Sequence[str], labels: dict[str, str]) -> dict[str, Any]:
    """Label accuracy, accuracy per reference label, and the confusion table (reference label -> answer label -> count)."""
    per_label: dict[str, dict[str, Any]] = {shown: {"correct": 0, "total": 0, "accuracy": None} for shown in labels.values()}
    confusion: dict[str, Counter] = {shown: Counter() for shown in labels.values()}
    correct = 0
    for answer, reference in zip(answers, references, strict=True):
        expected = labels[label_key(reference)]
        got = labels.get(label_key(answer), OTHER_LABEL)
        row = per_label[expected]
        row["total"] += 1
        if got == expected:
            row["correct"] += 1
            correct += 1
        confusion[expected][got] += 1
    for row in per_label.values():
        row["accuracy"] = row["correct"] / row["total"] if row["total"] else None
    return {
        "accuracy": correct / len(references),
        # The labels in the order they first appear among the references: the pages' order (an object's keys keep no
        # order in PostgreSQL's jsonb).
        "order": list(labels.values()),
        "per_label": per_label,
        "confusion": {label: dict(counts) for label, counts in confusion.items()},
    }


# --- a run -----------------------------------------------------------------------------------------------------------


def summarise_task_scores(scores: Sequence[dict], answers: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """A run's task-aware summary from its per-example scores, answers and references (only the keys that apply).

    ``json_valid_rate`` and ``field_accuracy`` are means over the examples whose reference is JSON (``json_examples``
    of them); ``checks`` is each check's pass rate over the examples; ``labels`` as ``label_scores``. Examples scored on
    tool calls (a ``tool_calls`` score) take no part in the label rule."""
    out: dict[str, Any] = {}
    json_rows = [s for s in scores if "field_accuracy" in s]
    if json_rows:
        out["json_valid_rate"] = sum(s["json_valid"] for s in json_rows) / len(json_rows)
        out["field_accuracy"] = sum(s["field_accuracy"] for s in json_rows) / len(json_rows)
        out["json_examples"] = len(json_rows)
    elif not any("tool_calls" in s for s in scores):
        labels = label_set(references)
        if labels is not None:
            out["labels"] = label_scores(answers, references, labels)
    passed: dict[str, list[float]] = {}
    for s in scores:
        for name, value in (s.get("checks") or {}).items():
            passed.setdefault(name, []).append(value)
    if passed:
        out["checks"] = {name: sum(values) / len(values) for name, values in passed.items()}
    if "field_accuracy" in out:
        key, value = "field_accuracy", out["field_accuracy"]
    elif "labels" in out:
        key, value = "labels", out["labels"]["accuracy"]
    elif "checks" in out:
        key, value = "checks", sum(out["checks"].values()) / len(out["checks"])
    else:
        return out
    return {**out, "task_score": value, "task_score_label": TASK_SCORE_LABELS[key], "task_score_key": key}


def summary_task_score(answers: Sequence[str], references: Sequence[str], checks: Sequence[dict] = ()) -> dict[str, Any]:
    """``summarise_task_scores`` straight from answers and references (the texts as compared; checks as the dataset's)."""
    scores = [task_scores(answer, reference, checks) for answer, reference in zip(answers, references, strict=True)]
    return summarise_task_scores(scores, answers, references)
