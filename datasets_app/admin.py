import json

from django.contrib import admin, messages
from django.utils.html import format_html

from datasets_app.models import Dataset
from datasets_app.services import DatasetInUse, dataset_delete
from tuna_core.admin_readonly import ReadOnlyFieldsAdmin


@admin.register(Dataset)
class DatasetAdmin(ReadOnlyFieldsAdmin, admin.ModelAdmin):
    # Files, sizes and reports are the services' (a file swapped here would skip validation and the quota).
    editable_fields = ("name",)
    list_display = ["name", "owner", "validation_status", "format", "num_examples", "num_train", "num_eval", "created_at"]
    list_filter = ["validation_status", "format", "created_at"]
    search_fields = ["name", "original_filename", "owner__username"]
    list_select_related = ["owner"]
    readonly_fields = ["report_summary", "pretty_report", "created_at"]
    exclude = ["validation_report"]

    class Media:
        css = {"all": ["css/admin.css"]}  # the scrolling report box (the CSP allows no style="")

    # Deleting goes through the service, as on the page and in the API: the stored files go too. A dataset
    # that jobs use is refused on the confirmation page (its jobs are listed as protected): delete them first.
    def delete_model(self, request, obj: Dataset) -> None:
        try:
            dataset_delete(dataset=obj)
        except DatasetInUse as exc:
            self.message_user(request, exc.message, messages.ERROR)

    def delete_queryset(self, request, queryset) -> None:
        for dataset in queryset:
            self.delete_model(request, dataset)

    @admin.display(description="Report summary")
    def report_summary(self, obj: Dataset) -> str:
        report = obj.validation_report
        errors = report.get("errors", {})
        lines = [
            f"{report.get('valid_examples', 0)} valid examples, {errors.get('count', 0)} errors, {report.get('warning_count', 0)} warnings"
        ]
        for item in errors.get("items", [])[:20]:
            lines.append(f"line {item['line']}: {item['message']}" if item["line"] else item["message"])
        for group in report.get("warnings", []):
            lines.append(f"{group['title']}: {group['count']}")
        return format_html("<pre>{}</pre>", "\n".join(lines))

    @admin.display(description="Full report (JSON)")
    def pretty_report(self, obj: Dataset) -> str:
        return format_html('<pre class="readonly-scroll">{}</pre>', json.dumps(obj.validation_report, indent=2))
