from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.generics import ListAPIView
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from evaluation_app import selectors, services
from evaluation_app.models import Evaluation, EvaluationExample, Rating
from evaluation_app.selectors import evaluations_for_user, get_evaluation_for_user
from training_app.selectors import get_job_for_user
from tuna_site.api import ApiError
from tuna_site.quotas import LimitExceeded


class TestResultSerializer(serializers.ModelSerializer):
    example_index = serializers.IntegerField(source="index")
    prompt = serializers.CharField()

    class Meta:
        model = EvaluationExample
        fields = [
            "example_index",
            "prompt",
            "messages",
            "reference",
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
    progress = serializers.SerializerMethodField()

    class Meta:
        model = Evaluation
        fields = [
            "id",
            "training_job_id",
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
        try:
            evaluation, created = services.evaluation_start(owner=request.user, job=job, test_size=data.validated_data.get("test_size"))
        except services.EvaluationInvalid as exc:
            return Response({"detail": exc.message, "errors": {exc.field: [exc.message]}}, status=400)
        except (services.EvaluationConflict, LimitExceeded) as exc:
            raise ApiError(str(exc), 409) from None
        return Response(EvaluationSummarySerializer(evaluation).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class EvaluationDetailApi(APIView):
    @extend_schema(responses=EvaluationSerializer)
    def get(self, request: Request, pk: int) -> Response:
        evaluation = get_evaluation_for_user(request.user, pk)
        return Response(EvaluationSerializer(evaluation, context={"request": request}).data)

    @extend_schema(responses={204: None}, description="Delete the evaluation with its answers and votes. A running one answers 409.")
    def delete(self, request: Request, pk: int) -> Response:
        try:
            services.evaluation_delete(evaluation=get_evaluation_for_user(request.user, pk))
        except services.EvaluationConflict as exc:
            raise ApiError(str(exc), 409) from None
        return Response(status=status.HTTP_204_NO_CONTENT)


class EvaluationRateApi(APIView):
    @extend_schema(request=RateSerializer, responses={201: RateSerializer})
    def post(self, request: Request, pk: int) -> Response:
        evaluation = get_evaluation_for_user(request.user, pk)
        data = RateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            rating, _ = services.rating_set(user=request.user, evaluation=evaluation, **data.validated_data)
        except services.VoteInvalid as exc:
            raise ApiError(str(exc), 400) from None
        return Response(
            {"example_index": rating.example.index, "preferred_model": rating.preferred_model, "blind": rating.blind},
            status=status.HTTP_201_CREATED,
        )


class EvaluationPreferencesApi(APIView):
    @extend_schema(responses={(200, "application/jsonl"): OpenApiTypes.STR})
    def get(self, request: Request, pk: int) -> HttpResponse:
        evaluation = get_evaluation_for_user(request.user, pk)
        return HttpResponse(selectors.preferences_jsonl(evaluation, request.user), content_type="application/jsonl; charset=utf-8")
