from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from datasets_app.examples import validation_lines
from datasets_app.selectors import get_dataset_for_user
from training_app import experiment_views, experiments, exports, services
from training_app.estimates import training_estimate
from training_app.export_api import export_files
from training_app.models import Export, TrainingJob
from training_app.selectors import (
    adapter_download,
    base_model_download,
    get_job_for_user,
    jobs_for_user,
    learning_verdict,
    loss_chart_data,
    settings_rows,
)
from training_app.storage import job_files_bytes
from training_app.tracking import tracking_files_download
from tuna_core.errors import NotFound
from tuna_core.jobs import queue_position
from tuna_core.quotas import LimitExceeded
from tuna_llm import gguf_export
from tuna_llm.catalog import get_catalog
from tuna_llm.training_config import RANGES


@login_required
@require_GET
def training_list(request: HttpRequest) -> HttpResponse:
    return render(request, "training_app/training_list.html", {"jobs": jobs_for_user(request.user)})


@login_required
@require_http_methods(["GET", "POST"])
def training_new(request: HttpRequest, dataset_pk: int) -> HttpResponse:
    """The confirmation form: every setting the job would run with and why; a change re-renders the plan. "Try several
    settings" starts a sweep of these settings with a grid around them instead (training_app.experiment_views)."""
    dataset = get_dataset_for_user(request.user, dataset_pk)
    if dataset.is_preference:
        return _training_new_preference(request, dataset)
    values = experiment_views.job_values(request.POST)
    plan = services.training_plan(dataset=dataset, config_data=values)
    limit_error, sweep_errors = None, {}
    if request.method == "POST" and not request.POST.get("preview") and not plan.errors:
        try:
            if request.POST.get("sweep"):
                started = experiment_views.sweep_start(request, dataset, values)
            else:
                started = services.training_job_start(owner=request.user, dataset=dataset, config_data=values)
        except services.DatasetNotTrainable as exc:
            messages.error(request, str(exc))
            return redirect(dataset)
        except LimitExceeded as exc:
            limit_error = exc.message  # the form stays, with its values, until a job finishes
        except (services.ConfigInvalid, experiments.SweepInvalid) as exc:  # a sweep's grid
            sweep_errors = {**exc.errors, "sweep": exc.message}
        else:
            return redirect(started)
    defaults = plan.config or services.training_plan(dataset=dataset, config_data={}).config
    context = {
        "dataset": dataset,
        "catalog": get_catalog(),
        "fields": [
            {"name": name, "spec": spec, "chosen": getattr(defaults, name), "value": values.get(name, ""), "error": plan.errors.get(name)}
            for name, spec in RANGES.items()
        ],
        "defaults": defaults,
        "values": values,
        "errors": plan.errors,
        "limit_error": limit_error,
        **_plan_context(dataset, plan),
        **experiment_views.sweep_context(dataset, values, request.POST, errors=sweep_errors, method=request.method),
    }
    preview = request.POST.get("preview")
    status = 409 if limit_error else 400 if (plan.errors or sweep_errors) and not preview else 200
    if request.htmx and preview:
        return render(request, "training_app/_sweep_preview.html", context)
    return render(request, "training_app/training_new.html", context, status=status)


PREFERENCE_FIELDS = ("num_epochs", "batch_size", "learning_rate_multiplier", "beta")


def _training_new_preference(request: HttpRequest, dataset) -> HttpResponse:
    """A preference file trains with DPO: from a base model (a new adapter) or from one of the user's completed fine-tunes."""
    values = {name: request.POST[name] for name in PREFERENCE_FIELDS if request.POST.get(name, "") != ""}
    start = request.POST.get("start", f"base:{settings.TUNA_DEFAULT_BASE_MODEL}")
    fine_tunes = jobs_for_user(request.user).filter(status=TrainingJob.Status.COMPLETED).exclude(adapter_dir="")
    errors: dict = {}
    chosen = start.removeprefix("job:")
    parent = fine_tunes.filter(pk=int(chosen)).first() if start.startswith("job:") and chosen.isdigit() else None
    if request.method == "POST" and start.startswith("job:") and parent is None:
        errors = {"start": "Choose a base model or one of your completed fine-tunes."}
    elif request.method == "POST":
        config = {**values, "base_model": start.removeprefix("base:")} if parent is None else values
        try:
            job = services.preference_file_job_start(owner=request.user, dataset=dataset, parent=parent, config_data=config)
        except (services.ConfigInvalid, services.DatasetNotTrainable) as exc:
            errors = {name: " ".join(messages) for name, messages in exc.errors.items()} or {"start": exc.message}
        except (services.JobConflict, LimitExceeded) as exc:
            errors = {"start": exc.message}
        else:
            return redirect(job)
    context = {
        "dataset": dataset,
        "base_choices": [(f"base:{name}", f"{name} — {spec.describe_state()}") for name, spec in get_catalog().items()],
        "job_choices": [(f"job:{job.pk}", f"Job #{job.pk} on {job.dataset.name} ({job.base_model})") for job in fine_tunes],
        "start": start,
        "values": values,
        "errors": errors,
    }
    return render(request, "training_app/training_new_preference.html", context, status=400 if errors else 200)


def _plan_context(dataset, plan: services.TrainingPlan) -> dict:
    if plan.config is None:
        return {"rows": [], "estimate": None, "validation_lines": None}
    return {
        "rows": settings_rows(plan.config.to_dict(), plan.reasons),
        "estimate": training_estimate(dataset=dataset, config=plan.config),
        "validation_lines": validation_lines(dataset, validation=plan.config.eval_examples),
    }


@login_required
@require_GET
def training_estimate_fragment(request: HttpRequest, dataset_pk: int) -> HttpResponse:
    """The default plan's estimate, for the dataset page (loaded as a fragment)."""
    dataset = get_dataset_for_user(request.user, dataset_pk)
    if not dataset.is_valid:
        raise Http404("An invalid dataset cannot be trained.")
    context = {"dataset": dataset, **_plan_context(dataset, services.training_plan(dataset=dataset, config_data={}))}
    return render(request, "training_app/_estimate.html", context)


def _progress_context(job) -> dict:
    return {
        "job": job,
        "verdict": learning_verdict(job),
        "chart": loss_chart_data(job),
        "chart_id": f"loss-data-{job.pk}",
        "queue_position": queue_position(job) if job.status == job.Status.QUEUED else None,
        "can_resume": job.status in (job.Status.FAILED, job.Status.CANCELLED)
        and (services.resumable_checkpoint(job) is not None or (job.is_paused and job.started_at is None)),
        "eval_max": min(job.dataset.num_eval, settings.TUNA_MAX_EVAL_EXAMPLES),
        "max_epochs": settings.TUNA_MAX_EPOCHS,
    }


@login_required
@require_GET
def training_detail(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_job_for_user(request.user, pk)
    if request.htmx:
        return render(request, "training_app/_progress.html", _progress_context(job))
    return training_page(request, job)


def training_page(request: HttpRequest, job, *, status: int = 200, errors: dict | None = None) -> HttpResponse:
    """The job's page; the evaluation form's errors (from evaluation_app's start view) are shown on it."""
    context = _progress_context(job)
    config = job.config
    context.update(
        evaluations=job.evaluations.all()[:10],
        continuations=job.continuations.all(),
        rows=settings_rows(config, job.config_reasons),
        validation_lines=validation_lines(job.dataset, validation=config.get("eval_examples", 0)) if job.config_reasons else None,
        form_errors=errors or {},
        **_export_context(job),
    )
    return render(request, "training_app/training_detail.html", context, status=status)


def _job_action(request: HttpRequest, pk: int, action, success: str) -> HttpResponse:
    job = get_job_for_user(request.user, pk)
    try:
        action(job=job)
        messages.success(request, success.format(pk=job.pk))
    except (services.JobConflict, LimitExceeded) as exc:
        messages.error(request, str(exc))
    return redirect(job)


@login_required
@require_POST
def training_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    return _job_action(request, pk, services.training_job_cancel, "Cancelling job #{pk}: it stops after the current step.")


@login_required
@require_POST
def training_pause(request: HttpRequest, pk: int) -> HttpResponse:
    return _job_action(
        request, pk, services.training_job_pause, "Pausing job #{pk}: it stops after the current step with a checkpoint saved there."
    )


@login_required
@require_POST
def training_resume(request: HttpRequest, pk: int) -> HttpResponse:
    return _job_action(request, pk, services.training_job_resume, "Job #{pk} is queued to resume from its last checkpoint.")


@login_required
@require_POST
def training_continue(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_job_for_user(request.user, pk)
    try:
        child = services.training_job_continue(job=job, epochs=_epochs(request.POST.get("epochs")))
    except (services.JobConflict, LimitExceeded) as exc:
        messages.error(request, str(exc))
        return redirect(job)
    except services.ConfigInvalid as exc:
        messages.error(request, f"Epochs: {' '.join(exc.errors['epochs'])}")
        return redirect(job)
    messages.success(request, f"Job #{child.pk} continues job #{job.pk} from its adapter.")
    return redirect(child)


def _epochs(raw: str | None) -> int | str | None:
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        return raw


@login_required
@require_GET
def training_adapter(request: HttpRequest, pk: int) -> HttpResponse:
    return adapter_download(get_job_for_user(request.user, pk))


@login_required
@require_GET
def training_base_model(request: HttpRequest, pk: int) -> HttpResponse:
    """The exact base weights the job was trained on (what its adapter's config names), as a zip: the embedded base
    only; for any other, a 404 page saying where its base comes from."""
    try:
        return base_model_download(get_job_for_user(request.user, pk))
    except NotFound as exc:
        return render(request, "tuna_core/refused.html", {"message": exc.message, "heading": "No download"}, status=exc.status)


@login_required
@require_http_methods(["GET", "POST"])
def training_delete(request: HttpRequest, pk: int) -> HttpResponse:
    """GET: what deleting the job removes (or why it cannot go yet); POST: delete it."""
    job = get_job_for_user(request.user, pk)
    error = None
    if request.method == "POST":
        try:
            services.training_job_delete(job=job)
        except services.JobConflict as exc:
            error = str(exc)
        else:
            messages.success(request, f"Deleted job #{pk}, its evaluations and its files.")
            return redirect("training-list")
    context = {
        "job": job,
        "evaluations": job.evaluations.all(),
        "continuations": job.continuations.all(),
        "files_bytes": job_files_bytes(job),
        "error": error,
    }
    return render(request, "training_app/training_delete.html", context, status=409 if error else 200)


def _export_context(job) -> dict:
    export = exports.latest_export(job)
    return {
        "job": job,
        "export": export,
        "export_files": export_files(export) if export else [],
        "export_formats": Export.Format.choices,
        "export_unavailable": gguf_export.export_unavailable(),
        "export_position": queue_position(export) if export and export.status == Export.Status.QUEUED else None,
    }


@login_required
@require_POST
def training_export(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_job_for_user(request.user, pk)
    formats = request.POST.getlist("formats") or None
    try:
        export = exports.export_start(owner=request.user, job=job, formats=formats)
    except exports.ExportRefused as exc:
        messages.error(request, str(exc))
    except LimitExceeded as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Export #{export.pk} of job #{job.pk} is queued: the files and the parity check appear below.")
    return redirect(f"{job.get_absolute_url()}#export")


@login_required
def training_export_fragment(request: HttpRequest, pk: int) -> HttpResponse:
    """The export section, polled by htmx while an export runs."""
    return render(request, "training_app/_export.html", _export_context(get_job_for_user(request.user, pk)))


@login_required
@require_GET
def training_tracking_files(request: HttpRequest, pk: int) -> HttpResponse:
    """The job's TensorBoard event files as a zip."""
    return tracking_files_download(get_job_for_user(request.user, pk))
