"""Validate a generated 100,000-line (~50 MB) JSONL file; print the time and the memory growth.

    .venv/bin/python bench/validate_large.py [--lines 100000]

Goal (datasets issue): under 30 s on a 2-core machine, and the process grows by less than 300 MB.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tuna_site.settings")


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def write_file(path: Path, lines: int) -> None:
    filler = "The customer asked for a detailed summary of the order history and the delivery notes. "
    with path.open("w", encoding="utf-8") as handle:
        for i in range(lines):
            row = {"prompt": f"Case {i}: {filler * 3}Summarise it.", "completion": f"Summary {i}: {filler * 2}"}
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()

    import django

    django.setup()
    from datasets_app.validation import JsonlValidator
    from tuna_llm.catalog import get_base_model_spec
    from tuna_llm.tokencount import token_counter_for

    counter = token_counter_for(get_base_model_spec())  # tokenizer loaded before the baseline
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.jsonl"
        write_file(path, args.lines)
        size_mb = path.stat().st_size / 1024 / 1024
        before = rss_mb()
        started = time.perf_counter()
        validator = JsonlValidator(counter)
        with path.open("rb") as handle:
            validator.feed(handle)
        report = validator.report()
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"file: {args.lines} lines, {size_mb:.1f} MB")
    print(f"validated: {report['valid_examples']} examples, {report['errors']['count']} errors, {report['warning_count']} warnings")
    print(f"time: {seconds:.1f} s (goal < 30 s)")
    print(f"memory: RSS {before:.0f} MB before, peak {peak:.0f} MB, growth {peak - before:.0f} MB (goal < 300 MB)")


if __name__ == "__main__":
    main()
