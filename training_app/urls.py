from django.urls import path

from training_app import api, export_api, views

urlpatterns = [
    path("training", views.training_list, name="training-list"),
    path("training/new/<int:dataset_pk>", views.training_new, name="training-new"),
    path("training/<int:pk>", views.training_detail, name="training-detail"),
    path("training/<int:pk>/cancel", views.training_cancel, name="training-cancel"),
    path("training/<int:pk>/pause", views.training_pause, name="training-pause"),
    path("training/<int:pk>/resume", views.training_resume, name="training-resume"),
    path("training/<int:pk>/continue", views.training_continue, name="training-continue"),
    path("training/<int:pk>/delete", views.training_delete, name="training-delete"),
    path("training/estimate/<int:dataset_pk>", views.training_estimate_fragment, name="training-estimate"),
    path("training/<int:pk>/adapter.zip", views.training_adapter, name="training-adapter"),
    path("training/<int:pk>/tensorboard.zip", views.training_tracking_files, name="training-tracking-files"),
    path("training/<int:pk>/export", views.training_export, name="training-export"),
    path("training/<int:pk>/export/status", views.training_export_fragment, name="training-export-status"),
    path("api/training", api.TrainingJobListApi.as_view(), name="api-training-list"),
    path("api/training/start", api.TrainingJobStartApi.as_view(), name="api-training-start"),
    path("api/training/<int:pk>", api.TrainingJobDetailApi.as_view(), name="api-training-detail"),
    path("api/training/<int:pk>/cancel", api.TrainingJobCancelApi.as_view(), name="api-training-cancel"),
    path("api/training/<int:pk>/resume", api.TrainingJobResumeApi.as_view(), name="api-training-resume"),
    path("api/training/<int:pk>/continue", api.TrainingJobContinueApi.as_view(), name="api-training-continue"),
    path("api/training/<int:pk>/adapter", api.TrainingJobAdapterApi.as_view(), name="api-training-adapter"),
    path("api/training/<int:pk>/export", export_api.TrainingJobExportApi.as_view(), name="api-training-export"),
    path("api/training/<int:pk>/export/bundle.tar", export_api.TrainingJobExportBundleApi.as_view(), name="api-training-export-bundle"),
    path("api/training/<int:pk>/export/files/<path:name>", export_api.TrainingJobExportFileApi.as_view(), name="api-training-export-file"),
]
