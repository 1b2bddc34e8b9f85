"""A pairwise judge: any OpenAI-compatible chat endpoint compares two answers against a reference.

Django-free. One comparison asks the judge twice, with the answers in both orders (A/B, then B/A), so
that a judge that prefers whatever comes first cancels out: the two verdicts agree on a model, or the
comparison counts as a tie and is marked inconsistent. The endpoint's failures (refused connections,
timeouts, HTTP errors, replies that are not JSON, replies without a verdict) are retried a bounded number
of times and then raised as `JudgeError` with what went wrong; a verdict is never guessed.

The key is only ever sent to the configured URL: a redirect is refused, not followed (urllib would carry the
Authorization header to wherever it points). The URL is only ever shown through `redact_url` (no user:password@,
no query values), in messages too. A caller can bound a whole run with a deadline (`JudgeTimeUp`) and bound what
one example sends with `fit_example`.
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
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


class JudgeTimeUp(Exception):
    """The run's deadline passed before this question could be asked (or answered)."""


def redact_url(url: str) -> str:
    """The URL as it may be shown or stored: without user:password@, query values or fragment."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:  # not a URL we can take apart: show its scheme and host at most
        return re.sub(r"^([a-z][a-z0-9+.-]*://)?(?:[^/@]*@)?([^/?#]*).*$", r"\1\2/...", url.strip(), flags=re.IGNORECASE | re.DOTALL)
    query = urllib.parse.urlencode([(key, "***") for key, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    shown = urllib.parse.urlunsplit((parts.scheme, host + port, parts.path, query, ""))
    return re.sub(r"[^/?#@]*@", "", shown)  # "user:pass@host" without a scheme parses as a path


def fit_example(texts: list[str], max_chars: int) -> tuple[list[str], int]:
    """``texts`` (the request, the reference, the two answers) cut so that together they hold at most ``max_chars``
    characters: the short ones whole, the long ones cut to an equal share each, marked where they were cut. Returns
    (the texts, how many were cut). Both orders of a comparison read the same cut texts."""
    if sum(len(text) for text in texts) <= max_chars:
        return list(texts), 0
    shares = {}
    budget, left = max_chars, sorted(range(len(texts)), key=lambda i: len(texts[i]))
    while left:
        share = budget // len(left)
        index = left.pop(0)
        shares[index] = min(len(texts[index]), share)
        budget -= shares[index]
    out, cut = [], 0
    for index, text in enumerate(texts):
        if len(text) <= shares[index]:
            out.append(text)
            continue
        marker = f" [... {len(text) - shares[index]:,} characters cut]"
        out.append(text[: max(0, shares[index] - len(marker))] + marker[: shares[index]])
        cut += 1
    return out, cut


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
        """The base URL's path + /chat/completions (its query, e.g. an api-version, kept after it)."""
        parts = urllib.parse.urlsplit(self.url.strip())
        return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions", fragment=""))

    @property
    def shown_url(self) -> str:
        """The base URL without its credentials: what pages, messages and rows hold."""
        return redact_url(self.url)


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


def ask(endpoint: JudgeEndpoint, messages: list[dict[str, str]], *, deadline: float | None = None) -> Verdict:
    """One verdict, retried up to ``endpoint.retries`` times; the last failure is raised as JudgeError. With a
    ``deadline`` (time.monotonic()), no request runs past it (each is cut at min(timeout_s, the time left) in all,
    not per socket read), and JudgeTimeUp is raised once it has passed."""
    last: JudgeError | None = None
    for attempt in range(1 + max(0, endpoint.retries)):
        if attempt:
            time.sleep(max(0.0, min(2.0, 0.25 * 2**attempt, _remaining(deadline))))
        timeout = min(endpoint.timeout_s, _remaining(deadline))
        if timeout <= 0:
            raise JudgeTimeUp()
        try:
            # First try greedy; a retry samples, so a judge that gave no verdict can give one.
            text = _chat(endpoint, messages, temperature=0.0 if attempt == 0 else 0.7, timeout_s=timeout)
            winner, reason = parse_verdict(text)
            return Verdict(winner, reason, attempt + 1)
        except _Final as exc:
            raise JudgeError(str(exc)) from None
        except JudgeError as exc:
            last = exc
    if _remaining(deadline) <= 0:
        raise JudgeTimeUp()
    tries = 1 + max(0, endpoint.retries)
    raise JudgeError(f"{last} (after {tries} tr{'ies' if tries != 1 else 'y'})")


def _remaining(deadline: float | None) -> float:
    return float("inf") if deadline is None else deadline - time.monotonic()


def compare(
    endpoint: JudgeEndpoint, rubric: str, prompt: str, reference: str, first: str, second: str, *, deadline: float | None = None
) -> PairVerdict:
    """Judge ``first`` against ``second`` in both orders (JudgeTimeUp when ``deadline`` passes first)."""
    forward = ask(endpoint, judge_messages(rubric, prompt, reference, first, second), deadline=deadline)
    backward = ask(endpoint, judge_messages(rubric, prompt, reference, second, first), deadline=deadline)
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
    """A failure another try cannot mend (a wrong URL, a refused key, a redirect)."""


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx stays an HTTPError: following it would send the Authorization header to another address."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class _Cutoff:
    """A request's limit in all: urllib's timeout bounds each socket operation, so a judge that sends a byte now and
    then would hold a request for ever. At the limit this shuts the request's socket (the read blocked on it ends)."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.passed = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(limit_s, self._cut)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.passed:
                self._shut()

    def _cut(self) -> None:
        with self._lock:
            self.passed = True
            self._shut()

    def _shut(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self._timer.cancel()


def _cut_off(base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
    class Connection(base):
        def __init__(self, *args, cutoff: _Cutoff, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._cutoff = cutoff

        def connect(self) -> None:
            super().connect()  # bounded by the per-operation timeout, which is at most the limit
            self._cutoff.watch(self.sock)

    return Connection


_HTTP, _HTTPS = _cut_off(http.client.HTTPConnection), _cut_off(http.client.HTTPSConnection)


class _CutOffHTTP(urllib.request.HTTPHandler):
    def __init__(self, cutoff: _Cutoff) -> None:
        super().__init__()
        self._cutoff = cutoff

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTP, cutoff=self._cutoff), req)


class _CutOffHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, cutoff: _Cutoff) -> None:
        super().__init__()
        self._cutoff = cutoff

    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPS, cutoff=self._cutoff), req, context=self._context)


def _opener(cutoff: _Cutoff) -> urllib.request.OpenerDirector:
    """urllib's opener for one request: no redirects followed, the request cut at `cutoff`'s limit."""
    return urllib.request.build_opener(_RefuseRedirects, _CutOffHTTP(cutoff), _CutOffHTTPS(cutoff))


def _request(endpoint: JudgeEndpoint) -> tuple[str, dict[str, str]]:
    """The URL to call (credentials taken out of it) and the headers: the API key as a Bearer token, or the URL's
    user:password as Basic authentication (urllib sends neither by itself)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    parts = urllib.parse.urlsplit(endpoint.chat_url)
    url = endpoint.chat_url
    if "@" in parts.netloc:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        url = urllib.parse.urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))
        user, _, password = userinfo.partition(":")
        pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    return url, headers


def _chat(endpoint: JudgeEndpoint, messages: list[dict[str, str]], *, temperature: float, timeout_s: float | None = None) -> str:
    body = json.dumps(
        {"model": endpoint.model, "messages": messages, "temperature": temperature, "max_tokens": endpoint.max_tokens}
    ).encode()
    url, headers = _request(endpoint)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    where = redact_url(endpoint.chat_url)
    timeout_s = endpoint.timeout_s if timeout_s is None else timeout_s
    too_slow = f"{where} did not answer within {timeout_s:g} s (TUNA_JUDGE_TIMEOUT_S, or what was left of the run's time)"
    cutoff = _Cutoff(timeout_s)
    try:
        with _opener(cutoff).open(request, timeout=timeout_s) as response:
            raw = response.read(2_000_000)
        if cutoff.passed:  # cut while it was read: what came is not the whole answer
            raise JudgeError(too_slow)
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            target = redact_url(exc.headers.get("Location", "") or "") or "elsewhere"
            raise _Final(
                f"{where} answered HTTP {exc.code}, a redirect to {target}: not followed, so that the key is only sent to "
                "TUNA_JUDGE_URL (set TUNA_JUDGE_URL to the address it redirects to)"
            ) from None
        detail = _error_detail(exc)
        message = f"{where} answered HTTP {exc.code}{': ' + detail if detail else ''}"
        if exc.code in RETRY_STATUSES:
            raise JudgeError(message) from None
        raise _Final(message) from None
    except TimeoutError:
        raise JudgeError(too_slow) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError) or cutoff.passed:
            raise JudgeError(too_slow) from None
        raise JudgeError(f"could not reach {where}: {getattr(reason, 'strerror', None) or reason}") from None
    except (ConnectionError, OSError, http.client.HTTPException) as exc:
        if cutoff.passed:
            raise JudgeError(too_slow) from None
        raise JudgeError(f"could not reach {where}: {getattr(exc, 'strerror', None) or exc}") from None
    finally:
        cutoff.stop()
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
