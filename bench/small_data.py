"""Small-data bench: do the default settings learn a user's own small dataset?

Three unfamiliar 60-example tasks (bench/small_tasks.py: a format conversion, a classification into
fixed labels, a short extraction), each uploaded, trained and evaluated through the platform's own
services and worker tasks with nothing overridden, in a throw-away data directory and database.
Prints one row per task: the settings the platform chose, training time, held-out exact match,
ROUGE-L and loss for the base and the fine-tuned model.

    .venv/bin/python bench/small_data.py                      # every task, default settings
    .venv/bin/python bench/small_data.py --compare            # the previous release's defaults beside today's, per task
    .venv/bin/python bench/small_data.py --tasks tickets --config '{"num_epochs": 3}'   # an experiment
    .venv/bin/python bench/small_data.py --tasks sample       # the sample dataset, for comparison
    .venv/bin/python bench/small_data.py --tasks openai/tools # a file of samples/openai/ (tool calls scored on the call)
    .venv/bin/python bench/small_data.py --precisions fp32,bf16   # each task in each precision, side by side
    .venv/bin/python bench/small_data.py --precisions fp32,bf16 --seeds 42,1   # and the seed-to-seed spread beside it

With --precisions, each task is trained and evaluated once per precision (TUNA_PRECISION for the whole run:
training, evaluation, generation), and the greedy answers of the runs are compared example by example: the
base model's (same weights, only the precision differs) and the fine-tuned model's (trained in that precision).
Each run's fine-tune is then measured again by one fp32 model (its held-out loss): a difference there is in
what the runs trained, not in how they were measured.
With --seeds, each run is repeated with each training seed: the spread between two seeds in one precision is
the noise a precision's difference has to be measured against (a fine-tune of 48 examples at a high learning
rate ends in a different place for each seed).
"""

import argparse
import json
import time

from _common import SAMPLE, temporary_site
from small_tasks import TASKS, generate, to_jsonl


def use_precision(precision: str) -> None:
    """Switch the whole platform (training, evaluation, generation) to ``precision`` for the next runs."""
    from django.conf import settings

    from tuna_llm.serving.registry import registry

    settings.TUNA_PRECISION = precision
    registry.clear()


def run_task(owner, task: str, config: dict) -> dict:
    from django.core.files.base import ContentFile

    from datasets_app.services import dataset_create
    from evaluation_app.services import evaluation_start
    from training_app.models import TrainingJob
    from training_app.services import training_job_start
    from tuna_core.jobs import run_next_job

    if task == "sample":
        data = SAMPLE.read_bytes()
    elif task.startswith("openai/"):  # a file of samples/openai/ (OpenAI's shapes: tools, weights, ...)
        data = (SAMPLE.parent / "openai" / f"{task.removeprefix('openai/')}.jsonl").read_bytes()
    else:
        data = to_jsonl(generate(task))
    dataset = dataset_create(owner=owner, upload=ContentFile(data, name=f"{task}.jsonl"))
    job = training_job_start(owner=owner, dataset=dataset, config_data=config)
    started = time.perf_counter()
    run_next_job()
    train_wall = time.perf_counter() - started
    job = TrainingJob.objects.get(pk=job.pk)
    assert job.status == "completed", job.error_message
    evaluation, _ = evaluation_start(owner=owner, job=job, test_size=dataset.num_eval)
    started = time.perf_counter()
    run_next_job()
    eval_wall = time.perf_counter() - started
    evaluation.refresh_from_db()
    assert evaluation.status == "completed", evaluation.error_message
    m = evaluation.metrics
    return {
        "task": task,
        "dataset": dataset,
        "job": job,
        "evaluation": evaluation,
        "train_wall": train_wall,
        "eval_wall": eval_wall,
        "m": m,
    }


# The defaults before settings were chosen from the data: r 8 on q/v, lr 2e-4, 3 epochs, batch 4, no validation.
PREVIOUS_DEFAULTS = {
    "num_epochs": 3,
    "batch_size": 4,
    "learning_rate": 2e-4,
    "lora_r": 8,
    "lora_alpha": 16,
    "target_modules": ["q_proj", "v_proj"],
    "max_seq_length": 512,
    "eval_examples": 0,
}


def print_row(row: dict) -> None:
    job, m, n = row["job"], row["m"], row["evaluation"].test_size
    cfg = job.config
    base, tuned = m["base_model"], m["finetuned_model"]
    modules = "all" if len(cfg["target_modules"]) > 2 else "/".join(m.removesuffix("_proj") for m in cfg["target_modules"])
    print(
        f"{row['task']:<9} {row['label']:<9} {row['precision']:<5} {cfg['seed']:>4} {row['dataset'].num_train:>3}/{n:<3} {cfg['num_epochs']:>3} {job.total_steps:>4} {cfg['learning_rate']:>7g} "
        f"{cfg['lora_r']:>2} {modules:<6} {row['train_wall']:>6.0f} s {job.share_eval_seconds():>5.0%} "
        f"{round(base['exact_match'] * n):>3}/{n} -> {round(tuned['exact_match'] * n):>2}/{n} ({tuned['exact_match']:.2f})  "
        f"{base['rouge_l']:.2f} -> {tuned['rouge_l']:.2f}  {base['heldout_loss']:.3f} -> {tuned['heldout_loss']:.3f}  "
        f"{job.best_step_text()}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"comma-separated: {', '.join(TASKS)}, sample, openai/<file> (samples/openai/<file>.jsonl, e.g. openai/tools)",
    )
    parser.add_argument("--config", default="{}", help="settings to override, as JSON (default: none, as a new user would)")
    parser.add_argument("--compare", action="store_true", help="also run the previous release's defaults, beside today's")
    parser.add_argument("--show-misses", type=int, default=2)
    parser.add_argument("--precisions", default="", help="comma-separated, e.g. fp32,bf16 (default: the deployment's, TUNA_PRECISION)")
    parser.add_argument("--seeds", default="", help="comma-separated training seeds, e.g. 42,1 (default: the settings' seed)")
    args = parser.parse_args()
    runs = [("previous", PREVIOUS_DEFAULTS)] if args.compare else []
    runs.append(("chosen" if args.config == "{}" else "custom", json.loads(args.config)))
    precisions = [p for p in args.precisions.split(",") if p] or [None]
    seeds = [int(s) for s in args.seeds.split(",") if s] or [None]
    with temporary_site():
        from django.contrib.auth.models import User

        owner = User.objects.create(username="bench")
        for label, config in runs:
            print(f"{label}: settings overridden: {config or 'none (chosen from the data)'}")
        print(
            f"{'task':<9} {'settings':<9} {'prec':<5} {'seed':>4} {'trn/eval':<7} {'ep':>3} {'upd':>4} {'lr':>7} {'r':>2} {'target':<6} {'train':>8} {'eval%':>5} "
            f"{'exact match':>17}        {'ROUGE-L':<12}  {'held-out loss':<16}  best checkpoint"
        )
        rows = []
        for task in args.tasks.split(","):
            for label, config in runs:
                for precision in precisions:
                    if precision is not None:
                        use_precision(precision)
                    from tuna_llm.loading import pick_device

                    for seed in seeds:
                        seeded = config if seed is None else config | {"seed": seed}
                        row = run_task(owner, task, seeded) | {"label": label, "precision": pick_device().precision}
                        row["run"] = row["precision"] + ("" if seed is None else f" seed {seed}")
                        rows.append(row)
                        print_row(row)
        for row in rows:
            base, tuned = row["m"]["base_model"], row["m"]["finetuned_model"]
            if "tool_call_match" in tuned:  # the share of tool-calling references answered with the same calls
                print(f"  {row['task']}: tool calls matched {base['tool_call_match']:.2f} -> {tuned['tool_call_match']:.2f}")
            misses = [e for e in row["evaluation"].examples.all() if e.finetuned_scores.get("exact_match") != 1.0]
            for example in misses[: args.show_misses]:
                print(f"  {row['task']} #{example.index}: got {example.finetuned_output!r}, want {example.reference!r}")
        if len(precisions) > 1 or len(seeds) > 1:
            measure_with_one_ruler(rows)
            compare_runs(rows)
        rows = [r for r in rows if r["label"] != "previous"]
        worst = min(r["m"]["finetuned_model"]["exact_match"] for r in rows)
        slowest = max(r["train_wall"] for r in rows)
        print(f"worst fine-tuned exact match {worst:.2f} (goal >= 0.80); slowest training {slowest:.0f} s (goal < 300 s)")


def measure_with_one_ruler(rows: list[dict]) -> None:
    """Each run's fine-tune's held-out loss measured again by one fp32 model (after every run: it switches the
    platform to fp32). Beside each run's own figure (its deployment's precision), it tells a difference in what
    the runs trained from a difference in how they were measured."""
    from datasets_app.examples import held_out_examples
    from tuna_llm.evaluation import answer_loss
    from tuna_llm.serving.registry import registry

    use_precision("fp32")
    loaded = registry.get()
    for row in rows:
        job, name = row["job"], f"ruler-{row['job'].pk}"
        loaded.attach_adapter(name, job.adapter_dir)
        row["ruler_loss"] = answer_loss(loaded, held_out_examples(job.dataset)[: row["evaluation"].test_size], adapter=name)
        loaded.detach_adapter(name)


def compare_runs(rows: list[dict]) -> None:
    """Per task, the first run (precision, seed) against each other one: answers equal, exact match, held-out loss."""
    print("runs compared (precision, seed; greedy answers on the held-out examples, example by example):")
    for task in dict.fromkeys(r["task"] for r in rows):
        runs = [r for r in rows if r["task"] == task and r["label"] != "previous"]
        first = runs[0]
        answers = {r["run"]: list(r["evaluation"].examples.order_by("index")) for r in runs}
        for other in runs[1:]:
            a, b = answers[first["run"]], answers[other["run"]]
            same_base = sum(x.base_output == y.base_output for x, y in zip(a, b, strict=True))
            same_tuned = sum(x.finetuned_output == y.finetuned_output for x, y in zip(a, b, strict=True))
            n = len(a)
            em = [round(r["m"]["finetuned_model"]["exact_match"] * n) for r in (first, other)]
            loss = [r["m"]["finetuned_model"]["heldout_loss"] for r in (first, other)]
            ruler = [r["ruler_loss"] for r in (first, other)]
            print(
                f"  {task:<9} {first['run']} vs {other['run']}: base answers equal {same_base}/{n}, "
                f"fine-tuned answers equal {same_tuned}/{n}; fine-tuned exact match {em[0]}/{n} vs {em[1]}/{n} "
                f"({em[1] - em[0]:+d}); held-out loss {loss[0]:.5f} vs {loss[1]:.5f} ({loss[1] - loss[0]:+.5f} nats, {(loss[1] - loss[0]) / loss[0]:+.0%}); "
                f"measured by one fp32 model {ruler[0]:.5f} vs {ruler[1]:.5f} ({(ruler[1] - ruler[0]) / ruler[0]:+.0%})"
            )
            for x, y in zip(a, b, strict=True):
                if x.finetuned_output != y.finetuned_output:
                    print(f"    #{x.index}: {first['run']} {x.finetuned_output[:70]!r} | {other['run']} {y.finetuned_output[:70]!r}")


if __name__ == "__main__":
    main()
