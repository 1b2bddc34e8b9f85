"""schemathesis against the running server's own OpenAPI schema, authenticated."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

# Generation endpoints run the model on every fuzzed input (up to 2,048 tokens each): they are
# covered by their own tests; the fuzzing here covers every other operation.
EXCLUDED = r"^/(v1/(chat/)?completions|api/inference)$"


def test_it_finds_no_server_error_and_no_schema_violation(live_site):
    schemathesis = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [
            str(schemathesis),
            "run",
            f"{live_site.url}/api/schema",
            "-H",
            f"Authorization: Bearer {live_site.tokens['alice']}",
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
            "--exclude-path-regex",
            EXCLUDED,
            "--max-examples",
            "25",
            "--generation-deterministic",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
