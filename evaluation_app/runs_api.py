"""The Runs table as JSON, scoring runs, and two fine-tunes compared side by side (same services as the pages)."""

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from datasets_app.selectors import get_dataset_for_user
from evaluation_app import runs
from evaluation_app.api import EvaluationSummarySerializer
from training_app.selectors import get_job_for_user


class RunRowSerializer(serializers.Serializer):
    job_id = serializers.IntegerField()
    method = serializers.CharField(help_text='"sft" or "dpo" (preference-tuned).')
    parent_id = serializers.IntegerField(allow_null=True)
    experiment_id = serializers.IntegerField(allow_null=True, help_text="The sweep this run belongs to, if any.")
    settings = serializers.DictField(help_text="The settings whose values differ between the dataset's runs (see settings_compared).")
    eval_loss = serializers.FloatField(allow_null=True, help_text="Validation loss at the kept step (best_eval_loss).")
    best_step = serializers.IntegerField(allow_null=True, help_text="The kept step.")
    heldout_loss = serializers.FloatField(allow_null=True)
    exact_match = serializers.FloatField(allow_null=True)
    task_score = serializers.FloatField(allow_null=True, help_text="The task-aware score (0..1) where one applies.")
    task_score_label = serializers.CharField(help_text='What the task score measures, e.g. "JSON field accuracy"; empty when none.')
    rouge_l = serializers.FloatField(allow_null=True)
    win_rate = serializers.FloatField(allow_null=True, help_text="Your blind win rate against the base model (decisive blind votes).")
    win_interval = serializers.ListField(child=serializers.FloatField(), allow_null=True, help_text="Its 95% Wilson interval.")
    blind_votes = serializers.IntegerField(help_text="Decisive blind votes behind the win rate.")
    train_seconds = serializers.FloatField()
    cost_usd = serializers.FloatField()
    tokens_per_second = serializers.FloatField(allow_null=True)
    evaluation_id = serializers.IntegerField(allow_null=True, help_text="The scoring evaluation (null: not scored).")
    scoring = serializers.CharField(help_text='"scored", "queued", "running" or "unscored".')
    example_ids = serializers.ListField(
        child=serializers.IntegerField(),
        allow_null=True,
        help_text="The held-out example ids (positions) the figures come from: the same for every scored run of the dataset.",
    )


class SettingSerializer(serializers.Serializer):
    name = serializers.CharField()
    label = serializers.CharField()


class RunsTableSerializer(serializers.Serializer):
    dataset_id = serializers.IntegerField(source="dataset.pk")
    scoring_size = serializers.IntegerField(
        allow_null=True, help_text="Every run is scored on the first scoring_size held-out examples (null until the first run is scored)."
    )
    sort = serializers.CharField()
    settings_compared = SettingSerializer(source="settings", many=True)
    base = serializers.DictField(allow_null=True, help_text="The base model's figures on the same examples.")
    runs = RunRowSerializer(source="rows", many=True)


class ScoreSerializer(serializers.Serializer):
    jobs = serializers.ListField(
        child=serializers.IntegerField(), required=False, allow_empty=True, help_text="Runs to score (default: every run not scored yet)."
    )


class ScoreResultSerializer(serializers.Serializer):
    job_id = serializers.IntegerField(source="job.pk")
    evaluation = EvaluationSummarySerializer(allow_null=True)
    created = serializers.BooleanField()
    refused = serializers.CharField(help_text="Why this run was not started (a limit); empty when it was.")


class CompareSerializer(serializers.Serializer):
    job = serializers.IntegerField(help_text="The fine-tune whose answers are the candidate side.")
    baseline_job = serializers.IntegerField(help_text="The fine-tune it is compared with (same dataset and base model).")


class DatasetRunsApi(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("sort", str, description=f"One of {', '.join(runs.SORTS)}; prefix with - to sort descending.")],
        responses=RunsTableSerializer,
        description="Every completed fine-tune of the dataset with its figures on the dataset's scoring set (identical example ids).",
    )
    def get(self, request: Request, pk: int) -> Response:
        dataset = get_dataset_for_user(request.user, pk)
        return Response(RunsTableSerializer(runs.runs_table(dataset, request.user, sort=request.query_params.get("sort"))).data)


class DatasetRunsScoreApi(APIView):
    @extend_schema(
        request=ScoreSerializer,
        responses=ScoreResultSerializer(many=True),
        description=(
            "Queue the scoring evaluation (against the base model, on the scoring set) of the given runs, or of every run not "
            "scored yet. A run already scored or being scored returns that evaluation. Runs past TUNA_MAX_ACTIVE_JOBS_PER_USER "
            "are not started (refused says so); 409 when none could be."
        ),
    )
    def post(self, request: Request, pk: int) -> Response:
        dataset = get_dataset_for_user(request.user, pk)
        data = ScoreSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        results = runs.runs_score(owner=request.user, dataset=dataset, job_ids=data.validated_data.get("jobs"))
        return Response(ScoreResultSerializer(results, many=True).data)


class EvaluationCompareApi(APIView):
    @extend_schema(
        request=CompareSerializer,
        responses={201: EvaluationSummarySerializer, 200: EvaluationSummarySerializer},
        description=(
            "Compare two completed fine-tunes of one dataset and base model side by side on the dataset's scoring set: the "
            "evaluation's base_* answers are baseline_job's. Vote on it with /api/evaluation/{id}/rate. A comparison of the "
            "same pair already done or running is returned (200)."
        ),
    )
    def post(self, request: Request) -> Response:
        data = CompareSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        job = get_job_for_user(request.user, data.validated_data["job"])
        baseline = get_job_for_user(request.user, data.validated_data["baseline_job"])
        evaluation, created = runs.runs_compare(owner=request.user, job=job, baseline=baseline)
        return Response(EvaluationSummarySerializer(evaluation).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)
