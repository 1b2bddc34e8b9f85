"""Streaming JSONL validation: line-numbered errors, warnings, statistics and recommendations.

Django-free. The file is read line by line; per example only a few integers and an 8-byte
fingerprint (for duplicates) are kept, so memory stays flat whatever the file size.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from datasets_app.formats import (
    FORMAT_LABELS,
    Conversation,
    ExampleError,
    Normalised,
    detect_format,
    mapping_sentences,
    message_text,
    normalise,
    to_messages,
    type_name,
)
from tuna_llm.metrics import percentile
from tuna_llm.prompting import has_tool_content

MAX_MESSAGES_PER_KIND = 100
MIN_EXAMPLES = 10
RECOMMENDED_EXAMPLES = 50
SHORT_TOKENS = 10
LONG_TOKENS = 2048
UNBALANCED_RATIO = 25
UNBALANCED_MIN_TOKENS = 100
DEFAULT_MAX_SEQ_LENGTH = 512
HISTOGRAM_BINS = 20
MAX_DEPTH = 64  # levels of nesting in a line; an example has three at most
_BATCH = 512
_LETTER = re.compile(r"[^\W\d_]")

WARNING_TITLES = {
    "duplicate": "Duplicate examples",
    "short_prompt": f"Prompts under {SHORT_TOKENS} tokens",
    "long_prompt": f"Prompts over {LONG_TOKENS} tokens",
    "short_completion": f"Completions under {SHORT_TOKENS} tokens",
    "long_completion": f"Completions over {LONG_TOKENS} tokens",
    "truncated": "Examples longer than max_seq_length",
    "no_letters": "Completions without any letters",
    "unbalanced": "Very unbalanced prompt and completion lengths",
}


class Counter(Protocol):
    def count_many(self, texts: list[str]) -> list[int]: ...

    def template_overhead(self, roles: tuple[str, ...]) -> int: ...

    def count_chat(self, conversation: Conversation) -> int: ...

    def tools_unsupported_reason(self) -> str | None: ...


@dataclass
class _Messages:
    """Counts every message of one kind, keeps the first MAX_MESSAGES_PER_KIND."""

    count: int = 0
    items: list[dict[str, Any]] = field(default_factory=list)

    def add(self, line: int | None, message: str) -> None:
        self.count += 1
        if len(self.items) < MAX_MESSAGES_PER_KIND:
            self.items.append({"line": line, "message": message})

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "items": self.items, "more": self.count - len(self.items)}


@dataclass
class _Pending:
    line: int
    texts: list[str]
    targets: list[bool]  # which texts are learned (the completion side)
    overhead: int  # tokens the chat template adds (or, with `rendered`, the whole rendering's count)
    rendered: bool = False


class JsonlValidator:
    def __init__(self, counter: Counter, *, max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH) -> None:
        self.counter = counter
        self.max_seq_length = max_seq_length
        self.errors = _Messages()
        self.warnings: dict[str, _Messages] = {kind: _Messages() for kind in WARNING_TITLES}
        self.format: str | None = None
        self.format_line: int | None = None
        self.lines = 0
        self.blank_lines = 0
        self.prompt_lens = array("i")
        self.completion_lens = array("i")
        self.total_lens = array("i")
        self._seen: dict[bytes, int] = {}
        self.fingerprints: list[bytes] = []  # one per valid example, in file order
        self._pending: list[_Pending] = []
        self.notes: dict[str, list[int]] = {}  # how lines were read: note -> [lines, count]
        self.targets = 0  # assistant turns to learn, over the valid examples

    # -- reading ---------------------------------------------------------------------------
    def feed(self, raw_lines: Iterable[bytes]) -> None:
        for number, raw in enumerate(raw_lines, start=1):
            self.lines = number
            self._feed_line(number, raw)
            if len(self._pending) >= _BATCH:
                self._flush()
        self._flush()

    def _feed_line(self, number: int, raw: bytes) -> None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.errors.add(number, f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at position {exc.start + 1}); save the file as UTF-8")
            return
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            self.blank_lines += 1
            return
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            self.errors.add(number, f"is not valid JSON: {exc.msg} (column {exc.colno})")
            return
        except RecursionError:
            self.errors.add(number, f"is nested more than {MAX_DEPTH} levels deep; each line must be one example")
            return
        except ValueError:  # Python reads integers of at most 4300 digits
            self.errors.add(number, "has a number with more than 4300 digits")
            return
        unsafe = unsafe_text(obj)
        if unsafe:
            self.errors.add(number, unsafe)
            return
        if not isinstance(obj, dict):
            self.errors.add(
                number, f'is {type_name(obj)}, not a JSON object; each line must be one object like {{"prompt": ..., "completion": ...}}'
            )
            return
        fmt = detect_format(obj)
        if fmt is None:
            found = ", ".join(f'"{key}"' for key in list(obj)[:6]) or "no fields"
            self.errors.add(
                number,
                f"has an unknown format (found {found}); use OpenAI chat messages, OpenAI preference data (input, preferred_output, "
                "non_preferred_output), ShareGPT conversations, prompt/completion, or instruction/input/output",
            )
            return
        if self.format is None:
            self.format, self.format_line = fmt, number
        elif fmt != self.format:
            self.errors.add(
                number,
                f"is in {FORMAT_LABELS[fmt].split(' (')[0]} format but the file started in "
                f"{FORMAT_LABELS[self.format].split(' (')[0]} format on line {self.format_line}; use one format throughout",
            )
            return
        try:
            read = normalise(obj, fmt)
            pending = self._measure(number, read)
        except ExampleError as exc:
            self.errors.add(number, str(exc))
            return
        for note, count in read.notes.items():
            lines_and_count = self.notes.setdefault(note, [0, 0])
            lines_and_count[0] += 1
            lines_and_count[1] += count
        self.targets += read.targets
        self._check_duplicate(number, read.conversation)
        if not _LETTER.search(message_text(read.conversation[-1])):
            self.warnings["no_letters"].add(
                number, "the answer contains no letters; check it is not a placeholder or a number-only label by mistake"
            )
        self._pending.append(pending)

    def _measure(self, number: int, read: Normalised) -> _Pending:
        """What to count for this line; the template's share is measured now, so a conversation the base model's
        chat template refuses is an error on its line."""
        conversation = read.conversation
        texts = [message_text(m) for m in conversation]
        targets: list[bool | None] = [m["role"] == "assistant" and "weight" not in m for m in conversation]
        if read.rejected is not None:  # preference: the prompt, then the chosen answer; the rejected one counts in the total
            targets = [False] * (len(conversation) - 1) + [True]
            texts.append(message_text(read.rejected))
            targets.append(None)
        tool_content = has_tool_content(conversation) or bool(read.rejected and read.rejected.get("tool_calls"))
        if tool_content:
            reason = self.counter.tools_unsupported_reason()
            if reason:
                raise ExampleError(f"has tools or tool calls, but {reason}")
        try:
            if tool_content:
                return _Pending(number, texts, targets, self.counter.count_chat(conversation), rendered=True)
            return _Pending(number, texts, targets, self.counter.template_overhead(tuple(m["role"] for m in conversation)))
        except ValueError as exc:
            raise ExampleError(f"cannot be rendered with the base model's chat template: {exc}") from None

    def _check_duplicate(self, number: int, messages: list[dict[str, Any]]) -> None:
        key = fingerprint(messages)
        self.fingerprints.append(key)
        first = self._seen.get(key)
        if first is None:
            self._seen[key] = number
        else:
            self.warnings["duplicate"].add(number, f"duplicates line {first}")

    def _flush(self) -> None:
        if not self._pending:
            return
        texts = [text for item in self._pending for text in item.texts]
        counts = iter(self.counter.count_many(texts))
        for item in self._pending:
            per_text = [next(counts) for _ in item.texts]
            prompt = sum(n for n, target in zip(per_text, item.targets, strict=True) if target is False)
            completion = sum(n for n, target in zip(per_text, item.targets, strict=True) if target)
            extra = sum(n for n, target in zip(per_text, item.targets, strict=True) if target is None)
            total = item.overhead + extra if item.rendered else sum(per_text) + item.overhead
            self.prompt_lens.append(prompt)
            self.completion_lens.append(completion)
            self.total_lens.append(total)
            self._length_warnings(item.line, prompt, completion, total)
        self._pending.clear()

    def _length_warnings(self, line: int, prompt: int, completion: int, total: int) -> None:
        if prompt < SHORT_TOKENS:
            self.warnings["short_prompt"].add(line, f"prompt is {prompt} tokens; very short prompts give the model little to go on")
        elif prompt > LONG_TOKENS:
            self.warnings["long_prompt"].add(line, f"prompt is {prompt} tokens")
        if completion < SHORT_TOKENS:
            self.warnings["short_completion"].add(line, f"completion is {completion} tokens")
        elif completion > LONG_TOKENS:
            self.warnings["long_completion"].add(line, f"completion is {completion} tokens")
        if total > self.max_seq_length:
            self.warnings["truncated"].add(line, f"is {total} tokens with the chat template; it will be cut to {self.max_seq_length}")
        longer, shorter = max(prompt, completion), max(1, min(prompt, completion))
        if longer >= UNBALANCED_MIN_TOKENS and longer / shorter >= UNBALANCED_RATIO:
            side = "prompt" if prompt > completion else "completion"
            self.warnings["unbalanced"].add(
                line, f"the {side} is {longer / shorter:.0f}x longer than the other side ({prompt} vs {completion} tokens)"
            )

    # -- report ----------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        examples = len(self.total_lens)
        if examples < MIN_EXAMPLES and self.lines:
            self.errors.add(
                None, f"the file has {examples} valid example{'s' if examples != 1 else ''}; at least {MIN_EXAMPLES} are needed to train"
            )
        if self.lines == 0 or self.lines == self.blank_lines:
            self.errors.add(None, "the file has no examples")
        if examples and not self.targets:
            self.errors.add(
                None,
                "every assistant turn in the file has weight 0, so there is nothing to learn; "
                "give the answers to learn weight 1 (or no weight)",
            )
        warnings = [
            {"kind": kind, "title": WARNING_TITLES[kind], **messages.as_dict()}
            for kind, messages in self.warnings.items()
            if messages.count
        ]
        stats = self._stats()
        return {
            "format": self.format or "",
            "format_label": FORMAT_LABELS.get(self.format or "", "unknown"),
            "mapping": mapping_sentences(self.format, self.notes) if self.format else [],
            "lines": self.lines,
            "blank_lines": self.blank_lines,
            "valid_examples": examples,
            "errors": self.errors.as_dict(),
            "warnings": warnings,
            "warning_count": sum(w["count"] for w in warnings),
            "stats": stats,
            "recommendations": self._recommendations(stats),
        }

    def _stats(self) -> dict[str, Any]:
        if not self.total_lens:
            return {"examples": 0}
        low = min(min(self.prompt_lens), min(self.completion_lens))
        top = max(max(self.prompt_lens), max(self.completion_lens))
        width = max(1, math.ceil((top - low + 1) / HISTOGRAM_BINS))
        edges = [low + i * width for i in range(HISTOGRAM_BINS + 1)]
        return {
            "examples": len(self.total_lens),
            "total_tokens": int(sum(self.total_lens)),
            "prompt_tokens": summarise(self.prompt_lens),
            "completion_tokens": summarise(self.completion_lens),
            "example_tokens": summarise(self.total_lens),
            "max_seq_length": self.max_seq_length,
            "truncated": self.warnings["truncated"].count,
            "histogram": {
                "edges": edges,
                "prompt": _bucket(self.prompt_lens, low, width),
                "completion": _bucket(self.completion_lens, low, width),
            },
        }

    def _recommendations(self, stats: dict[str, Any]) -> list[str]:
        tips: list[str] = []
        examples = stats.get("examples", 0)
        if self.errors.count:
            tips.append("Fix the errors listed above (each names its line) and upload the file again; nothing has been trained.")
        if 0 < examples < RECOMMENDED_EXAMPLES:
            tips.append(
                f"You have {examples} examples. Fine-tunes usually need at least {RECOMMENDED_EXAMPLES}-100 good "
                "examples to change behaviour reliably; add more if you can."
            )
        if examples and stats["completion_tokens"]["p50"] < SHORT_TOKENS:
            tips.append(
                "Most completions are very short. If you want full answers, show full answers: the model copies the length it sees."
            )
        duplicates = self.warnings["duplicate"].count
        if duplicates:
            tips.append(
                f"Remove the {duplicates} duplicate example{'s' if duplicates != 1 else ''}: repeats make the model memorise instead of generalise and leak into the held-out set."
            )
        truncated = self.warnings["truncated"].count
        if truncated:
            p95 = stats["example_tokens"]["p95"]
            tips.append(
                f"{truncated} example{'s' if truncated != 1 else ''} will be cut at max_seq_length {self.max_seq_length}. "
                f"Raise max_seq_length in the Advanced settings (to about {p95} to cover 95% of examples) or shorten them."
            )
        if self.warnings["no_letters"].count:
            tips.append("Some answers contain no letters at all; check they are not empty placeholders.")
        if examples and not tips:
            tips.append("The data looks clean. Start a fine-tune with the default settings.")
        return tips


def unsafe_text(obj: Any) -> str | None:
    """Why a parsed line cannot be used, when it holds text that no database or tokenizer takes (a NUL, a
    lone UTF-16 surrogate such as "\\ud800") or is nested deeper than any example; None when it is fine."""
    stack = [(obj, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth == MAX_DEPTH:
                return f"is nested more than {MAX_DEPTH} levels deep; each line must be one example"
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    problem = _text_problem(key)
                    if problem:
                        return f"has {problem} in a field name{f' in {where}' if where else ''}"
                    stack.append((item, f"{where}.{key}" if where else key, depth + 1))
                else:
                    stack.append((item, f"{where}[{key}]", depth + 1))
        elif isinstance(value, str):
            problem = _text_problem(value)
            if problem:
                return f'has {problem} in "{where}"'
    return None


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "a NUL character (\\u0000), which text cannot hold; remove it"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone UTF-16 surrogate ({ascii(exc.object[exc.start])[1:-1]}), half of a character; write the whole character"
    return None


def fingerprint(messages: list[dict[str, Any]]) -> bytes:
    """8 bytes that are equal for examples equal up to case and surrounding whitespace (tool calls included)."""
    canonical = "\x1f".join(f"{m['role']}\x1e{message_text(m).strip().casefold()}" for m in messages)
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).digest()


def summarise(values: array) -> dict[str, float | int]:
    ordered = sorted(values)
    count = len(ordered)
    return {
        "min": ordered[0],
        "mean": round(sum(ordered) / count, 1),
        "p50": percentile(ordered, 50),
        "p95": percentile(ordered, 95),
        "max": ordered[-1],
    }


def _bucket(values: array, low: int, width: int) -> list[int]:
    counts = [0] * HISTOGRAM_BINS
    for value in values:
        counts[min((value - low) // width, HISTOGRAM_BINS - 1)] += 1
    return counts


def iter_records(raw_lines: Iterable[bytes]) -> Iterator[tuple[dict[str, Any], str]]:
    """The lines of a validated file as (parsed object, format), in file order."""
    for raw in raw_lines:
        text = raw.decode("utf-8").removeprefix("\ufeff")
        if text.strip():
            obj = json.loads(text)
            yield obj, detect_format(obj)


def iter_examples(raw_lines: Iterable[bytes]) -> Iterator[Conversation]:
    """The examples of a validated file, normalised to Conversations, in file order (a preference line: its
    input and the preferred answer)."""
    for obj, fmt in iter_records(raw_lines):
        yield to_messages(obj, fmt)
