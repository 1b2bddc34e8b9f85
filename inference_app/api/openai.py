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
from inference_app.conversation import ChatRequest
from tuna_core import admission
from tuna_llm.catalog import get_catalog
from tuna_llm.toolcalls import TOOL_CALL_OPEN, openai_tool_calls, parse_tool_calls


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


def answer_calls(text: str, chat: ChatRequest | None) -> tuple[str, list[dict]] | None:
    """(content outside the calls, calls) when the answer is read for calls and has some; else None.
    parallel_tool_calls false: the first call only."""
    if chat is None or not chat.reads_calls:
        return None
    content, calls = parse_tool_calls(text)
    if not calls:
        return None
    return content, calls if chat.parallel_tool_calls else calls[:1]


def _calls_finish(finish_reason: str) -> str:
    """An answer that called tools ends with "tool_calls", unless it was cut short ("length", "cancelled")."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


class StreamedAnswer:
    """Turns an answer's pieces into stream deltas. Text streams as content as it comes; once the answer reaches
    a tool call (TOOL_CALL_OPEN; text that may be its start is held back until it is known), the rest is held
    and read at the end: its calls go out as OpenAI tool_call deltas (index, id, type and name, then the
    arguments), and the stream ends with finish_reason "tool_calls". Held text that holds no call goes out as
    content. Without tools offered (or with tool_choice "none") every piece is content, as it comes."""

    def __init__(self, chat: ChatRequest | None, delta) -> None:
        self.reads_calls = chat is not None and chat.reads_calls
        self.chat = chat
        self.delta = delta
        self.held = ""  # text not sent yet: possibly the start of a call
        self.rest: str | None = None  # from the first call on: read at the end
        self.sent = False
        self.called = False

    def feed(self, piece: str) -> list[dict]:
        if not self.reads_calls:
            return [self.delta(piece)]
        if self.rest is not None:
            self.rest += piece
            return []
        text = self.held + piece
        at = text.find(TOOL_CALL_OPEN)
        if at >= 0:
            self.rest, text = text[at:], text[:at]
            self.held = ""
        else:
            keep = _partial_open(text)
            text, self.held = text[: len(text) - keep], text[len(text) - keep :]
        if not self.sent and not text.strip():  # nothing but blank space yet: the answer may still start with a call
            self.held = text + self.held
            return []
        self.sent = True
        return [self.delta(text)]

    def end(self) -> list[dict]:
        if not self.reads_calls:
            return []
        if self.rest is None:
            return [self.delta(self.held)] if self.held else []
        calls = answer_calls(self.rest, self.chat)
        if calls is None:  # no call could be read: it is text after all
            return [self.delta(self.held + self.rest)]
        content, found = calls
        out = [self.delta(self.held + content)] if (self.held + content).strip() else []
        for index, call in enumerate(openai_tool_calls(found)):
            head = {"index": index, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}
            out.append(_tool_delta(head))
            out.append(_tool_delta({"index": index, "function": {"arguments": call["function"]["arguments"]}}))
        self.called = True
        return out

    def finish_reason(self, finish_reason: str) -> str:
        return _calls_finish(finish_reason) if self.called else finish_reason


def _partial_open(text: str) -> int:
    """How many characters at the end of ``text`` could be the start of TOOL_CALL_OPEN."""
    for size in range(min(len(text), len(TOOL_CALL_OPEN) - 1), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-size:]):
            return size
    return 0


def _tool_delta(call: dict) -> dict:
    return {"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None, "logprobs": None}


def _sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


EVENT_STREAM = OpenApiResponse(
    OpenApiTypes.STR, description='With "stream": true: server-sent events, one "data: {chunk}" per piece, then "data: [DONE]".'
)


class ModelsApi(OpenAIView):
    @extend_schema(summary="List models (OpenAI-compatible)", responses=ModelListSerializer)
    def get(self, request: Request) -> Response:
        data = [{"id": f"{services.BASE_PREFIX}{name}", "object": "model", "created": 0, "owned_by": "llm-tuna"} for name in get_catalog()]
        # Each fine-tune under both its names: tuna-job-<n> and its OpenAI-style ft:... name; either answers.
        for job in services.completed_models_for(request.user):
            created = int((job.completed_at or job.created_at).timestamp())
            for name in (job.model_id, job.fine_tuned_model):
                data.append(
                    {"id": name, "object": "model", "created": created, "owned_by": request.user.get_username(), "root": job.base_model}
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
        call.chat = values.get("chat")  # the chat request (tools, tool_choice) its answer is read with
        ident, created = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
        if values["stream"]:
            services.admit(call)  # a refusal here is still answered with its status: no byte has gone out
            include_usage = bool(values["stream_options"].get("include_usage"))
            # The slot goes back when the server closes the response, even one closed before its first piece.
            events = admission.HeldStream(self.events(call, ident, created, include_usage), call.admission)
            response = StreamingHttpResponse(events, content_type="text/event-stream")
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
                "choices": [self.choice(result, call.chat)],
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
        reader = self.reader(call.chat)
        try:
            if first is not None:
                yield _sse({**base, "choices": [first]})
            for piece in pieces:
                for delta in reader.feed(piece):
                    yield _sse({**base, "choices": [delta]})
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
        for delta in reader.end():
            yield _sse({**base, "choices": [delta]})
        yield _sse({**base, "choices": [self.delta(None, reader.finish_reason(result.finish_reason))]})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(result)})
        yield "data: [DONE]\n\n"


class ChatCompletionsApi(_GenerationApi):
    serializer_class = ChatCompletionSerializer
    endpoint = "v1/chat/completions"
    object_name = "chat.completion"
    id_prefix = "chatcmpl"

    def prompt_kwargs(self, values):
        return {"messages": values["chat"].conversation}

    @staticmethod
    def choice(result, chat: ChatRequest):
        message, finish_reason = {"role": "assistant", "content": result.text}, result.finish_reason
        calls = answer_calls(result.text, chat)
        if calls is not None:
            content, found = calls
            message = {"role": "assistant", "content": content or None, "tool_calls": openai_tool_calls(found)}
            finish_reason = _calls_finish(finish_reason)
        return {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}

    @staticmethod
    def reader(chat: ChatRequest):
        return StreamedAnswer(chat, ChatCompletionsApi.delta)

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
    def choice(result, chat=None):
        return {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}

    @staticmethod
    def reader(chat=None):
        return StreamedAnswer(None, CompletionsApi.delta)

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
