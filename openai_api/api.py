"""OpenAI's fine-tuning API under /v1, answering the official `openai` client unchanged: files, jobs, events and
checkpoints. Errors come out in OpenAI's shape (``error_shape``, tuna_core.errors)."""

from __future__ import annotations

from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from datasets_app.services import UploadTooLarge
from datasets_app.uploads import too_large_message, upload_too_large
from openai_api import objects, selectors, services
from openai_api.models import JobFiles
from training_app import services as training
from training_app.models import TrainingJob
from training_app.selectors import job_checkpoints
from tuna_core import admission
from tuna_llm.training_config import POSITIVE, RANGES


class OpenAIView(APIView):
    error_shape = "openai"


# -- request bodies ----------------------------------------------------------------------------------
class AutoOr(serializers.Field):
    """OpenAI's "number or 'auto'": auto leaves the setting to the product's choice."""

    integer = True

    def __init__(self, *, low: float, high: float, open_low: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.low, self.high, self.open_low = low, high, open_low

    def to_internal_value(self, data):
        if data == "auto":
            return "auto"
        kind = "a whole number" if self.integer else "a number"
        bounds = f"{'above' if self.open_low else 'from'} {self.low:g} {'up ' if self.open_low else ''}to {self.high:g}"
        ok_type = isinstance(data, int) if self.integer else isinstance(data, (int, float))
        if isinstance(data, bool) or not ok_type or (data <= self.low if self.open_low else data < self.low) or data > self.high:
            raise serializers.ValidationError(f'Must be "auto" or {kind} {bounds}; got {data!r}.')
        return data

    def to_representation(self, value):
        return value


@extend_schema_field({"oneOf": [{"type": "string", "enum": ["auto"]}, {"type": "integer"}]})
class AutoOrInteger(AutoOr):
    integer = True


@extend_schema_field({"oneOf": [{"type": "string", "enum": ["auto"]}, {"type": "number"}]})
class AutoOrNumber(AutoOr):
    integer = False


class StrictSerializer(serializers.Serializer):
    """Refuses keys it does not know, naming them (a misspelt setting is never silently ignored)."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                known = ", ".join(self.fields)
                raise serializers.ValidationError({name: [f"Unrecognized argument. Known here: {known}."] for name in unknown})
        return super().to_internal_value(data)


class SupervisedHyperparameters(StrictSerializer):
    n_epochs = AutoOrInteger(low=1, high=RANGES["num_epochs"].maximum, required=False)
    batch_size = AutoOrInteger(low=1, high=RANGES["batch_size"].maximum, required=False)
    learning_rate_multiplier = AutoOrNumber(low=0, high=POSITIVE["learning_rate_multiplier"][0], open_low=True, required=False)


class DpoHyperparameters(SupervisedHyperparameters):
    beta = AutoOrNumber(low=0, high=POSITIVE["dpo_beta"][0], open_low=True, required=False)


class SupervisedMethod(StrictSerializer):
    hyperparameters = SupervisedHyperparameters(required=False)


class DpoMethod(StrictSerializer):
    hyperparameters = DpoHyperparameters(required=False)


class MethodSerializer(StrictSerializer):
    type = serializers.CharField()
    supervised = SupervisedMethod(required=False)
    dpo = DpoMethod(required=False)
    reinforcement = serializers.DictField(required=False)

    def validate_type(self, value: str) -> str:
        if value == "reinforcement":
            raise serializers.ValidationError(
                "Reinforcement fine-tuning (graders) is not offered here; use 'supervised' or 'dpo' (preference files)."
            )
        if value not in ("supervised", "dpo"):
            raise serializers.ValidationError(f"Must be 'supervised' or 'dpo'; got {value!r}.")
        return value

    def validate(self, data):
        other = "dpo" if data["type"] == "supervised" else "supervised"
        if other in data:
            raise serializers.ValidationError(
                {other: [f"Given with method type {data['type']!r}: put its settings under {data['type']!r}."]}
            )
        return data


SETTING_NAMES = {
    "n_epochs": "num_epochs",
    "batch_size": "batch_size",
    "learning_rate_multiplier": "learning_rate_multiplier",
    "beta": "beta",
}


class JobCreateSerializer(StrictSerializer):
    model = serializers.CharField(max_length=300)
    training_file = serializers.CharField(max_length=100)
    validation_file = serializers.CharField(max_length=100, required=False, allow_null=True)
    suffix = serializers.CharField(required=False, allow_null=True, allow_blank=True, trim_whitespace=False)
    seed = serializers.IntegerField(required=False, allow_null=True, min_value=RANGES["seed"].minimum, max_value=RANGES["seed"].maximum)
    metadata = serializers.JSONField(required=False, allow_null=True)
    hyperparameters = SupervisedHyperparameters(required=False)
    method = MethodSerializer(required=False)
    integrations = serializers.ListField(required=False, allow_null=True)

    def validate_integrations(self, value):
        if value:
            raise serializers.ValidationError(
                "Integrations (Weights & Biases) are not offered here: the job's page shows its live loss chart, "
                "and GET /v1/fine_tuning/jobs/{id}/events gives every step's metrics."
            )
        return value

    def validate(self, data):
        errors = training.label_errors(suffix=data.get("suffix") or "", metadata=data.get("metadata"))
        if errors:
            raise serializers.ValidationError(errors)  # OpenAI's rules for both, kept by training_app
        method = data.get("method") or {"type": "supervised"}
        kind = method["type"]
        hyper = (method.get(kind) or {}).get("hyperparameters")
        if "hyperparameters" in data and hyper is not None:
            raise serializers.ValidationError(
                {"hyperparameters": ["Given with method: put the settings under method.<type>.hyperparameters only."]}
            )
        hyper = hyper if hyper is not None else data.get("hyperparameters", {})
        settings = {SETTING_NAMES[name]: value for name, value in hyper.items() if value != "auto"}
        if data.get("seed") is not None:
            settings["seed"] = data["seed"]
        return services.JobRequest(
            model=data["model"],
            training_file=data["training_file"],
            method=kind,
            validation_file=data.get("validation_file"),
            suffix=data.get("suffix") or "",
            metadata=data.get("metadata"),
            settings=settings,
        )


class FileUploadSerializer(serializers.Serializer):
    file = serializers.FileField(required=False, help_text="A .jsonl file in one of OpenAI's fine-tuning formats.")
    purpose = serializers.CharField(help_text='"fine-tune" (the only purpose taken here).')


class ListQuery(serializers.Serializer):
    after = serializers.CharField(required=False, max_length=100)
    limit = serializers.IntegerField(required=False, min_value=1, max_value=100, default=20)


class FileListQuery(ListQuery):
    limit = serializers.IntegerField(required=False, min_value=1, max_value=10000, default=10000)
    order = serializers.ChoiceField(choices=["asc", "desc"], required=False, default="desc")
    purpose = serializers.CharField(required=False)


class CheckpointListQuery(ListQuery):
    limit = serializers.IntegerField(required=False, min_value=1, max_value=100, default=10)


def _query(request: Request, serializer_class: type[serializers.Serializer]) -> dict:
    query = serializer_class(data=request.query_params)
    query.is_valid(raise_exception=True)
    return query.validated_data


# -- files -----------------------------------------------------------------------------------------
FILE = OpenApiTypes.OBJECT


class FilesApi(OpenAIView):
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(
        summary="List files (OpenAI-compatible)",
        operation_id="v1_files_list",
        parameters=[FileListQuery],
        responses=OpenApiTypes.OBJECT,
        description="Your datasets as OpenAI files, newest first (order=asc: oldest first), paged with after/limit/has_more.",
    )
    def get(self, request: Request) -> Response:
        query = _query(request, FileListQuery)
        if query.get("purpose", "fine-tune") != "fine-tune":
            return Response({"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None})
        rows, more = selectors.files_page(request.user, after=query.get("after"), limit=query["limit"], ascending=query["order"] == "asc")
        data = [objects.file_object(row) for row in rows]
        return Response(
            {
                "object": "list",
                "data": data,
                "has_more": more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    @extend_schema(
        summary="Upload a file (OpenAI-compatible)",
        request={"multipart/form-data": FileUploadSerializer},
        responses={200: FILE},
        description="The upload becomes a dataset, validated as the Datasets page does. An invalid file is kept (status "
        "processed, status_details names its first bad line) and a job that uses it fails with invalid_training_file.",
    )
    def post(self, request: Request) -> Response:
        if upload_too_large(request):
            raise UploadTooLarge(too_large_message())
        data = FileUploadSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        dataset = services.file_upload(owner=request.user, upload=data.validated_data.get("file"), purpose=data.validated_data["purpose"])
        return Response(objects.file_object(dataset))


class FileDetailApi(OpenAIView):
    @extend_schema(summary="Retrieve a file (OpenAI-compatible)", responses=FILE)
    def get(self, request: Request, file_id: str) -> Response:
        return Response(objects.file_object(selectors.get_file_for_user(request.user, file_id)))

    @extend_schema(
        summary="Delete a file (OpenAI-compatible)",
        responses=OpenApiTypes.OBJECT,
        description="Deletes the dataset. A file that fine-tuning jobs use answers 409: jobs keep their data.",
    )
    def delete(self, request: Request, file_id: str) -> Response:
        dataset = selectors.get_file_for_user(request.user, file_id)
        services.file_delete(dataset=dataset)
        return Response({"id": file_id, "object": "file", "deleted": True})


class FileContentApi(OpenAIView):
    def perform_content_negotiation(self, request, force=False):
        """The client asks for `application/binary`; the bytes go as they are, and an error still as JSON."""
        return super().perform_content_negotiation(request, force=True)

    @extend_schema(summary="A file's content (OpenAI-compatible)", responses={(200, "application/octet-stream"): OpenApiTypes.BINARY})
    def get(self, request: Request, file_id: str) -> FileResponse:
        dataset = selectors.get_file_for_user(request.user, file_id)
        with admission.download_slot(request.user) as ticket:  # 429 / 503 beyond the download limits
            return admission.file_response(
                dataset.file.open("rb"), ticket, content_type="application/octet-stream", filename=dataset.original_filename
            )


# -- jobs ------------------------------------------------------------------------------------------
def job_answer(job: TrainingJob) -> dict:
    files = JobFiles.objects.filter(job=job).select_related("training_file", "validation_file").first()
    return _object(job, files)


def _object(job: TrainingJob, files: JobFiles | None) -> dict:
    if files is None:
        return objects.job_object(job)
    return objects.job_object(job, training_file=files.training_file, validation_file=files.validation_file)


def _fresh(job: TrainingJob) -> TrainingJob:
    return selectors.get_job_for_user(job.owner, objects.job_id(job))


JOB = OpenApiTypes.OBJECT
JOB_ID = OpenApiParameter("fine_tuning_job_id", str, OpenApiParameter.PATH, description="ftjob-<id>")


class JobsApi(OpenAIView):
    @extend_schema(
        summary="List fine-tuning jobs (OpenAI-compatible)",
        operation_id="v1_fine_tuning_jobs_list",
        parameters=[ListQuery],
        responses=OpenApiTypes.OBJECT,
        description="Every training job of yours, made here or in the pages, newest first; metadata[key]=value filters.",
    )
    def get(self, request: Request) -> Response:
        query = _query(request, ListQuery)
        metadata = {
            key[len("metadata[") : -1]: value
            for key, value in request.query_params.items()
            if key.startswith("metadata[") and key.endswith("]")
        }
        jobs, more = selectors.jobs_page(request.user, after=query.get("after"), limit=query["limit"], metadata=metadata)
        files = selectors.job_files(jobs)
        return Response({"object": "list", "data": [_object(job, files.get(job.pk)) for job in jobs], "has_more": more})

    @extend_schema(
        summary="Create a fine-tuning job (OpenAI-compatible)",
        request=JobCreateSerializer,
        responses={200: JOB},
        description="model: a base model of this server or one of your completed fine-tunes (ft: name or tuna-job-<id>). "
        "A file that cannot be used gives a job that has failed at once, with error.code invalid_training_file "
        "(or invalid_validation_file) and the first bad line.",
    )
    def post(self, request: Request) -> Response:
        data = JobCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        job = services.fine_tuning_job_create(owner=request.user, request=data.validated_data)
        return Response(job_answer(_fresh(job)))


class JobDetailApi(OpenAIView):
    @extend_schema(summary="Retrieve a fine-tuning job (OpenAI-compatible)", parameters=[JOB_ID], responses=JOB)
    def get(self, request: Request, fine_tuning_job_id: str) -> Response:
        return Response(job_answer(selectors.get_job_for_user(request.user, fine_tuning_job_id)))


class _JobActionApi(OpenAIView):
    def act(self, job: TrainingJob) -> TrainingJob:
        raise NotImplementedError

    def post(self, request: Request, fine_tuning_job_id: str) -> Response:
        job = self.act(selectors.get_job_for_user(request.user, fine_tuning_job_id))
        return Response(job_answer(_fresh(job)))


class JobCancelApi(_JobActionApi):
    def act(self, job: TrainingJob) -> TrainingJob:
        return training.training_job_cancel(job=job)

    @extend_schema(
        summary="Cancel a fine-tuning job (OpenAI-compatible)",
        parameters=[JOB_ID],
        request=None,
        responses=JOB,
        description="A queued job is cancelled at once; a running one stops after the current step. A finished job answers 409.",
    )
    def post(self, request: Request, fine_tuning_job_id: str) -> Response:
        return super().post(request, fine_tuning_job_id)


class JobPauseApi(_JobActionApi):
    def act(self, job: TrainingJob) -> TrainingJob:
        return training.training_job_pause(job=job)

    @extend_schema(
        summary="Pause a fine-tuning job (OpenAI-compatible)",
        parameters=[JOB_ID],
        request=None,
        responses=JOB,
        description="The job stops with a checkpoint saved where it stopped; resume continues from it.",
    )
    def post(self, request: Request, fine_tuning_job_id: str) -> Response:
        return super().post(request, fine_tuning_job_id)


class JobResumeApi(_JobActionApi):
    def act(self, job: TrainingJob) -> TrainingJob:
        return training.training_job_resume(job=job)

    @extend_schema(
        summary="Resume a fine-tuning job (OpenAI-compatible)",
        parameters=[JOB_ID],
        request=None,
        responses=JOB,
        description="A paused, cancelled or failed job continues from its last checkpoint.",
    )
    def post(self, request: Request, fine_tuning_job_id: str) -> Response:
        return super().post(request, fine_tuning_job_id)


class JobEventsApi(OpenAIView):
    @extend_schema(
        summary="List a fine-tuning job's events (OpenAI-compatible)",
        parameters=[JOB_ID, ListQuery],
        responses=OpenApiTypes.OBJECT,
        description='Newest first: status messages (type "message") and one "metrics" event per logged step '
        "(data: step, train_loss, valid_loss, total_steps, epoch, learning_rate).",
    )
    def get(self, request: Request, fine_tuning_job_id: str) -> Response:
        query = _query(request, ListQuery)
        job = selectors.get_job_for_user(request.user, fine_tuning_job_id)
        events = objects.job_events(job, job_checkpoints(job))
        return Response(objects.cursor_page(events, after=query.get("after"), limit=query["limit"]))


class JobCheckpointsApi(OpenAIView):
    @extend_schema(
        summary="List a fine-tuning job's checkpoints (OpenAI-compatible)",
        parameters=[JOB_ID, CheckpointListQuery],
        responses=OpenApiTypes.OBJECT,
        description="The kept checkpoints, newest first; each answers at /v1/chat/completions under its fine_tuned_model_checkpoint name.",
    )
    def get(self, request: Request, fine_tuning_job_id: str) -> Response:
        query = _query(request, CheckpointListQuery)
        job = selectors.get_job_for_user(request.user, fine_tuning_job_id)
        rows = sorted(job_checkpoints(job), key=lambda row: row[0], reverse=True)
        data = [objects.checkpoint_object(job, step, train, valid, created) for step, _path, train, valid, created in rows]
        page = objects.cursor_page(data, after=query.get("after"), limit=query["limit"])
        page["first_id"] = page["data"][0]["id"] if page["data"] else None
        page["last_id"] = page["data"][-1]["id"] if page["data"] else None
        return Response(page)
