"""Evaluation time and answers, side by side in one run: one example at a time in fp32 (how an evaluation ran
before issue 16) against batched decoding in each precision.

On a throw-away data directory and database: uploads the sample, trains a short fine-tune through the worker's
code path (--steps updates), then evaluates it on --examples held-out examples (generation of both models +
held-out loss of both) with tuna_llm.evaluation.run_evaluation:

- "before: fp32, one at a time": each answer decoded alone, base then fine-tuned, held-out loss one example
  per pass, torch's own linear layers (issue 16 gave the serving model oneDNN's: tuna_llm.serving.packing). It runs
  today's decoding loop though, which never decodes a lone row (tuna_llm.serving.decoding's ghost copy): where
  torch's two-row products cost more than one-row ones (MKL's fp32 on an AMD EPYC: about twice), it takes
  longer than the evaluation did before issue 16;
- "<precision>, one at a time": the same with the serving model as it is (batched = alone is checked on it);
- "<precision>, batched": the evaluation's way: continuously batched, 8 rows at most, the base rows first
  and the fine-tuned ones after (rows of one adapter together), held-out loss in batches of 8; "batched
  mixed": each example's base and fine-tuned rows side by side (peft's per-row adapters), to see whether
  mixing them pays.

Prints the wall time of each, its ratio to the first (goal <= 0.6 for the deployment's precision), the held-out
exact match and loss of the fine-tune, and how many greedy answers are equal between runs (precision against
precision, batched against one at a time in the same precision), with the first differences.

    .venv/bin/python bench/evaluation.py [--steps 30] [--examples 32] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import time

from _common import load_as_before_issue_16, temporary_site, upload_sample

BEFORE = "before: fp32, one at a time"


def evaluate(job, examples, *, precision: str, batch: int, mixed: bool = False, before: bool = False):
    from django.conf import settings

    from tuna_llm.catalog import get_base_model_spec
    from tuna_llm.evaluation import run_evaluation
    from tuna_llm.loading import pick_device
    from tuna_llm.serving.registry import registry

    settings.TUNA_PRECISION = precision
    registry.clear()
    if before:  # torch's own linear layers, as before issue 16
        loaded = load_as_before_issue_16(get_base_model_spec(job.base_model), pick_device(precision))
    else:
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
        from training_app.tasks import training_job_execute
        from tuna_llm.loading import pick_device

        owner, dataset = upload_sample()
        job = training_job_start(owner=owner, dataset=dataset, config_data={"max_steps": args.steps})
        training_job_execute(job.pk)
        job = TrainingJob.objects.get(pk=job.pk)
        assert job.status == "completed", job.error_message
        examples = held_out_examples(dataset)[: args.examples]
        default = pick_device().precision
        runs = [(BEFORE, "fp32", 1, False)] + [(f"{p}, batched", p, 8, False) for p in args.precisions.split(",")]
        runs.append((f"{default}, batched mixed", default, 8, True))
        runs.append((f"{default}, one at a time", default, 1, False))
        results = {}
        print(f"{len(examples)} held-out examples of the sample, fine-tune of {args.steps} updates; deployment: {pick_device().describe()}")
        print(f"{'run':<22} {'time':>7} {'vs before':>9} {'exact match':>12} {'held-out loss':>14}")
        for name, precision, batch, mixed in runs:
            seconds, result, answers = evaluate(job, examples, precision=precision, batch=batch, mixed=mixed, before=name == BEFORE)
            results[name] = answers
            tuned = result.finetuned
            ratio = seconds / results.setdefault("_before_s", seconds)
            print(
                f"{name:<22} {seconds:>6.1f}s {ratio:>8.2f}x {round(tuned['exact_match'] * len(examples)):>5}/{len(examples):<6} "
                f"{tuned['heldout_loss']:>14.4f}",
                flush=True,
            )
        before = results[BEFORE]
        print("greedy answers equal (base, fine-tuned), example by example:")
        for name in [run[0] for run in runs[1:]]:
            other = results[name]
            base_equal = sum(a[0] == b[0] for a, b in zip(before, other, strict=True))
            tuned_equal = sum(a[1] == b[1] for a, b in zip(before, other, strict=True))
            print(f"  {BEFORE} vs {name:<22} {base_equal}/{len(before)}, {tuned_equal}/{len(before)}")
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
