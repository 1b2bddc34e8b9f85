from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from training_app.calibration import calibrate_default_model
from training_app.estimates import latest_throughput
from tuna_llm.catalog import get_catalog
from tuna_llm.loading import ModelUnavailable, prepare_embedded_model


class Command(BaseCommand):
    help = "List the base-model catalog with each model's state; prepare the embedded model."

    def add_arguments(self, parser):
        parser.add_argument("--no-prepare", action="store_true", help="Only list; do not convert the embedded model.")
        parser.add_argument(
            "--calibrate",
            action="store_true",
            help="Measure training speed of the default model on this machine (a few LoRA steps) for time and cost estimates.",
        )
        parser.add_argument(
            "--calibrate-if-missing",
            action="store_true",
            help="Calibrate only when no training speed has been measured for the default model yet (used by make run).",
        )

    def handle(self, *args, **options):
        catalog = get_catalog()
        if not options["no_prepare"]:
            for spec in catalog.values():
                if spec.kind == "embedded":
                    try:
                        prepare_embedded_model(spec)
                    except ModelUnavailable as exc:
                        raise CommandError(str(exc)) from exc
        width = max(len(name) for name in catalog)
        self.stdout.write(f"{'NAME'.ljust(width)}  {'STATE'.ljust(12)}  {'KIND'.ljust(8)}  SOURCE")
        for spec in catalog.values():
            default = "  (default)" if spec.is_default else ""
            source = spec.load_path if spec.kind != "hub" else spec.source
            self.stdout.write(f"{spec.name.ljust(width)}  {spec.state().ljust(12)}  {spec.kind.ljust(8)}  {source}{default}")
        calibrate = options["calibrate"]
        if options["calibrate_if_missing"] and not calibrate:
            calibrate = latest_throughput(settings.TUNA_DEFAULT_BASE_MODEL) is None
        if calibrate:
            self.stdout.write("Measuring training speed on this machine (a few LoRA steps) for time and cost estimates...")
            measurement = calibrate_default_model()
            self.stdout.write(f"Measured {measurement}")
