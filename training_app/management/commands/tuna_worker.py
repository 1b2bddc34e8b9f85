from django.core.management import call_command
from django.core.management.base import BaseCommand

from evaluation_app.services import evaluations_reap_orphans
from training_app.services import training_jobs_reap_orphans


class Command(BaseCommand):
    help = "Start the background worker (django-q2 cluster) after failing jobs a dead worker left running."

    def handle(self, *args, **options):
        jobs = training_jobs_reap_orphans()
        evaluations = evaluations_reap_orphans()
        if jobs or evaluations:
            self.stdout.write(f"Marked {jobs} training job(s) and {evaluations} evaluation(s) left running by a stopped worker as failed.")
        call_command("qcluster")
