"""The user's own checks of an answer (`Dataset.answer_checks`): what a valid set of checks is, and the one service
that sets them. `tuna_llm.task_scores` scores them per example in every evaluation of the dataset started afterwards
(an evaluation already run keeps the scores it had).

A check is ``{"name": str, "kind": str, "value": ...}``:

- ``regex``: the answer matches the regular expression somewhere (``re.search``; anchor it with ``^...$`` for the
  whole answer). At most ``MAX_PATTERN_CHARS`` characters, it must compile, and a repetition of something that itself
  repeats with nothing fixed between (``(a+)+``, ``(\\w+\\s?)*``) is refused: on a long answer that can take hours;
- ``contains`` / ``not_contains``: the text (surrounding whitespace removed; case-sensitive) is / is not in the answer;
- ``one_of``: the answer, surrounding whitespace ignored, equals one of a list of values (at most ``MAX_CHOICES``).

At most ``MAX_CHECKS`` checks per dataset, each with its own name (names compared ignoring case); a name is at most
``MAX_NAME_CHARS`` characters. Every refusal names the check (its position and name) and what to change.
"""

from __future__ import annotations

import re
from typing import Any

from django.db import transaction

from datasets_app.models import Dataset
from tuna_core.errors import Invalid
from tuna_llm.task_scores import CHECK_KINDS

MAX_CHECKS = 20
MAX_NAME_CHARS = 60
MAX_PATTERN_CHARS = 300
MAX_TEXT_CHARS = 500
MAX_CHOICES = 50
MAX_CHOICE_CHARS = 200

# What each kind means, in the words the page shows ("the answer ...").
KIND_LABELS = {
    "regex": "matches the regular expression",
    "contains": "contains",
    "not_contains": "does not contain",
    "one_of": "is one of",
}
assert tuple(KIND_LABELS) == tuple(CHECK_KINDS), "a kind the scorer knows must be one the page offers, and the other way round"


class ChecksInvalid(Invalid):
    """One or more checks cannot be used; `errors["answer_checks"]` has one message per problem."""

    param = "answer_checks"


class _Refused(ValueError):
    pass


def validate_checks(raw: Any) -> list[dict]:
    """The checks as stored (names and texts trimmed), or ChecksInvalid with every problem found."""
    if not isinstance(raw, list):
        raise ChecksInvalid("answer_checks must be a list of checks, each {name, kind, value}.", errors={"answer_checks": ["Not a list."]})
    if len(raw) > MAX_CHECKS:
        message = f"At most {MAX_CHECKS} checks per dataset; {len(raw)} were given. Remove {len(raw) - MAX_CHECKS}."
        raise ChecksInvalid(message, errors={"answer_checks": [message]})
    checks, problems, names = [], [], {}
    for position, item in enumerate(raw, start=1):
        try:
            check = _check(item, position)
        except _Refused as exc:
            problems.append(str(exc))
            continue
        key = check["name"].casefold()
        if key in names:
            problems.append(
                f"Check {position} (“{check['name']}”): the name is already used by check {names[key]}; each check needs its own name."
            )
            continue
        names[key] = position
        checks.append(check)
    if problems:
        summary = problems[0] if len(problems) == 1 else f"{len(problems)} problems with these checks: " + " ".join(problems)
        raise ChecksInvalid(summary, errors={"answer_checks": problems})
    return checks


def _check(item: Any, position: int) -> dict:
    if not isinstance(item, dict):
        raise _Refused(f"Check {position} must be an object with a name, a kind and a value.")
    unknown = sorted(set(item) - {"name", "kind", "value"})
    if unknown:
        raise _Refused(
            f"Check {position}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (a check has name, kind and value)."
        )
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _Refused(f"Check {position} needs a name (it labels the check's score in every evaluation).")
    name = " ".join(name.split())
    if len(name) > MAX_NAME_CHARS:
        raise _Refused(f"Check {position}: the name is {len(name)} characters; at most {MAX_NAME_CHARS}.")
    where = f"Check {position} (“{name}”)"
    kind = item.get("kind")
    if kind not in CHECK_KINDS:
        raise _Refused(f"{where}: unknown kind “{kind}”; the kinds are {', '.join(CHECK_KINDS)}.")
    return {"name": name, "kind": kind, "value": _value(kind, item.get("value"), where)}


def _value(kind: str, value: Any, where: str) -> str | list[str]:
    if kind == "one_of":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _Refused(f"{where}: “one of” needs a list of texts (on the page: one per line).")
        choices = list(dict.fromkeys(v.strip() for v in value if v.strip()))
        if not choices:
            raise _Refused(f"{where}: “one of” needs at least one value.")
        if len(choices) > MAX_CHOICES:
            raise _Refused(f"{where}: {len(choices)} values; at most {MAX_CHOICES}.")
        long = next((v for v in choices if len(v) > MAX_CHOICE_CHARS), None)
        if long is not None:
            raise _Refused(f"{where}: the value “{long[:40]}…” is {len(long)} characters; at most {MAX_CHOICE_CHARS} each.")
        return choices
    if not isinstance(value, str) or not value.strip():
        raise _Refused(f"{where}: needs a {'regular expression' if kind == 'regex' else 'text'} as its value.")
    if kind != "regex":
        value = value.strip()
        if len(value) > MAX_TEXT_CHARS:
            raise _Refused(f"{where}: the text is {len(value)} characters; at most {MAX_TEXT_CHARS}.")
        return value
    if len(value) > MAX_PATTERN_CHARS:
        raise _Refused(f"{where}: the regular expression is {len(value)} characters; at most {MAX_PATTERN_CHARS}.")
    try:
        re.compile(value)
    except (re.error, RecursionError, OverflowError) as exc:
        raise _Refused(f"{where}: the regular expression does not compile: {exc}.") from None
    if _nested_repetition(value):
        raise _Refused(
            f"{where}: the regular expression repeats something that itself repeats with nothing fixed between (like (a+)+); "
            "on a long answer that can take hours. Put a fixed character between the repetitions, or repeat only once."
        )
    return value


def _nested_repetition(pattern: str) -> bool:
    """Whether the pattern repeats (more than once) a part that itself repeats a variable number of times, with no
    literal character required at that part's top level to anchor each round: the classic catastrophic backtracking
    shape. A heuristic on Python's own parse of the pattern; it may miss rarer shapes (alternations that overlap)."""
    try:
        from re import _constants as sre_constants
        from re import _parser as sre_parse
    except ImportError:  # another Python's layout: the length limit still holds
        return False
    repeats = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT}

    def items(body) -> list:
        """The body's top-level items, groups flattened."""
        out = []
        for op, av in body:
            if op == sre_constants.SUBPATTERN:
                out.extend(items(av[-1]))
            else:
                out.append((op, av))
        return out

    def repeats_inside(body) -> bool:
        for op, av in body:
            if op in repeats and av[1] > 1 and av[0] != av[1]:
                return True
            for part in av if isinstance(av, (tuple, list)) else ():
                if isinstance(part, sre_parse.SubPattern) and repeats_inside(part):
                    return True
                if isinstance(part, list) and any(isinstance(p, sre_parse.SubPattern) and repeats_inside(p) for p in part):
                    return True
        return False

    def catastrophic(body) -> bool:
        for op, av in body:
            if op in repeats and av[1] > 1:
                inner = items(av[2])
                anchored = any(o in (sre_constants.LITERAL, sre_constants.NOT_LITERAL) for o, _ in inner)
                if not anchored and repeats_inside(inner):
                    return True
            for part in av if isinstance(av, (tuple, list)) else ():
                if isinstance(part, sre_parse.SubPattern) and catastrophic(part):
                    return True
                if isinstance(part, list) and any(isinstance(p, sre_parse.SubPattern) and catastrophic(p) for p in part):
                    return True
        return False

    return catastrophic(sre_parse.parse(pattern))


def dataset_checks_set(dataset: Dataset, checks: Any) -> list[dict]:
    """Replace the dataset's checks with `checks` (validated as a whole; nothing changes when any is refused)."""
    clean = validate_checks(checks)
    with transaction.atomic():
        Dataset.objects.filter(pk=dataset.pk).update(answer_checks=clean)
    dataset.answer_checks = clean
    return clean


def dataset_check_add(dataset: Dataset, check: dict) -> list[dict]:
    """Add one check (the page's form): the whole list is validated again, so a clash names the check it clashes with."""
    with transaction.atomic():
        current = Dataset.objects.select_for_update().get(pk=dataset.pk).answer_checks or []
        return dataset_checks_set(dataset, [*current, check])


def dataset_check_remove(dataset: Dataset, name: str) -> list[dict]:
    """Remove the check of that name (none of that name: nothing changes)."""
    with transaction.atomic():
        current = Dataset.objects.select_for_update().get(pk=dataset.pk).answer_checks or []
        kept = [check for check in current if check.get("name") != name]
        Dataset.objects.filter(pk=dataset.pk).update(answer_checks=kept)
    dataset.answer_checks = kept
    return kept
