from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.files import File
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from datasets_app import checks, selectors, services
from datasets_app.examples import SAMPLE_PATH
from datasets_app.forms import DatasetUploadForm, EvalFileForm
from datasets_app.selectors import EXAMPLES_PER_PAGE, dataset_examples, get_dataset_for_user
from datasets_app.uploads import too_large_message, upload_too_large
from tuna_core.disk import DiskFull
from tuna_core.pages import refused


@login_required
@require_GET
def dataset_list(request: HttpRequest) -> HttpResponse:
    datasets = selectors.datasets_for_user(request.user)
    return render(
        request,
        "datasets_app/dataset_list.html",
        {"datasets": datasets, "form": DatasetUploadForm(), "max_upload_mb": settings.TUNA_MAX_UPLOAD_MB},
    )


@login_required
@require_POST
def dataset_upload(request: HttpRequest) -> HttpResponse:
    try:
        if upload_too_large(request):
            return _upload_error(request, services.UploadTooLarge(too_large_message()))
    except DiskFull as exc:
        return _upload_error(request, exc)
    form = DatasetUploadForm(request.POST, request.FILES)
    if not form.is_valid():
        return _upload_error(request, services.UploadRejected(" ".join(m for errs in form.errors.values() for m in errs)))
    try:
        dataset = services.dataset_create(
            owner=request.user,
            upload=form.cleaned_data["file"],
            name=form.cleaned_data["name"],
            eval_fraction=form.eval_fraction,
        )
    except services.UploadRejected as exc:
        return _upload_error(request, exc)
    if request.htmx:
        context = {**_detail_context(dataset), "datasets": selectors.datasets_for_user(request.user)}
        return render(request, "datasets_app/_upload_result.html", context)
    return redirect(dataset)


def _upload_error(request: HttpRequest, exc: services.UploadRejected) -> HttpResponse:
    return refused(request, exc, redirect_to="dataset-list", fragment="datasets_app/_upload_error.html")


@login_required
@require_POST
def dataset_sample(request: HttpRequest) -> HttpResponse:
    try:
        with SAMPLE_PATH.open("rb") as handle:
            dataset = services.dataset_create(owner=request.user, upload=File(handle, name=SAMPLE_PATH.name), name="Sample: orders to JSON")
    except services.UploadRejected as exc:  # the storage quota is full
        return _upload_error(request, exc)
    messages.success(request, "The sample dataset is ready. Start a fine-tune with the default settings.")
    return redirect(dataset)


def _detail_context(dataset) -> dict:
    report = dataset.validation_report
    stats = report.get("stats", {})
    return {
        "dataset": dataset,
        "report": report,
        "stats_rows": [
            ("Prompt", stats.get("prompt_tokens")),
            ("Completion", stats.get("completion_tokens")),
            ("Whole example", stats.get("example_tokens")),
        ],
        "histogram_id": f"histogram-{dataset.pk}",
        "default_model": settings.TUNA_DEFAULT_BASE_MODEL,
        "split": report.get("split", {}),
    }


@login_required
@require_GET
def dataset_detail(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_dataset_for_user(request.user, pk)
    context = _detail_context(dataset)
    context["preview"] = dataset_examples(dataset, limit=5)
    context["eval_form"] = EvalFileForm()
    return render(request, "datasets_app/dataset_detail.html", context)


@login_required
@require_GET
def dataset_examples_page(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_dataset_for_user(request.user, pk)
    report = dataset.validation_report
    # An invalid upload keeps only its first lines (report["kept"]); the report still covers the whole file.
    total = dataset.num_examples if dataset.is_valid else report.get("kept", {}).get("lines", report.get("lines", 0))
    page = Paginator(range(total), EXAMPLES_PER_PAGE).get_page(request.GET.get("page"))
    rows = dataset_examples(dataset, offset=page.start_index() - 1 if total else 0, limit=EXAMPLES_PER_PAGE)
    return render(request, "datasets_app/dataset_examples.html", {"dataset": dataset, "page": page, "rows": rows})


@login_required
@require_POST
def dataset_eval_file(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_dataset_for_user(request.user, pk)
    try:
        if upload_too_large(request):
            messages.error(request, too_large_message())
            return redirect(dataset)
        report = services.dataset_attach_eval_file(dataset=dataset, upload=request.FILES.get("file"))
    except (services.UploadRejected, DiskFull) as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Held-out file attached: {report['valid_examples']} examples kept for evaluation.")
    return redirect(dataset)


@login_required
@require_http_methods(["GET", "POST"])
def dataset_delete(request: HttpRequest, pk: int) -> HttpResponse:
    """GET: the confirmation, listing the jobs (and their evaluations) that would go with it; POST: delete."""
    dataset = get_dataset_for_user(request.user, pk)
    error = None
    if request.method == "POST":
        try:
            services.dataset_delete(dataset=dataset, with_jobs=request.POST.get("with_jobs") == "1")
        except services.DatasetInUse as exc:
            error = exc.message
        else:
            messages.success(request, f"Deleted dataset “{dataset.name}”.")
            return redirect("dataset-list")
    jobs = dataset.training_jobs.order_by("pk").prefetch_related("evaluations")
    context = {"dataset": dataset, "jobs": jobs, "error": error}
    return render(request, "datasets_app/dataset_delete.html", context, status=409 if error else 200)


# -- the user's own checks of an answer (datasets_app.checks) ----------------------------------------------------


def _checks_answer(request: HttpRequest, dataset, *, error: str = "", form=None, status: int = 200, done: str = "") -> HttpResponse:
    """The Checks block again (htmx), or the dataset page with the message (a plain form post)."""
    if request.htmx:
        context = {"dataset": dataset, "checks_error": error, "checks_form": form or {}, "checks_done": done}
        return render(request, "datasets_app/_checks.html", context, status=status)
    if error:
        messages.error(request, error)
    elif done:
        messages.success(request, done)
    return redirect(f"{dataset.get_absolute_url()}#checks")


@login_required
@require_POST
def dataset_check_add(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_dataset_for_user(request.user, pk)
    kind, value = request.POST.get("kind", ""), request.POST.get("value", "")
    check = {"name": request.POST.get("name", ""), "kind": kind, "value": value.splitlines() if kind == "one_of" else value}
    try:
        checks.dataset_check_add(dataset, check)
    except checks.ChecksInvalid as exc:
        return _checks_answer(request, dataset, error=exc.message, form=request.POST, status=exc.status)
    return _checks_answer(request, dataset, done=f"Check “{dataset.answer_checks[-1]['name']}” added.")


@login_required
@require_POST
def dataset_check_remove(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_dataset_for_user(request.user, pk)
    name = request.POST.get("name", "")
    before = len(dataset.answer_checks or [])
    kept = checks.dataset_check_remove(dataset, name)
    return _checks_answer(request, dataset, done=f"Check “{name}” removed." if len(kept) < before else f"There is no check named “{name}”.")
