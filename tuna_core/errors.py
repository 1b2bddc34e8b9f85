"""API conventions shared by every app: errors are ``{"detail": ...}``; JSON bodies are checked by
``tuna_core.parsers.StrictJSONParser`` before any view."""

from rest_framework.exceptions import APIException, NotFound
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler


class ApiError(APIException):
    """An error with a specific status and a plain-language ``detail``."""

    def __init__(self, message: str, status_code: int, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(detail=message)
        self.status_code = status_code
        self.param = param  # the request field at fault, where there is one (OpenAI's error shape names it)
        self.retry_after = retry_after  # seconds, sent as Retry-After (a 503 when busy)


def exception_handler(exc, context):
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if getattr(exc, "retry_after", None):
        response["Retry-After"] = str(exc.retry_after)
    if isinstance(response.data, list):
        response.data = {"detail": " ".join(str(item) for item in response.data)}
    elif isinstance(response.data, dict) and "detail" not in response.data:
        # Field errors keep their shape under "errors", with a readable summary in "detail".
        fields = response.data
        summary = "; ".join(
            f"{field}: {' '.join(str(m) for m in msgs) if isinstance(msgs, list) else msgs}" for field, msgs in fields.items()
        )
        response.data = {"detail": summary, "errors": fields}
    return response


_ERROR = {"type": "object", "properties": {"detail": {"type": "string"}, "errors": {"type": "object"}}, "required": ["detail"]}
_OPENAI_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
    "required": ["error"],
}
_ERROR_CODES = {
    "400": "The request is invalid; `detail` says why.",
    "401": "Missing or wrong credentials.",
    "404": "No such object (or it belongs to another user).",
    "405": "Method not allowed.",
    "409": "The object is not in a state that allows this.",
    "413": "The upload is larger than TUNA_MAX_UPLOAD_MB.",
    "429": "Too many calls (TUNA_API_RATE); Retry-After says when to try again.",
}
# Generation endpoints also answer 503 (with Retry-After) when TUNA_MAX_INFERENCE_QUEUE calls are waiting.
_BUSY = ("/api/inference", "/v1/chat/completions", "/v1/completions")


def add_error_responses(result, generator, request, public):
    """drf-spectacular post-processing hook: document the error answers every operation can give."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"], schemas["OpenAIError"] = _ERROR, _OPENAI_ERROR
    for path, operations in result.get("paths", {}).items():
        ref = "#/components/schemas/OpenAIError" if path.startswith("/v1/") else "#/components/schemas/Error"
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            codes = {
                **_ERROR_CODES,
                **({"503": "The model is busy (TUNA_MAX_INFERENCE_QUEUE); Retry-After says when to try again."} if path in _BUSY else {}),
            }
            for code, description in codes.items():
                responses.setdefault(code, {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}})
    return result


class NotFoundApi(APIView):
    """Unknown paths under /api/ and /v1/ answer JSON like every other API error, not an HTML page."""

    schema = None

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        raise NotFound("No such API endpoint or object.")
