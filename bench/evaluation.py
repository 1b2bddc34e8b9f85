"""Evaluation time and answers, side by side in one run: one example at a time in fp32 against batched
decoding in each precision.

On a throw-away data directory and database: uploads the sample, trains a short fine-tune through the worker's
code path (--steps updates), then evaluates it on --examples held-out examples (generation of both models +
held-out loss of both) with tuna_llm.evaluation.run_evaluation:

- "<precision>, one at a time": each answer decoded alone, base then fine-tuned, held-out loss one example
  per pass (batched = alone is checked on it); fp32 first, the reference of the ratios;
- "<precision>, batched": the evaluation's way: continuously batched, 8 rows at most, the base rows first
  and the fine-tuned ones after (rows of one adapter together), held-out loss in batches of 8; "batched
  mixed": each example's base and fine-tuned rows side by side (peft's per-row adapters), to see whether
  mixing them pays.

Prints the wall time of each, its ratio to the first, the held-out exact match and loss of the fine-tune, and
how many greedy answers are equal between runs (precision against precision, batched against one at a time in
the same precision), with the first differences. (The runs against the engine as it was before issue 16 are
gone with the code that kept that engine; their figures are in docs/performance.md.)

    .venv/bin/python bench/evaluation.py [--steps 30] [--examples 32] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import time

from _common import temporary_site, upload_sample

FIRST = "fp32, one at a time"


def evaluate(job, examples, *, precision: str, batch: int, mixed: bool = False):
    from django.conf import settings

    from tuna_llm.evaluation import run_evaluation
    from tuna_llm.serving.registry import registry

    settings.TUNA_PRECISION = precision
    registry.clear()
    loaded = registry.get(job.base_model)
    loaded.attach_adapter("bench", job.adapter_dir)
    answers = []
    started = time.perf_counter()
    result = run_evaluation(loaded, examples, "bench", hourly_usd=1.0, max_batch=batch, mixed=mixed, hooks=_collect(answers))
    return time.perf_counter() - started, result, answers


def _collect(answers: list):
    from tuna_llm.evaluation import EvaluationHooks

    return EvaluationHooks(on_example=lambda r: answers.append((r.base.text, r.finetuned.text)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--precisions", default="fp32,bf16", help="precisions of the batched runs")
    args = parser.parse_args()
    with temporary_site():
        from datasets_app.examples import held_out_examples
        from training_app.models import TrainingJob
        from training_app.services import training_job_start
        from tuna_core.jobs import run_next_job
        from tuna_llm.loading import pick_device

        owner, dataset = upload_sample()
        job = training_job_start(owner=owner, dataset=dataset, config_data={"max_steps": args.steps})
        run_next_job()
        job = TrainingJob.objects.get(pk=job.pk)
        assert job.status == "completed", job.error_message
        examples = held_out_examples(dataset)[: args.examples]
        default = pick_device().precision
        runs = [(FIRST, "fp32", 1, False)] + [(f"{p}, batched", p, 8, False) for p in args.precisions.split(",")]
        runs.append((f"{default}, batched mixed", default, 8, True))
        if default != "fp32":
            runs.append((f"{default}, one at a time", default, 1, False))
        results = {}
        print(f"{len(examples)} held-out examples of the sample, fine-tune of {args.steps} updates; deployment: {pick_device().describe()}")
        print(f"{'run':<22} {'time':>7} {'vs first':>9} {'exact match':>12} {'held-out loss':>14}")
        for name, precision, batch, mixed in runs:
            seconds, result, answers = evaluate(job, examples, precision=precision, batch=batch, mixed=mixed)
            results[name] = answers
            tuned = result.finetuned
            ratio = seconds / results.setdefault("_first_s", seconds)
            print(
                f"{name:<22} {seconds:>6.1f}s {ratio:>8.2f}x {round(tuned['exact_match'] * len(examples)):>5}/{len(examples):<6} "
                f"{tuned['heldout_loss']:>14.4f}",
                flush=True,
            )
        first = results[FIRST]
        print("greedy answers equal (base, fine-tuned), example by example:")
        for name in [run[0] for run in runs[1:]]:
            other = results[name]
            base_equal = sum(a[0] == b[0] for a, b in zip(first, other, strict=True))
            tuned_equal = sum(a[1] == b[1] for a, b in zip(first, other, strict=True))
            print(f"  {FIRST} vs {name:<22} {base_equal}/{len(first)}, {tuned_equal}/{len(first)}")
        alone, batched = results[f"{default}, one at a time"], results.get(f"{default}, batched")
        if batched is not None:
            same = sum(a == b for a, b in zip(alone, batched, strict=True))
            print(f"  {default} one at a time vs {default} batched: {same}/{len(alone)} examples with both answers equal")
            for index, (a, b) in enumerate(zip(alone, batched, strict=True)):
                if a != b:
                    side = 0 if a[0] != b[0] else 1
                    print(f"    #{index} ({'base' if side == 0 else 'fine-tuned'}): alone {a[side][:60]!r} | batched {b[side][:60]!r}")


if __name__ == "__main__":
    main()
