"""Upload the sample -> train (default settings) -> export every format -> the parity check, from the
command line, with the same services and worker code as the site, in a throw-away data directory.

Prints the export's files and, per GGUF variant, identical answers against PyTorch, exact match against
the reference for both, and tokens/s for both.

    .venv/bin/python bench/export.py [--max-steps N]   (N limits training, for a quick run)
"""

import argparse
import time

from _common import temporary_site, upload_sample


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-steps", type=int, default=0, help="0: the chosen settings, as a user's first run")
    args = parser.parse_args()
    with temporary_site():
        from training_app import exports
        from training_app.models import Export
        from training_app.services import training_job_start
        from tuna_core.jobs import job_run, run_next_job

        started = time.perf_counter()
        user, dataset = upload_sample()
        job = training_job_start(owner=user, dataset=dataset, config_data={"max_steps": args.max_steps} if args.max_steps else {})
        run_next_job()
        job.refresh_from_db()
        trained = time.perf_counter()
        print(f"training: {job.status}, {job.current_step} updates, {trained - started:.0f} s")
        export = exports.export_start(owner=user, job=job)
        job_run(Export, export.pk, exports.export_work)
        export.refresh_from_db()
        print(f"export: {export.status} {export.error_message} in {export.run_seconds:.0f} s (llama-cpp-python {export.llama_cpp_version})")
        for f in export.files:
            print(f"  {f['kind']:<20} {f['name']:<28} {f['size_bytes'] / 1e6:>9.1f} MB")
        print(f"{'variant':<8}{'identical':>12}{'exact (PyTorch)':>17}{'exact (GGUF)':>14}{'tok/s PyTorch':>15}{'tok/s GGUF':>12}")
        for name, p in export.parity.items():
            print(
                f"{name:<8}{p['identical']:>7} / {p['total']:<3}{p['exact_match_pytorch']:>11.0f} / {p['total']:<3}"
                f"{p['exact_match_gguf']:>8.0f} / {p['total']:<3}{p['tokens_per_second_pytorch'] or 0:>15.1f}{p['tokens_per_second_gguf'] or 0:>12.1f}"
            )
            for m in p["mismatches"][:3]:
                print(f"    #{m['index']}: PyTorch {m['pytorch']!r}\n         GGUF    {m['gguf']!r}")
        print(f"passes the parity check (>= {Export.PARITY_PASS:.0%} of f16 identical): {export.parity_passed}")


if __name__ == "__main__":
    main()
