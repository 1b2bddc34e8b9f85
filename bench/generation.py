"""Generation speed, side by side in one run: each precision and scheduling of the transformers engine,
plain transformers ``generate`` as the reference, and llama.cpp when the base model's GGUF is there.

The embedded base model, greedy, --tokens new tokens per answer, prompts that ask for long answers. For the
transformers engine (tuna_llm.serving.batching, in this process, as the web process runs it):

- 1 stream: --rounds requests one after another, each alone; tokens/s = completion tokens / wall time, the
  median of the rounds; the rounds alternate between all the runs of the table (the machine's speed drifts
  over minutes, so runs measured one after another are not comparable);
- 8 at once: 8 requests submitted together; aggregate tokens/s;
- 8 clients 0.5 s apart: client i sends at i x 0.5 s; time to first token (TTFT: from sending to the first
  text) and latency (sending to the last token), p50 and p95 over the 8 clients.

"continuous" is the engine as it is: a request joins the running batch at the next step, and on CPU the linear
layers are oneDNN's (tuna_llm.serving.packing), "unpacked" without the weights packed for it beside the packed
default. Plain ``generate`` runs single-stream only; the single-stream goal is measured against "plain generate,
fp32". (The "static" runs, the engine as it was before issue 16, are gone with the code that kept that engine;
their figures are in docs/performance.md.)

    .venv/bin/python bench/generation.py [--tokens 128] [--rounds 5] [--precisions fp32,bf16]

llama.cpp: llama-server (as the product serves GGUFs) on the f16 GGUF of the base model in TUNA_GGUF_DIR
(default media/gguf; bench/serving.py or any export makes it), single stream; skipped when it is not there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from functools import partial

from _common import ROOT, setup_django

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a bicycle works, part by part.",
    "Describe a walk through a busy market in a city you love.",
    "Write a letter to a friend about your first week at a new job.",
    "Explain the water cycle to a ten-year-old, with examples.",
    "Describe how to bake bread at home, step by step.",
    "Write a travel guide for a weekend in a mountain village.",
    "Tell the history of the printing press and why it mattered.",
]
CLIENTS, ARRIVAL_GAP_S = 8, 0.5


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))]


def chat_text(tokenizer, i: int) -> str:
    from tuna_llm.prompting import render_chat

    return render_chat(tokenizer, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], add_generation_prompt=True)


class EngineRun:
    """The transformers engine over one loaded model: single-stream requests, 8 at once, 8 clients 0.5 s apart."""

    def __init__(self, loaded, *, tokens: int) -> None:
        from tuna_llm.serving.batching import BatchingEngine

        self.engine = BatchingEngine(loaded)
        self.texts = [chat_text(loaded.tokenizer, i) for i in range(len(PROMPTS))]
        self.tokens = tokens

    def request(self, i: int):
        from tuna_llm.serving.batching import GenerationRequest

        return GenerationRequest(text=self.texts[i % len(self.texts)], max_new_tokens=self.tokens)

    def single(self, i: int) -> float:
        """One request alone: its completion tokens / its wall time."""
        started = time.perf_counter()
        done = self.engine.generate(self.request(i)).completion_tokens
        return done / (time.perf_counter() - started)

    def together(self) -> dict:
        engine = self.engine
        batch = [self.request(i) for i in range(CLIENTS)]
        started = time.perf_counter()
        engine.submit_all(batch)
        for r in batch:
            r.done.wait()
        aggregate = sum(r.result.completion_tokens for r in batch) / (time.perf_counter() - started)
        ttft, latency = [0.0] * CLIENTS, [0.0] * CLIENTS

        def client(i: int, start: float) -> None:
            time.sleep(max(0.0, start + i * ARRIVAL_GAP_S - time.perf_counter()))
            sent = time.perf_counter()
            first = None
            for _ in engine.stream(engine.submit(self.request(i))):
                if first is None:
                    first = time.perf_counter()
            ttft[i], latency[i] = (first or time.perf_counter()) - sent, time.perf_counter() - sent

        start = time.perf_counter() + 0.1
        threads = [threading.Thread(target=client, args=(i, start)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {
            "aggregate": aggregate,
            "ttft_p50": percentile(ttft, 0.5),
            "ttft_p95": percentile(ttft, 0.95),
            "lat_p50": percentile(latency, 0.5),
            "lat_p95": percentile(latency, 0.95),
        }


class PlainRun:
    """Plain transformers ``generate`` on a model loaded the plain way (single stream only)."""

    def __init__(self, loaded, *, tokens: int) -> None:
        self.loaded, self.tokens = loaded, tokens

    def single(self, i: int) -> float:
        import torch

        tok = self.loaded.tokenizer
        ids = tok(chat_text(tok, i), return_tensors="pt")
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.loaded.model.generate(**ids, max_new_tokens=self.tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        return (out.shape[1] - ids["input_ids"].shape[1]) / (time.perf_counter() - started)


def llama_cpp(tokens: int, rounds: int) -> float | None:
    """llama-server (the engine the product serves GGUFs with) on the base GGUF, one request at a time."""
    from pathlib import Path

    from django.conf import settings

    from tuna_llm.serving.engine import CallSpec, result_of
    from tuna_llm.serving.llama_server import launched

    path = Path(settings.TUNA_GGUF_DIR) / settings.TUNA_DEFAULT_BASE_MODEL / "base-f16.gguf"
    try:
        with launched(path, parallel=1) as engine:

            def one(i: int) -> int:
                spec = CallSpec(messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens=tokens)
                return result_of(engine.submit(engine.prepare(spec))).completion_tokens

            one(0)
            done, started = 0, time.perf_counter()
            for i in range(rounds):
                done += one(i)
            return done / (time.perf_counter() - started)
    except Exception as exc:  # not converted yet, or llama-server not installed
        print(f"llama.cpp: skipped ({path}: {exc})")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="single-stream requests per run (alternated between the runs)")
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    os.environ.setdefault("TUNA_MODEL_CACHE_DIR", str(ROOT / "media" / "models"))
    os.environ.setdefault("TUNA_GGUF_DIR", str(ROOT / "media" / "gguf"))
    setup_django()
    from tuna_llm.catalog import get_base_model_spec
    from tuna_llm.loading import deployment_precision, load_tokenizer_and_model, pick_device
    from tuna_llm.serving.packing import applies as can_pack
    from tuna_llm.serving.registry import LoadedBaseModel, load_for_serving

    print(f"deployment precision (TUNA_PRECISION): {deployment_precision()}")
    print(f"{args.tokens} new tokens, greedy; {CLIENTS} clients {ARRIVAL_GAP_S} s apart for TTFT and latency")
    print(f"{'engine':<34} {'1 stream':>9} {'8 at once':>10} {'TTFT p50':>9} {'TTFT p95':>9} {'lat p50':>8} {'lat p95':>8}")
    from tuna_llm.serving.compute import compute_thread

    spec = get_base_model_spec()
    # Every torch call on the one compute thread, as in the web process (see tuna_llm.serving.compute).
    on = compute_thread.call
    runs: dict[str, PlainRun | EngineRun] = {}
    for precision in args.precisions.split(","):
        plan = pick_device(precision)
        plain = LoadedBaseModel(spec, plan, *on(partial(load_tokenizer_and_model, spec, plan)))
        runs[f"plain generate, {precision}"] = PlainRun(plain, tokens=args.tokens)
        # The engine as it is (continuous, oneDNN serving layers on CPU: unpacked and packed weights).
        for pack in (False, True) if can_pack(plan) else (True,):
            loaded = on(partial(load_for_serving, spec, plan, pack=pack))  # as the registry loads it
            runs[f"engine, {precision}, continuous" + ("" if pack else ", unpacked")] = EngineRun(loaded, tokens=args.tokens)
    # Single stream: the rounds alternate between the runs (this machine's speed drifts by 10-20% over minutes;
    # alternating puts every run under the same drift), after one warm-up request each. The median is shown.
    singles: dict[str, list[float]] = {name: [] for name in runs}

    def one(run, i: int) -> float:  # plain generate on the compute thread; an engine's request waits for it there
        return on(partial(run.single, i)) if isinstance(run, PlainRun) else run.single(i)

    for run in runs.values():
        one(run, 0)
    for i in range(args.rounds):
        for name, run in runs.items():
            singles[name].append(one(run, i))
    single = {name: statistics.median(values) for name, values in singles.items()}
    results = {}
    for name, run in runs.items():
        row = f"{name:<34} {single[name]:>7.1f}/s"
        if isinstance(run, EngineRun):
            r = results[name] = run.together() | {"single": single[name]}
            row += f" {r['aggregate']:>8.1f}/s {r['ttft_p50']:>8.2f}s {r['ttft_p95']:>8.2f}s {r['lat_p50']:>7.2f}s {r['lat_p95']:>7.2f}s"
        print(f"{row}   rounds: {', '.join(f'{v:.1f}' for v in singles[name])}", flush=True)
    plain_speeds = {name.removeprefix("plain generate, "): single[name] for name in runs if name.startswith("plain")}
    llama = llama_cpp(args.tokens, args.rounds)
    if llama is not None:
        print(f"{'llama.cpp, f16 GGUF':<34} {llama:>7.1f}/s")
    best = results.get(f"engine, {pick_device().precision}, continuous")
    unpacked = results.get(f"engine, {pick_device().precision}, continuous, unpacked")
    if best and unpacked:
        print(
            f"packed weights against unpacked (same precision, continuous): single stream {best['single'] / unpacked['single']:.2f}x, 8 at once {best['aggregate'] / unpacked['aggregate']:.2f}x"
        )
    if best and "fp32" in plain_speeds:
        print(
            f"deployment default vs plain generate, fp32 (how one stream was decoded before issue 16): single stream {best['single'] / plain_speeds['fp32']:.2f}x (goal >= 1.4x)"
        )


if __name__ == "__main__":
    main()
