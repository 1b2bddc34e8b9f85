"""Serving speed, side by side in one run: llama.cpp's own server behind the product over HTTP (1 client and
--clients concurrent clients), llama.cpp called directly, and transformers over HTTP.

On a throw-away data directory and SQLite database: uploads the sample, trains a tiny fine-tune (or takes
--adapter), exports it as f16 GGUF (base + LoRA, through the worker's code path), then on the sample's
held-out prompts, greedy, with max_tokens each:

- llama.cpp direct: ``llama_cpp.Llama`` created and called on one thread of a fresh Python of its own (torch,
  which trained and exported in this one, not beside it), the base GGUF + the job's LoRA GGUF, as many threads
  as llama-server uses (one per core), its chat completion (the GGUF's template), one call after another;
- llama.cpp over HTTP: gunicorn (one process, threads, as `make run` and compose) with
  TUNA_SERVING_ENGINE=llamacpp: the product starts llama-server (TUNA_LLAMA_SERVER_PARALLEL slots, continuous
  batching) and forwards each call to it (tuna_llm.serving.llama_server, openai_engine);
- transformers over HTTP: the same server with TUNA_SERVING_ENGINE=transformers (--no-transformers skips it).

Single stream: one call after another; concurrent: --clients clients each sending --rounds calls; tokens/s =
completion tokens / wall time. The measurements alternate over --repeats rounds (this machine's speed drifts
over minutes) and the median is shown. Then the greedy answers over HTTP are compared: llama.cpp against
transformers. Goals (issue 33): llama.cpp over HTTP single stream >= 0.9x llama.cpp direct; --clients
concurrent clients >= 2.5x one client's tokens/s.

    .venv/bin/python bench/serving.py [--adapter DIR] [--max-steps 30] [--prompts 8] [--tokens 64]
                                      [--clients 8] [--rounds 2] [--repeats 3] [--no-transformers]

The base model's GGUF is cached in TUNA_GGUF_DIR (default media/gguf). llama-server: `make install` builds it
(or TUNA_LLAMA_SERVER_BIN names one). Run it on a quiet machine: it measures the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import requests
from _common import ROOT, temporary_site, upload_sample
from load import GUNICORN, GUNICORN_ARGS, Client, free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", help="an existing LoRA adapter directory of the embedded model (skips training)")
    parser.add_argument("--max-steps", type=int, default=30, help="updates of the tiny fine-tune trained when --adapter is not given")
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts of the sample used (and checked by the export's parity)")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of every call")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the second measurement")
    parser.add_argument("--rounds", type=int, default=2, help="calls each concurrent client sends")
    parser.add_argument("--repeats", type=int, default=3, help="alternated rounds of every measurement (the median is shown)")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers over HTTP")
    args = parser.parse_args()

    os.environ.setdefault("TUNA_GGUF_DIR", str(ROOT / "media" / "gguf"))  # the base GGUF, converted once, kept
    os.environ["TUNA_PARITY_EXAMPLES"] = str(args.prompts)
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    with temporary_site() as data:
        job, user = fine_tune(args)
        export = export_gguf(user, job)
        from datasets_app.examples import held_out_examples
        from tuna_core.tokens import api_token_create

        prompts = [messages[:-1] for messages in held_out_examples(job.dataset)[: args.prompts]]
        token = api_token_create(user=user, name="bench")[1]
        print(f"{job.model_id}: {len(prompts)} held-out prompts, max_tokens {args.tokens}, {args.clients} clients x {args.rounds} calls\n")

        direct = Direct(export, args)
        direct.run(prompts[:1])  # warm-up: the model and its LoRA loaded, caches filled
        samples: dict[str, list[float]] = {"direct": [], "single": [], "concurrent": []}
        answers: dict[str, list[str]] = {}
        with server(data, "llamacpp") as url:
            client = Client(url, token)
            warm_up(client, job.model_id)
            for repeat in range(args.repeats):  # alternated, so that every measurement sees the same drift
                samples["direct"].append(direct.run(prompts))
                single, answers["llamacpp"] = over_http(client, job.model_id, prompts, args)
                samples["single"].append(single)
                samples["concurrent"].append(
                    timed(lambda: concurrently(args, lambda i: call(client, job.model_id, prompts[i % len(prompts)], args)[0]))
                )
                print(
                    f"round {repeat + 1}: direct {samples['direct'][-1]:.1f}, over HTTP 1 client {samples['single'][-1]:.1f}, "
                    f"{args.clients} clients {samples['concurrent'][-1]:.1f} tokens/s",
                    flush=True,
                )
        direct_answers = direct.answers
        direct.close()
        if not args.no_transformers:
            with server(data, "transformers") as url:
                client = Client(url, token)
                warm_up(client, job.model_id)
                speed, answers["transformers"] = over_http(client, job.model_id, prompts, args)
                samples["transformers"] = [speed]
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")
    report(samples, answers, direct_answers, prompts, args)


def fine_tune(args):
    from django.utils import timezone

    from training_app.models import TrainingJob
    from training_app.services import training_job_start
    from tuna_core.jobs import run_next_job

    user, dataset = upload_sample()
    if args.adapter:
        job = TrainingJob.objects.create(
            owner=user,
            dataset=dataset,
            base_model="smollm2-135m-instruct",
            config={},
            status=TrainingJob.Status.COMPLETED,
            adapter_dir=str(Path(args.adapter).resolve()),
            completed_at=timezone.now(),
        )
        return job, user
    started = time.perf_counter()
    config = {"max_steps": args.max_steps, "batch_size": 4, "learning_rate": 2e-3, "max_seq_length": 160}
    job = training_job_start(owner=user, dataset=dataset, config_data=config)
    run_next_job()
    job.refresh_from_db()
    if job.status != TrainingJob.Status.COMPLETED:
        raise SystemExit(f"training failed: {job.status} {job.error_message}")
    print(f"trained {job.model_id}: {job.total_steps} updates in {time.perf_counter() - started:.0f} s")
    return job, user


def export_gguf(user, job):
    from training_app import exports
    from training_app.models import Export
    from tuna_core.jobs import job_run

    started = time.perf_counter()
    export = exports.export_start(owner=user, job=job, formats=["gguf_f16"])
    job_run(Export, export.pk, exports.export_work)
    export.refresh_from_db()
    if export.status != Export.Status.COMPLETED:
        raise SystemExit(f"export failed: {export.error_message}")
    f16 = export.parity["f16"]
    print(
        f"exported in {time.perf_counter() - started:.0f} s; parity: {f16['identical']}/{f16['total']} identical "
        f"(pytorch {f16['tokens_per_second_pytorch']} tokens/s, gguf {f16['tokens_per_second_gguf']} tokens/s)"
    )
    return export


def gguf_paths(export) -> tuple[Path, Path]:
    from django.conf import settings

    return tuple(Path(settings.TUNA_DATA_DIR) / export.file(kind)["path"] for kind in ("gguf_base_f16", "gguf_lora"))


DIRECT = """
import json, sys, time
from llama_cpp import Llama

base, lora, threads, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=base, lora_path=lora, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False)
for line in sys.stdin:
    prompts = json.loads(line)
    started, done, answers = time.perf_counter(), 0, []
    for messages in prompts:
        out = llm.create_chat_completion(messages=messages, max_tokens=tokens, temperature=0.0)
        done += out["usage"]["completion_tokens"]
        answers.append(out["choices"][0]["message"]["content"])
    print(json.dumps({"tokens_per_s": done / (time.perf_counter() - started), "answers": answers}), flush=True)
"""


class Direct:
    """llama.cpp called directly: ``llama_cpp.Llama`` with the base GGUF + the job's LoRA GGUF, in a fresh Python of
    its own (no torch beside it), created and called on its one thread (ggml's OpenMP makes a thread team per
    calling thread; another thread would slow it). Each ``run`` answers the prompts one after another."""

    def __init__(self, export, args) -> None:
        base, lora = gguf_paths(export)
        command = [sys.executable, "-c", DIRECT, str(base), str(lora), str(os.cpu_count() or 1), str(args.tokens)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.answers: list[str] = []

    def run(self, prompts) -> float:
        self.process.stdin.write(json.dumps(prompts) + "\n")
        self.process.stdin.flush()
        result = json.loads(self.process.stdout.readline())
        self.answers = result["answers"]
        return result["tokens_per_s"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


def call(client: Client, model: str, messages, args) -> tuple[int, str]:
    response = client.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": args.tokens})
    response.raise_for_status()
    body = response.json()
    return body["usage"]["completion_tokens"], body["choices"][0]["message"]["content"]


def warm_up(client: Client, model: str) -> None:
    engine = client.post("/api/inference", json={"model_id": model, "prompt": "Hi", "max_tokens": 4}).json()["engine"]
    print(f"server answers with engine {engine!r}")


def over_http(client: Client, model: str, prompts, args) -> tuple[float, list[str]]:
    """Single stream: tokens/s of the prompts one after another, and their greedy answers."""
    answers: list[str] = []

    def one(messages) -> int:
        tokens, text = call(client, model, messages, args)
        answers.append(text)
        return tokens

    return timed(lambda: [one(messages) for messages in prompts]), answers


def concurrently(args, call) -> list[int]:
    """--clients threads, each sending --rounds calls one after another."""
    tokens: list[int] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        for round_ in range(args.rounds):
            count = call(number + round_ * args.clients)
            with lock:
                tokens.append(count)

    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        list(pool.map(client, range(args.clients)))
    return tokens


def timed(run) -> float:
    """Tokens per second of `run` (which returns the completion tokens of its calls)."""
    started = time.perf_counter()
    tokens = sum(run())
    return tokens / (time.perf_counter() - started)


@contextmanager
def server(data: Path, engine: str):
    """gunicorn, as `make run` starts it, serving with TUNA_SERVING_ENGINE=engine on a free port."""
    port = free_port()
    env = {**os.environ, "TUNA_SERVING_ENGINE": engine, "DEBUG": "1", "PYTHONUNBUFFERED": "1"}
    with open(data / f"web-{engine}.log", "w") as log:
        web = subprocess.Popen(
            [*GUNICORN, "--bind", f"127.0.0.1:{port}", *GUNICORN_ARGS], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    requests.get(url + "/v1/models", timeout=5)
                    break
                except requests.ConnectionError:
                    if time.monotonic() > deadline or web.poll() is not None:
                        raise SystemExit(
                            f"the {engine} server did not start; see its log:\n{(data / f'web-{engine}.log').read_text()}"
                        ) from None
                    time.sleep(0.3)
            yield url
        finally:
            web.terminate()
            try:
                web.wait(timeout=20)
            except subprocess.TimeoutExpired:
                web.kill()


def report(samples: dict[str, list[float]], answers: dict[str, list[str]], direct_answers: list[str], prompts, args) -> None:
    from tuna_llm import metrics

    median = {name: statistics.median(values) for name, values in samples.items()}
    print(f"\n{'tokens/s (median of ' + str(args.repeats) + ' alternated rounds)':<52}{'value':>8}")
    print(f"{'llama.cpp direct (Llama, one thread, ' + str(os.cpu_count()) + ' threads)':<52}{median['direct']:>8.1f}")
    print(f"{'llama.cpp over HTTP (llama-server), 1 client':<52}{median['single']:>8.1f}")
    print(f"{'llama.cpp over HTTP (llama-server), ' + str(args.clients) + ' clients':<52}{median['concurrent']:>8.1f}")
    if "transformers" in median:
        print(f"{'transformers over HTTP, 1 client':<52}{median['transformers']:>8.1f}")
    print(f"\nover HTTP 1 client / direct: {median['single'] / median['direct']:.2f} (goal >= 0.9)")
    print(f"over HTTP {args.clients} clients / 1 client: {median['concurrent'] / median['single']:.2f}x (goal >= 2.5)")
    llama = answers["llamacpp"]
    same = sum(metrics.normalise(a) == metrics.normalise(b) for a, b in zip(llama, direct_answers, strict=True))
    print(f"greedy answers equal (llama.cpp over HTTP vs direct): {same}/{len(prompts)}")
    if "transformers" in answers:
        pairs = list(zip(answers["transformers"], llama, strict=True))
        same = sum(metrics.normalise(a) == metrics.normalise(b) for a, b in pairs)
        print(f"greedy answers equal (transformers vs llama.cpp over HTTP): {same}/{len(prompts)}")
        for index, (torch_answer, llama_answer) in enumerate(pairs):
            if metrics.normalise(torch_answer) != metrics.normalise(llama_answer):
                print(f"  prompt {index}:\n    transformers: {torch_answer!r}\n    llama.cpp:    {llama_answer!r}")


if __name__ == "__main__":
    main()
