from django.urls import path

from datasets_app import api, views

urlpatterns = [
    path("datasets", views.dataset_list, name="dataset-list"),
    path("datasets/upload", views.dataset_upload, name="dataset-upload"),
    path("datasets/sample", views.dataset_sample, name="dataset-sample"),
    path("datasets/<int:pk>", views.dataset_detail, name="dataset-detail"),
    path("datasets/<int:pk>/examples", views.dataset_examples_page, name="dataset-examples"),
    path("datasets/<int:pk>/eval-file", views.dataset_eval_file, name="dataset-eval-file"),
    path("datasets/<int:pk>/delete", views.dataset_delete, name="dataset-delete"),
    path("datasets/<int:pk>/checks/add", views.dataset_check_add, name="dataset-check-add"),
    path("datasets/<int:pk>/checks/remove", views.dataset_check_remove, name="dataset-check-remove"),
    path("api/datasets", api.DatasetListCreateApi.as_view(), name="api-dataset-list"),
    path("api/datasets/<int:pk>", api.DatasetDetailApi.as_view(), name="api-dataset-detail"),
    path("api/datasets/<int:pk>/eval-file", api.DatasetEvalFileApi.as_view(), name="api-dataset-eval-file"),
]
