import sys

from django.core.management.base import BaseCommand

from training_app.distributed import training_rank_work


class Command(BaseCommand):
    help = (
        "internal: one rank of a training job on several processes, started by torchrun from the worker process that "
        "holds the job (training_app.distributed). Rank 0 writes the job's progress; the others write nothing."
    )

    def add_arguments(self, parser):
        parser.add_argument("job", type=int, help="the training job's id")

    def handle(self, *args, **options):
        sys.exit(training_rank_work(options["job"]))
