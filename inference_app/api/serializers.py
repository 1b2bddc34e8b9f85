"""Serializers of both inference APIs: they validate request bodies and document the answers."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from inference_app.engines import ENGINES
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
    engine = serializers.ChoiceField(choices=ENGINES, help_text="The runtime that produced the answer (TUNA_SERVING_ENGINE).")


# -- OpenAI-compatible /v1 --------------------------------------------------------------------
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
