"""Quality, latency and cost metrics for an evaluation. Django-free.

Cost per 1,000 requests = mean measured latency (s) x 1,000 / 3,600 x hourly price: the machine's
time each request occupied, at the configured price. No per-model constants.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tuna_llm import task_scores
from tuna_llm.prompting import answer_text
from tuna_llm.toolcalls import calls_match, calls_of, canonical_arguments, parse_tool_calls

_SPACE = re.compile(r"\s+")

# Scripts written without spaces between words: each character is its own token, a common stand-in
# for word segmentation (no dictionary needed). CJK ideographs (with extensions and compatibility
# forms), Hiragana, Katakana, Hangul syllables, Thai, Lao, Khmer, Myanmar.
NO_SPACE_SCRIPTS = (
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f"
)
_NO_SPACE_CHAR = re.compile(f"[{NO_SPACE_SCRIPTS}]")
# Combining marks that belong inside a word (Python's \w leaves them out): accents, Hebrew points,
# Arabic harakat, the vowel signs of the Indic scripts.
_MARKS = "\u0300-\u036f\u0591-\u05c7\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06ed\u0900-\u0dff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
# A token: a character of a no-space script, or a run of other letters, digits, underscores and marks.
TOKEN_PATTERN = f"[{NO_SPACE_SCRIPTS}]|(?:[^\\W{NO_SPACE_SCRIPTS}][{_MARKS}]*)+"
_TOKEN = re.compile(TOKEN_PATTERN)

# name -> (label, higher is better, explanation shown on the page)
METRICS: dict[str, tuple[str, bool, str]] = {
    "exact_match": ("Exact match", True, "Share of answers identical to the reference (ignoring surrounding and repeated whitespace)."),
    "task_score": (
        "Task score",
        True,
        "The task-aware score that applies (JSON field accuracy, label accuracy or checks passed): where there is one, it decides the verdict.",
    ),
    "json_valid_rate": (
        "Valid JSON",
        True,
        "Where the reference is a JSON object or array: the share of answers that parse as one.",
    ),
    "field_accuracy": (
        "JSON field accuracy",
        True,
        (
            "Where the reference is JSON: of every field in the reference or the answer (nested fields by path), the share present in "
            "both with the same value; key order and whitespace ignored, an answer that is not JSON scores 0."
        ),
    ),
    "rouge_l": (
        "ROUGE-L",
        True,
        (
            "Longest common word sequence with the reference, as an F1 score from 0 to 1 (rouge-score package). Any language: "
            "case-insensitive Unicode words; Chinese, Japanese, Korean and Thai compared character by character."
        ),
    ),
    "bleu": (
        "BLEU",
        True,
        (
            "Overlap of 1- to 4-word sequences with the reference, 0 to 1 (sacrebleu sentence BLEU, averaged; "
            "Chinese, Japanese, Korean and Thai compared character by character)."
        ),
    ),
    "tool_call_match": (
        "Tool calls matched",
        True,
        (
            "Of the examples whose reference answer calls tools, the share answered with the same calls: the same function names "
            "with the same arguments as JSON (key order ignored), whatever the text around them."
        ),
    ),
    "heldout_loss": (
        "Held-out loss",
        False,
        "Cross-entropy of the model on the reference answers' tokens: lower means it finds the right answer more likely.",
    ),
    "perplexity": ("Perplexity", False, "exp(held-out loss): roughly how many tokens the model hesitates between at each step."),
    "latency_mean_ms": (
        "Latency, mean",
        False,
        "Measured time to generate one answer, in milliseconds: its own share of the batched decoding time.",
    ),
    "latency_p50_ms": ("Latency, p50", False, "Half of the answers took at most this long."),
    "latency_p95_ms": ("Latency, p95", False, "95% of the answers took at most this long."),
    "avg_length": ("Answer length", None, "Mean number of generated tokens per answer."),
    "cost_per_1k_usd": ("Cost per 1,000 requests", False, "Mean measured latency x 1,000 requests at the configured hourly machine price."),
}


def normalise(text: str) -> str:
    # NFC: "é" typed as one code point or as "e" + accent is the same answer.
    return _SPACE.sub(" ", unicodedata.normalize("NFC", text).strip())


def exact_match(prediction: str, reference: str) -> float:
    return 1.0 if normalise(prediction) == normalise(reference) else 0.0


def rouge_tokens(text: str) -> list[str]:
    """Case-insensitive Unicode words, one token per character in scripts without spaces.

    rouge-score's default tokenizer keeps only [a-z0-9], so two identical Russian or Chinese answers
    would share no token and score 0.
    """
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


class UnicodeTokenizer:
    """The tokenizer object rouge-score's RougeScorer accepts (anything with a ``tokenize`` method)."""

    def tokenize(self, text: str) -> list[str]:
        return rouge_tokens(text)


_scorer = None


def rouge_l(prediction: str, reference: str) -> float:
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())
    return _scorer.score(reference, prediction)["rougeL"].fmeasure


def _space_out_no_space_scripts(text: str) -> str:
    return _NO_SPACE_CHAR.sub(lambda m: f" {m.group()} ", unicodedata.normalize("NFC", text))


def bleu(prediction: str, reference: str) -> float:
    """sacrebleu's default 13a tokenizer, with characters of no-space scripts spaced out first.

    13a alone sees a whole CJK or Thai sentence as one word, so any difference scores 0; text in other
    scripts is unchanged. (The "flores200" tokenizer needs sentencepiece and a downloaded model; "zh"
    splits Chinese ideographs only, not kana, Hangul or Thai.)
    """
    import sacrebleu

    score = sacrebleu.sentence_bleu(_space_out_no_space_scripts(prediction), [_space_out_no_space_scripts(reference)]).score / 100
    return min(1.0, score)  # identical texts score 100.00000000000004 in floating point


def quality(prediction: str, reference: str) -> dict[str, float]:
    return {
        "exact_match": exact_match(prediction, reference),
        "rouge_l": rouge_l(prediction, reference),
        "bleu": bleu(prediction, reference),
    }


def calls_text(content: str, calls: Sequence[dict[str, Any]]) -> str:
    """A canonical text of an answer with tool calls: its text, then one line per call, ``name {arguments}``, with the
    arguments as canonical JSON and the lines sorted, so neither key order nor call order changes it."""
    lines = sorted(f"{call['name']} {_arguments_text(call['arguments'])}" for call in calls)
    return "\n".join([content.strip(), *lines]).strip()


def _arguments_text(arguments: Any) -> str:
    try:
        return canonical_arguments(arguments)
    except ValueError:  # not a JSON object: compared as written
        return str(arguments)


def answer_quality(prediction: str, reference: dict[str, Any], checks: Sequence[dict] = ()) -> dict[str, Any]:
    """Scores of a generated answer against the reference assistant message.

    A reference that calls tools is scored on the calls: exact match (and ``tool_calls``) is whether the answer makes
    the same calls (names and arguments as JSON, key order ignored), and ROUGE-L and BLEU compare canonical texts of
    both (``calls_text``), not the template's rendering. Any other reference is scored on its text, as ``quality``.
    The task-aware scores that apply (``task_scores.task_scores``: JSON validity and field accuracy, the dataset's
    ``checks``) are merged in.
    """
    expected = calls_of(reference)
    extra = task_scores.task_scores(prediction, answer_text(reference), checks)
    if not expected:
        return {**quality(prediction, answer_text(reference)), **extra}
    content, got = parse_tool_calls(prediction)
    matched = 1.0 if calls_match(expected, got) else 0.0
    scores = quality(calls_text(content, got), calls_text(reference.get("content") or "", expected))
    return {**scores, "exact_match": matched, "tool_calls": matched, **extra}


def cost_at(seconds: float, hourly_usd: float) -> float:
    """Machine time at an hourly price: every cost figure in the product is this."""
    return seconds / 3600 * hourly_usd


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class ModelRun:
    """One model's measurements over the test set."""

    qualities: list[dict[str, Any]]
    latencies_ms: list[float]
    completion_tokens: list[int]
    loss: float | None
    answers: Sequence[str] = ()  # the answers and reference texts, for the task-aware summary (labels need them all)
    references: Sequence[str] = ()


def summarise(run: ModelRun, *, hourly_usd: float) -> dict[str, Any]:
    """A model's figures over the test set, with the task-aware ones that apply (``task_scores.summarise_task_scores``:
    ``json_valid_rate``, ``field_accuracy``, ``labels``, ``checks``, ``task_score`` and its label)."""
    count = len(run.latencies_ms)
    mean_latency = sum(run.latencies_ms) / count
    calls = [q["tool_calls"] for q in run.qualities if "tool_calls" in q]
    answers = list(run.answers) if len(run.answers) == len(run.qualities) else [""] * len(run.qualities)
    references = list(run.references) if len(run.references) == len(run.qualities) else []
    return {
        **task_scores.summarise_task_scores(run.qualities, answers, references),
        "exact_match": sum(q["exact_match"] for q in run.qualities) / count,
        "rouge_l": sum(q["rouge_l"] for q in run.qualities) / count,
        "bleu": sum(q["bleu"] for q in run.qualities) / count,
        **({"tool_call_match": sum(calls) / len(calls)} if calls else {}),
        "heldout_loss": run.loss,
        "perplexity": math.exp(run.loss) if run.loss is not None else None,
        "latency_mean_ms": mean_latency,
        "latency_p50_ms": percentile(run.latencies_ms, 50),
        "latency_p95_ms": percentile(run.latencies_ms, 95),
        "avg_length": sum(run.completion_tokens) / count,
        "cost_per_1k_usd": cost_at(mean_latency / 1000 * 1000, hourly_usd),
        # the seed's names
        "avg_latency_ms": mean_latency,
        "count": count,
    }


def improvements(base: dict, finetuned: dict) -> dict[str, dict]:
    out = {}
    for name, (_label, higher_better, _help) in METRICS.items():
        b, f = base.get(name), finetuned.get(name)
        if b is None or f is None:
            continue
        delta = f - b
        if higher_better is None or abs(delta) < 1e-12:
            direction = "same" if abs(delta) < 1e-12 else "different"
        else:
            direction = "better" if (delta > 0) == higher_better else "worse"
        out[name] = {"delta": delta, "relative": delta / b if b else None, "direction": direction}
    return out


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """95% Wilson score interval for a proportion; None without trials."""
    if trials == 0:
        return None
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    margin = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - margin), min(1.0, centre + margin)


def cohen_kappa(pairs: Sequence[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two raters over the same items: (observed agreement - chance agreement) / (1 - chance).

    Chance agreement is what two raters with these label frequencies would reach at random. 1 is perfect
    agreement, 0 is chance, below 0 worse than chance. None when it is undefined (no pairs, or both raters
    gave one and the same label to everything, so chance agreement is 1).
    """
    n = len(pairs)
    if not n:
        return None
    observed = sum(1 for a, b in pairs if a == b) / n
    labels = {label for pair in pairs for label in pair}
    chance = sum((sum(1 for a, _ in pairs if a == k) / n) * (sum(1 for _, b in pairs if b == k) / n) for k in labels)
    if chance >= 1.0:
        return None
    return (observed - chance) / (1.0 - chance)
