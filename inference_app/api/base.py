"""What both front doors share: the body is validated, then the call is prepared. A refusal (an
`InferenceRefused`) propagates to tuna_core.errors.exception_handler, which answers it in the door's shape."""

from __future__ import annotations

from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request

from inference_app import services

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "stop")


def validated(request: Request, serializer_class: type[serializers.Serializer], *, endpoint: str, model_field: str) -> dict:
    """Validate the body; a refused body is logged like any other refused call, then answered 400."""
    data = serializer_class(data=request.data)
    if not data.is_valid():
        model_id = request.data.get(model_field, "") if isinstance(request.data, dict) else ""
        errors = "; ".join(f"{field}: {' '.join(map(str, messages))}" for field, messages in data.errors.items())
        services.log_rejected(user=request.user, model_id=str(model_id), endpoint=endpoint, error=errors)
        raise ValidationError(data.errors)
    return data.validated_data


def prepared_call(request: Request, values: dict, *, endpoint: str, model_field: str, **prompt) -> services.Call:
    """The checked call for validated values; ``prompt`` is ``messages=`` or ``text=``."""
    sampling = {k: values[k] for k in SAMPLING_FIELDS}
    return services.checked_call(user=request.user, model_id=values[model_field], endpoint=endpoint, **prompt, **sampling)
