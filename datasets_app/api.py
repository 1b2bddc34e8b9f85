from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.generics import ListAPIView
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from datasets_app import checks, services
from datasets_app.models import Dataset
from datasets_app.selectors import datasets_for_user, get_dataset_for_user
from datasets_app.uploads import too_large_message, upload_too_large


class DatasetSerializer(serializers.ModelSerializer):
    train_examples = serializers.IntegerField(source="num_train")
    eval_examples = serializers.IntegerField(source="num_eval")
    has_eval_file = serializers.BooleanField()

    class Meta:
        model = Dataset
        fields = [
            "id",
            "name",
            "original_filename",
            "size_bytes",
            "format",
            "num_examples",
            "validation_status",
            "validation_report",
            "train_examples",
            "eval_examples",
            "eval_fraction",
            "has_eval_file",
            "answer_checks",
            "created_at",
        ]
        read_only_fields = fields


class DatasetPatchSerializer(serializers.Serializer):
    answer_checks = serializers.JSONField(
        help_text='Your own checks of an answer, replacing the current ones: a list (at most 20) of {"name", "kind": "regex" | '
        '"contains" | "not_contains" | "one_of", "value": a text, or a list of texts for one_of}; [] removes them all.'
    )

    def validate(self, attrs):
        unknown = sorted(set(self.initial_data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError({name: ["Only answer_checks can be changed."] for name in unknown})
        return attrs


class DatasetUploadSerializer(serializers.Serializer):
    file = serializers.FileField(required=False, help_text="A .jsonl file, one example per line.")
    name = serializers.CharField(required=False, allow_blank=True, max_length=200)
    eval_fraction = serializers.FloatField(
        required=False,
        default=services.DEFAULT_EVAL_FRACTION,
        min_value=services.MIN_EVAL_FRACTION,
        max_value=services.MAX_EVAL_FRACTION,
    )


class DatasetListCreateApi(ListAPIView):
    serializer_class = DatasetSerializer
    parser_classes = [MultiPartParser, FormParser]

    def get_queryset(self):
        return datasets_for_user(self.request.user)

    @extend_schema(request={"multipart/form-data": DatasetUploadSerializer}, responses={201: DatasetSerializer})
    def post(self, request: Request) -> Response:
        if upload_too_large(request):
            raise services.UploadTooLarge(too_large_message())
        data = DatasetUploadSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        dataset = services.dataset_create(
            owner=request.user,
            upload=data.validated_data.get("file"),
            name=data.validated_data.get("name", ""),
            eval_fraction=data.validated_data["eval_fraction"],
        )
        return Response(DatasetSerializer(dataset).data, status=status.HTTP_201_CREATED)


class DatasetDetailApi(APIView):
    @extend_schema(responses=DatasetSerializer)
    def get(self, request: Request, pk: int) -> Response:
        return Response(DatasetSerializer(get_dataset_for_user(request.user, pk)).data)

    @extend_schema(
        request=DatasetPatchSerializer,
        responses=DatasetSerializer,
        description="Set the dataset's own checks of an answer (answer_checks), scored per example in the evaluations started "
        "afterwards. All or nothing: a refused check (bad regular expression, unknown kind, more than 20, a name used twice) "
        "is a 400 naming it, and nothing changes.",
    )
    def patch(self, request: Request, pk: int) -> Response:
        dataset = get_dataset_for_user(request.user, pk)
        data = DatasetPatchSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        checks.dataset_checks_set(dataset, data.validated_data["answer_checks"])
        return Response(DatasetSerializer(dataset).data)

    @extend_schema(
        parameters=[
            OpenApiParameter("with_jobs", bool, description="Also delete the training jobs that use it (with their evaluations and files).")
        ],
        responses={204: None},
        description="Delete the dataset and its files. While training jobs use it: 409 listing them, unless with_jobs=true; "
        "a job that is training (or being evaluated) answers 409 and nothing is deleted.",
    )
    def delete(self, request: Request, pk: int) -> Response:
        dataset = get_dataset_for_user(request.user, pk)
        services.dataset_delete(dataset=dataset, with_jobs=self._with_jobs())
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _with_jobs(self) -> bool:
        return self.request.query_params.get("with_jobs", "").lower() in ("1", "true", "yes")

    def error_hint(self, exc: Exception) -> str | None:
        """Added to a refused DELETE's detail (tuna_core.errors.exception_handler): how to delete the jobs too."""
        if isinstance(exc, services.DatasetInUse) and not self._with_jobs():
            return f"Send DELETE /api/datasets/{self.kwargs['pk']}?with_jobs=true to delete them with it."
        return None


class EvalFileUploadSerializer(serializers.Serializer):
    file = serializers.FileField(required=False, help_text="A .jsonl file in the dataset's format: all of it is held out.")


class DatasetEvalFileApi(APIView):
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(
        request={"multipart/form-data": EvalFileUploadSerializer},
        responses=DatasetSerializer,
        summary="Use a separate held-out file for evaluation instead of the split",
    )
    def post(self, request: Request, pk: int) -> Response:
        dataset = get_dataset_for_user(request.user, pk)
        if upload_too_large(request):
            raise services.UploadTooLarge(too_large_message())
        services.dataset_attach_eval_file(dataset=dataset, upload=request.FILES.get("file"))
        dataset.refresh_from_db()
        return Response(DatasetSerializer(dataset).data)
