"""Request batching over HTTP: 1 client vs 8 concurrent clients asking for 128 tokens each.

Starts the real web server (runserver --noreload: one process, threads) on a free local port with a
throw-away database, then measures total completion tokens per second. Prints both figures and the
ratio. Goal (inference issue): 8 clients >= 3x one client.

    .venv/bin/python bench/batching.py [--clients 8] [--tokens 128]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from _common import ROOT

PROMPTS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain in detail how bread is made, step by step.",
    "Describe a walk through a busy city market in the morning.",
    "Write a long letter to a friend about a summer holiday.",
    "Explain how a bicycle works, part by part.",
    "Tell a long fairy tale about a clever fox.",
    "Describe the life cycle of a butterfly in detail.",
    "Write a long description of a journey by train across mountains.",
]


def call(url: str, token: str, prompt: str, tokens: int) -> int:
    body = json.dumps({"model_id": "base:smollm2-135m-instruct", "prompt": prompt, "max_tokens": tokens, "temperature": 0}).encode()
    request = urllib.request.Request(
        f"{url}/api/inference", data=body, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())["completion_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "TUNA_DATA_DIR": tmp,
            "TUNA_MODEL_CACHE_DIR": os.environ.get("TUNA_MODEL_CACHE_DIR", str(ROOT / "media" / "models")),
        }
        manage = [sys.executable, str(ROOT / "manage.py")]
        subprocess.run([*manage, "migrate", "-v0"], check=True, env=env)
        token = (
            subprocess.run(
                [
                    *manage,
                    "shell",
                    "-c",
                    "from django.contrib.auth.models import User; from tuna_core.tokens import api_token_create; "
                    "u = User.objects.create_user('bench', password='x'); print(api_token_create(user=u, name='bench')[1])",
                ],
                check=True,
                env=env,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen(
            [*manage, "runserver", "--noreload", f"127.0.0.1:{port}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(120):
                try:
                    urllib.request.urlopen(f"{url}/login/", timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            call(url, token, "Hello", 8)  # loads the model: not part of the measurement
            started = time.perf_counter()
            single = call(url, token, PROMPTS[0], args.tokens)
            single_s = time.perf_counter() - started
            started = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                counts = list(pool.map(lambda p: call(url, token, p, args.tokens), (PROMPTS * 4)[: args.clients]))
            many_s = time.perf_counter() - started
        finally:
            server.terminate()
            server.wait(timeout=30)
    single_tps, many_tps = single / single_s, sum(counts) / many_s
    print(f"1 client: {single} tokens in {single_s:.1f} s = {single_tps:.1f} tokens/s")
    print(f"{args.clients} concurrent clients: {sum(counts)} tokens in {many_s:.1f} s = {many_tps:.1f} tokens/s total")
    print(f"ratio: {many_tps / single_tps:.2f}x (goal >= 3x)")


if __name__ == "__main__":
    main()
