"""Serializers of both inference APIs: they validate request bodies and document the answers."""

from __future__ import annotations

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from inference_app.conversation import MAX_TOOLS, ROLES, TOOL_CHOICES, TOOL_NAME, FieldError, chat_request
from inference_app.engines import ENGINES
from inference_app.services import InferenceInvalid, check_prompt_size
from tuna_llm.serving.batching import MAX_SEED, MIN_SEED

SEED_RANGE = f"seed must be a whole number from {MIN_SEED} to {MAX_SEED} (a signed 64-bit integer)."


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


class PromptField(serializers.CharField):
    """A raw prompt: refused when it holds more text than TUNA_MAX_PROMPT_TOKENS allows, before it is tokenized."""

    def __init__(self, **kwargs) -> None:
        super().__init__(trim_whitespace=False, **kwargs)

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        try:
            check_prompt_size(text=value)
        except InferenceInvalid as exc:
            raise serializers.ValidationError(exc.message) from None
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
    seed = serializers.IntegerField(
        required=False,
        allow_null=True,
        default=None,
        min_value=MIN_SEED,
        max_value=MAX_SEED,
        error_messages={"min_value": SEED_RANGE, "max_value": SEED_RANGE},
        help_text=f"Used when sampling (temperature > 0): the same seed and prompt give the same answer. {SEED_RANGE}",
    )
    stop = StopField(required=False, default=list)


# -- /api/inference ---------------------------------------------------------------------------
class InferenceSerializer(SamplingSerializer):
    model_id = serializers.CharField(
        help_text='A training job id (12 or "tuna-job-12"), its "ft:<base>:<user>:<suffix>:ftjob-12" name (with ":ckpt-step-<n>": '
        'a kept checkpoint of it) or "base:<name>".'
    )
    prompt = PromptField()


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
    engine = serializers.ChoiceField(choices=ENGINES, help_text="The runtime that produced the answer (TUNA_SERVING_ENGINE).")


# -- OpenAI-compatible /v1 --------------------------------------------------------------------
TEXT_PART = {
    "type": "object",
    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    "required": ["type", "text"],
}
CONTENT = {"oneOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}], "nullable": True}
TOOL_CALL = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "type": {"type": "string", "enum": ["function"]},
        "function": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string", "description": "A JSON object, as a string."}},
            "required": ["name", "arguments"],
        },
    },
    "required": ["id", "type", "function"],
}
MESSAGE = {
    "type": "object",
    "properties": {
        "role": {"type": "string", "enum": list(ROLES)},
        "content": {**CONTENT, "description": "Text parts are joined with a newline; null only beside tool_calls."},
        "name": {"type": "string"},
        "tool_calls": {"type": "array", "items": TOOL_CALL, "description": "Assistant messages only."},
        "tool_call_id": {"type": "string", "description": "Tool messages only: the call they answer."},
    },
    "required": ["role"],
}
TOOL = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "enum": ["function"]},
        "function": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "pattern": TOOL_NAME.pattern},
                "description": {"type": "string"},
                "parameters": {"type": "object", "description": "A JSON Schema object."},
                "strict": {"type": "boolean"},
            },
            "required": ["name"],
        },
    },
    "required": ["type", "function"],
}


@extend_schema_field({"type": "array", "items": MESSAGE, "minItems": 1, "description": "At most TUNA_MAX_CHAT_MESSAGES (512)."})
class MessagesField(serializers.JSONField):
    """Counted here, before anything reads them (TUNA_MAX_CHAT_MESSAGES); checked as a whole in
    ChatCompletionSerializer.validate (inference_app.conversation). The body came from the JSON parser, so it is
    not encoded again to be checked as JSON (JSONField's default), which would cost a pass over every message."""

    def to_internal_value(self, data):
        most = settings.TUNA_MAX_CHAT_MESSAGES
        if isinstance(data, list) and len(data) > most:
            raise serializers.ValidationError(f"A chat takes at most {most} messages (TUNA_MAX_CHAT_MESSAGES); this one has {len(data)}.")
        return data


@extend_schema_field({"type": "array", "items": TOOL, "maxItems": MAX_TOOLS, "nullable": True})
class ToolsField(serializers.JSONField):
    pass


@extend_schema_field({"type": "string", "enum": list(TOOL_CHOICES), "nullable": True})
class ToolChoiceField(serializers.JSONField):
    pass


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
    messages = MessagesField(help_text="Roles system, developer (read as system), user, assistant, tool.")
    tools = ToolsField(required=False, allow_null=True, default=None, help_text="Function tools the model may call.")
    tool_choice = ToolChoiceField(
        required=False,
        allow_null=True,
        default=None,
        help_text='"auto" (the default with tools) or "none" (tools not offered, the answer not read for calls). '
        '"required" and a named function are refused: decoding is not constrained to a call.',
    )
    parallel_tool_calls = serializers.BooleanField(
        required=False, default=True, help_text="false: at most one call is returned (the first the model wrote)."
    )

    def validate(self, attrs):
        attrs = super().validate(attrs)
        for legacy, instead in (("functions", "tools"), ("function_call", "tool_choice")):
            if legacy in self.initial_data:
                raise serializers.ValidationError({legacy: [f"The legacy {legacy} is not accepted here; send {instead}."]})
        try:
            attrs["chat"] = chat_request(
                attrs.pop("messages"),
                tools=attrs.pop("tools"),
                tool_choice=attrs.pop("tool_choice"),
                parallel_tool_calls=attrs.pop("parallel_tool_calls"),
            )
        except FieldError as exc:
            raise serializers.ValidationError({exc.param: [exc.reason]}) from None
        return attrs


class CompletionSerializer(OpenAISamplingSerializer):
    prompt = PromptField()


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class AssistantMessageSerializer(serializers.Serializer):
    role = serializers.CharField()
    content = serializers.CharField(allow_null=True, help_text="null when the answer is only tool calls.")
    tool_calls = serializers.ListField(
        child=serializers.JSONField(),
        required=False,
        help_text='The calls the model wrote: id "call_...", type "function", function {name, arguments}.',
    )


class ChoiceSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    finish_reason = serializers.ChoiceField(choices=["stop", "length", "tool_calls"])
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
    system_fingerprint = serializers.CharField(help_text="The engine that produced the answer, as in engine.")
    engine = serializers.ChoiceField(choices=ENGINES, help_text="The runtime that produced the answer (TUNA_SERVING_ENGINE).")


class CompletionResultSerializer(ChatCompletionResultSerializer):
    choices = TextChoiceSerializer(many=True)


class ModelSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField()
    created = serializers.IntegerField()
    owned_by = serializers.CharField()
    root = serializers.CharField(required=False)


class ModelListSerializer(serializers.Serializer):
    object = serializers.CharField()
    data = ModelSerializer(many=True)
