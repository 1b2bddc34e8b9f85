import sys

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from training_app.distributed import run_launcher, runs_distributed
from training_app.models import TrainingJob


class Command(BaseCommand):
    help = (
        "Join a training job on several machines as node K (1 .. TUNA_TRAIN_NNODES-1): this machine's ranks meet node 0 "
        "(the worker that claimed the job) at TUNA_TRAIN_RDZV_ENDPOINT and train their share; they write nothing (rank 0, "
        "on node 0, writes the job). It needs the same database, TUNA_DATA_DIR (shared) and model files as the worker. "
        "Start it once the job is training; it ends when the run does. See docs/training.md."
    )

    def add_arguments(self, parser):
        parser.add_argument("--job", type=int, required=True, help="the training job's id")
        parser.add_argument("--node-rank", type=int, required=True, help="this machine's node rank, 1 .. TUNA_TRAIN_NNODES-1")

    def handle(self, *args, **options):
        nnodes, node_rank = settings.TUNA_TRAIN_NNODES, options["node_rank"]
        if nnodes < 2:
            raise CommandError(
                "TUNA_TRAIN_NNODES is 1: there is no other node to join. Set it (the same on every node) to the machines' count."
            )
        if not 1 <= node_rank < nnodes:
            raise CommandError(f"--node-rank must be from 1 to {nnodes - 1} (node 0 is the worker that claimed the job); got {node_rank}.")
        job = TrainingJob.objects.filter(pk=options["job"]).first()
        if job is None:
            raise CommandError(f"No training job #{options['job']}.")
        if job.status != TrainingJob.Status.RUNNING or not runs_distributed(job):
            raise CommandError(f"Job #{job.pk} is {job.get_status_display().lower()}: a node joins a job while it trains.")
        code, failures = run_launcher(job, node_rank=node_rank)
        for failure in failures:
            self.stderr.write(f"rank {failure.rank}: {failure.signal or failure.exitcode}: {failure.message[:300]}")
        sys.exit(code)
