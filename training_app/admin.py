from django.contrib import admin, messages
from django.db import transaction
from django.utils.html import format_html, format_html_join

from training_app import experiments, exports, services
from training_app.models import Experiment, Export, LossPoint, ThroughputMeasurement, TrainingJob
from tuna_core.admin_readonly import ReadOnlyFieldsAdmin
from tuna_core.quotas import LimitExceeded


class LossPointInline(admin.TabularInline):
    model = LossPoint
    extra = 0
    can_delete = False
    readonly_fields = ["step", "epoch", "loss", "eval_loss", "learning_rate", "created_at"]
    max_num = 0


@admin.register(TrainingJob)
class TrainingJobAdmin(ReadOnlyFieldsAdmin, admin.ModelAdmin):
    list_display = ["id", "owner", "dataset", "base_model", "method", "status", "progress", "tokens_per_second", "created_at"]
    list_filter = ["status", "method", "base_model", "device", "created_at"]
    search_fields = ["id", "owner__username", "dataset__name", "error_message"]
    list_select_related = ["owner", "dataset"]
    readonly_fields = ["traceback_display", "created_at", "started_at", "completed_at", "heartbeat_at"]
    exclude = ["error_traceback"]
    inlines = [LossPointInline]
    actions = ["cancel_jobs", "resume_jobs", "export_jobs"]

    class Media:
        css = {"all": ["css/admin.css"]}  # the scrolling report box (the CSP allows no style="")

    @admin.display(description="Progress")
    def progress(self, obj: TrainingJob) -> str:
        return f"{obj.current_step}/{obj.total_steps} ({obj.progress_percent:.0f}%)"

    @admin.display(description="Traceback")
    def traceback_display(self, obj: TrainingJob) -> str:
        return format_html('<pre class="readonly-scroll">{}</pre>', obj.error_traceback or "-")

    @admin.action(description="Cancel selected jobs")
    def cancel_jobs(self, request, queryset):
        self._apply(request, queryset, services.training_job_cancel, "cancelled")

    @admin.action(description="Export selected jobs (merged weights, GGUF, Ollama) and check parity")
    def export_jobs(self, request, queryset):
        done = 0
        for job in queryset:
            try:
                exports.export_start(owner=job.owner, job=job)
                done += 1
            except (exports.ExportRefused, LimitExceeded) as exc:
                self.message_user(request, f"Job #{job.pk}: {exc}", messages.ERROR)
        if done:
            self.message_user(request, f"{done} export{'s' if done != 1 else ''} queued.", messages.SUCCESS)

    @admin.action(description="Resume selected jobs from their last checkpoint")
    def resume_jobs(self, request, queryset):
        self._apply(request, queryset, services.training_job_resume, "queued to resume")

    # Deleting goes through the service, as on the page and in the API: the job's files go too, and a
    # training job (or one others continue) is refused on the confirmation page.
    def get_deleted_objects(self, objs, request):
        deleted, counts, perms_needed, _ = super().get_deleted_objects(objs, request)
        # Django protects a run from deletion even when the runs continuing it are deleted with it (the service
        # deletes those first): only continuations left out are in the way.
        ids = [job.pk for job in objs]
        outside = TrainingJob.objects.filter(parent_id__in=ids).exclude(pk__in=ids).order_by("pk")
        protected = [f"Job #{child.pk} continues job #{child.parent_id}: select it too, or delete it first." for child in outside]
        for job in objs:
            if job.status == TrainingJob.Status.RUNNING:
                protected.append(f"Job #{job.pk} is training: cancel it first (the Cancel action), then delete it.")
            running = job.evaluations.filter(status=job.evaluations.model.Status.RUNNING).first()
            if running is not None:
                protected.append(f"Evaluation #{running.pk} of job #{job.pk} is running: delete the job once it has finished.")
        return deleted, counts, perms_needed, protected

    def delete_model(self, request, obj: TrainingJob) -> None:
        try:
            services.training_job_delete(job=obj)
        except services.JobConflict as exc:
            self.message_user(request, str(exc), messages.ERROR)

    def delete_queryset(self, request, queryset) -> None:
        try:
            with transaction.atomic():
                services.training_jobs_delete(jobs=list(queryset))
        except services.JobConflict as exc:
            self.message_user(request, str(exc), messages.ERROR)

    def _apply(self, request, queryset, action, verb):
        done = 0
        for job in queryset:
            try:
                action(job=job)
                done += 1
            except (services.JobConflict, LimitExceeded) as exc:
                self.message_user(request, str(exc), messages.WARNING)
        if done:
            self.message_user(request, f"{done} job(s) {verb}.", messages.SUCCESS)


@admin.register(ThroughputMeasurement)
class ThroughputMeasurementAdmin(ReadOnlyFieldsAdmin, admin.ModelAdmin):
    """Measured speeds feed every time and cost estimate: shown, never edited or added by hand (deleting a wrong one
    is allowed; the next measurement replaces it)."""

    list_display = ["base_model", "device", "tokens_per_second", "source", "measured_at"]
    list_filter = ["base_model", "device"]


@admin.register(Export)
class ExportAdmin(ReadOnlyFieldsAdmin, admin.ModelAdmin):
    list_display = ["id", "training_job", "owner", "status", "stage", "parity_passed", "llama_cpp_version", "created_at"]
    list_filter = ["status", "created_at"]
    search_fields = ["id", "training_job__id", "owner__username", "error_message"]
    list_select_related = ["owner", "training_job"]
    readonly_fields = ["traceback_display", "files", "parity", "created_at", "started_at", "completed_at", "heartbeat_at"]
    exclude = ["error_traceback"]

    class Media:
        css = {"all": ["css/admin.css"]}  # the scrolling report box (the CSP allows no style="")

    @admin.display(boolean=True, description="Parity passed")
    def parity_passed(self, obj: Export) -> bool:
        return obj.parity_passed

    @admin.display(description="Traceback")
    def traceback_display(self, obj: Export) -> str:
        return format_html('<pre class="readonly-scroll">{}</pre>', obj.error_traceback or "-")


class RunInline(admin.TabularInline):
    model = TrainingJob
    fk_name = "experiment"
    fields = ["id", "status", "current_step", "total_steps", "best_eval_loss", "best_step", "stop_reason", "error_message"]
    readonly_fields = fields
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = True
    verbose_name = "run"
    verbose_name_plural = "runs"


@admin.register(Experiment)
class ExperimentAdmin(ReadOnlyFieldsAdmin, admin.ModelAdmin):
    editable_fields = ("name",)
    list_display = ["id", "name", "owner", "dataset", "base_model", "status", "winner", "early_stopping", "created_at", "finished_at"]
    list_filter = ["status", "early_stopping", "base_model", "created_at"]
    search_fields = ["id", "name", "owner__username", "dataset__name"]
    list_select_related = ["owner", "dataset", "winner"]
    readonly_fields = ["pick_display", "grid_display", "estimate", "winner", "status", "created_at", "finished_at"]
    exclude = ["pick", "grid"]
    inlines = [RunInline]
    actions = ["cancel_experiments"]

    @admin.display(description="Pick")
    def pick_display(self, obj: Experiment) -> str:
        pick = obj.pick or {}
        compared = [f"#{e['job']}: {e['eval_loss']:.4f}" for e in pick.get("compared", [])]
        left_out = [f"#{e['job']}: {e['why']}" for e in pick.get("left_out", [])]
        return format_html(
            "<p>{}</p><p>Compared (lowest validation loss first): {}</p><p>Left out: {}</p>",
            pick.get("reason", "not picked yet"),
            ", ".join(compared) or "-",
            "; ".join(left_out) or "-",
        )

    @admin.display(description="Grid")
    def grid_display(self, obj: Experiment) -> str:
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((p.get("learning_rate"), p.get("num_epochs"), p.get("lora_r"), p.get("lora_layers")) for p in obj.grid),
        )
        return format_html("<table><tr><th>learning rate</th><th>epochs</th><th>rank</th><th>layers</th></tr>{}</table>", rows)

    @admin.action(description="Cancel selected sweeps (their unfinished runs)")
    def cancel_experiments(self, request, queryset):
        done = 0
        for experiment in queryset:
            try:
                experiments.experiment_cancel(experiment=experiment)
                done += 1
            except experiments.SweepConflict as exc:
                self.message_user(request, str(exc), messages.WARNING)
        if done:
            self.message_user(request, f"{done} sweep(s) cancelled.", messages.SUCCESS)
