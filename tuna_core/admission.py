"""Fair shares of what holds a server thread for long: slots per user and in all, counted in this process.

One primitive (`Slots`) serves inference calls and downloads. A slot is taken before the work starts and
given back when it ends; for a response that streams (a file, a zip, a tar) that is when the server closes
the response (sent in full, or the client went away), not when the view returns. Beyond a user's share the
answer is 429 (the others still get theirs), beyond the total 503; both carry Retry-After and name the setting.

The counts live in the web process, like its threads (the deployment runs one gunicorn process with 32
threads); with several processes each counts its own. Written here rather than taken from a rate-limit
package: those count requests per time window, not requests still in progress.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from django.conf import settings
from django.http import FileResponse, HttpRequest, HttpResponse, StreamingHttpResponse
from django.template.response import TemplateResponse

from tuna_core.errors import Unavailable, UserError

DOWNLOAD_RETRY_S = 10  # a download takes seconds to minutes: ask again in a while, not at once


class TooManyAtOnce(UserError):
    """One user holds all the slots their share allows (429): the others' slots stay free."""

    status = 429
    code = "rate_limit_exceeded"


class DownloadsBusy(Unavailable):
    """Every download slot of the server is taken (503)."""


class TooManyDownloads(TooManyAtOnce):
    pass


@dataclass(frozen=True)
class Refusal:
    """Why a slot was not given: the user's share is used up ("user") or every slot is ("all")."""

    scope: Literal["user", "all"]
    held: int  # slots held now in that scope
    limit: int


class Slots:
    """Counters of work in progress, per key (a user) and in all, taken and given back under one lock."""

    def __init__(self) -> None:
        # Re-entrant: a dropped Ticket's __del__ may give slots back from a garbage collection that runs inside take().
        self._lock = threading.RLock()
        self._held: Counter = Counter()
        self.total = 0

    def take(self, key, count: int = 1, *, per_key: int, total: int) -> Refusal | None:
        """Take `count` slots for `key` if both limits allow it (None), or take nothing and say which limit refused.
        A key holding nothing may take more than its share at once (one request of several rows) if the total allows."""
        with self._lock:
            if self._held[key] and self._held[key] + count > per_key:
                return Refusal("user", self._held[key], per_key)
            if self.total + count > total:
                return Refusal("all", self.total, total)
            self._held[key] += count
            self.total += count
            return None

    def give(self, key, count: int = 1) -> None:
        with self._lock:
            self._held[key] -= count
            self.total -= count
            if self._held[key] <= 0:
                del self._held[key]

    def held_by(self, key) -> int:
        with self._lock:
            return self._held[key]


@dataclass
class Ticket:
    """Slots taken for one piece of work; `release` gives them back once, however often it is called."""

    slots: Slots
    key: object
    count: int = 1
    _released: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self.slots.give(self.key, self.count)

    @property
    def released(self) -> bool:
        return self._released

    def __del__(self) -> None:  # work dropped without being closed (a response never sent) still gives its slots back
        if not getattr(self, "_released", True):
            self.release()


downloads = Slots()


@contextmanager
def download_slot(user) -> Iterator[Ticket]:
    """A download slot of `user`, held while the response is built; released at once if building it fails,
    otherwise handed to the response (`file_response` / `streaming_response`), which releases it when closed."""
    per_user, total = settings.TUNA_MAX_DOWNLOADS_PER_USER, settings.TUNA_MAX_DOWNLOADS
    refusal = downloads.take(user.pk, per_key=per_user, total=total)
    if refusal is not None and refusal.scope == "user":
        raise TooManyDownloads(
            f"You already have {refusal.held} downloads in progress and the limit is {per_user} per user "
            f"(TUNA_MAX_DOWNLOADS_PER_USER). Let one finish, then try again.",
            retry_after=DOWNLOAD_RETRY_S,
        )
    if refusal is not None:
        raise DownloadsBusy(
            f"The server is sending {refusal.held} downloads and the limit is {total} at once (TUNA_MAX_DOWNLOADS). "
            f"Try again in about {DOWNLOAD_RETRY_S} s.",
            retry_after=DOWNLOAD_RETRY_S,
        )
    ticket = Ticket(downloads, user.pk)
    try:
        yield ticket
    except BaseException:
        ticket.release()
        raise


class HeldFile:
    """A file object that releases its ticket when closed. FileResponse sees a real file (read, seek, tell,
    fileno: the server may still send it with sendfile), and the server closes it once the response is done."""

    def __init__(self, file, ticket: Ticket) -> None:
        self._file = file
        self._ticket = ticket

    def __getattr__(self, name: str):
        if name in ("_file", "_ticket"):  # not set yet: never look them up on the file
            raise AttributeError(name)
        return getattr(self._file, name)

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            self._ticket.release()


class HeldStream:
    """An iterable of chunks that releases its ticket when closed (or exhausted)."""

    def __init__(self, chunks: Iterable[bytes], ticket: Ticket) -> None:
        self._chunks = iter(chunks)
        self._ticket = ticket

    def __iter__(self) -> HeldStream:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except StopIteration:
            self.close()
            raise

    def close(self) -> None:
        try:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        finally:
            self._ticket.release()


def file_response(file, ticket: Ticket, **kwargs) -> FileResponse:
    """FileResponse(file, **kwargs) that holds `ticket` until the server closes it."""
    return FileResponse(HeldFile(file, ticket), **kwargs)


def streaming_response(chunks: Iterable[bytes], ticket: Ticket, **kwargs) -> StreamingHttpResponse:
    """StreamingHttpResponse(chunks, **kwargs) that holds `ticket` until the server closes it."""
    return StreamingHttpResponse(HeldStream(chunks, ticket), **kwargs)


class RefusalMiddleware:
    """Page views that send files raise the same refusals as the API (which DRF's handler renders); here a page
    view's refusal becomes a readable page with its status and Retry-After instead of a 500."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exc: Exception) -> HttpResponse | None:
        if not isinstance(exc, (TooManyAtOnce, DownloadsBusy)):
            return None
        response = TemplateResponse(request, "tuna_core/refused.html", {"message": exc.message}, status=exc.status)
        if exc.retry_after:
            response["Retry-After"] = str(exc.retry_after)
        return response.render()
