"""Preference-loop bench: do votes that train make the next model better, on prompts voted on and on others?

For each small task (bench/small_tasks.py), through the platform's own services and worker tasks, in a
throw-away site: upload -> a deliberately short fine-tune (--sft-steps, so that there is something left to
prefer) -> evaluation on the held-out examples -> blind votes on the first half of them (--vote-share) by a
stand-in voter that prefers the answer closer to the reference (ROUGE-L; equal = tie) -> "Train on
preferences" with default settings -> the automatic evaluation against the parent. Prints, side by side,
the parent and the preference-tuned job on the voted prompts and on the prompts nobody voted on, and the
stand-in voter's win rate of the new job on the latter with its 95% interval.

    .venv/bin/python bench/preference_loop.py                        # meetings and tickets
    .venv/bin/python bench/preference_loop.py --tasks sample --sft-steps 8
"""

import argparse
import time

from _common import SAMPLE, temporary_site
from small_tasks import generate, to_jsonl


def stand_in_vote(first: str, second: str, reference: str) -> str:
    """'first', 'second' or 'tie': the answer closer to the reference (what a careful rater with the reference would pick)."""
    from tuna_llm import metrics

    a, b = metrics.rouge_l(first, reference), metrics.rouge_l(second, reference)
    return "tie" if abs(a - b) < 1e-9 else ("first" if a > b else "second")


def run_task(owner, task: str, sft_steps: int, vote_share: float) -> dict:
    from django.conf import settings
    from django.core.files.base import ContentFile

    from datasets_app.services import dataset_create
    from evaluation_app.models import Evaluation, EvaluationExample
    from evaluation_app.preference import preference_job_start
    from evaluation_app.services import evaluation_start, rating_set
    from training_app.models import TrainingJob
    from training_app.services import training_job_start
    from tuna_core.jobs import run_next_job
    from tuna_llm import metrics

    data = SAMPLE.read_bytes() if task == "sample" else to_jsonl(generate(task))
    dataset = dataset_create(owner=owner, upload=ContentFile(data, name=f"{task}.jsonl"))
    parent = training_job_start(owner=owner, dataset=dataset, config_data={"max_steps": sft_steps})
    run_next_job()
    parent = TrainingJob.objects.get(pk=parent.pk)
    assert parent.status == "completed", parent.error_message
    source, _ = evaluation_start(owner=owner, job=parent, test_size=dataset.num_eval)
    run_next_job()
    source.refresh_from_db()
    assert source.status == "completed", source.error_message
    examples = list(EvaluationExample.objects.filter(evaluation=source))
    voted_count = max(1, round(len(examples) * vote_share))
    choice = {"first": "base", "second": "finetuned", "tie": "tie"}
    for example in examples[:voted_count]:
        vote = choice[stand_in_vote(example.base_output, example.finetuned_output, example.reference)]
        rating_set(user=owner, evaluation=source, example_index=example.index, preferred_model=vote, blind=True)

    settings.TUNA_MIN_PREFERENCE_PAIRS = 1
    child = preference_job_start(owner=owner, evaluation=source)
    started = time.perf_counter()
    run_next_job()
    wall = time.perf_counter() - started
    child = TrainingJob.objects.get(pk=child.pk)
    assert child.status == "completed", child.error_message
    comparison = Evaluation.objects.get(training_job=child)
    run_next_job()
    comparison.refresh_from_db()
    assert comparison.status == "completed", comparison.error_message
    rows = list(EvaluationExample.objects.filter(evaluation=comparison))
    losses = list(child.loss_points.exclude(loss=None).values_list("loss", flat=True))

    def side(part, attribute):
        exact = sum(metrics.exact_match(getattr(r, attribute), r.reference) for r in part)
        rouge = sum(metrics.rouge_l(getattr(r, attribute), r.reference) for r in part) / len(part) if part else 0.0
        return int(exact), rouge

    voted, unvoted = rows[:voted_count], rows[voted_count:]
    wins = losses_ = 0
    for row in unvoted:
        vote = stand_in_vote(row.finetuned_output, row.base_output, row.reference)
        wins += vote == "first"
        losses_ += vote == "second"
    return {
        "task": task,
        "pairs": len(child.preference_pairs),
        "votes": voted_count,
        "updates": child.current_step,
        "seconds": wall,
        "loss": (losses[0], losses[-1]) if losses else (None, None),
        "voted": (side(voted, "base_output"), side(voted, "finetuned_output"), len(voted)),
        "unvoted": (side(unvoted, "base_output"), side(unvoted, "finetuned_output"), len(unvoted)),
        "changed": sum(r.base_output != r.finetuned_output for r in rows),
        "rows": len(rows),
        "win": (wins, losses_, metrics.wilson_interval(wins, wins + losses_)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="meetings,tickets", help="comma-separated: meetings, tickets, invoices, sample")
    parser.add_argument("--sft-steps", type=int, default=12, help="updates of the parent fine-tune (short on purpose)")
    parser.add_argument("--vote-share", type=float, default=0.5, help="share of the held-out examples voted on")
    args = parser.parse_args()
    with temporary_site():
        from django.contrib.auth.models import User

        from tuna_llm.loading import pick_device

        owner = User.objects.create(username="bench")
        print(
            f"precision: {pick_device().describe()}; parent: {args.sft_steps} updates; votes on the first {args.vote_share:.0%} of the held-out examples"
        )
        header = f"{'task':9} {'pairs':>5} {'upd':>4} {'DPO s':>6} {'DPO loss':>13}  {'voted: exact, ROUGE-L parent -> new':38} {'not voted: exact, ROUGE-L parent -> new':40} {'changed':>8}  win rate on not voted (95% CI)"
        print(header)
        for task in args.tasks.split(","):
            r = run_task(owner, task.strip(), args.sft_steps, args.vote_share)
            (vb, vbr), (vf, vfr), vn = r["voted"]
            (ub, ubr), (uf, ufr), un = r["unvoted"]
            wins, lost, interval = r["win"]
            ci = f"{wins / (wins + lost):.2f} ({interval[0]:.2f}-{interval[1]:.2f})" if interval else "no decisive comparison"
            loss = f"{r['loss'][0]:.3f} -> {r['loss'][1]:.3f}" if r["loss"][0] is not None else "-"
            print(
                f"{r['task']:9} {r['pairs']:>5} {r['updates']:>4} {r['seconds']:>6.0f} {loss:>13}  "
                f"{f'{vb}/{vn} -> {vf}/{vn}, {vbr:.2f} -> {vfr:.2f}':38} {f'{ub}/{un} -> {uf}/{un}, {ubr:.2f} -> {ufr:.2f}':40} "
                f"{r['changed']:>4}/{r['rows']:<3}  {ci}: {wins} won, {lost} lost",
                flush=True,
            )


if __name__ == "__main__":
    main()
