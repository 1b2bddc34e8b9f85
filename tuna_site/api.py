"""API conventions shared by every app: errors are ``{"detail": ...}``."""

from rest_framework.exceptions import APIException
from rest_framework.views import exception_handler as drf_exception_handler


class ApiError(APIException):
    """An error with a specific status and a plain-language ``detail``."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(detail=message)
        self.status_code = status_code


def exception_handler(exc, context):
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
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
