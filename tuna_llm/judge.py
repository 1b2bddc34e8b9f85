"""A pairwise judge: any OpenAI-compatible chat endpoint compares two answers against a reference.

Django-free. One comparison asks the judge twice, with the answers in both orders (A/B, then B/A), so
that a judge that prefers whatever comes first cancels out: the two verdicts agree on a model, or the
comparison counts as a tie and is marked inconsistent. The endpoint's failures (refused connections,
timeouts, HTTP errors, replies that are not JSON, replies without a verdict) are retried a bounded number
of times and then raised as `JudgeError` with what went wrong; a verdict is never guessed.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

DEFAULT_RUBRIC = (
    "You compare two answers to the same request. The reference answer is what a correct answer looks like.\n"
    "Prefer the answer that is correct and complete with respect to the reference, follows the requested format, "
    "and adds nothing that is false. Ignore length and style unless the request asks for them. If both answers are "
    "equally good or equally bad, say tie."
)

INSTRUCTIONS = 'Reply with JSON only, one object: {"winner": "A" or "B" or "tie", "reason": "<one short sentence>"}.'

# HTTP statuses worth another try (the server is busy or briefly broken); any other error status is final.
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_REASON = 500


class JudgeError(ValueError):
    """The judge endpoint did not give a usable verdict; the message says why, for the user."""


@dataclass(frozen=True)
class JudgeEndpoint:
    """Where the judge lives: an OpenAI-compatible base URL (ending in /v1), the model name and an API key."""

    url: str
    model: str
    api_key: str = ""
    timeout_s: float = 60.0
    retries: int = 2  # tries after the first one, for each question
    max_tokens: int = 200

    @property
    def chat_url(self) -> str:
        return self.url.rstrip("/") + "/chat/completions"


@dataclass(frozen=True)
class Verdict:
    winner: str  # "A", "B" or "tie": a position, as the judge saw the answers
    reason: str
    tries: int  # how many requests it took (1 = first try)


@dataclass(frozen=True)
class PairVerdict:
    """Both orders of one comparison, in model terms ("first", "second" or "tie" for the two answers given)."""

    winner: str  # "first", "second" or "tie" (an inconsistent pair is a tie)
    consistent: bool
    forward: str  # the verdict with the first answer shown as A
    backward: str  # the verdict with the first answer shown as B
    forward_reason: str
    backward_reason: str
    tries: int


def judge_messages(rubric: str, prompt: str, reference: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    user = (
        f"## Request\n{prompt}\n\n## Reference answer\n{reference}\n\n## Answer A\n{answer_a}\n\n## Answer B\n{answer_b}\n\n"
        f"Which answer is better, A or B? {INSTRUCTIONS}"
    )
    return [{"role": "system", "content": f"{rubric.strip()}\n\n{INSTRUCTIONS}"}, {"role": "user", "content": user}]


_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)
_WINNER = {"a": "A", "b": "B", "tie": "tie", "answer a": "A", "answer b": "B"}
# A reply that starts with its verdict: "A", "B.", "Answer B: ...", "tie - both ...".
_LEADING = re.compile(r"^\W*(?:answer\s+)?(a|b|tie)\b[\s.:;,)\-]*(.*)$", re.IGNORECASE | re.DOTALL)


def parse_verdict(text: str) -> tuple[str, str]:
    """(winner, reason) from the judge's reply, or JudgeError when it holds no verdict.

    The reply must contain a JSON object with "winner" A, B or tie (code fences and text around it are
    tolerated), or start with the verdict itself ("A", "Answer B: ...", "Tie."): small local models often
    answer that way. Anything else is not a verdict.
    """
    for match in _OBJECT.finditer(text or ""):
        try:
            data = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict):
            continue
        winner = _WINNER.get(str(data.get("winner", "")).strip().lower())
        if winner is not None:
            return winner, str(data.get("reason", "")).strip()[:MAX_REASON]
    leading = _LEADING.match(text or "")
    if leading:
        return _WINNER[leading.group(1).lower()], " ".join(leading.group(2).split())[:MAX_REASON]
    shown = (text or "").strip().replace("\n", " ")
    shown = shown if len(shown) <= 120 else shown[:120] + "..."
    raise JudgeError(f'the reply holds no verdict (a JSON object with "winner": "A", "B" or "tie"): {shown!r}')


def ask(endpoint: JudgeEndpoint, messages: list[dict[str, str]]) -> Verdict:
    """One verdict, retried up to ``endpoint.retries`` times; the last failure is raised as JudgeError."""
    last: JudgeError | None = None
    for attempt in range(1 + max(0, endpoint.retries)):
        if attempt:
            time.sleep(min(2.0, 0.25 * 2**attempt))
        try:
            # First try greedy; a retry samples, so a judge that gave no verdict can give one.
            text = _chat(endpoint, messages, temperature=0.0 if attempt == 0 else 0.7)
            winner, reason = parse_verdict(text)
            return Verdict(winner, reason, attempt + 1)
        except _Final as exc:
            raise JudgeError(str(exc)) from None
        except JudgeError as exc:
            last = exc
    tries = 1 + max(0, endpoint.retries)
    raise JudgeError(f"{last} (after {tries} tr{'ies' if tries != 1 else 'y'})")


def compare(endpoint: JudgeEndpoint, rubric: str, prompt: str, reference: str, first: str, second: str) -> PairVerdict:
    """Judge ``first`` against ``second`` in both orders."""
    forward = ask(endpoint, judge_messages(rubric, prompt, reference, first, second))
    backward = ask(endpoint, judge_messages(rubric, prompt, reference, second, first))
    as_first = {"A": "first", "B": "second", "tie": "tie"}[forward.winner]
    as_second = {"A": "second", "B": "first", "tie": "tie"}[backward.winner]
    consistent = as_first == as_second
    return PairVerdict(
        winner=as_first if consistent else "tie",
        consistent=consistent,
        forward=as_first,
        backward=as_second,
        forward_reason=forward.reason,
        backward_reason=backward.reason,
        tries=forward.tries + backward.tries,
    )


class _Final(Exception):
    """A failure another try cannot mend (a wrong URL, a refused key)."""


def _chat(endpoint: JudgeEndpoint, messages: list[dict[str, str]], *, temperature: float) -> str:
    body = json.dumps(
        {"model": endpoint.model, "messages": messages, "temperature": temperature, "max_tokens": endpoint.max_tokens}
    ).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    request = urllib.request.Request(endpoint.chat_url, data=body, headers=headers, method="POST")
    where = endpoint.chat_url
    try:
        with urllib.request.urlopen(request, timeout=endpoint.timeout_s) as response:
            raw = response.read(2_000_000)
    except urllib.error.HTTPError as exc:
        detail = _error_detail(exc)
        message = f"{where} answered HTTP {exc.code}{': ' + detail if detail else ''}"
        if exc.code in RETRY_STATUSES:
            raise JudgeError(message) from None
        raise _Final(message) from None
    except TimeoutError:
        raise JudgeError(f"{where} did not answer within {endpoint.timeout_s:g} s (TUNA_JUDGE_TIMEOUT_S)") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise JudgeError(f"{where} did not answer within {endpoint.timeout_s:g} s (TUNA_JUDGE_TIMEOUT_S)") from None
        raise JudgeError(f"could not reach {where}: {getattr(reason, 'strerror', None) or reason}") from None
    except (ConnectionError, OSError) as exc:
        raise JudgeError(f"could not reach {where}: {exc.strerror or exc}") from None
    try:
        data = json.loads(raw)
        content = data["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, UnicodeDecodeError):
        shown = raw[:80].decode("utf-8", "replace").replace("\n", " ")
        raise JudgeError(f"{where} did not answer with JSON (an OpenAI-compatible chat completion); it sent {shown!r}") from None
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"{where} answered JSON without choices[0].message.content: not an OpenAI-compatible chat completion") from None
    if not isinstance(content, str):
        raise JudgeError(f"{where} answered without text in choices[0].message.content")
    return content


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        data = json.loads(exc.read(20_000))
        message = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data.get("detail")
        return str(message)[:200] if message else ""
    except Exception:  # noqa: BLE001 - a body that is not JSON has no detail to add
        return ""
