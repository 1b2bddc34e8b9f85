from django.core.management import call_command
from django.core.management.base import BaseCommand

from tuna_site.jobs import jobs_reap_orphans


class Command(BaseCommand):
    help = "Start the background worker (django-q2 cluster) after failing jobs a dead worker left running."

    def handle(self, *args, **options):
        reaped = {kind: count for kind, count in jobs_reap_orphans().items() if count}
        if reaped:
            counts = " and ".join(f"{count} {kind}" for kind, count in reaped.items())
            self.stdout.write(f"Marked {counts} left running by a stopped worker as failed.")
        call_command("qcluster")
