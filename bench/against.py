"""One bench, this tree against an earlier revision, side by side in one run.

    .venv/bin/python bench/against.py 25ea121 generation.py --tokens 64 --rounds 3
    .venv/bin/python bench/against.py 25ea121 --repeat 2 evaluation.py --steps 12 --examples 16

Checks the revision out into a temporary git worktree, then runs ``bench/<script>`` with the same arguments in
both trees, alternating (revision, this tree, revision, ...: --repeat rounds; the machine's speed drifts over
minutes, so one after the other is not comparable), with this Python and a shared model cache
(TUNA_MODEL_CACHE_DIR, TUNA_GGUF_DIR), and prints each run's output under its label, then the lines that
differ between the last run of each. The benches' own tables stay the measurement; this only pairs them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tree: Path, script: str, args: list[str], env: dict[str, str]) -> tuple[str, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(tree / "bench" / script), *args], cwd=tree, env=env, capture_output=True, text=True, check=False
    )
    output = done.stdout + (f"\n[exit {done.returncode}]\n{done.stderr[-2000:]}" if done.returncode else "")
    return output, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revision", help="the git revision to compare with (e.g. 25ea121)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; each round runs the revision, then this tree")
    parser.add_argument("script", help="a bench script in bench/ (e.g. generation.py)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the bench's own arguments")
    options = parser.parse_args()
    env = {
        **os.environ,
        "TUNA_MODEL_CACHE_DIR": os.environ.get("TUNA_MODEL_CACHE_DIR", str(ROOT / "media" / "models")),
        "TUNA_GGUF_DIR": os.environ.get("TUNA_GGUF_DIR", str(ROOT / "media" / "gguf")),
    }
    with tempfile.TemporaryDirectory(prefix="tuna-against-") as tmp:
        other = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(other), options.revision], check=True)
        try:
            last: dict[str, str] = {}
            for round_ in range(1, options.repeat + 1):
                for label, tree in ((options.revision, other), ("this tree", ROOT)):
                    output, seconds = run(tree, options.script, options.args, env)
                    last[label] = output
                    print(f"===== round {round_}, {label}: bench/{options.script} {' '.join(options.args)} ({seconds:.0f} s)", flush=True)
                    print(output.rstrip(), flush=True)
            mine, theirs = last["this tree"].splitlines(), last[options.revision].splitlines()
            print(f"===== lines of the last round that differ ({options.revision} | this tree)")
            for a, b in zip(theirs, mine, strict=False):
                if a != b:
                    print(f"  {a}\n| {b}")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False)


if __name__ == "__main__":
    main()
