"""The whole journey in a real browser (Debian's chromium via Playwright) against a live server and worker."""

import re

import pytest
from playwright.sync_api import expect

from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.browser
SAMPLE = (ROOT / "samples" / "orders_to_json.jsonl").read_text()
TIMEOUT = 240_000
# DPO trains on chosen and rejected answers and runs a reference pass: on a 2-core AMD EPYC with AVX2 only, the
# journey's 10 updates took 237 s of training while the live site, the browser and the worker shared the cores.
PREFERENCE_TIMEOUT = 600_000


def login(page, site, user, shots=None):
    page.goto(f"{site.url}/login/")
    if shots is not None:
        shots(page, "00-login")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", f"{user}-pass-123")
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Dashboard")


def drop_file(page, name: str, content: str) -> None:
    page.wait_for_selector("[data-dropzone][data-ready]")  # the page's script has hooked the drop zone up
    transfer = page.evaluate_handle(
        "([name, content]) => { const dt = new DataTransfer(); dt.items.add(new File([content], name, {type: 'application/jsonl'})); return dt; }",
        [name, content],
    )
    page.dispatch_event("[data-dropzone]", "drop", {"dataTransfer": transfer})


def settled(page) -> None:
    """Wait until htmx has no request, swap or settle in progress."""
    page.wait_for_function("() => !document.querySelector('.htmx-request, .htmx-swapping, .htmx-settling, .htmx-added')")


def chart_points(page, canvas_id: str) -> int:
    return page.evaluate(
        f"() => {{ const c = window.Chart && Chart.getChart(document.getElementById('{canvas_id}')); return c ? c.data.datasets[0].data.length : 0; }}"
    )


def test_it_takes_a_user_from_an_empty_site_to_a_callable_model(browser, live_site, shots):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    external = []
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith(live_site.url) and not r.url.startswith("data:") else None)
    login(page, live_site, "alice", shots)
    shots(page, "01-dashboard")

    page.click("nav >> text=Datasets")
    drop_file(page, "orders_to_json.jsonl", SAMPLE)
    report = page.locator("#upload-result .upload-report")
    expect(report).to_contain_text("160 examples", timeout=30_000)
    expect(page.locator("#upload-result canvas[data-chart=histogram]")).to_be_visible()
    page.wait_for_function(
        "() => { const c = document.querySelector('#upload-result canvas'); return c && window.Chart && Chart.getChart(c); }"
    )
    shots(page, "02-dataset-report")

    page.click("text=Train with defaults")
    expect(page.locator("h1")).to_contain_text("Fine-tune on")
    dataset_url = "/datasets/" + re.search(r"/training/new/(\d+)", page.url).group(1)
    page.click("summary:has-text('Advanced')")
    for name, value in {"max_steps": "12", "max_seq_length": "160", "save_steps": "4", "eval_steps": "4", "eval_examples": "4"}.items():
        page.fill(f"input[name={name}]", value)
    shots(page, "03-training-form")
    page.click("text=Start training")
    expect(page.locator("h1")).to_contain_text("Training job #")
    job_url = page.url.removeprefix(live_site.url)
    page.wait_for_function(
        "() => { const c = window.Chart && Chart.getChart(document.getElementById('loss-chart')); return c && c.data.datasets[0].data.length > 0; }",
        timeout=TIMEOUT,
    )
    first_points = chart_points(page, "loss-chart")
    # Watch the chart gain points while the job is still training (htmx polling, no reload).
    page.wait_for_function(
        f"""() => {{ const c = Chart.getChart(document.getElementById('loss-chart'));
                     return c.data.datasets[0].data.length > {first_points}
                            && document.getElementById('job-status').textContent.trim() === 'Training'; }}""",
        timeout=TIMEOUT,
    )
    expect(page.locator("#job-step")).to_contain_text(re.compile(r"\d+ / 12"))
    shots(page, "04-training-live")
    expect(page.locator("#job-status")).to_have_text("Completed", timeout=TIMEOUT)
    page.wait_for_timeout(500)
    assert chart_points(page, "loss-chart") >= 12
    assert page.locator("#job-progress[hx-trigger]").count() == 0  # polling stopped by itself
    shots(page, "05-training-done")

    page.fill("input[name=test_size]", "4")
    page.click("#evaluate-button")
    expect(page.locator("h1")).to_contain_text("base vs fine-tuned")
    evaluation_url = page.url.removeprefix(live_site.url).split("?")[0]
    expect(page.locator("#eval-progress")).to_contain_text(re.compile(r"\d of 4 examples answered"), timeout=TIMEOUT)
    shots(page, "06-evaluation-running")
    expect(page.locator(".example-view")).to_be_visible(timeout=TIMEOUT)
    expect(page.locator(".example-view")).to_contain_text("Example 1 of 4")
    settled(page)
    page.keyboard.press("ArrowRight")
    expect(page.locator(".example-view")).to_contain_text("Example 2 of 4")
    assert "Fine-tuned" not in page.locator(".sides").inner_text()  # blind before the vote
    settled(page)
    page.keyboard.press("a")
    # The vote reveals the names and the next example not voted on opens by itself.
    expect(page.locator("#last-vote")).to_contain_text("Example 2: you preferred A.")
    expect(page.locator("#last-vote")).to_contain_text("was the fine-tuned model")
    expect(page.locator(".example-view")).to_contain_text("Example 3 of 4")
    expect(page.locator("#win-rate")).not_to_have_text("—")
    settled(page)
    page.keyboard.press("b")
    expect(page.locator("#win-rate-card")).to_contain_text("2 cast")
    shots(page, "07-evaluation")

    page.click("nav >> text=Playground")
    page.fill(
        "textarea[name=prompt]",
        "Extract the order as JSON with keys product, color, size, quantity, shipping.\nOrder: Please send hoodie (red, L), quantity 2. no rush",
    )
    page.click("text=Generate")
    expect(page.locator("#playground-result .answer")).to_have_count(2, timeout=120_000)
    expect(page.locator("#playground-result")).to_contain_text("Fine-tuned (tuna-job-")
    shots(page, "08-playground")
    page.select_option("select[name=model]", "base:smollm2-135m-instruct")
    expect(page.locator("[data-snippet-model]").first).to_have_text("base:smollm2-135m-instruct")  # snippets follow the pick

    # Bob, signed in beside alice, gets 404 on each of her pages and on her adapter download.
    bob = browser.new_context().new_page()
    login(bob, live_site, "bob")
    for path in (dataset_url, job_url, f"{job_url}/adapter.zip", evaluation_url, f"{evaluation_url}/preferences.jsonl"):
        response = bob.request.get(f"{live_site.url}{path}")
        assert response.status == 404, path
    bob.goto(f"{live_site.url}{evaluation_url}")
    assert "base vs fine-tuned" not in bob.content()
    bob.context.close()

    page.click(".usermenu summary")
    page.click("text=Log out")
    expect(page).to_have_url(re.compile(r"/login/"))
    shots(page, "09-logged-out")
    assert external == [], external  # nothing loaded from another host


def test_it_shows_line_numbered_errors_for_an_invalid_file(browser, live_site, shots):
    page = browser.new_page()
    login(page, live_site, "alice")
    page.goto(f"{live_site.url}/datasets")
    lines = SAMPLE.splitlines()[:20]
    lines[6] = '{"prompt": "broken'
    drop_file(page, "broken.jsonl", "\n".join(lines))
    expect(page.locator("#upload-result")).to_contain_text("line 7", timeout=30_000)
    expect(page.locator("#upload-result")).to_contain_text("not valid JSON")
    shots(page, "10-invalid-file")


def train_sample(browser, site, *, max_steps: int):
    """Alice starts a job on the sample dataset with `max_steps` updates; the page is the job's."""
    page = browser.new_page()
    login(page, site, "alice")
    page.goto(f"{site.url}/datasets")
    page.click("text=Try the sample dataset")
    page.click("a.btn-primary:has-text('Train')")
    page.click("summary:has-text('Advanced')")
    page.fill("input[name=max_steps]", str(max_steps))
    page.fill("input[name=max_seq_length]", "160")
    page.click("text=Start training")
    return page


def test_it_shows_a_cancelled_job_whose_chart_stops(browser, live_site, shots):
    page = train_sample(browser, live_site, max_steps=400)
    page.wait_for_function(
        "() => { const c = window.Chart && Chart.getChart(document.getElementById('loss-chart')); return c && c.data.datasets[0].data.length > 1; }",
        timeout=TIMEOUT,
    )
    page.click("#job-progress button:has-text('Cancel')")
    expect(page.locator("#job-status")).to_have_text("Cancelled", timeout=60_000)
    points = chart_points(page, "loss-chart")
    page.wait_for_timeout(4000)
    assert chart_points(page, "loss-chart") == points
    assert page.locator("#job-progress[hx-trigger]").count() == 0
    shots(page, "11-cancelled")


def test_it_keeps_bob_out_of_alices_pages(browser, live_site):
    page = browser.new_page()
    login(page, live_site, "alice")
    page.goto(f"{live_site.url}/datasets")
    page.click("text=Try the sample dataset")
    alice_url = page.url
    assert re.search(r"/datasets/\d+$", alice_url)
    other = browser.new_context().new_page()
    login(other, live_site, "bob")
    response = other.goto(alice_url)
    assert response.status == 404
    assert "Sample: orders to JSON" not in other.content()


def test_it_offers_to_continue_a_run_that_stopped_while_improving(browser, live_site, shots):
    page = browser.new_page()
    login(page, live_site, "alice")
    page.goto(f"{live_site.url}/datasets")
    drop_file(page, "thirty.jsonl", "\n".join(SAMPLE.splitlines()[:30]))  # 24 to train (4 of them validate), 6 held out
    expect(page.locator("#upload-result")).to_contain_text("Valid", timeout=30_000)
    page.click("#upload-result a:has-text('Train with defaults')")
    expect(page.locator("#plan-table")).to_contain_text("Validation examples")
    page.click("summary:has-text('Advanced')")
    for name, value in {"max_steps": "4", "eval_steps": "2", "max_seq_length": "160"}.items():
        page.fill(f"input[name={name}]", value)
    page.click("text=Start training")
    expect(page.locator("#job-status")).to_have_text("Completed", timeout=TIMEOUT)
    # Four updates cannot finish learning the format: the page says so and offers one click to go on.
    expect(page.locator("#learning-verdict")).to_contain_text("still falling when training stopped")
    shots(page, "12-still-improving")
    page.fill("#learning-verdict input[name=epochs]", "1")
    page.click("#continue-button")
    expect(page.locator("h1")).to_contain_text("Training job #")
    expect(page.locator("#job-progress")).to_contain_text("Continues")
    expect(page.locator("#job-status")).to_have_text("Completed", timeout=TIMEOUT)
    page.wait_for_timeout(500)
    steps = page.evaluate("() => Chart.getChart(document.getElementById('loss-chart')).data.datasets[0].data.map(p => p.x)")
    # One history: the first run's updates, then the continued run's 5 (one epoch of 20 examples), numbered on.
    assert len(steps) > 5 and steps == list(range(1, len(steps) + 1)), steps
    shots(page, "13-continued")


def test_it_exports_a_trained_job_and_shows_the_parity_check(browser, live_site, shots, tmp_path):
    page = train_sample(browser, live_site, max_steps=6)
    expect(page.locator("#job-status")).to_have_text("Completed", timeout=TIMEOUT)
    page.reload()
    page.click("#export button:has-text('Export')")
    expect(page.locator("#export")).to_contain_text(re.compile("Queued|Running"))
    shots(page, "14-export-running")
    expect(page.locator("#parity")).to_be_visible(timeout=TIMEOUT)
    f16 = page.locator("#parity tr[data-variant=f16] td").first.inner_text()
    identical, total = (int(n) for n in re.findall(r"\d+", f16))
    assert total == 4 and identical >= 4 * 0.95  # the live site checks 4 held-out prompts (TUNA_PARITY_EXAMPLES)
    expect(page.locator("#parity tr[data-variant=q8_0]")).to_be_visible()
    expect(page.locator("#export-files tr[data-kind=bundle]")).to_be_visible()
    shots(page, "15-export-done")
    with page.expect_download() as download:
        page.click("#export-files tr[data-kind=modelfile] a >> nth=0")
    modelfile = tmp_path / "Modelfile"
    download.value.save_as(modelfile)
    text = modelfile.read_text()
    assert "FROM ./base-f16.gguf" in text and "ADAPTER ./adapter-f16.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text


def test_it_trains_on_blind_votes_and_compares_the_result_with_its_parent(browser, live_site, shots):
    page = train_sample(browser, live_site, max_steps=8)
    expect(page.locator("#job-status")).to_have_text("Completed", timeout=TIMEOUT)
    page.fill("input[name=test_size]", "4")
    page.click("#evaluate-button")
    expect(page.locator(".example-view")).to_be_visible(timeout=TIMEOUT)
    for number in range(1, 5):  # a blind vote on every example
        expect(page.locator(".example-view")).to_contain_text(f"Example {number} of 4")
        settled(page)
        page.keyboard.press("a")
    expect(page.locator("#win-rate-card")).to_contain_text("4 cast")
    # The pair counts follow the votes without a reload (the vote's answer swaps the card out of band).
    expect(page.locator("#pair-counts")).to_contain_text(re.compile(r"\b[1-9]\d* pairs? from your blind votes"))
    shots(page, "12-train-on-preferences")
    page.click("#train-on-preferences")

    expect(page.locator("h1")).to_contain_text("Preference-tuning job")
    expect(page.locator("#preference-source")).to_contain_text("DPO on")
    expect(page.locator("#job-status")).to_have_text("Completed", timeout=PREFERENCE_TIMEOUT)
    assert chart_points(page, "loss-chart") >= 2
    shots(page, "13-preference-job-done")
    page.reload()
    link = page.locator(".row-item a:has-text('Evaluation #')").first  # queued by itself when the job completed
    expect(link).to_be_visible()
    link.click()

    expect(page.locator("h1")).to_contain_text("vs its parent")
    expect(page.locator(".example-view")).to_be_visible(timeout=TIMEOUT)
    expect(page.locator("#preference-result")).to_contain_text("better than its parent")
    for number in range(1, 5):
        expect(page.locator(".example-view")).to_contain_text(f"Example {number} of 4")
        settled(page)
        page.keyboard.press("b")
    page.reload()
    expect(page.locator("#preference-votes")).to_contain_text(re.compile(r"\d won, \d lost"))
    expect(page.locator("#preference-votes strong")).to_contain_text(re.compile(r"Better|Worse|Within noise|Vote blind"))
    shots(page, "14-preference-comparison")
