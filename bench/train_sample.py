"""Train the sample dataset with the default settings through the worker's code path; print the time.

    .venv/bin/python bench/train_sample.py

Uses a throw-away data directory and SQLite database. Goal (training issue): under 5 minutes on a 2-core CPU.
"""

import time

from _common import temporary_site, upload_sample


def main() -> None:
    with temporary_site():
        from training_app.services import training_job_start
        from tuna_core.jobs import run_next_job

        user, dataset = upload_sample()
        job = training_job_start(owner=user, dataset=dataset, config_data={})
        started = time.perf_counter()
        run_next_job()
        wall = time.perf_counter() - started
        job.refresh_from_db()
        losses = list(job.loss_points.exclude(loss=None).values_list("loss", flat=True))
        evals = list(job.loss_points.exclude(eval_loss=None).values_list("eval_loss", flat=True))
        print(f"status: {job.status} {job.error_message}")
        trained = dataset.num_train - job.config["eval_examples"]
        print(f"{trained} training examples x {job.config['num_epochs']} epochs = {job.total_steps} steps on {job.device}")
        print(f"training loss: first {losses[0]:.3f}, last {losses[-1]:.3f}; validation loss: first {evals[0]:.3f}, last {evals[-1]:.3f}")
        print(f"kept: {job.best_step_text()}; validation took {job.eval_seconds:.1f} s of {job.train_seconds:.0f} s")
        print(
            f"speed: {job.tokens_per_second:.0f} tokens/s; cost at ${job.cost_usd / max(job.train_seconds, 1e-9) * 3600:.2f}/h: ${job.cost_usd:.4f}"
        )
        print(f"wall time: {wall:.0f} s (goal < 300 s)")


if __name__ == "__main__":
    main()
