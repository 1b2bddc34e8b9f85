"""Upload size limit enforced while the request streams in, before anything is stored."""

from django.conf import settings
from django.core.files import uploadhandler
from django.core.files.uploadhandler import FileUploadHandler, StopUpload

from tuna_core.disk import DiskFull, disk_full


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
    """Parse the upload; True when it passed TUNA_MAX_UPLOAD_MB. DiskFull (503) when the disk filled while it came in."""
    request.FILES  # noqa: B018 - parsing the body is what runs the upload handlers
    raw = getattr(request, "_request", request)  # DRF wraps the Django request
    if getattr(raw, "tuna_upload_disk_full", False):
        raise DiskFull("The upload")
    return getattr(raw, "tuna_upload_too_large", False)


class TemporaryFileUploadHandler(uploadhandler.TemporaryFileUploadHandler):
    """Django's handler (uploads streamed to a temporary file), keeping hold of every file it opens so that
    UploadCleanupMiddleware can remove whatever is left when the request ends.

    Django removes the file itself when the upload is stored (moved) or the request closes normally, but not
    when parsing stops half-way with an error (a client that disconnects mid-upload, a malformed body): then the
    file stayed in the temporary directory until the process happened to collect it, or forever if it was killed.
    """

    def new_file(self, *args, **kwargs):
        super().new_file(*args, **kwargs)
        files = self.request.__dict__.setdefault("tuna_upload_files", [])
        files.append(self.file)

    def receive_data_chunk(self, raw_data, start):
        try:
            return super().receive_data_chunk(raw_data, start)
        except OSError as exc:  # the temporary directory's disk is full: stop reading, answer 503 (upload_too_large)
            if not disk_full(exc):
                raise
            self.request.tuna_upload_disk_full = True
            raise StopUpload(connection_reset=False) from exc


def upload_cleanup_middleware(get_response):
    """Closes (and so deletes) the request's temporary upload files once its response is ready, however it ended."""

    def middleware(request):
        try:
            return get_response(request)
        finally:
            for upload in request.__dict__.get("tuna_upload_files", ()):
                upload.close()  # a stored upload was moved away already: closing it is a no-op

    return middleware
