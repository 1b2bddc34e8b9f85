"""An OpenAI-compatible /v1: models, chat completions and text completions, streamed or not."""

from __future__ import annotations

import inspect
import json
import time
import uuid

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from inference_app import services
from inference_app.api.base import prepared_call, validated
from inference_app.api.serializers import (
    ChatCompletionResultSerializer,
    ChatCompletionSerializer,
    CompletionResultSerializer,
    CompletionSerializer,
    ModelListSerializer,
)
from tuna_llm.catalog import get_catalog


class OpenAIView(APIView):
    """Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: tuna_core.errors.exception_handler reads
    ``error_shape``."""

    error_shape = "openai"


def _usage(result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


EVENT_STREAM = OpenApiResponse(
    OpenApiTypes.STR, description='With "stream": true: server-sent events, one "data: {chunk}" per piece, then "data: [DONE]".'
)


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
    id_prefix = ""

    def post(self, request: Request):
        values = validated(request, self.serializer_class, endpoint=self.endpoint, model_field="model")
        call = prepared_call(request, values, endpoint=self.endpoint, model_field="model", **self.prompt_kwargs(values))
        ident, created = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
        if values["stream"]:
            services.admit(call)  # a refusal here is still answered with its status: no byte has gone out
            include_usage = bool(values["stream_options"].get("include_usage"))
            response = StreamingHttpResponse(self.events(call, ident, created, include_usage), content_type="text/event-stream")
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"
            return response
        result = services.run_call(call)
        return Response(
            {
                "id": ident,
                "object": self.object_name,
                "created": created,
                "model": call.model.model_id,
                "choices": [self.choice(result)],
                "usage": _usage(result),
                "system_fingerprint": call.engine,
                "engine": call.engine,
            }
        )

    def events(self, call, ident, created, include_usage):
        base = {
            "id": ident,
            "object": f"{self.object_name}.chunk" if self.object_name == "chat.completion" else self.object_name,
            "created": created,
            "model": call.model.model_id,
            "system_fingerprint": call.engine,
            "engine": call.engine,
        }
        first = self.first_chunk()
        pieces = services.stream_call(call)
        try:
            if first is not None:
                yield _sse({**base, "choices": [first]})
            for piece in pieces:
                yield _sse({**base, "choices": [self.delta(piece)]})
        except GeneratorExit:  # closed early: the client went away
            if inspect.getgeneratorstate(pieces) == inspect.GEN_CREATED:  # before its request was even queued
                services.log_cancelled(call)
            raise
        except Exception as exc:  # the status line has gone out: report in-stream, never a traceback
            yield _sse({"error": {"message": f"Generation failed: {type(exc).__name__}", "type": "api_error", "param": None, "code": None}})
            return
        finally:
            pieces.close()  # closed early, this stops its row and logs what it produced
        result = call.result
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
