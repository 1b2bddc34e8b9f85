"""The engine check API: check a fine-tune on its base model's remote engine (TUNA_REMOTE_ENGINES) before
TUNA_SERVING_ENGINE=auto serves it there, and read the result with the engine's health."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from inference_app import remote_engines
from inference_app.models import EngineCheck
from training_app.models import Export
from training_app.selectors import get_job_for_user
from tuna_core.errors import NotFound


class EngineHealthSerializer(serializers.Serializer):
    kind = serializers.CharField(help_text="vllm, sglang or llama-server")
    url = serializers.CharField()
    ok = serializers.BooleanField()
    detail = serializers.CharField(help_text="What is up, or what is wrong (GET /health, then GET /v1/models).")


class EngineCheckSerializer(serializers.ModelSerializer):
    job_id = serializers.IntegerField(source="training_job_id")
    progress_percent = serializers.FloatField()
    passed = serializers.BooleanField(
        help_text=f"At least {Export.PARITY_PASS:.0%} of the engine's answers equal the transformers answers."
    )
    report = serializers.DictField(help_text="Counts, exact match of each side, speeds and the differing answers side by side.")

    class Meta:
        model = EngineCheck
        fields = [
            "id",
            "job_id",
            "status",
            "engine_kind",
            "engine_key",
            "done",
            "total",
            "identical",
            "passed",
            "progress_percent",
            "error_message",
            "report",
            "created_at",
            "completed_at",
        ]
        read_only_fields = fields


class EngineCheckStateSerializer(serializers.Serializer):
    check = EngineCheckSerializer(allow_null=True)
    engine = EngineHealthSerializer(allow_null=True, help_text="The base model's remote engine now (null: none is configured).")


def _health(base_model: str) -> dict | None:
    config = remote_engines.config_for(base_model)
    if config is None:
        return None
    report = remote_engines.engine_health(base_model)
    return {"kind": config.kind, "url": config.url, "ok": report.ok, "detail": report.detail}


class TrainingJobEngineCheckApi(APIView):
    @extend_schema(
        responses=EngineCheckStateSerializer,
        description="The job's latest engine check (null before the first) and its base model's remote engine health.",
    )
    def get(self, request: Request, pk: int) -> Response:
        job = get_job_for_user(request.user, pk)
        check = job.engine_checks.order_by("-created_at", "-id").first()
        engine = _health(job.base_model)
        if check is None and engine is None:
            raise NotFound(f"Job #{job.pk}'s base model {job.base_model} has no remote engine (TUNA_REMOTE_ENGINES) and no engine check.")
        return Response({"check": EngineCheckSerializer(check).data if check else None, "engine": engine})

    @extend_schema(
        request=None,
        responses={202: EngineCheckSerializer},
        description="Check a completed fine-tune on its base model's remote engine (in the background): its held-out prompts, "
        "greedy, through transformers and through the engine. A check already running is returned as it is. 409 when the job "
        "is not completed, its base has no remote engine, or the engine cannot have its adapter (e.g. a llama-server needs "
        "the f16 export).",
    )
    def post(self, request: Request, pk: int) -> Response:
        job = get_job_for_user(request.user, pk)
        check = remote_engines.engine_check_start(owner=request.user, job=job)
        return Response(EngineCheckSerializer(check).data, status=status.HTTP_202_ACCEPTED)
