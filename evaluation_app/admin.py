import json

from django.contrib import admin, messages
from django.utils.html import format_html

from evaluation_app.models import Evaluation, EvaluationExample, JudgeRun, JudgeVerdict, Rating
from evaluation_app.services import EvaluationConflict, evaluation_delete
from tuna_core.admin_readonly import ReadOnlyFieldsAdmin
from tuna_llm.judge import redact_url


@admin.register(Evaluation)
class EvaluationAdmin(ReadOnlyFieldsAdmin, admin.ModelAdmin):
    list_display = ["id", "owner", "training_job", "baseline_job", "status", "done", "test_size", "created_at"]
    list_filter = ["status", "created_at"]
    search_fields = ["id", "owner__username", "error_message"]
    list_select_related = ["owner", "training_job"]
    readonly_fields = ["metrics_display", "traceback_display"]
    exclude = ["metrics", "error_traceback"]

    # Deleting goes through the service, as on the page and in the API: a running evaluation is refused.
    def get_deleted_objects(self, objs, request):
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        protected += [
            f"Evaluation #{e.pk} is running: delete it once it has finished." for e in objs if e.status == Evaluation.Status.RUNNING
        ]
        return deleted, counts, perms_needed, protected

    def delete_model(self, request, obj: Evaluation) -> None:
        try:
            evaluation_delete(evaluation=obj)
        except EvaluationConflict as exc:
            self.message_user(request, str(exc), messages.ERROR)

    def delete_queryset(self, request, queryset) -> None:
        for evaluation in queryset:
            self.delete_model(request, evaluation)

    @admin.display(description="Metrics")
    def metrics_display(self, obj):
        return format_html("<pre>{}</pre>", json.dumps(obj.metrics, indent=2))

    @admin.display(description="Traceback")
    def traceback_display(self, obj):
        return format_html("<pre>{}</pre>", obj.error_traceback or "-")


@admin.register(EvaluationExample)
class EvaluationExampleAdmin(ReadOnlyFieldsAdmin, admin.ModelAdmin):
    list_display = ["evaluation", "index", "base_latency_ms", "finetuned_latency_ms", "finetuned_side"]
    list_filter = ["evaluation"]
    list_select_related = ["evaluation"]


@admin.register(Rating)
class RatingAdmin(ReadOnlyFieldsAdmin, admin.ModelAdmin):
    list_display = ["example", "user", "preferred_model", "blind", "updated_at"]
    list_filter = ["preferred_model", "blind"]
    list_select_related = ["example", "user"]


class JudgeVerdictInline(admin.TabularInline):
    model = JudgeVerdict
    extra = 0
    can_delete = False
    fields = ["example", "winner", "consistent", "base_first", "finetuned_first", "base_first_reason", "finetuned_first_reason"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(JudgeRun)
class JudgeRunAdmin(ReadOnlyFieldsAdmin, admin.ModelAdmin):
    list_display = ["id", "owner", "evaluation", "status", "judge_model", "shown_endpoint", "done", "total", "requests", "created_at"]
    list_filter = ["status", "judge_model"]
    search_fields = ["id", "owner__username", "error_message", "judge_model"]
    list_select_related = ["owner", "evaluation"]
    readonly_fields = ["shown_endpoint", "traceback_display"]
    exclude = ["error_traceback", "endpoint"]
    inlines = [JudgeVerdictInline]

    @admin.display(description="Endpoint")
    def shown_endpoint(self, obj):
        return redact_url(obj.endpoint)  # rows stored before URLs were stored redacted too

    @admin.display(description="Traceback")
    def traceback_display(self, obj):
        return format_html("<pre>{}</pre>", obj.error_traceback or "-")


@admin.register(JudgeVerdict)
class JudgeVerdictAdmin(ReadOnlyFieldsAdmin, admin.ModelAdmin):
    list_display = ["run", "example", "winner", "consistent", "base_first", "finetuned_first"]
    list_filter = ["winner", "consistent"]
    list_select_related = ["run", "example"]
