from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.generics import ListAPIView
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from evaluation_app import judging, selectors, services
from evaluation_app.models import Evaluation, EvaluationExample, JudgeRun, JudgeVerdict, Rating
from evaluation_app.preference import preference_job_start
from evaluation_app.selectors import evaluations_for_user, get_evaluation_for_user
from training_app.api import TrainingJobSerializer
from training_app.selectors import get_job_for_user
from tuna_llm.judge import redact_url


class TestResultSerializer(serializers.ModelSerializer):
    example_index = serializers.IntegerField(source="index")
    prompt = serializers.CharField()

    class Meta:
        model = EvaluationExample
        fields = [
            "example_index",
            "prompt",
            "messages",
            "tools",
            "reference",
            "reference_calls",
            "base_output",
            "finetuned_output",
            "base_latency_ms",
            "finetuned_latency_ms",
            "base_tokens",
            "finetuned_tokens",
            "base_prompt_tokens",
            "finetuned_prompt_tokens",
            "base_cost_usd",
            "finetuned_cost_usd",
            "base_scores",
            "finetuned_scores",
        ]


class EvaluationSummarySerializer(serializers.ModelSerializer):
    training_job_id = serializers.IntegerField()
    baseline_job_id = serializers.IntegerField(
        allow_null=True,
        help_text="What the job is compared with: null for the base model, else that job (a preference-tuned job's parent).",
    )
    progress = serializers.SerializerMethodField()

    class Meta:
        model = Evaluation
        fields = [
            "id",
            "training_job_id",
            "baseline_job_id",
            "status",
            "test_size",
            "progress",
            "max_new_tokens",
            "run_seconds",
            "error_message",
            "created_at",
            "started_at",
            "completed_at",
        ]

    def get_progress(self, obj: Evaluation) -> dict:
        return {"done": obj.done, "total": obj.test_size, "percent": round(obj.progress_percent, 1)}


class EvaluationSerializer(EvaluationSummarySerializer):
    test_results = TestResultSerializer(source="examples", many=True)
    votes = serializers.SerializerMethodField()

    class Meta(EvaluationSummarySerializer.Meta):
        fields = [*EvaluationSummarySerializer.Meta.fields, "metrics", "votes", "test_results"]

    def get_votes(self, obj: Evaluation) -> dict:
        summary = services.vote_summary(obj, self.context["request"].user)
        return {**summary, "interval": list(summary["interval"]) if summary["interval"] else None}


class RunSerializer(serializers.Serializer):
    training_job_id = serializers.IntegerField()
    test_size = serializers.IntegerField(
        required=False, help_text="Held-out examples to run on: 1 to TUNA_MAX_EVAL_EXAMPLES (default 50, capped at the held-out count)."
    )


class RateSerializer(serializers.Serializer):
    example_index = serializers.IntegerField(min_value=0)
    preferred_model = serializers.ChoiceField(choices=Rating.Choice.values)
    blind = serializers.BooleanField(
        default=True,
        help_text=(
            "Whether the model names were hidden from the rater when this vote was cast. Only blind votes count in the "
            "blind win rate; send false when the rater saw which answer came from which model. Changing a vote sets it again."
        ),
    )


class EvaluationListApi(ListAPIView):
    serializer_class = EvaluationSummarySerializer

    def get_queryset(self):
        return evaluations_for_user(self.request.user)


class EvaluationRunApi(APIView):
    @extend_schema(request=RunSerializer, responses={201: EvaluationSummarySerializer, 200: EvaluationSummarySerializer})
    def post(self, request: Request) -> Response:
        data = RunSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        job = get_job_for_user(request.user, data.validated_data["training_job_id"])
        evaluation, created = services.evaluation_start(owner=request.user, job=job, test_size=data.validated_data.get("test_size"))
        return Response(EvaluationSummarySerializer(evaluation).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class EvaluationDetailApi(APIView):
    @extend_schema(responses=EvaluationSerializer)
    def get(self, request: Request, pk: int) -> Response:
        evaluation = get_evaluation_for_user(request.user, pk)
        return Response(EvaluationSerializer(evaluation, context={"request": request}).data)

    @extend_schema(responses={204: None}, description="Delete the evaluation with its answers and votes. A running one answers 409.")
    def delete(self, request: Request, pk: int) -> Response:
        services.evaluation_delete(evaluation=get_evaluation_for_user(request.user, pk))
        return Response(status=status.HTTP_204_NO_CONTENT)


class EvaluationRateApi(APIView):
    @extend_schema(request=RateSerializer, responses={201: RateSerializer})
    def post(self, request: Request, pk: int) -> Response:
        evaluation = get_evaluation_for_user(request.user, pk)
        data = RateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        rating, _ = services.rating_set(user=request.user, evaluation=evaluation, **data.validated_data)
        return Response(
            {"example_index": rating.example.index, "preferred_model": rating.preferred_model, "blind": rating.blind},
            status=status.HTTP_201_CREATED,
        )


class EvaluationPreferencesApi(APIView):
    @extend_schema(responses={(200, "application/jsonl"): OpenApiTypes.STR})
    def get(self, request: Request, pk: int) -> HttpResponse:
        evaluation = get_evaluation_for_user(request.user, pk)
        return HttpResponse(selectors.preferences_jsonl(evaluation, request.user), content_type="application/jsonl; charset=utf-8")


class JudgeVerdictSerializer(serializers.ModelSerializer):
    example_index = serializers.IntegerField(source="example.index")

    class Meta:
        model = JudgeVerdict
        fields = ["example_index", "winner", "consistent", "base_first", "finetuned_first", "base_first_reason", "finetuned_first_reason"]


class JudgeRunSerializer(serializers.ModelSerializer):
    evaluation_id = serializers.IntegerField()
    endpoint = serializers.SerializerMethodField(help_text="The judge's base URL, without credentials.")
    progress = serializers.SerializerMethodField()

    class Meta:
        model = JudgeRun
        fields = [
            "id",
            "evaluation_id",
            "status",
            "endpoint",
            "judge_model",
            "rubric",
            "progress",
            "requests",
            "run_seconds",
            "error_message",
            "created_at",
            "started_at",
            "completed_at",
        ]

    def get_endpoint(self, obj: JudgeRun) -> str:
        return redact_url(obj.endpoint)  # rows stored before URLs were stored redacted too

    def get_progress(self, obj: JudgeRun) -> dict:
        return {"done": obj.done, "total": obj.total, "percent": round(obj.progress_percent, 1)}


class JudgeRunDetailSerializer(JudgeRunSerializer):
    summary = serializers.SerializerMethodField(
        help_text="Win rate of the fine-tuned side with its 95% interval, ties, inconsistent pairs."
    )
    agreement = serializers.SerializerMethodField(help_text="Agreement with your blind votes: count, rate and Cohen's kappa.")
    verdicts = JudgeVerdictSerializer(many=True)

    class Meta(JudgeRunSerializer.Meta):
        fields = [*JudgeRunSerializer.Meta.fields, "summary", "agreement", "verdicts"]

    def get_summary(self, obj: JudgeRun) -> dict | None:
        return judging.run_summary(obj) if obj.status == JudgeRun.Status.COMPLETED else None

    def get_agreement(self, obj: JudgeRun) -> dict | None:
        if obj.status != JudgeRun.Status.COMPLETED:
            return None
        figures = judging.agreement(obj, self.context["request"].user)
        return {**figures, "trust": judging.trust_text(figures)}


class JudgeAskSerializer(serializers.Serializer):
    rubric = serializers.CharField(
        required=False, allow_blank=True, trim_whitespace=True, help_text="What the judge is told to prefer (default: the last one used)."
    )


class PreferenceTrainingSerializer(serializers.Serializer):
    include_judge = serializers.BooleanField(
        default=False, help_text="Also train on the latest judge run's consistent verdicts, on examples you did not vote on."
    )
    epochs = serializers.IntegerField(required=False, help_text="Epochs over the pairs (default: chosen for about 30 updates).")


class EvaluationJudgeApi(APIView):
    @extend_schema(responses=JudgeRunDetailSerializer(many=True), description="Judge runs on this evaluation, newest first.")
    def get(self, request: Request, pk: int) -> Response:
        evaluation = get_evaluation_for_user(request.user, pk)
        runs = evaluation.judge_runs.order_by("-created_at", "-id").prefetch_related("verdicts__example")
        return Response(JudgeRunDetailSerializer(runs, many=True, context={"request": request}).data)

    @extend_schema(
        request=JudgeAskSerializer,
        responses={201: JudgeRunSerializer, 200: JudgeRunSerializer},
        description="Ask the configured judge about every example, in both orders (in the worker). 409 when no judge is configured.",
    )
    def post(self, request: Request, pk: int) -> Response:
        evaluation = get_evaluation_for_user(request.user, pk)
        data = JudgeAskSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        run, created = judging.judge_start(owner=request.user, evaluation=evaluation, rubric=data.validated_data.get("rubric"))
        return Response(JudgeRunSerializer(run).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class EvaluationTrainPreferencesApi(APIView):
    @extend_schema(
        request=PreferenceTrainingSerializer,
        responses={201: TrainingJobSerializer},
        description=(
            "Start a preference-tuning job (DPO) on top of the evaluated fine-tune, from your decisive blind votes (and, with "
            "include_judge, the judge's consistent verdicts). It is evaluated against its parent automatically when it completes. "
            "Too few pairs answers 400 with the number needed."
        ),
    )
    def post(self, request: Request, pk: int) -> Response:
        evaluation = get_evaluation_for_user(request.user, pk)
        data = PreferenceTrainingSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        job = preference_job_start(owner=request.user, evaluation=evaluation, **data.validated_data)
        return Response(TrainingJobSerializer(job).data, status=status.HTTP_201_CREATED)
