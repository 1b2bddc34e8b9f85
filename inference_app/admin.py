from django.contrib import admin

from inference_app.models import EngineCheck, UsageLog
from tuna_core.admin_readonly import ReadOnlyFieldsAdmin


@admin.register(UsageLog)
class UsageLogAdmin(ReadOnlyFieldsAdmin, admin.ModelAdmin):
    list_display = [
        "created_at",
        "user",
        "model_id",
        "endpoint",
        "engine",
        "status",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "latency_ms",
        "queue_ms",
        "compute_ms",
        "cost_usd",
    ]
    list_filter = ["status", "engine", "finish_reason", "endpoint", "model_id", "created_at"]
    search_fields = ["user__username", "model_id", "error"]
    list_select_related = ["user"]
    date_hierarchy = "created_at"


@admin.register(EngineCheck)
class EngineCheckAdmin(ReadOnlyFieldsAdmin, admin.ModelAdmin):
    """A fine-tune's answers on a remote engine against transformers' (inference_app.remote_engines); read-only."""

    list_display = ["created_at", "owner", "training_job", "engine_kind", "engine_key", "status", "identical", "total", "completed_at"]
    list_filter = ["status", "engine_kind", "created_at"]
    search_fields = ["owner__username", "engine_key", "base_model", "error_message"]
    list_select_related = ["owner", "training_job"]
    date_hierarchy = "created_at"
