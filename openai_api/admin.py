from django.contrib import admin

from openai_api.models import JobFiles
from tuna_core.admin_readonly import ReadOnlyFieldsAdmin


@admin.register(JobFiles)
class JobFilesAdmin(ReadOnlyFieldsAdmin, admin.ModelAdmin):
    list_display = ("job", "training_file", "validation_file")
    list_select_related = ("job", "training_file", "validation_file")
    search_fields = ("job__id", "job__owner__username", "training_file__original_filename", "validation_file__original_filename")
    raw_id_fields = ("job", "training_file", "validation_file")
