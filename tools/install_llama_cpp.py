"""Install the pinned llama.cpp: the llama-cpp-python runtime and its own GGUF converter scripts.

    python tools/install_llama_cpp.py        (run by `make install` and the Dockerfile)

One source distribution (the version pinned in requirements-llama.txt) gives both: it is built into this
environment (CPU by default, with GGML_NATIVE=OFF: a build tuned to the build machine's CPU can crash on
another virtual machine; set CMAKE_ARGS for a GPU build, e.g. "-DGGML_CUDA=on"), and its
vendor/llama.cpp converter scripts (convert_hf_to_gguf.py, convert_lora_to_gguf.py, conversion/,
gguf-py/) are copied to <prefix>/share/llama.cpp-converter-<version>, where tuna_llm.gguf finds them.
Does nothing when that version is already installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py", "LICENSE")


def pinned_version() -> str:
    text = (ROOT / "requirements-llama.txt").read_text(encoding="utf-8")
    return re.search(r"^llama-cpp-python==(\S+)", text, re.MULTILINE).group(1)


def converter_target(version: str) -> Path:
    return Path(sys.prefix) / "share" / f"llama.cpp-converter-{version}"


def installed_version() -> str | None:
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return None


def main() -> None:
    version = pinned_version()
    target = converter_target(version)
    if installed_version() == version and (target / "convert_hf_to_gguf.py").is_file():
        print(f"llama.cpp {version} (llama-cpp-python) and its converter are installed")
        return
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory() as tmp:
        print(f"Downloading the source of llama-cpp-python {version} ...", flush=True)
        subprocess.run(
            [*pip, "download", "--quiet", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", tmp], check=True
        )
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        print(f"Building llama.cpp {version} (a few minutes, once) ...", flush=True)
        env = {
            **os.environ,
            "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=OFF"),
            "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2)),
        }
        subprocess.run([*pip, "install", "--quiet", "--no-deps", str(sdist)], check=True, env=env)
        extract_converter(sdist, target)
    print(f"llama.cpp {version} installed; converter in {target}")


def extract_converter(sdist: Path, target: Path) -> None:
    """Copy the converter scripts out of the source distribution, whole or not at all."""
    with tempfile.TemporaryDirectory(dir=target.parent if target.parent.exists() else None) as tmp, tarfile.open(sdist) as archive:
        prefix = f"{archive.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
        members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.name[len(prefix) :].split("/")[0] in CONVERTER_FILES]
        archive.extractall(tmp, members=members, filter="data")
        staged = Path(tmp) / prefix
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staged), str(target))


if __name__ == "__main__":
    main()
