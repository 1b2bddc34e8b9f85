"""What a user can be told, and how the API tells it.

Services raise a `UserError` subclass of the kind that fits (`Invalid`, `NotFound`, `Conflict`,
`LimitReached`, `TooLarge`, `Unavailable`); the kind carries the answer's status, so no service names HTTP.
`exception_handler` (settings' EXCEPTION_HANDLER) renders those and DRF's own errors in one shape:

- under /api: ``{"detail": "<readable summary>", "errors": {"<field>": ["<message>", ...]}}``, ``errors``
  always present (an empty object when no field is at fault);
- under /v1 (OpenAI-compatible): ``{"error": {"message", "type", "param", "code"}}``, which the official
  ``openai`` client reads.

API views hold no try/except for service errors. JSON bodies are checked by
``tuna_core.parsers.StrictJSONParser`` before any view.
"""

from __future__ import annotations

from collections.abc import Mapping

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from rest_framework import exceptions as drf
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView, set_rollback
from rest_framework.views import exception_handler as drf_exception_handler


class UserError(Exception):
    """A refusal the user can act on: `message` says what and why, `errors` names the fields at fault.

    `param` is the one request field at fault where there is one (OpenAI's shape names it); `retry_after`
    (seconds) is sent as Retry-After. The subclass's kind decides `status`; a subclass may name OpenAI's
    error `code` for itself (e.g. "model_not_found"), otherwise /v1 answers the status's generic code or null.
    """

    status = 400
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        errors: Mapping[str, str | list[str]] | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.errors: dict[str, list[str]] = {
            str(field): [str(m) for m in messages] if isinstance(messages, (list, tuple)) else [str(messages)]
            for field, messages in (errors or {}).items()
        }
        self.param = param if param is not None else getattr(type(self), "param", None)
        self.retry_after = retry_after


class Invalid(UserError):
    """The request itself is wrong (a value, a missing field, a file that cannot be used)."""

    status = 400


class NotFound(UserError):
    status = 404


class Conflict(UserError):
    """The object is not in a state that allows this (e.g. cancelling a finished job)."""

    status = 409


class LimitReached(UserError):
    """Over one of the operator's limits (jobs, storage); the message names the limit and its setting."""

    status = 409


class TooLarge(UserError):
    status = 413


class Unavailable(UserError):
    """Cannot be done now or on this server (busy, a tool missing); `retry_after` when trying again helps."""

    status = 503


def _model_layer_error(exc: Exception) -> UserError | None:
    """tuna_llm is Django-free and raises its own errors; the few that can reach a view map here by kind."""
    from tuna_llm.catalog import UnknownBaseModel
    from tuna_llm.judge import JudgeError
    from tuna_llm.loading import ModelUnavailable
    from tuna_llm.prompting import ChatTemplateRefused
    from tuna_llm.serving.batching import RequestInvalid

    table: list[tuple[type[Exception], type[UserError]]] = [
        (RequestInvalid, Invalid),
        (ChatTemplateRefused, Invalid),
        (UnknownBaseModel, NotFound),
        (ModelUnavailable, Unavailable),
        (JudgeError, Unavailable),
    ]
    for source, kind in table:
        if isinstance(exc, source):
            return kind(str(exc))
    return None


# A refused body is read (and dropped) up to this size before the 413 goes out, so that a client still sending it
# reads the answer instead of a reset connection; a larger one is left unread (the server closes the connection).
BODY_DRAIN_LIMIT = 64 * 1024 * 1024


def _body_too_large(context) -> TooLarge:
    """A JSON or form body over DATA_UPLOAD_MAX_MEMORY_SIZE (DRF reads it through ``request.body``, which refuses it
    before reading a byte): a 413 naming the limit, its unread body drained first (up to BODY_DRAIN_LIMIT)."""
    request = getattr(context.get("request"), "_request", context.get("request"))
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    try:
        size = int(request.META.get("CONTENT_LENGTH") or 0) if request is not None else 0
    except ValueError:
        size = 0
    if request is not None and not request._read_started and 0 < size <= BODY_DRAIN_LIMIT:
        while request.read(65536):
            pass
    sent = f"{size:,} bytes" if size else "larger than that"
    return TooLarge(
        f"The request body is {sent}; this server takes at most {limit:,} bytes ({limit / 1048576:.1f} MB, "
        "DATA_UPLOAD_MAX_MEMORY_SIZE) in one JSON or form body. Send less at once (fewer or shorter messages); "
        "files go to the upload endpoints as multipart."
    )


def _flat(errors, prefix: str = "") -> dict[str, list[str]]:
    """DRF's nested field errors as ``{"messages[0].content": ["..."]}``: one level, lists of strings."""
    if isinstance(errors, Mapping):
        flat: dict[str, list[str]] = {}
        for key, value in errors.items():
            if isinstance(key, int):
                name = f"{prefix}[{key}]"
            elif prefix and key == api_settings.NON_FIELD_ERRORS_KEY:  # about the nested value as a whole
                name = prefix
            else:
                name = f"{prefix}.{key}" if prefix else str(key)
            for field, messages in _flat(value, name).items():
                flat.setdefault(field, []).extend(messages)
        return flat
    if isinstance(errors, (list, tuple)):
        if all(not isinstance(item, (Mapping, list, tuple)) for item in errors):
            return {prefix or "body": [str(item) for item in errors]} if errors else {}
        flat = {}
        for index, item in enumerate(errors):  # a list of objects (many=True): one entry per item at fault
            flat.update(_flat(item, f"{prefix}[{index}]"))
        return flat
    return {prefix or "body": [str(errors)]}


def _summary(errors: dict[str, list[str]]) -> str:
    return "; ".join(f"{field}: {' '.join(messages)}" for field, messages in errors.items())


def _one_shape(data) -> dict:
    """DRF's error data (a detail, a list, or field errors) as ``{"detail", "errors"}``."""
    if isinstance(data, Mapping) and "detail" in data:
        return {"detail": str(data["detail"]), "errors": {}}
    if isinstance(data, (list, tuple)) and all(not isinstance(item, (Mapping, list, tuple)) for item in data):
        return {"detail": " ".join(str(item) for item in data), "errors": {}}
    errors = _flat(data)
    return {"detail": _summary(errors), "errors": errors}


_OPENAI_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}
# Codes that follow from the status alone; a refusal of another status names its own (UserError.code).
_OPENAI_CODE = {
    401: "invalid_api_key",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    503: "engine_overloaded",
}


def _openai_shape(status: int, body: dict, param: str | None, code: str | None) -> dict:
    param = next(iter(body["errors"]), None) if body["errors"] else param
    code = code or _OPENAI_CODE.get(status)
    return {"error": {"message": body["detail"], "type": _OPENAI_TYPE.get(status, "api_error"), "param": param, "code": code}}


def _speaks_openai(context) -> bool:
    """/v1 answers in OpenAI's shape: its views say so (``error_shape = "openai"``), unknown /v1 paths by their path."""
    view, request = context.get("view"), context.get("request")
    if getattr(view, "error_shape", None) == "openai":
        return True
    return request is not None and getattr(request, "path_info", "").startswith("/v1/")


def exception_handler(exc, context):
    """Every API error in one shape (see the module docstring); None lets anything else be a 500. A view may
    add what its callers can do about a refusal with ``error_hint(exc) -> str | None`` (appended to detail)."""
    if isinstance(exc, RequestDataTooBig):  # a SuspiciousOperation DRF leaves to Django: no answer the client reads
        exc = _body_too_large(context)
    if not isinstance(exc, (UserError, drf.APIException)):
        exc = _model_layer_error(exc) or exc
    if isinstance(exc, UserError):
        set_rollback()
        body = {"detail": exc.message, "errors": exc.errors}
        hint = getattr(context.get("view"), "error_hint", None)
        if hint and (extra := hint(exc)):
            body["detail"] = f"{body['detail']} {extra}"
        response = Response(body, status=exc.status)
        if exc.retry_after:
            response["Retry-After"] = str(exc.retry_after)
        param = exc.param
    else:
        response = drf_exception_handler(exc, context)  # also sets Retry-After for throttling, WWW-Authenticate
        if response is None:
            return None
        response.data = _one_shape(response.data)
        param = getattr(exc, "param", None)
    if _speaks_openai(context):
        response.data = _openai_shape(
            response.status_code, response.data, param, getattr(exc, "code", None) if isinstance(exc, UserError) else None
        )
    return response


_ERROR = {
    "type": "object",
    "description": "Every error under /api. `errors` is always present: the fields at fault with their messages, "
    "or an empty object when no single field is (a state conflict, a limit, a missing object).",
    "properties": {
        "detail": {"type": "string", "description": "A readable summary of what went wrong and what to do."},
        "errors": {
            "type": "object",
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
            "description": 'Field (dotted for nested values, e.g. "messages[0].content") to its messages.',
        },
    },
    "required": ["detail", "errors"],
}
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
    "409": "The object is not in a state that allows this, or one of the server's limits is reached; `detail` says which.",
    "413": "The upload is larger than TUNA_MAX_UPLOAD_MB, or a JSON body larger than DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MB).",
    "429": "Too many calls (TUNA_API_RATE); Retry-After says when to try again.",
}
# These POSTs also answer 503: generation (with Retry-After) when TUNA_MAX_INFERENCE_QUEUE calls are waiting;
# an export asking for GGUF files answers 503 when llama.cpp's converter is not installed.
_UNAVAILABLE = {
    "/api/inference": "The model is busy (TUNA_MAX_INFERENCE_QUEUE); Retry-After says when to try again.",
    "/v1/chat/completions": "The model is busy (TUNA_MAX_INFERENCE_QUEUE); Retry-After says when to try again.",
    "/v1/completions": "The model is busy (TUNA_MAX_INFERENCE_QUEUE); Retry-After says when to try again.",
    "/api/training/{id}/export": "llama.cpp's converter is not installed on this server (GGUF formats only).",
}


def add_error_responses(result, generator, request, public):
    """drf-spectacular post-processing hook: document the error answers every operation can give."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"], schemas["OpenAIError"] = _ERROR, _OPENAI_ERROR
    for path, operations in result.get("paths", {}).items():
        ref = "#/components/schemas/OpenAIError" if path.startswith("/v1/") else "#/components/schemas/Error"
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            codes = {**_ERROR_CODES, **({"503": _UNAVAILABLE[path]} if method == "post" and path in _UNAVAILABLE else {})}
            for code, description in codes.items():
                responses.setdefault(code, {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}})
    return result


class NotFoundApi(APIView):
    """Unknown paths under /api/ and /v1/ answer JSON like every other API error, not an HTML page."""

    schema = None

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        raise drf.NotFound("No such API endpoint or object.")
