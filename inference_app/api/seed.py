"""The seed's /api/inference: one prompt in, one answer with its timings and cost out."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from inference_app import services
from inference_app.api.base import prepared_call, validated
from inference_app.api.serializers import InferenceResultSerializer, InferenceSerializer

ENDPOINT = "api/inference"


class InferenceApi(APIView):
    @extend_schema(request=InferenceSerializer, responses=InferenceResultSerializer)
    def post(self, request: Request) -> Response:
        values = validated(request, InferenceSerializer, endpoint=ENDPOINT, model_field="model_id")
        call = prepared_call(
            request, values, endpoint=ENDPOINT, model_field="model_id", messages=[{"role": "user", "content": values["prompt"]}]
        )
        result = services.run_call(call)
        return Response(
            {
                "output": result.text,
                "latency_ms": round(result.latency_ms, 1),
                "queue_ms": round(result.queue_ms, 1),
                "compute_ms": round(result.compute_ms, 1),
                "tokens_used": result.prompt_tokens + result.completion_tokens,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "cost_usd": services.cost_for(result.compute_ms),
                "model_id": call.model.model_id,
                "finish_reason": result.finish_reason,
                "engine": call.engine,
            }
        )
