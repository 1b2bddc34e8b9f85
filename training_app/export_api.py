"""The export API: start an export, read its progress, files and parity, download each file or the bundle.
Downloads are streamed from disk (never read into memory) with the same token (or session) authentication."""

from __future__ import annotations

from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from training_app import exports
from training_app.models import Export
from training_app.selectors import get_job_for_user
from tuna_core import admission
from tuna_core.errors import Conflict, NotFound
from tuna_core.jobs import queue_position


class ExportFileSerializer(serializers.Serializer):
    name = serializers.CharField()
    kind = serializers.CharField(
        help_text="gguf_base_f16, gguf_base_q8_0, gguf_lora, gguf_merged_q8_0, gguf_merged_q5_k_m, gguf_merged_q4_k_m, "
        "merged_safetensors, modelfile, readme or bundle"
    )
    size_bytes = serializers.IntegerField()
    url = serializers.CharField()


class ParitySerializer(serializers.Serializer):
    gguf = serializers.CharField(help_text="The GGUF file(s) that answered.")
    identical = serializers.IntegerField(help_text="Held-out prompts answered identically by PyTorch and llama.cpp.")
    total = serializers.IntegerField()
    exact_match_pytorch = serializers.FloatField(help_text="Answers equal to the reference, PyTorch.")
    exact_match_gguf = serializers.FloatField(help_text="Answers equal to the reference, llama.cpp.")
    tokens_per_second_pytorch = serializers.FloatField(allow_null=True)
    tokens_per_second_gguf = serializers.FloatField(allow_null=True)
    mismatches = serializers.ListField(
        child=serializers.DictField(), help_text="Differing answers side by side (index, prompt, reference, pytorch, gguf)."
    )
    quantization = serializers.DictField(
        required=False,
        help_text='Quantized variants only: {"type": "Q4_K_M", "bits": 4, "fallbacks": {"q4_K -> q5_0": tensors}} '
        "(tensors whose rows do not divide into 256 are kept at another type by llama-quantize).",
    )
    note = serializers.CharField(required=False, help_text='Quantized variants only: "a 4-bit model differs: k of N answers differ".')


class ExportSerializer(serializers.ModelSerializer):
    job_id = serializers.IntegerField(source="training_job_id")
    progress_percent = serializers.SerializerMethodField()
    queue_position = serializers.SerializerMethodField()
    files = serializers.SerializerMethodField()
    parity = serializers.SerializerMethodField()
    parity_passed = serializers.BooleanField(help_text=f"At least {Export.PARITY_PASS:.0%} of the f16 answers identical.")

    class Meta:
        model = Export
        fields = [
            "id",
            "job_id",
            "status",
            "formats",
            "stage",
            "progress_percent",
            "queue_position",
            "error_message",
            "files",
            "parity",
            "parity_passed",
            "llama_cpp_version",
            "run_seconds",
            "created_at",
            "completed_at",
        ]
        read_only_fields = fields

    def get_progress_percent(self, export: Export) -> float:
        return round(100 * export.progress, 1)

    def get_queue_position(self, export: Export) -> int | None:
        return queue_position(export) if export.status == Export.Status.QUEUED else None

    @extend_schema_field(ExportFileSerializer(many=True))
    def get_files(self, export: Export) -> list[dict]:
        return export_files(export)

    @extend_schema_field(serializers.DictField(child=ParitySerializer(), help_text='Per GGUF variant: "f16", "q8_0", "q5_k_m", "q4_k_m".'))
    def get_parity(self, export: Export) -> dict:
        return export.parity


def export_files(export: Export) -> list[dict]:
    """The export's files with their download URLs, and the bundle (a tar of the GGUF files, Modelfiles and README)."""
    if export.status != Export.Status.COMPLETED:
        return []
    job = export.training_job_id
    files = [
        {
            "name": f["name"],
            "kind": f["kind"],
            "size_bytes": f["size_bytes"],
            "url": reverse("api-training-export-file", args=[job, f["name"]]),
        }
        for f in export.files
    ]
    if exports.bundle_members(export):
        name = f"tuna-job-{job}-{exports.BUNDLE_NAME}"
        files.append(
            {
                "name": name,
                "kind": "bundle",
                "size_bytes": exports.bundle_size(export),
                "url": reverse("api-training-export-bundle", args=[job]),
            }
        )
    return files


class ExportStartSerializer(serializers.Serializer):
    formats = serializers.ListField(
        child=serializers.ChoiceField(choices=exports.ALL_FORMATS),
        required=False,
        allow_empty=False,
        max_length=len(exports.ALL_FORMATS),
        help_text="Leave out for all: merged_safetensors, gguf_f16 (base + LoRA GGUF, Modelfile), gguf_q8_0 (base and merged q8_0), "
        "gguf_q5_k_m and gguf_q4_k_m (the merged model quantized by llama-quantize).",
    )


def _latest_or_404(job) -> Export:
    export = exports.latest_export(job)
    if export is None:
        raise NotFound(f"Job #{job.pk} has not been exported yet: POST /api/training/{job.pk}/export starts an export.")
    return export


class TrainingJobExportApi(APIView):
    @extend_schema(responses=ExportSerializer, description="The job's latest export: progress, files and parity check.")
    def get(self, request: Request, pk: int) -> Response:
        return Response(ExportSerializer(_latest_or_404(get_job_for_user(request.user, pk))).data)

    @extend_schema(
        request=ExportStartSerializer,
        responses={202: ExportSerializer},
        description="Export a completed job (in the background): merged weights, GGUF files, Ollama Modelfiles and a bundle, "
        "then the parity check. An export already running is returned as it is. 409 when the job is not completed.",
    )
    def post(self, request: Request, pk: int) -> Response:
        data = ExportStartSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        job = get_job_for_user(request.user, pk)
        export = exports.export_start(owner=request.user, job=job, formats=data.validated_data.get("formats"))
        return Response(ExportSerializer(export).data, status=status.HTTP_202_ACCEPTED)


def _completed_or_409(job) -> Export:
    export = _latest_or_404(job)
    if export.status != Export.Status.COMPLETED:
        raise Conflict(f"Export #{export.pk} is {export.get_status_display().lower()}; its files are listed once it has completed.")
    return export


class TrainingJobExportFileApi(APIView):
    @extend_schema(responses={(200, "application/octet-stream"): OpenApiTypes.BINARY})
    def get(self, request: Request, pk: int, name: str):
        export = _completed_or_409(get_job_for_user(request.user, pk))
        path = exports.export_file(export, name)
        if path is None:
            raise NotFound(f"Export #{export.pk} has no file named {name!r}.")
        with admission.download_slot(request.user) as ticket:  # 429 / 503 beyond the download limits
            return admission.file_response(path.open("rb"), ticket, as_attachment=True, filename=path.name)


class TrainingJobExportBundleApi(APIView):
    @extend_schema(responses={(200, "application/x-tar"): OpenApiTypes.BINARY})
    def get(self, request: Request, pk: int):
        export = _completed_or_409(get_job_for_user(request.user, pk))
        if not exports.bundle_members(export):
            raise NotFound(f"Export #{export.pk} has no GGUF files to bundle (it exported {', '.join(export.formats)}).")
        with admission.download_slot(request.user) as ticket:  # 429 / 503 beyond the download limits
            response = admission.streaming_response(exports.stream_bundle(export), ticket, content_type="application/x-tar")
            response["Content-Length"] = str(exports.bundle_size(export))
            response["Content-Disposition"] = f'attachment; filename="tuna-job-{pk}-{exports.BUNDLE_NAME}"'
            return response
