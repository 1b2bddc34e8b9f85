"""Inference over HTTP: the seed's /api/inference and an OpenAI-compatible /v1."""

from __future__ import annotations

import json
import time
import uuid

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from inference_app import services
from inference_app.catalog import get_catalog
from tuna_site.api import ApiError


@extend_schema_field({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]})
class StopField(serializers.Field):
    """A string or a list of up to 4 strings, as OpenAI accepts."""

    def to_internal_value(self, data):
        items = [data] if isinstance(data, str) else data
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items) or len(items) > 4:
            raise serializers.ValidationError("stop must be a string or a list of up to 4 strings.")
        return [s for s in items if s]

    def to_representation(self, value):
        return value


class SamplingSerializer(serializers.Serializer):
    max_tokens = serializers.IntegerField(
        required=False,
        allow_null=True,
        default=None,
        help_text="1 to TUNA_MAX_TOKENS_LIMIT (2048 unless configured); 256 (or the limit, if lower) when left out.",
    )
    temperature = serializers.FloatField(
        required=False, default=0.0, help_text="0 (the default) decodes greedily: the same prompt gives the same answer."
    )
    top_p = serializers.FloatField(required=False, default=1.0)
    seed = serializers.IntegerField(required=False, allow_null=True, default=None)
    stop = StopField(required=False, default=list)


class InferenceSerializer(SamplingSerializer):
    model_id = serializers.CharField(help_text='A training job id (12 or "tuna-job-12") or "base:<name>".')
    prompt = serializers.CharField(trim_whitespace=False)


class InferenceResultSerializer(serializers.Serializer):
    output = serializers.CharField()
    latency_ms = serializers.FloatField(help_text="From the start of the batch that decoded this request to its last token.")
    queue_ms = serializers.FloatField(help_text="Time spent waiting for a batch, before latency_ms starts.")
    compute_ms = serializers.FloatField(
        help_text="This request's share of its batch's decoding time: each step's time is split between the requests decoded in it."
    )
    tokens_used = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    cost_usd = serializers.FloatField(help_text="compute_ms at TUNA_GPU_HOURLY_USD; queue time is not billed.")
    model_id = serializers.CharField()
    finish_reason = serializers.CharField()


def _sampling(data: dict) -> dict:
    return {k: data[k] for k in ("max_tokens", "temperature", "top_p", "seed", "stop")}


def _validated(request: Request, serializer_class: type[serializers.Serializer], endpoint: str, model_field: str) -> dict:
    """Validate the body; a refused body is logged like any other refused call, then answered 400."""
    data = serializer_class(data=request.data)
    if not data.is_valid():
        model_id = request.data.get(model_field, "") if isinstance(request.data, dict) else ""
        errors = "; ".join(f"{field}: {' '.join(map(str, messages))}" for field, messages in data.errors.items())
        services.log_rejected(user=request.user, model_id=str(model_id), endpoint=endpoint, error=errors)
        raise ValidationError(data.errors)
    return data.validated_data


def _resolve(request: Request, model_id: str, endpoint: str) -> services.ResolvedModel:
    try:
        return services.resolve_model(request.user, model_id)
    except services.ModelNotFound as exc:
        services.log_rejected(user=request.user, model_id=model_id, endpoint=endpoint, error=str(exc))
        raise ApiError(str(exc), 404) from None
    except services.ModelNotReady as exc:
        services.log_rejected(user=request.user, model_id=model_id, endpoint=endpoint, error=str(exc))
        raise ApiError(str(exc), 409) from None


def _prepare(request: Request, model: services.ResolvedModel, endpoint: str, **kwargs) -> services.Call:
    try:
        return services.prepare_call(user=request.user, model=model, endpoint=endpoint, **kwargs)
    except services.InferenceInvalid as exc:
        services.log_rejected(user=request.user, model_id=model.model_id, endpoint=endpoint, error=str(exc))
        raise ApiError(str(exc), 400, param=exc.param) from None
    except services.ModelNotReady as exc:
        services.log_rejected(user=request.user, model_id=model.model_id, endpoint=endpoint, error=str(exc))
        raise ApiError(str(exc), 409) from None


class InferenceApi(APIView):
    @extend_schema(request=InferenceSerializer, responses=InferenceResultSerializer)
    def post(self, request: Request) -> Response:
        values = _validated(request, InferenceSerializer, "api/inference", "model_id")
        model = _resolve(request, values["model_id"], "api/inference")
        call = _prepare(request, model, "api/inference", messages=[{"role": "user", "content": values["prompt"]}], **_sampling(values))
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
                "model_id": model.model_id,
                "finish_reason": result.finish_reason,
            }
        )


# -- OpenAI-compatible -------------------------------------------------------------------------
class OpenAIView(APIView):
    """Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def handle_exception(self, exc):
        response = super().handle_exception(exc)
        detail = response.data.get("detail") if isinstance(response.data, dict) else response.data
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            409: "conflict_error",
        }.get(response.status_code, "api_error")
        code = {401: "invalid_api_key", 404: "model_not_found", 409: "model_not_ready"}.get(response.status_code)
        param = None
        if isinstance(response.data, dict) and response.data.get("errors"):
            param = next(iter(response.data["errors"]))
        elif isinstance(exc, ApiError):
            param = exc.param
        response.data = {"error": {"message": str(detail), "type": kind, "param": param, "code": code}}
        return response


@extend_schema_field(
    {
        "oneOf": [
            {"type": "string"},
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
                    "required": ["type", "text"],
                },
            },
        ]
    }
)
class ContentField(serializers.Field):
    def to_internal_value(self, data):
        if isinstance(data, str):
            return data
        if isinstance(data, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in data):
            return "".join(p["text"] for p in data)
        raise serializers.ValidationError("content must be a string or a list of text parts.")

    def to_representation(self, value):
        return value


class MessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=["system", "user", "assistant"])
    content = ContentField()


class OpenAISamplingSerializer(SamplingSerializer):
    model = serializers.CharField()
    max_completion_tokens = serializers.IntegerField(required=False)
    stream = serializers.BooleanField(required=False, default=False)
    stream_options = serializers.DictField(required=False, default=dict)
    n = serializers.IntegerField(required=False, default=1, min_value=1, max_value=1, help_text="Only 1 is supported.")
    user = serializers.CharField(required=False)

    def validate(self, attrs):
        if "max_completion_tokens" in attrs:
            attrs["max_tokens"] = attrs.pop("max_completion_tokens")
        return attrs


class ChatCompletionSerializer(OpenAISamplingSerializer):
    messages = MessageSerializer(many=True, allow_empty=False)


class CompletionSerializer(OpenAISamplingSerializer):
    prompt = serializers.CharField(trim_whitespace=False)


def _usage(result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class AssistantMessageSerializer(serializers.Serializer):
    role = serializers.CharField()
    content = serializers.CharField()


class ChoiceSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    finish_reason = serializers.ChoiceField(choices=["stop", "length"])
    logprobs = serializers.JSONField(allow_null=True)


class ChatChoiceSerializer(ChoiceSerializer):
    message = AssistantMessageSerializer()


class TextChoiceSerializer(ChoiceSerializer):
    text = serializers.CharField(allow_blank=True)


class ChatCompletionResultSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField()
    created = serializers.IntegerField()
    model = serializers.CharField()
    choices = ChatChoiceSerializer(many=True)
    usage = UsageSerializer()


class CompletionResultSerializer(ChatCompletionResultSerializer):
    choices = TextChoiceSerializer(many=True)


EVENT_STREAM = OpenApiResponse(
    OpenApiTypes.STR, description='With "stream": true: server-sent events, one "data: {chunk}" per piece, then "data: [DONE]".'
)


class ModelSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField()
    created = serializers.IntegerField()
    owned_by = serializers.CharField()
    root = serializers.CharField(required=False)


class ModelListSerializer(serializers.Serializer):
    object = serializers.CharField()
    data = ModelSerializer(many=True)


class ModelsApi(OpenAIView):
    @extend_schema(summary="List models (OpenAI-compatible)", responses=ModelListSerializer)
    def get(self, request: Request) -> Response:
        data = [{"id": f"{services.BASE_PREFIX}{name}", "object": "model", "created": 0, "owned_by": "llm-tuna"} for name in get_catalog()]
        for job in services.completed_models_for(request.user):
            created = int((job.completed_at or job.created_at).timestamp())
            data.append(
                {"id": job.model_id, "object": "model", "created": created, "owned_by": request.user.get_username(), "root": job.base_model}
            )
        return Response({"object": "list", "data": data})


class _GenerationApi(OpenAIView):
    serializer_class: type[serializers.Serializer]
    endpoint = ""
    object_name = ""

    def post(self, request: Request):
        values = _validated(request, self.serializer_class, self.endpoint, "model")
        model = _resolve(request, values["model"], self.endpoint)
        call = _prepare(request, model, self.endpoint, **self.prompt_kwargs(values), **_sampling(values))
        ident, created = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
        if values["stream"]:
            include_usage = bool(values["stream_options"].get("include_usage"))
            response = StreamingHttpResponse(
                self.events(call, ident, created, model.model_id, include_usage), content_type="text/event-stream"
            )
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"
            return response
        result = services.run_call(call)
        return Response(
            {
                "id": ident,
                "object": self.object_name,
                "created": created,
                "model": model.model_id,
                "choices": [self.choice(result)],
                "usage": _usage(result),
            }
        )

    def events(self, call, ident, created, model_id, include_usage):
        base = {
            "id": ident,
            "object": f"{self.object_name}.chunk" if self.object_name == "chat.completion" else self.object_name,
            "created": created,
            "model": model_id,
        }
        first = self.first_chunk()
        if first is not None:
            yield _sse({**base, "choices": [first]})
        try:
            for piece in services.stream_call(call):
                yield _sse({**base, "choices": [self.delta(piece)]})
        except Exception as exc:  # the status line has gone out: report in-stream, never a traceback
            yield _sse({"error": {"message": f"Generation failed: {type(exc).__name__}", "type": "api_error", "param": None, "code": None}})
            return
        result = call.request.result
        yield _sse({**base, "choices": [self.delta(None, result.finish_reason)]})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(result)})
        yield "data: [DONE]\n\n"


class ChatCompletionsApi(_GenerationApi):
    serializer_class = ChatCompletionSerializer
    endpoint = "v1/chat/completions"
    object_name = "chat.completion"
    id_prefix = "chatcmpl"

    def prompt_kwargs(self, values):
        return {"messages": [dict(m) for m in values["messages"]]}

    @staticmethod
    def choice(result):
        return {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "finish_reason": result.finish_reason,
            "logprobs": None,
        }

    @staticmethod
    def first_chunk():
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}

    @staticmethod
    def delta(piece, finish_reason=None):
        return {"index": 0, "delta": {"content": piece} if piece is not None else {}, "finish_reason": finish_reason, "logprobs": None}

    @extend_schema(
        request=ChatCompletionSerializer,
        responses={(200, "application/json"): ChatCompletionResultSerializer, (200, "text/event-stream"): EVENT_STREAM},
        summary="Chat completion (OpenAI-compatible, stream supported)",
    )
    def post(self, request: Request):
        return super().post(request)


class CompletionsApi(_GenerationApi):
    """Plain text continuation: the prompt is used as it is, without the chat template."""

    serializer_class = CompletionSerializer
    endpoint = "v1/completions"
    object_name = "text_completion"
    id_prefix = "cmpl"

    def prompt_kwargs(self, values):
        return {"text": values["prompt"]}

    @staticmethod
    def choice(result):
        return {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}

    @staticmethod
    def first_chunk():
        return None

    @staticmethod
    def delta(piece, finish_reason=None):
        return {"index": 0, "text": piece or "", "finish_reason": finish_reason, "logprobs": None}

    @extend_schema(
        request=CompletionSerializer,
        responses={(200, "application/json"): CompletionResultSerializer, (200, "text/event-stream"): EVENT_STREAM},
        summary="Text completion (OpenAI-compatible, stream supported)",
    )
    def post(self, request: Request):
        return super().post(request)
