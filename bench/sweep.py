"""Sweep bench: does a sweep's pick (by validation loss) do at least as well as the single default run?

For the sample dataset and each small-data task (bench/small_tasks.py, loaded as bench/small_data.py loads them), in a
throw-away data directory and database, through the platform's own services and worker: a sweep with the default grid
(the chosen settings, then one change at a time around them: half and twice the learning rate, more epochs, twice the
rank, the other LoRA layers), early stopping on, run unattended; the winner is picked on validation loss and evaluated
against the base model automatically. The single default run is the sweep's run of the chosen settings: an ordinary
job with the default settings (same seed, same data; the first run, so early stopping never touches it), evaluated on
the same scoring examples as the winner. Prints per task: each run's settings, validation loss, time and how it ended;
then the default run against the pick on held-out exact match and the task score (tuna_llm.task_scores), and the time
the sweep took against the default run's.

    .venv/bin/python bench/sweep.py                                  # sample + meetings, tickets, invoices (long: hours on 2 cores)
    .venv/bin/python bench/sweep.py --tasks tickets                  # one task
    .venv/bin/python bench/sweep.py --no-early-stopping              # every run to its end
    .venv/bin/python bench/sweep.py --runs 4                         # the default grid's first 4 points (chosen, half and twice the rate, more epochs)
    .venv/bin/python bench/sweep.py --smoke                          # does the bench work: tiny runs, a 2-row grid, 2 scored examples
"""

import argparse
import json
import time

from _common import SAMPLE, temporary_site
from small_tasks import TASKS, generate, to_jsonl

SMOKE_CONFIG = {"max_steps": 4, "batch_size": 2, "max_seq_length": 128, "eval_steps": 2, "eval_examples": 2}
SMOKE_GRID = [{"learning_rate": 1e-3}, {"learning_rate": 2e-3}]


def task_data(task: str) -> bytes:
    """The task's file, as bench/small_data.py reads it: the sample, a file of samples/openai/, or a generated task."""
    if task == "sample":
        return SAMPLE.read_bytes()
    if task.startswith("openai/"):
        return (SAMPLE.parent / "openai" / f"{task.removeprefix('openai/')}.jsonl").read_bytes()
    return to_jsonl(generate(task))


def run_until_done(experiment) -> float:
    """Run the worker until the sweep has picked (its runs come first: same owner, older rows); wall seconds."""
    from tuna_core.jobs import run_next_job

    started = time.perf_counter()
    while True:
        experiment.refresh_from_db()
        if experiment.status != "running" or not run_next_job():
            break
    return time.perf_counter() - started


def scored(owner, job):
    """The job's evaluation against the base model on the dataset's scoring set (the one the sweep queued for its winner,
    or a new one), run to its end."""
    from evaluation_app.runs import scoring_start
    from tuna_core.jobs import run_next_job

    evaluation, _ = scoring_start(owner=owner, job=job)
    while evaluation.status in ("queued", "running") and run_next_job():
        evaluation.refresh_from_db()
    evaluation.refresh_from_db()
    assert evaluation.status == "completed", evaluation.error_message
    return evaluation


def figures(evaluation) -> dict:
    m = evaluation.metrics["finetuned_model"]
    return {
        "exact": round(m["exact_match"] * evaluation.test_size),
        "n": evaluation.test_size,
        "task_score": m.get("task_score"),
        "task_label": m.get("task_score_label", ""),
        "loss": m.get("heldout_loss"),
    }


def settings_text(point: dict) -> str:
    return f"lr {point['learning_rate']:g}, {point['num_epochs']} ep, r {point['lora_r']}, {point['lora_layers']}"


def run_task(owner, task: str, config: dict, grid, early_stopping: bool, points: int = 0) -> dict:
    from django.core.files.base import ContentFile

    from datasets_app.services import dataset_create
    from training_app.experiments import default_grid, experiment_start, grid_point

    dataset = dataset_create(owner=owner, upload=ContentFile(task_data(task), name=f"{task}.jsonl"))
    if grid is None and points:
        grid = default_grid(dataset, config)[:points]
    experiment = experiment_start(owner=owner, dataset=dataset, config_data=config, grid=grid, early_stopping=early_stopping)
    wall = run_until_done(experiment)
    runs = list(experiment.runs.order_by("pk"))
    default = runs[0]  # the chosen settings: the first row of the grid
    print(f"{task}: sweep #{experiment.pk}, {len(runs)} runs, {wall:.0f} s; {experiment.pick.get('reason', experiment.status)}", flush=True)
    for run in runs:
        ended = run.stop_reason or run.error_message or run.status
        loss = f"{run.best_eval_loss:.4f}" if run.best_eval_loss is not None else "-"
        mark = " <- pick" if run.pk == experiment.winner_id else " (default)" if run.pk == default.pk else ""
        print(
            f"  #{run.pk:<4} {settings_text(grid_point(run.config)):<36} val {loss:>7}  {run.current_step:>4}/{run.total_steps:<4} "
            f"{run.train_seconds:>6.0f} s  {ended[:110]}{mark}",
            flush=True,
        )
    assert experiment.winner_id is not None, experiment.pick
    pick_eval = scored(owner, experiment.winner)
    default_eval = pick_eval if default.pk == experiment.winner_id else scored(owner, default)
    return {
        "task": task,
        "experiment": experiment,
        "default": default,
        "winner": experiment.winner,
        "runs": runs,
        "wall": wall,
        "train_seconds": sum(run.train_seconds for run in runs),
        "default_figures": figures(default_eval),
        "pick_figures": figures(pick_eval),
        "same_examples": default_eval.examples.count() == pick_eval.examples.count(),
    }


def score_text(f: dict) -> str:
    score = f"{f['task_score']:.3f}" if f["task_score"] is not None else "-"
    return f"{f['exact']:>2}/{f['n']:<3} {score:>5}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", default=",".join(["sample", *TASKS]), help=f"comma-separated: sample, {', '.join(TASKS)}, openai/<file>")
    parser.add_argument("--config", default="{}", help="settings for every run, as JSON (default: none, as a new user would)")
    parser.add_argument("--grid", default="", help="the grid as JSON (default: the training form's default grid)")
    parser.add_argument("--no-early-stopping", action="store_true")
    parser.add_argument("--runs", type=int, default=0, help="only the default grid's first N points (the chosen settings first)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny runs, a 2-row grid and 2 scored examples: checks the bench, measures nothing"
    )
    parser.add_argument(
        "--max-eval", type=int, default=0, help="scored held-out examples at most (TUNA_MAX_EVAL_EXAMPLES; default: the deployment's)"
    )
    args = parser.parse_args()
    config, grid = json.loads(args.config), json.loads(args.grid) if args.grid else None
    tasks = args.tasks.split(",")
    if args.smoke:
        config, grid = {**SMOKE_CONFIG, **config}, grid or SMOKE_GRID
        args.max_eval = args.max_eval or 2
        tasks = tasks if args.tasks != parser.get_default("tasks") else ["tickets"]
    with temporary_site():
        from django.conf import settings
        from django.contrib.auth.models import User

        from training_app.experiments import grid_point

        if args.max_eval:
            settings.TUNA_MAX_EVAL_EXAMPLES = args.max_eval
        settings.TUNA_MAX_SWEEP_HOURS = 1e6  # the bench measures; the deployment's limit is for users
        owner = User.objects.create(username="bench")
        print(
            f"settings for every run: {config or 'none (chosen from the data)'}; grid: {grid or 'default'}"
            f"{f' (its first {args.runs} points)' if args.runs and not grid else ''}; early stopping "
            f"{'off' if args.no_early_stopping else 'on'}"
        )
        rows = [run_task(owner, task, config, grid, not args.no_early_stopping, args.runs) for task in tasks]
        print()
        print(
            f"{'task':<9} {'runs':>4} {'early':>5}  {'default: exact score':<22} {'pick: exact score':<20} {'pick settings':<36} "
            f"{'default s':>9} {'sweep s':>8}  at least as good"
        )
        for row in rows:
            d, p = row["default_figures"], row["pick_figures"]
            early = sum(1 for run in row["runs"] if run.stop_reason)
            good = p["exact"] >= d["exact"] and (p["task_score"] is None or d["task_score"] is None or p["task_score"] >= d["task_score"])
            label = p["task_label"] or d["task_label"] or "no task score"
            print(
                f"{row['task']:<9} {len(row['runs']):>4} {early:>5}  {score_text(d):<22} {score_text(p):<20} "
                f"{settings_text(grid_point(row['winner'].config)):<36} {row['default'].train_seconds:>9.0f} {row['train_seconds']:>8.0f}  "
                f"{'yes' if good else 'NO'} ({label}; same scored examples: {row['same_examples']})",
                flush=True,
            )


if __name__ == "__main__":
    main()
