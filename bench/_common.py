"""Shared set-up for the benchmarks: Django settings and the sample examples."""

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tuna_site.settings")
SAMPLE = ROOT / "samples" / "orders_to_json.jsonl"


def setup_django() -> None:
    import django

    django.setup()


def sample_messages() -> list[list[dict[str, str]]]:
    from datasets_app.examples import file_examples

    return file_examples(SAMPLE)


@contextlib.contextmanager
def temporary_site() -> Iterator[Path]:
    """A throw-away data directory and SQLite database, migrated, with Django set up."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TUNA_DATA_DIR"] = tmp
        os.environ.pop("DATABASE_URL", None)
        os.environ.setdefault("TUNA_MODEL_CACHE_DIR", str(ROOT / "media" / "models"))
        subprocess.run([sys.executable, str(ROOT / "manage.py"), "migrate", "-v0"], check=True)
        setup_django()
        yield Path(tmp)


def upload_sample(username: str = "bench"):
    """Create a user and upload the sample dataset through the platform's own service."""
    from django.contrib.auth.models import User
    from django.core.files import File

    from datasets_app.services import dataset_create

    user = User.objects.create(username=username)
    with SAMPLE.open("rb") as handle:
        return user, dataset_create(owner=user, upload=File(handle, name=SAMPLE.name))
