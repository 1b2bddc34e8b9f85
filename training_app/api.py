from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.generics import ListAPIView
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from datasets_app.models import Dataset
from datasets_app.selectors import get_dataset_for_user
from training_app import services
from training_app.models import TrainingJob
from training_app.selectors import adapter_download, base_model_download, get_job_for_user, jobs_for_user, training_logs


class TrainingLogSerializer(serializers.Serializer):
    step = serializers.IntegerField()
    loss = serializers.FloatField(help_text="Training loss at this step (always a number).")
    eval_loss = serializers.FloatField(allow_null=True, help_text="Validation loss measured at this step, if one was.")
    learning_rate = serializers.FloatField(allow_null=True)
    epoch = serializers.FloatField()
    timestamp = serializers.DateTimeField()


class EvalLogSerializer(serializers.Serializer):
    step = serializers.IntegerField(help_text="Updates done when it was measured (0: before training).")
    eval_loss = serializers.FloatField()
    epoch = serializers.FloatField()
    timestamp = serializers.DateTimeField()


class TrainingJobSerializer(serializers.ModelSerializer):
    dataset_id = serializers.IntegerField()
    model_id = serializers.CharField()
    progress_percent = serializers.FloatField()
    cost_usd = serializers.FloatField()
    training_logs = serializers.SerializerMethodField(help_text="One row per logged training step, each with a numeric loss.")
    eval_logs = serializers.SerializerMethodField(help_text="Validation-loss measurements (held-out part of the training file).")
    parent_id = serializers.IntegerField(
        allow_null=True, help_text="The job whose adapter this run starts from (a continued or a preference-tuned run), if any."
    )
    source_evaluation_id = serializers.IntegerField(
        allow_null=True, help_text="For a preference-tuned run (method dpo): the evaluation whose votes it learned from."
    )
    preference_pairs = serializers.SerializerMethodField(help_text="For method dpo: the number of chosen/rejected pairs trained on.")
    processes = serializers.SerializerMethodField(
        help_text="Processes the run trains on (DDP; the server's TUNA_TRAIN_PROCESSES when the job was created; config.batch_size "
        "is per process)."
    )
    effective_batch = serializers.SerializerMethodField(
        help_text="Examples each update learns from: config.batch_size (per process) × processes × config.gradient_accumulation_steps."
    )
    experiment_id = serializers.IntegerField(
        allow_null=True, help_text="The sweep this job is a run of, if any (GET /api/experiments/{id})."
    )
    tracking = serializers.JSONField(
        help_text="Where this job's metrics are tracked: its TensorBoard folder (relative to TUNA_DATA_DIR), its MLflow and W&B runs, "
        "and why a tracker stopped, if one did (docs/tracking.md)."
    )

    class Meta:
        model = TrainingJob
        fields = [
            "id",
            "model_id",
            "dataset_id",
            "base_model",
            "status",
            "method",
            "config",
            "config_reasons",
            "processes",
            "effective_batch",
            "parent_id",
            "source_evaluation_id",
            "preference_pairs",
            "step_offset",
            "current_step",
            "total_steps",
            "progress_percent",
            "epoch",
            "tokens_seen",
            "tokens_per_second",
            "train_seconds",
            "eval_seconds",
            "best_step",
            "best_eval_loss",
            "eta_seconds",
            "cost_usd",
            "device",
            "cancel_requested",
            "resume_count",
            "experiment_id",
            "stop_reason",
            "tracking",
            "training_logs",
            "eval_logs",
            "error_message",
            "created_at",
            "started_at",
            "completed_at",
        ]
        read_only_fields = fields

    def get_preference_pairs(self, job: TrainingJob) -> int:
        return len(job.preference_pairs)

    def get_processes(self, job: TrainingJob) -> int:
        return job.config.get("processes", 1)  # rows from before several processes trained one job

    def get_effective_batch(self, job: TrainingJob) -> int | None:
        if "batch_size" not in job.config:  # a job refused before it ran has no settings
            return None
        return job.config["batch_size"] * self.get_processes(job) * job.config.get("gradient_accumulation_steps", 1)

    def _logs(self, job: TrainingJob) -> tuple[list[dict], list[dict]]:
        """Both lists come from one read of the job's loss points."""
        cached = getattr(self, "_logs_cache", None)
        if cached is None or cached[0] != job.pk:
            cached = self._logs_cache = (job.pk, training_logs(job))
        return cached[1]

    @extend_schema_field(TrainingLogSerializer(many=True))
    def get_training_logs(self, job: TrainingJob) -> list[dict]:
        return TrainingLogSerializer(self._logs(job)[0], many=True).data

    @extend_schema_field(EvalLogSerializer(many=True))
    def get_eval_logs(self, job: TrainingJob) -> list[dict]:
        return EvalLogSerializer(self._logs(job)[1], many=True).data


class TrainingJobSummarySerializer(TrainingJobSerializer):
    class Meta(TrainingJobSerializer.Meta):
        fields = [f for f in TrainingJobSerializer.Meta.fields if f not in ("training_logs", "eval_logs")]


class TrainingStartSerializer(serializers.Serializer):
    dataset_id = serializers.IntegerField()
    config = serializers.DictField(
        required=False,
        default=dict,
        help_text="Settings to set yourself; any left out are chosen from the dataset and the base model (see config_reasons in the answer). Any of base_model, num_epochs, batch_size, learning_rate, max_seq_length, lora_r, lora_alpha, lora_dropout, target_modules, warmup_steps, gradient_accumulation_steps, seed, max_steps, save_steps, eval_steps, save_total_limit, eval_examples.",
    )


class TrainingJobListApi(ListAPIView):
    serializer_class = TrainingJobSummarySerializer

    def get_queryset(self):
        return jobs_for_user(self.request.user)


class TrainingJobStartApi(APIView):
    @extend_schema(request=TrainingStartSerializer, responses={201: TrainingJobSerializer})
    def post(self, request: Request) -> Response:
        data = TrainingStartSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        dataset: Dataset = get_dataset_for_user(request.user, data.validated_data["dataset_id"])
        job = services.training_job_start(owner=request.user, dataset=dataset, config_data=data.validated_data["config"])
        return Response(TrainingJobSerializer(job).data, status=status.HTTP_201_CREATED)


class TrainingJobDeleteQuerySerializer(serializers.Serializer):
    purge = serializers.BooleanField(
        required=False,
        default=False,
        help_text="true: delete the job with its evaluations, loss history and files instead of cancelling it.",
    )


class TrainingJobDetailApi(APIView):
    @extend_schema(responses=TrainingJobSerializer)
    def get(self, request: Request, pk: int) -> Response:
        return Response(TrainingJobSerializer(get_job_for_user(request.user, pk)).data)

    @extend_schema(
        summary="Cancel a training job (or, with purge=true, delete it with its files)",
        parameters=[
            OpenApiParameter(
                "purge",
                bool,
                description="Delete the job with its evaluations, loss history and files (adapter, checkpoints, exports) "
                "instead of cancelling it. A training job answers 409 (cancel it first), as does a job that other runs continue.",
            )
        ],
        responses={200: TrainingJobSerializer, 204: None},
        description="Without purge: cancel a queued or training job, as POST /api/training/{id}/cancel does. A queued job is "
        "cancelled at once; a training one stops after the current step (`cancel_requested` is true until then). The job stays, "
        "with its loss history, and answers 200 with its state; a finished job (completed, failed, cancelled) answers 409. "
        "With purge=true: the job and its files are deleted, answering 204.",
    )
    def delete(self, request: Request, pk: int) -> Response:
        job = get_job_for_user(request.user, pk)
        query = TrainingJobDeleteQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        if query.validated_data["purge"]:
            services.training_job_delete(job=job)
            return Response(status=status.HTTP_204_NO_CONTENT)
        return Response(TrainingJobSerializer(services.training_job_cancel(job=job)).data)


class TrainingJobCancelApi(APIView):
    @extend_schema(request=None, responses={200: TrainingJobSerializer}, description="Cancel the job. A finished job answers 409.")
    def post(self, request: Request, pk: int) -> Response:
        job = services.training_job_cancel(job=get_job_for_user(request.user, pk))
        return Response(TrainingJobSerializer(job).data)


class TrainingJobResumeApi(APIView):
    @extend_schema(request=None, responses={202: TrainingJobSerializer})
    def post(self, request: Request, pk: int) -> Response:
        job = services.training_job_resume(job=get_job_for_user(request.user, pk))
        return Response(TrainingJobSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class TrainingContinueSerializer(serializers.Serializer):
    epochs = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=services.MAX_CONTINUE_EPOCHS,
        help_text="More epochs to train (default: as many as the job ran).",
    )


class TrainingJobContinueApi(APIView):
    @extend_schema(
        request=TrainingContinueSerializer,
        responses={201: TrainingJobSerializer},
        description="Start a new run from a completed job's adapter for more epochs; its loss history joins the job's.",
    )
    def post(self, request: Request, pk: int) -> Response:
        data = TrainingContinueSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        child = services.training_job_continue(job=get_job_for_user(request.user, pk), epochs=data.validated_data.get("epochs"))
        return Response(TrainingJobSerializer(child).data, status=status.HTTP_201_CREATED)


class TrainingJobAdapterApi(APIView):
    @extend_schema(responses={(200, "application/zip"): OpenApiTypes.BINARY})
    def get(self, request: Request, pk: int):
        return adapter_download(get_job_for_user(request.user, pk))


class TrainingJobBaseModelApi(APIView):
    @extend_schema(
        responses={(200, "application/zip"): OpenApiTypes.BINARY},
        description="The exact base weights the job was trained on (the embedded base is dequantized from a Q4_1 GGUF, not the "
        "hub's weights), as a zip of one folder named as the adapter's config names its base (model files only). The embedded "
        "base only: 404 for a hub model or an operator's local folder, its message saying where the base comes from.",
    )
    def get(self, request: Request, pk: int):
        return base_model_download(get_job_for_user(request.user, pk))
