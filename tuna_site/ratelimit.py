"""Page rate limit: form posts (and every other unsafe method) to the pages, TUNA_PAGE_RATE per user.

The API (/api, /v1) has its own limit (TUNA_API_RATE, a DRF throttle) and the log-in pages theirs (failed
log-ins, tuna_site.throttles); everything else a browser posts (uploads, the playground, starting jobs) is
counted here, per signed-in user (per address before signing in). Beyond the rate: 429 with Retry-After and a
readable page (for htmx, which swaps 4xx answers, a fragment put at the top of the page's main element).

Votes on an evaluation's examples (the evaluation-vote endpoint, one key press each when voting blind) are counted
in a bucket of their own, VOTE_RATE_FACTOR times TUNA_PAGE_RATE (600 a minute by default): fast keyboard voting
never meets the page limit, and votes do not use up the user's form posts (nor form posts their votes).
"""

from __future__ import annotations

from django.conf import settings
from django.shortcuts import render
from django.urls import NoReverseMatch, Resolver404, resolve, reverse

from tuna_site.throttles import client_ip, parse_rate, rate_hit, wait_text

_SAFE_METHODS = {"GET", "HEAD", "OPTIONS", "TRACE"}
_API_PREFIXES = ("/api/", "/v1/")
VOTE_URL_NAMES = frozenset({"evaluation-vote"})
VOTE_RATE_FACTOR = 10


def _is_vote(path: str) -> bool:
    try:
        return resolve(path).url_name in VOTE_URL_NAMES
    except Resolver404:
        return False


def _vote_rate(rate: str) -> str:
    """The votes' own bucket: VOTE_RATE_FACTOR times the page rate, over the same period ("60/min" -> "600/min")."""
    count, _, _ = parse_rate(rate)
    return f"{count * VOTE_RATE_FACTOR}/{rate.split('/')[1]}"


def _login_paths() -> set[str]:
    found = set()
    for name in ("login", "admin:login"):
        try:
            found.add(reverse(name))
        except NoReverseMatch:  # a site without the admin
            pass
    return found


def page_rate_middleware(get_response):
    login_paths: set[str] = set()

    def middleware(request):
        rate = settings.TUNA_PAGE_RATE
        if rate is None or request.method in _SAFE_METHODS or request.path_info.startswith(_API_PREFIXES):
            return get_response(request)
        if not login_paths:
            login_paths.update(_login_paths())
        if request.path_info in login_paths:
            return get_response(request)
        user = getattr(request, "user", None)
        ident = f"user:{user.pk}" if user is not None and user.is_authenticated else f"ip:{client_ip(request)}"
        vote = _is_vote(request.path_info)
        bucket_rate = _vote_rate(rate) if vote else rate
        retry_after = rate_hit(f"{'vote' if vote else 'page'}:{ident}", bucket_rate)
        if not retry_after:
            return get_response(request)
        count, _, period = parse_rate(bucket_rate)
        what = (
            f"votes: the limit is {count} per {period} per user ({VOTE_RATE_FACTOR} × TUNA_PAGE_RATE)"
            if vote
            else f"form posts: the limit is {count} per {period} per user (TUNA_PAGE_RATE)"
        )
        message = f"Too many {what}. Try again in {wait_text(retry_after)}."
        htmx = request.headers.get("HX-Request") == "true"
        template = "rate_limited_fragment.html" if htmx else "rate_limited.html"
        response = render(request, template, {"message": message, "retry_after": retry_after}, status=429)
        response["Retry-After"] = str(retry_after)
        if htmx:  # shown at the top of the page, whatever the form's target was (a preview's plan stays in place)
            response["HX-Retarget"] = "main"
            response["HX-Reswap"] = "afterbegin"
        return response

    return middleware
