from django.core.management.base import BaseCommand

from tuna_core.supervisor import Supervisor, run_cluster


class Command(BaseCommand):
    help = (
        "Start the background worker: a supervisor that fails jobs a dead worker left running, runs the "
        "django-q2 cluster in its own process group, watches every running job, and takes the whole cluster "
        "down with it when it stops (Ctrl-C, SIGTERM, or even SIGKILL)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--cluster", action="store_true", help="internal: the supervised django-q2 cluster")

    def handle(self, *args, **options):
        if options["cluster"]:
            run_cluster()
            return
        Supervisor(write=lambda text: self.stdout.write(text)).run()
