"""Upload size limit enforced while the request streams in, before anything is stored."""

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, StopUpload


def max_upload_bytes() -> int:
    return int(settings.TUNA_MAX_UPLOAD_MB * 1024 * 1024)


def too_large_message() -> str:
    """What every front door answers for an upload over the limit (with status 413)."""
    return f"The file is larger than the {settings.TUNA_MAX_UPLOAD_MB:g} MB limit (TUNA_MAX_UPLOAD_MB)."


class MaxSizeUploadHandler(FileUploadHandler):
    """First in FILE_UPLOAD_HANDLERS: stops the upload as soon as it passes TUNA_MAX_UPLOAD_MB.

    The request is marked so the view answers 413; the partial temporary file is discarded by
    Django and nothing reaches storage.
    """

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        self.limit = max_upload_bytes()
        self.received = 0
        # Multipart framing adds a little; anything this far over cannot be within the limit.
        self.over_limit = bool(content_length and content_length > self.limit + 64 * 1024)
        # Returning None lets the parser go on; the rejection happens inside its loop (new_file),
        # where Django discards the partial upload cleanly.

    def new_file(self, *args, **kwargs):
        super().new_file(*args, **kwargs)
        if self.over_limit:
            self._reject()

    def receive_data_chunk(self, raw_data, start):
        self.received += len(raw_data)
        if self.received > self.limit:
            self._reject()
        return raw_data

    def file_complete(self, file_size):
        return None

    def _reject(self):
        self.request.tuna_upload_too_large = True
        raise StopUpload(connection_reset=False)


def upload_too_large(request) -> bool:
    request.FILES  # noqa: B018 - parsing the body is what runs the upload handlers
    raw = getattr(request, "_request", request)  # DRF wraps the Django request
    return getattr(raw, "tuna_upload_too_large", False)
