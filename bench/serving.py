"""Serving speed, side by side: transformers and llama.cpp over HTTP, and llama.cpp called directly.

On a throw-away data directory and SQLite database: uploads the sample, trains a tiny fine-tune (or takes
--adapter), exports it as f16 GGUF (base + LoRA, through the worker's code path), then on the sample's
held-out prompts, greedy, with max_tokens each:

- llama.cpp direct: `LlamaCppModel` in this process (the base GGUF + the job's LoRA GGUF), called from one
  thread (the concurrent clients hand their calls to it, as the web process's threads do);
- llama.cpp over HTTP: gunicorn (one process, threads, as `make run` and compose) with TUNA_SERVING_ENGINE=llamacpp;
- transformers over HTTP: the same server with TUNA_SERVING_ENGINE=transformers.

Each is measured single-stream (one call after another) and with --clients concurrent clients (each sends
--rounds calls); tokens/s = completion tokens / wall time. Then the greedy answers of the two engines over
HTTP are compared on the held-out prompts. Goal (issue 13): llama.cpp over HTTP, single stream, >= 0.8x
llama.cpp direct; the greedy answers equal.

    .venv/bin/python bench/serving.py [--adapter DIR] [--max-steps 30] [--prompts 8] [--tokens 64]
                                      [--clients 8] [--rounds 2]

The base model's GGUF is cached in TUNA_GGUF_DIR (default media/gguf); about 5 minutes on a 2-core CPU
with the defaults, a first conversion of the base model included.
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
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
    args = parser.parse_args()

    os.environ.setdefault("TUNA_GGUF_DIR", str(ROOT / "media" / "gguf"))  # the base GGUF, converted once, kept
    os.environ["TUNA_PARITY_EXAMPLES"] = str(args.prompts)
    with temporary_site() as data:
        job, user = fine_tune(args)
        export = export_gguf(user, job)
        from datasets_app.examples import held_out_examples
        from tuna_core.tokens import api_token_create

        prompts = [messages[:-1] for messages in held_out_examples(job.dataset)[: args.prompts]]
        token = api_token_create(user=user, name="bench")[1]
        print(f"{job.model_id}: {len(prompts)} held-out prompts, max_tokens {args.tokens}, {args.clients} clients x {args.rounds} calls\n")

        rows = {"llama.cpp direct (in-process)": direct(export, prompts, args)}
        answers = {}
        for engine, label in (("llamacpp", "llama.cpp over HTTP"), ("transformers", "transformers over HTTP")):
            with server(data, engine) as url:
                rows[label], answers[engine] = over_http(Client(url, token), job.model_id, prompts, args)
    report(rows, answers, prompts, args)


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


def direct(export, prompts, args) -> tuple[float, float]:
    """llama.cpp in this process, as the web process runs it: one model, every call on one thread (this one:
    calls from several threads slow ggml's OpenMP decoding down, see inference_app.engines), LoRA per call."""
    from tuna_llm.serving.llamacpp import LlamaCall, LlamaCppModel

    base, lora = gguf_paths(export)
    model = LlamaCppModel(base)

    def call(messages) -> int:
        return model.chat(LlamaCall(messages=messages, max_tokens=args.tokens, lora=lora)).completion_tokens

    call(prompts[0])  # warm-up: adapter loaded, caches filled
    single = timed(lambda: [call(messages) for messages in prompts])
    concurrent = timed(lambda: run_for_clients(args, lambda i: call(prompts[i % len(prompts)])))
    return single, concurrent


def run_for_clients(args, call) -> list[int]:
    """--clients threads hand their calls (--rounds each) to this thread, which runs them one at a time."""
    calls: queue.Queue = queue.Queue()

    def client(number: int) -> int:
        tokens = 0
        for round_ in range(args.rounds):
            answer: Future = Future()
            calls.put((number + round_ * args.clients, answer))
            tokens += answer.result()
        return tokens

    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        clients = [pool.submit(client, number) for number in range(args.clients)]
        for _ in range(args.clients * args.rounds):
            index, answer = calls.get()
            answer.set_result(call(index))
        return [c.result() for c in clients]


def over_http(client: Client, model: str, prompts, args) -> tuple[tuple[float, float], list[str]]:
    answers: list[str] = []

    def call(messages) -> int:
        response = client.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": args.tokens})
        response.raise_for_status()
        body = response.json()
        answers.append(body["choices"][0]["message"]["content"])
        return body["usage"]["completion_tokens"]

    engine = client.post("/api/inference", json={"model_id": model, "prompt": "Hi", "max_tokens": 4}).json()["engine"]  # warm-up
    print(f"server answers with engine {engine!r}")
    single = timed(lambda: [call(messages) for messages in prompts])
    greedy = list(answers)
    concurrent = timed(lambda: concurrently(args, lambda i: call(prompts[i % len(prompts)])))
    return (single, concurrent), greedy


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


def report(rows: dict[str, tuple[float, float]], answers: dict[str, list[str]], prompts, args) -> None:
    from tuna_llm import metrics

    clients = f"{args.clients} clients"
    print(f"\n{'tokens/s':<32}{'single stream':>14}{clients:>14}")
    for label, (single, concurrent) in rows.items():
        print(f"{label:<32}{single:>14.1f}{concurrent:>14.1f}")
    direct_single = rows["llama.cpp direct (in-process)"][0]
    http_single = rows["llama.cpp over HTTP"][0]
    torch_single = rows["transformers over HTTP"][0]
    print(f"\nllama.cpp over HTTP / direct, single stream: {http_single / direct_single:.2f} (goal >= 0.8)")
    print(f"llama.cpp / transformers over HTTP, single stream: {http_single / torch_single:.1f}x")
    pairs = list(zip(answers["transformers"], answers["llamacpp"], strict=True))
    same = sum(metrics.normalise(a) == metrics.normalise(b) for a, b in pairs)
    print(f"greedy answers equal (transformers vs llama.cpp over HTTP): {same}/{len(prompts)}")
    for index, (torch_answer, llama_answer) in enumerate(pairs):
        if metrics.normalise(torch_answer) != metrics.normalise(llama_answer):
            print(f"  prompt {index}:\n    transformers: {torch_answer!r}\n    llama.cpp:    {llama_answer!r}")


if __name__ == "__main__":
    main()
