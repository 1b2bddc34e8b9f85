"""Shared set-up for the benchmarks: Django settings and the sample examples."""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tuna_site.settings")
SAMPLE = ROOT / "samples" / "orders_to_json.jsonl"


def setup_django() -> None:
    import django

    django.setup()


def sample_messages() -> list[list[dict[str, str]]]:
    from datasets_app.formats import PROMPT_COMPLETION, to_messages

    with SAMPLE.open(encoding="utf-8") as handle:
        return [to_messages(json.loads(line), PROMPT_COMPLETION) for line in handle if line.strip()]
