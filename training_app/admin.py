from django.contrib import admin, messages
from django.utils.html import format_html

from training_app import services
from training_app.models import LossPoint, ThroughputMeasurement, TrainingJob


class LossPointInline(admin.TabularInline):
    model = LossPoint
    extra = 0
    can_delete = False
    readonly_fields = ["step", "epoch", "loss", "eval_loss", "learning_rate", "created_at"]
    max_num = 0


@admin.register(TrainingJob)
class TrainingJobAdmin(admin.ModelAdmin):
    list_display = ["id", "owner", "dataset", "base_model", "status", "progress", "tokens_per_second", "created_at"]
    list_filter = ["status", "base_model", "device", "created_at"]
    search_fields = ["id", "owner__username", "dataset__name", "error_message"]
    list_select_related = ["owner", "dataset"]
    readonly_fields = ["traceback_display", "created_at", "started_at", "completed_at", "heartbeat_at"]
    exclude = ["error_traceback"]
    inlines = [LossPointInline]
    actions = ["cancel_jobs", "resume_jobs"]

    @admin.display(description="Progress")
    def progress(self, obj: TrainingJob) -> str:
        return f"{obj.current_step}/{obj.total_steps} ({obj.progress_percent:.0f}%)"

    @admin.display(description="Traceback")
    def traceback_display(self, obj: TrainingJob) -> str:
        return format_html("<pre style='max-height:30em;overflow:auto'>{}</pre>", obj.error_traceback or "-")

    @admin.action(description="Cancel selected jobs")
    def cancel_jobs(self, request, queryset):
        self._apply(request, queryset, services.training_job_cancel, "cancelled")

    @admin.action(description="Resume selected jobs from their last checkpoint")
    def resume_jobs(self, request, queryset):
        self._apply(request, queryset, services.training_job_resume, "queued to resume")

    def _apply(self, request, queryset, action, verb):
        done = 0
        for job in queryset:
            try:
                action(job=job)
                done += 1
            except services.JobConflict as exc:
                self.message_user(request, str(exc), messages.WARNING)
        if done:
            self.message_user(request, f"{done} job(s) {verb}.", messages.SUCCESS)


@admin.register(ThroughputMeasurement)
class ThroughputMeasurementAdmin(admin.ModelAdmin):
    list_display = ["base_model", "device", "tokens_per_second", "source", "measured_at"]
    list_filter = ["base_model", "device"]
