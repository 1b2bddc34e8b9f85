from django.urls import path

from openai_api import api, views

urlpatterns = [
    path("coming-from-openai", views.coming_from_openai, name="coming-from-openai"),
    path("v1/files", api.FilesApi.as_view(), name="openai-files"),
    path("v1/files/<str:file_id>", api.FileDetailApi.as_view(), name="openai-file"),
    path("v1/files/<str:file_id>/content", api.FileContentApi.as_view(), name="openai-file-content"),
    path("v1/fine_tuning/jobs", api.JobsApi.as_view(), name="openai-jobs"),
    path("v1/fine_tuning/jobs/<str:fine_tuning_job_id>", api.JobDetailApi.as_view(), name="openai-job"),
    path("v1/fine_tuning/jobs/<str:fine_tuning_job_id>/cancel", api.JobCancelApi.as_view(), name="openai-job-cancel"),
    path("v1/fine_tuning/jobs/<str:fine_tuning_job_id>/pause", api.JobPauseApi.as_view(), name="openai-job-pause"),
    path("v1/fine_tuning/jobs/<str:fine_tuning_job_id>/resume", api.JobResumeApi.as_view(), name="openai-job-resume"),
    path("v1/fine_tuning/jobs/<str:fine_tuning_job_id>/events", api.JobEventsApi.as_view(), name="openai-job-events"),
    path("v1/fine_tuning/jobs/<str:fine_tuning_job_id>/checkpoints", api.JobCheckpointsApi.as_view(), name="openai-job-checkpoints"),
]
