"""The Content-Security-Policy holds in a real browser: the main pages, /docs (Swagger UI) and the admin run with
no violation (no inline script, no eval, no inline style or style attribute, nothing from elsewhere) and no console
error."""

from __future__ import annotations

import threading

import pytest
from django.urls import reverse
from django.utils import timezone

from evaluation_app.models import Evaluation, EvaluationExample
from tests.e2e.conftest import CHROMIUM
from tests.support import job_row
from training_app.models import LossPoint

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update"]
pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Registered before any page script runs; a violation anywhere in the page (htmx, Chart.js, Swagger UI) lands here.
COLLECT = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", function (e) {
  window.__csp.push(e.violatedDirective + " blocked " + (e.blockedURI || "inline") + " at " + e.sourceFile + ":" + e.lineNumber);
});
"""


@pytest.fixture
def site_rows(alice, valid_dataset, settings):
    """A finished job with a loss curve, a running one (its page polls), and a completed evaluation with a judge."""
    settings.TUNA_JUDGE_URL, settings.TUNA_JUDGE_MODEL = "https://user:secret@judge.example/v1", "judge"
    done = job_row(
        alice, valid_dataset, status="completed", adapter_dir="/nonexistent", completed_at=timezone.now(), total_steps=4, current_step=4
    )
    for step in range(1, 5):
        LossPoint.objects.create(job=done, step=step, epoch=step / 4, loss=2.0 / step)
    running = job_row(alice, valid_dataset, status="training", total_steps=100, current_step=3, started_at=timezone.now())
    evaluation = Evaluation.objects.create(
        owner=alice,
        training_job=done,
        status="completed",
        test_size=2,
        done=2,
        completed_at=timezone.now(),
        metrics={"base_model": {"exact_match": 0.0}, "finetuned_model": {"exact_match": 1.0}, "improvements": {}},
    )
    for i in range(2):
        EvaluationExample.objects.create(
            evaluation=evaluation,
            index=i,
            messages=[{"role": "user", "content": f"prompt {i}"}],
            reference="ref",
            base_output="a",
            finetuned_output="b",
            finetuned_side="AB"[i],
        )
    return {"dataset": valid_dataset, "done": done, "running": running, "evaluation": evaluation}


# Marks the bar now on the page, then records on each animation frame (before the browser paints it) the width of
# the first new bar a poll swaps in: it must already have its width, or the bar would flash at 0 between polls.
WATCH_NEXT_BAR = """() => {
  document.querySelector(".progress > span").dataset.old = "1";
  window.__bars = [];
  const look = () => {
    const bar = document.querySelector(".progress > span");
    if (bar && !bar.dataset.old) window.__bars.push(bar.style.width || "unset");
    else requestAnimationFrame(look);
  };
  requestAnimationFrame(look);
}"""


def visit(url: str, paths: list[str], marks: dict) -> dict:
    """Log in as alice and open each page in chromium; what the browser saw, per page. Runs in its own thread:
    Playwright's sync API keeps an event loop running where it is used, and the ORM refuses such a thread."""
    from playwright.sync_api import sync_playwright

    seen: dict = {"violations": {}, "errors": [], "headers": {}}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        context = browser.new_context()
        context.add_init_script(COLLECT)
        # The admin's pages name no icon, so chromium asks for /favicon.ico (a 404 in the console, not the policy's).
        context.route("**/favicon.ico", lambda route: route.fulfill(status=204))
        page = context.new_page()
        page.on("console", lambda message: seen["errors"].append(f"{page.url}: {message.text}") if message.type == "error" else None)
        page.on("pageerror", lambda exc: seen["errors"].append(f"{page.url}: {exc}"))
        response = page.goto(f"{url}/login/")
        seen["headers"]["/login/"] = response.headers.get("content-security-policy", "")
        seen["violations"]["/login/"] = page.evaluate("window.__csp")
        page.fill("input[name=username]", "alice")
        page.fill("input[name=password]", "alice-pass-123")
        page.click("button[type=submit]")
        page.wait_for_url(f"{url}/")
        for path in paths:
            if path == marks["running"]:
                # The running job's status polls every 2 s through htmx: one round at least, under the policy.
                with page.expect_response(
                    lambda r, path=path: r.url.endswith(path) and r.request.headers.get("hx-request") == "true", timeout=10_000
                ):
                    response = page.goto(f"{url}{path}")
                seen["polled"] = True
            else:
                response = page.goto(f"{url}{path}")
            seen["headers"][path] = f"{response.status} {response.headers.get('content-security-policy', '')}"
            page.wait_for_load_state("networkidle")
            if path == marks["docs"]:
                page.wait_for_selector(".swagger-ui .info .title", timeout=20_000)  # Swagger UI rendered the schema
                seen["docs"] = page.inner_text(".swagger-ui .info .title")
            if path == marks["chart"]:
                seen["chart"] = page.evaluate("!!(window.Chart && Chart.getChart(document.querySelector('canvas[data-chart]')))")
            if path == marks["running"]:
                # Its progress bar's width comes from data-width through static/js/tuna.js (no style="" in the page).
                # Read on the first animation frame after the next poll swaps a new bar in: its width is set at once,
                # so the bar never shows at 0 between two polls.
                page.evaluate(WATCH_NEXT_BAR)
                for _ in range(100):
                    if page.evaluate("window.__bars.length"):
                        break
                    page.wait_for_timeout(100)
                seen["bar"] = page.evaluate("window.__bars[0]")
            if path == marks["judge"]:
                seen["judge_page"] = page.content()
            seen["violations"][path] = page.evaluate("window.__csp")
        # The collector itself: an inline script added now is refused by the policy, and seen.
        page.goto(f"{url}/")
        before = len(seen["errors"])
        try:
            page.add_script_tag(content="window.__inline = true;")
        except Exception:  # noqa: BLE001 - Playwright may report the refused script as an error
            pass
        seen["probe"] = page.evaluate("[window.__inline === true, window.__csp.length]")
        del seen["errors"][before:]  # the console's report of that refusal
        browser.close()
    return seen


def test_it_runs_the_main_pages_and_docs_without_a_policy_violation(live_server, site_rows):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    rows = site_rows
    type(rows["dataset"].owner).objects.filter(pk=rows["dataset"].owner_id).update(is_staff=True, is_superuser=True)
    marks = {
        "running": reverse("training-detail", args=[rows["running"].pk]),
        "chart": reverse("training-detail", args=[rows["done"].pk]),
        "judge": reverse("evaluation-detail", args=[rows["evaluation"].pk]),
        "docs": reverse("api-docs"),
    }
    paths = [
        reverse("dashboard"),
        reverse("dataset-list"),
        reverse("dataset-detail", args=[rows["dataset"].pk]),
        reverse("training-new", args=[rows["dataset"].pk]),
        reverse("training-list"),
        marks["chart"],
        marks["running"],
        reverse("experiment-list"),
        reverse("evaluation-list"),
        marks["judge"],
        reverse("dataset-runs", args=[rows["dataset"].pk]),
        reverse("playground"),
        reverse("usage"),
        reverse("account"),
        reverse("coming-from-openai"),
        marks["docs"],
        # The admin too (alice is staff here): its own pages and this site's read-only displays.
        reverse("admin:index"),
        reverse("admin:training_app_trainingjob_changelist"),
        reverse("admin:training_app_trainingjob_change", args=[rows["done"].pk]),
        reverse("admin:datasets_app_dataset_change", args=[rows["dataset"].pk]),
        reverse("admin:evaluation_app_evaluation_change", args=[rows["evaluation"].pk]),
        reverse("admin:django_q_failure_changelist"),
    ]
    result: dict = {}

    def run() -> None:
        try:
            result.update(visit(live_server.url, paths, marks))
        except Exception as exc:  # noqa: BLE001 - raised again in the test's own thread
            result["raised"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=240)
    assert not thread.is_alive() and result, "the browser run did not finish"
    if "raised" in result:
        raise result["raised"]

    for path, header in result["headers"].items():
        assert "script-src 'self'" in header and "default-src 'self'" in header and "style-src 'self'" in header, (path, header)
        assert "unsafe" not in header, (path, header)  # no inline script or style, no eval
        assert path == "/login/" or header.startswith("200 "), (path, header)
    assert {path: v for path, v in result["violations"].items() if v} == {}
    assert result["errors"] == []
    assert result["probe"] == [False, 1], "an inline script is refused and reported (the check above can fail)"
    assert "LLM Tuna API" in result["docs"]
    assert result["chart"], "the loss chart was drawn (Chart.js ran under the policy)"
    assert result["polled"] and result["bar"] == "3%"
    # The judge's URL is shown without its credentials.
    assert "judge.example" in result["judge_page"] and "secret" not in result["judge_page"]
