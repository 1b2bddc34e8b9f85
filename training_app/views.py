from __future__ import annotations

import io
import zipfile
from pathlib import Path

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from datasets_app.selectors import get_dataset_for_user
from inference_app.catalog import get_catalog
from training_app import services
from training_app.config import RANGES, TrainingConfig
from training_app.estimates import training_estimate
from training_app.selectors import get_job_for_user, jobs_for_user, loss_chart_data


@login_required
@require_GET
def training_list(request: HttpRequest) -> HttpResponse:
    return render(request, "training_app/training_list.html", {"jobs": jobs_for_user(request.user)})


@login_required
@require_http_methods(["GET", "POST"])
def training_new(request: HttpRequest, dataset_pk: int) -> HttpResponse:
    dataset = get_dataset_for_user(request.user, dataset_pk)
    errors: dict[str, str] = {}
    values = {k: v for k, v in request.POST.items() if k != "csrfmiddlewaretoken" and v != ""}
    if request.method == "POST":
        try:
            job = services.training_job_start(owner=request.user, dataset=dataset, config_data=values)
        except services.ConfigInvalid as exc:
            errors = exc.errors
        except services.DatasetNotTrainable as exc:
            messages.error(request, str(exc))
            return redirect(dataset)
        else:
            return redirect(job)
    defaults = TrainingConfig(base_model=settings.TUNA_DEFAULT_BASE_MODEL)
    context = {
        "dataset": dataset,
        "catalog": get_catalog(),
        "fields": [
            {"name": name, "spec": spec, "default": getattr(defaults, name), "value": values.get(name, ""), "error": errors.get(name)}
            for name, spec in RANGES.items()
        ],
        "defaults": defaults,
        "values": values,
        "errors": errors,
        "estimate": training_estimate(
            dataset=dataset, base_model=values.get("base_model"), num_epochs=_int(values.get("num_epochs"), defaults.num_epochs)
        ),
    }
    return render(request, "training_app/training_new.html", context, status=400 if errors else 200)


def _int(raw, default: int) -> int:
    try:
        return max(1, int(raw))
    except (TypeError, ValueError):
        return default


def _progress_context(job) -> dict:
    return {
        "job": job,
        "chart": loss_chart_data(job),
        "chart_id": f"loss-data-{job.pk}",
        "queue_position": services.queue_position(job) if job.status == job.Status.QUEUED else None,
        "can_resume": job.status in (job.Status.FAILED, job.Status.CANCELLED) and services.resumable_checkpoint(job) is not None,
    }


@login_required
@require_GET
def training_detail(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_job_for_user(request.user, pk)
    if request.htmx:
        return render(request, "training_app/_progress.html", _progress_context(job))
    context = _progress_context(job)
    context["evaluations"] = job.evaluations.all()[:10]
    return render(request, "training_app/training_detail.html", context)


def _job_action(request: HttpRequest, pk: int, action, success: str) -> HttpResponse:
    job = get_job_for_user(request.user, pk)
    try:
        action(job=job)
        messages.success(request, success.format(pk=job.pk))
    except services.JobConflict as exc:
        messages.error(request, str(exc))
    return redirect(job)


@login_required
@require_POST
def training_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    return _job_action(request, pk, services.training_job_cancel, "Cancelling job #{pk}: it stops after the current step.")


@login_required
@require_POST
def training_resume(request: HttpRequest, pk: int) -> HttpResponse:
    return _job_action(request, pk, services.training_job_resume, "Job #{pk} is queued to resume from its last checkpoint.")


@login_required
@require_GET
def training_adapter(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_job_for_user(request.user, pk)
    return adapter_zip_response(job)


def adapter_zip_response(job) -> FileResponse:
    if job.status != job.Status.COMPLETED or not job.adapter_dir or not Path(job.adapter_dir).is_dir():
        raise Http404("This job has no adapter to download.")
    buffer = io.BytesIO()
    root = Path(job.adapter_dir)
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.write(path, Path(f"tuna-job-{job.pk}-adapter") / path.relative_to(root))
    buffer.seek(0)
    return FileResponse(buffer, as_attachment=True, filename=f"tuna-job-{job.pk}-adapter.zip", content_type="application/zip")
