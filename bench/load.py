"""Mixed load against a real `make run` process model while a job trains.

Starts gunicorn (one process, threads, as `make run` and compose do) and the supervised worker on a
throw-away data directory (SQLite unless --database-url), uploads the sample, starts a training job, and
once it trains sends at the same moment: 16 inference calls (from two users: one may hold 8 slots), 4 uploads
and 20 list calls. Prints the status counts and p50/p95 latency of each kind, server errors, "database is
locked" lines in the logs, and what happened to the training job (it must complete with an unbroken history).

    .venv/bin/python bench/load.py [--database-url postgres://...] [--inference 16 --uploads 4 --lists 20]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "orders_to_json.jsonl"
PYTHON = sys.executable
GUNICORN = [str(Path(PYTHON).with_name("gunicorn")), "tuna_site.wsgi:application"]
GUNICORN_ARGS = ["--worker-class", "gthread", "--workers", "1", "--threads", "32", "--timeout", "300", "--graceful-timeout", "10"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def manage(env: dict, *args: str) -> str:
    return subprocess.run([PYTHON, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", default="")
    parser.add_argument("--inference", type=int, default=16)
    parser.add_argument("--uploads", type=int, default=4)
    parser.add_argument("--lists", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=40, help="length of the training job that runs under the load")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tuna_site.settings",
            "DEBUG": "1",  # as `make run`
            "TUNA_DATA_DIR": str(data),
            "TUNA_MODEL_CACHE_DIR": os.environ.get("TUNA_MODEL_CACHE_DIR", str(ROOT / "media" / "models")),
            "PYTHONUNBUFFERED": "1",
        }
        if args.database_url:
            env["DATABASE_URL"] = args.database_url
        else:
            env.pop("DATABASE_URL", None)
        manage(env, "migrate", "-v0")
        output = manage(
            env,
            "shell",
            "-c",
            "from django.contrib.auth.models import User; from tuna_core.tokens import api_token_create\n"
            "for name in ('load', 'load2'):\n"
            "    print('token', api_token_create(user=User.objects.create_user(name, password='load-pass-123'), name='load')[1])",
        )
        # Two users: one user may hold TUNA_MAX_INFERENCE_PER_USER (8) of the 16 inference slots; the calls are split.
        tokens = [line.split()[1] for line in output.splitlines() if line.startswith("token ")]
        port = free_port()
        logs = {name: open(data / f"{name}.log", "w") for name in ("web", "worker")}  # noqa: SIM115
        web = subprocess.Popen(
            [*GUNICORN, "--bind", f"127.0.0.1:{port}", *GUNICORN_ARGS], cwd=ROOT, env=env, stdout=logs["web"], stderr=subprocess.STDOUT
        )
        worker = subprocess.Popen([PYTHON, "manage.py", "tuna_worker"], cwd=ROOT, env=env, stdout=logs["worker"], stderr=subprocess.STDOUT)
        try:
            run(f"http://127.0.0.1:{port}", tokens, args, data)
        finally:
            for process in (web, worker):
                process.terminate()
            for process in (web, worker):
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    print(f"!! {process.args[0]} did not stop within 20 s of SIGTERM")
            for log in logs.values():
                log.close()
            locked = sum((data / f"{name}.log").read_text(errors="replace").count("database is locked") for name in logs)
            print(f'"database is locked" in the server and worker logs: {locked}')


class Client:
    """One connection per request (requests' sessions are not shared between threads)."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.headers = url, {"Authorization": f"Bearer {token}"}

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, headers=self.headers, timeout=600)

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, headers=self.headers, timeout=600, **kwargs)


def run(url: str, tokens: list[str], args, data: Path) -> None:
    client, second = Client(url, tokens[0]), Client(url, tokens[1])
    deadline = time.monotonic() + 60
    while True:
        try:
            client.get("/api/training")
            break
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)

    dataset = client.post("/api/datasets", files={"file": SAMPLE.open("rb")}, data={"name": "sample"}).json()
    config = {"max_steps": args.max_steps, "batch_size": 2, "max_seq_length": 128}
    job = client.post("/api/training/start", json={"dataset_id": dataset["id"], "config": config}).json()
    print(f"training job #{job['id']}: {args.max_steps} updates, waiting for it to train ...")
    while (row := client.get(f"/api/training/{job['id']}").json())["current_step"] < 2:
        if row["status"] not in ("queued", "training"):
            raise SystemExit(f"the job ended before the load: {row['status']} {row['error_message']}")
        time.sleep(0.5)
    before = (time.monotonic(), row["current_step"])

    def inference(i: int):
        body = {"model_id": "base:smollm2-135m-instruct", "prompt": f"Name three colours ({i}).", "max_tokens": 24}
        return (client, second)[i % 2].post("/api/inference", json=body)

    def upload(i: int):
        return client.post("/api/datasets", files={"file": (f"load-{i}.jsonl", SAMPLE.read_bytes())}, data={"name": f"load {i}"})

    def listing(i: int):
        return client.get(["/api/training", "/api/datasets", f"/api/training/{job['id']}", "/api/evaluation"][i % 4])

    calls = [("inference", inference, i) for i in range(args.inference)]
    calls += [("upload", upload, i) for i in range(args.uploads)]
    calls += [("list", listing, i) for i in range(args.lists)]

    def timed(kind, call, i):
        started = time.perf_counter()
        try:
            status = call(i).status_code
        except requests.RequestException as exc:
            status = type(exc).__name__
        return kind, status, time.perf_counter() - started

    load_started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        results = list(pool.map(lambda c: timed(*c), calls))
    load_seconds = time.monotonic() - load_started
    during = client.get(f"/api/training/{job['id']}").json()["current_step"]

    print(f"\n{len(calls)} requests at once, all answered in {load_seconds:.1f} s")
    print(f"{'kind':<10}{'n':>4}  {'statuses':<28}{'p50 s':>8}{'p95 s':>8}")
    for kind in ("inference", "upload", "list"):
        rows = [r for r in results if r[0] == kind]
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(Counter(str(r[1]) for r in rows).items()))
        latencies = [r[2] for r in rows]
        print(f"{kind:<10}{len(rows):>4}  {statuses:<28}{statistics.median(latencies):>8.2f}{percentile(latencies, 0.95):>8.2f}")
    server_errors = [r for r in results if not isinstance(r[1], int) or r[1] >= 500]
    print(f"5xx or dropped connections: {len(server_errors)}")

    while (row := client.get(f"/api/training/{job['id']}").json())["status"] in ("queued", "training"):
        time.sleep(1)
    steps = [log["step"] for log in row["training_logs"]]
    print(
        f"\ntraining job #{row['id']}: {row['status']} {row['error_message']}, {row['current_step']}/{row['total_steps']} updates "
        f"({during - before[1]} of them during the {load_seconds:.0f} s of load), {row['tokens_per_second']:.0f} tokens/s over the run; "
        f"history unbroken: {steps == list(range(1, row['total_steps'] + 1))}"
    )


if __name__ == "__main__":
    main()
