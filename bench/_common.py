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


def load_as_before_issue_16(spec, plan):
    """The base model loaded for serving as before issue 16 changed its layers: row-wise attention (which
    continuous batching needs) but torch's own linear layers (MKL in fp32 on CPU; no oneDNN serving layers,
    no packed weights: tuna_llm.serving.packing). The "before" runs of the benches."""
    from tuna_llm.serving import rowwise
    from tuna_llm.loading import load_tokenizer_and_model
    from tuna_llm.serving.registry import LoadedBaseModel

    return LoadedBaseModel(spec, plan, *load_tokenizer_and_model(spec, plan, attention=rowwise.register()))
