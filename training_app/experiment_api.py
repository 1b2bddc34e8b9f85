"""The sweeps API: start one (POST /api/experiments), list them, read one with its runs and its pick."""

from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.generics import ListAPIView
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from datasets_app.selectors import get_dataset_for_user
from training_app import experiments
from training_app.models import Experiment


class GridPointSerializer(serializers.Serializer):
    learning_rate = serializers.FloatField()
    num_epochs = serializers.IntegerField()
    lora_r = serializers.IntegerField()
    lora_layers = serializers.CharField(
        help_text='"all" (every linear projection), "attention" (query and value projections) or module names.'
    )


class ExperimentRunSerializer(serializers.Serializer):
    id = serializers.IntegerField(source="job.pk")
    model_id = serializers.CharField(source="job.model_id", help_text="Its name at /v1 (and /api/inference) once completed.")
    status = serializers.CharField(source="job.status")
    settings = GridPointSerializer(help_text="Its point of the grid.")
    current_step = serializers.IntegerField(source="job.current_step")
    total_steps = serializers.IntegerField(source="job.total_steps")
    best_eval_loss = serializers.FloatField(
        source="job.best_eval_loss", allow_null=True, help_text="Validation loss at the checkpoint kept."
    )
    best_step = serializers.IntegerField(source="job.best_step", allow_null=True)
    lowest_eval_loss = serializers.FloatField(allow_null=True, help_text="The lowest validation loss measured so far.")
    latest_eval_loss = serializers.FloatField(allow_null=True)
    train_seconds = serializers.FloatField(source="job.train_seconds")
    cost_usd = serializers.FloatField(source="job.cost_usd")
    stop_reason = serializers.CharField(source="job.stop_reason", help_text="Why it was stopped early, if it was.")
    error_message = serializers.CharField(source="job.error_message")
    is_winner = serializers.BooleanField()
    left_out = serializers.CharField(help_text="Why the pick left it out (empty: compared, or not picked yet).")


class PickEntrySerializer(serializers.Serializer):
    job = serializers.IntegerField()
    eval_loss = serializers.FloatField(required=False)
    best_step = serializers.IntegerField(required=False, allow_null=True)
    status = serializers.CharField(required=False)
    stop_reason = serializers.CharField(required=False)
    why = serializers.CharField(required=False)
    settings = GridPointSerializer()


class PickSerializer(serializers.Serializer):
    metric = serializers.CharField()
    rule = serializers.CharField()
    compared = PickEntrySerializer(many=True, help_text="Every completed run compared, lowest validation loss first.")
    left_out = PickEntrySerializer(many=True, help_text="Every run left out, with why (failed, stopped early, cancelled, paused).")
    reason = serializers.CharField()


class ExperimentSerializer(serializers.ModelSerializer):
    dataset_id = serializers.IntegerField()
    winner_id = serializers.IntegerField(allow_null=True, help_text="The run picked (lowest validation loss), once every run has ended.")
    winner_model_id = serializers.SerializerMethodField(help_text="The winner's model name at /v1, to serve it.")
    run_ids = serializers.SerializerMethodField()
    grid = GridPointSerializer(many=True)
    pick = serializers.SerializerMethodField()

    class Meta:
        model = Experiment
        fields = [
            "id",
            "name",
            "dataset_id",
            "base_model",
            "status",
            "base_config",
            "grid",
            "estimate",
            "early_stopping",
            "winner_id",
            "winner_model_id",
            "run_ids",
            "pick",
            "created_at",
            "finished_at",
        ]
        read_only_fields = fields

    def get_winner_model_id(self, experiment: Experiment) -> str | None:
        return f"tuna-job-{experiment.winner_id}" if experiment.winner_id else None

    def get_run_ids(self, experiment: Experiment) -> list[int]:
        return list(experiment.runs.order_by("pk").values_list("pk", flat=True))

    @extend_schema_field(PickSerializer(allow_null=True))
    def get_pick(self, experiment: Experiment) -> dict | None:
        return PickSerializer(experiment.pick).data if experiment.pick else None


class ExperimentDetailSerializer(ExperimentSerializer):
    runs = serializers.SerializerMethodField()

    class Meta(ExperimentSerializer.Meta):
        fields = [*ExperimentSerializer.Meta.fields, "runs"]
        read_only_fields = fields

    @extend_schema_field(ExperimentRunSerializer(many=True))
    def get_runs(self, experiment: Experiment) -> list[dict]:
        return ExperimentRunSerializer(experiments.experiment_runs(experiment), many=True).data


class ExperimentStartSerializer(serializers.Serializer):
    dataset_id = serializers.IntegerField()
    config = serializers.DictField(
        required=False,
        default=dict,
        help_text="Settings for every run, as for POST /api/training/start; any left out are chosen from the dataset and the base model.",
    )
    grid = serializers.ListField(
        child=serializers.DictField(),
        required=False,
        allow_null=True,
        default=None,
        help_text="One object per run with any of learning_rate, num_epochs, lora_r, lora_layers (a setting left out: the "
        "chosen value). Default: the chosen settings, then one change at a time around them (the training form's grid).",
    )
    early_stopping = serializers.BooleanField(required=False, default=True, help_text="Stop clearly losing runs early (docs/training.md).")
    name = serializers.CharField(required=False, default="", allow_blank=True, max_length=200)


class ExperimentListApi(ListAPIView):
    serializer_class = ExperimentSerializer

    def get_queryset(self):
        return experiments.experiments_for_user(self.request.user)

    @extend_schema(
        request=ExperimentStartSerializer,
        responses={201: ExperimentDetailSerializer},
        description="Start a sweep: one fine-tune per grid point, queued fairly with everyone's jobs. Refused (400 naming "
        "grid[i].setting, 409 naming the limit and its setting: TUNA_MAX_SWEEP_RUNS, TUNA_MAX_SWEEP_HOURS, "
        "TUNA_MAX_ACTIVE_JOBS_PER_USER) before anything is created. The winner (lowest validation loss) is picked once every "
        "run has ended and is then evaluated against the base model.",
    )
    def post(self, request: Request) -> Response:
        data = ExperimentStartSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        dataset = get_dataset_for_user(request.user, values["dataset_id"])
        experiment = experiments.experiment_start(
            owner=request.user,
            dataset=dataset,
            config_data=values["config"],
            grid=values["grid"],
            early_stopping=values["early_stopping"],
            name=values["name"],
        )
        return Response(ExperimentDetailSerializer(experiment).data, status=status.HTTP_201_CREATED)


class ExperimentDetailApi(APIView):
    @extend_schema(responses=ExperimentDetailSerializer)
    def get(self, request: Request, pk: int) -> Response:
        experiment = experiments.get_experiment_for_user(request.user, pk)
        experiments.experiment_settle(experiment=experiment)  # a run that ended without its worker telling
        return Response(ExperimentDetailSerializer(experiments.get_experiment_for_user(request.user, pk)).data)


class ExperimentCancelApi(APIView):
    @extend_schema(
        request=None,
        responses={200: ExperimentDetailSerializer},
        description="Cancel the sweep's unfinished runs. A finished sweep answers 409.",
    )
    def post(self, request: Request, pk: int) -> Response:
        experiment = experiments.experiment_cancel(experiment=experiments.get_experiment_for_user(request.user, pk))
        return Response(ExperimentDetailSerializer(experiment).data)
