"""Upload -> train (default settings) -> evaluate, on the sample dataset, from the command line.

Runs the same services and worker tasks as the site, in a throw-away data directory and database,
and prints the metrics and the total time. Goal (evaluation issue): under 10 minutes on a 2-core CPU.

    .venv/bin/python bench/journey.py [--test-size 32]
"""

import argparse
import time

from _common import temporary_site, upload_sample


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--test-size", type=int, default=32)
    parser.add_argument("--show-misses", type=int, default=5, help="print this many answers that miss the reference")
    args = parser.parse_args()
    with temporary_site():
        from evaluation_app.services import evaluation_start
        from training_app.services import training_job_start
        from tuna_core.jobs import run_next_job
        from tuna_llm.metrics import METRICS

        started = time.perf_counter()
        user, dataset = upload_sample()
        uploaded = time.perf_counter()
        job = training_job_start(owner=user, dataset=dataset, config_data={})
        run_next_job()
        job.refresh_from_db()
        trained = time.perf_counter()
        evaluation, _ = evaluation_start(owner=user, job=job, test_size=args.test_size)
        run_next_job()
        evaluation.refresh_from_db()
        done = time.perf_counter()

        print(
            f"dataset: {dataset.num_examples} examples ({dataset.num_train} train, {dataset.num_eval} held out), {uploaded - started:.1f} s"
        )
        print(f"training: {job.status}, {job.total_steps} steps, {job.tokens_per_second:.0f} tokens/s, {trained - uploaded:.0f} s")
        print(
            f"evaluation: {evaluation.status} {evaluation.error_message}on {evaluation.test_size} held-out examples, {done - trained:.0f} s"
        )
        m = evaluation.metrics
        print(f"{'metric':<18}{'base':>12}{'fine-tuned':>12}  change")
        for name in METRICS:
            b, f = m["base_model"].get(name), m["finetuned_model"].get(name)
            if not isinstance(b, (int, float)) or not isinstance(f, (int, float)):
                continue  # a metric that does not apply to this task (tool calls, labels)
            print(f"{name:<18}{b:>12.4f}{f:>12.4f}  {m['improvements'].get(name, {}).get('direction', '')}")
        misses = [e for e in evaluation.examples.all() if e.finetuned_scores.get("exact_match") != 1.0]
        print(f"fine-tuned answers that differ from the reference: {len(misses)} of {evaluation.test_size}")
        for example in misses[: args.show_misses]:
            print(f"  #{example.index}: got {example.finetuned_output!r}\n        want {example.reference!r}")
        print(f"total time: {done - started:.0f} s (goal < 600 s)")


if __name__ == "__main__":
    main()
