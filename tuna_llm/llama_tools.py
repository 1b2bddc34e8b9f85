"""llama.cpp's own programs (llama-server, llama-quantize), built from the pinned llama.cpp source by `make install`
(tools/install_llama_cpp.py) into the environment's bin/. Django-free."""

from __future__ import annotations

import sys
from pathlib import Path

from tuna_llm.settings import current

SERVER = "llama-server"
QUANTIZE = "llama-quantize"


class LlamaToolMissing(RuntimeError):
    """A llama.cpp program is not installed; the message says how to install it."""


def binary(name: str) -> Path:
    """The path of one of llama.cpp's programs (TUNA_LLAMA_SERVER_BIN overrides llama-server's)."""
    configured = current().llama_server_bin if name == SERVER else ""
    path = Path(configured) if configured else Path(sys.prefix) / "bin" / name
    if not path.is_file():
        raise LlamaToolMissing(
            f"{name} is not installed ({path}): run `make install`, which builds it from the pinned llama.cpp source"
            + (" (or set TUNA_LLAMA_SERVER_BIN)." if name == SERVER else ".")
        )
    return path
