from django.urls import path

from evaluation_app import api, runs_api, runs_views, views

urlpatterns = [
    path("evaluations", views.evaluation_list, name="evaluation-list"),
    path("evaluations/start/<int:job_pk>", views.evaluation_start, name="evaluation-start"),
    path("evaluations/<int:pk>", views.evaluation_detail, name="evaluation-detail"),
    path("evaluations/<int:pk>/examples/<int:index>", views.evaluation_example, name="evaluation-example"),
    path("evaluations/<int:pk>/examples/<int:index>/vote", views.evaluation_vote, name="evaluation-vote"),
    path("evaluations/<int:pk>/rerun", views.evaluation_rerun, name="evaluation-rerun"),
    path("evaluations/<int:pk>/delete", views.evaluation_delete, name="evaluation-delete"),
    path("evaluations/<int:pk>/judge", views.evaluation_judge, name="evaluation-judge"),
    path("evaluations/<int:pk>/train-on-preferences", views.evaluation_train_preferences, name="evaluation-train-preferences"),
    path("evaluations/<int:pk>/preferences.jsonl", views.evaluation_preferences, name="evaluation-preferences"),
    path("datasets/<int:pk>/runs", runs_views.dataset_runs, name="dataset-runs"),
    path("datasets/<int:pk>/runs/score", runs_views.dataset_runs_score, name="dataset-runs-score"),
    path("datasets/<int:pk>/runs/compare", runs_views.dataset_runs_compare, name="dataset-runs-compare"),
    path("api/datasets/<int:pk>/runs", runs_api.DatasetRunsApi.as_view(), name="api-dataset-runs"),
    path("api/datasets/<int:pk>/runs/score", runs_api.DatasetRunsScoreApi.as_view(), name="api-dataset-runs-score"),
    path("api/evaluation/compare", runs_api.EvaluationCompareApi.as_view(), name="api-evaluation-compare"),
    path("api/evaluation", api.EvaluationListApi.as_view(), name="api-evaluation-list"),
    path("api/evaluation/run", api.EvaluationRunApi.as_view(), name="api-evaluation-run"),
    path("api/evaluation/<int:pk>", api.EvaluationDetailApi.as_view(), name="api-evaluation-detail"),
    path("api/evaluation/<int:pk>/rate", api.EvaluationRateApi.as_view(), name="api-evaluation-rate"),
    path("api/evaluation/<int:pk>/judge", api.EvaluationJudgeApi.as_view(), name="api-evaluation-judge"),
    path(
        "api/evaluation/<int:pk>/train-on-preferences", api.EvaluationTrainPreferencesApi.as_view(), name="api-evaluation-train-preferences"
    ),
    path("api/evaluation/<int:pk>/preferences.jsonl", api.EvaluationPreferencesApi.as_view(), name="api-evaluation-preferences"),
]
