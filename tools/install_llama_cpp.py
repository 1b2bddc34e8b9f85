"""Install the pinned llama.cpp: the llama-cpp-python runtime and its own GGUF converter scripts.

    python tools/install_llama_cpp.py        (run by `make install` and the Dockerfile)

One source distribution (the version pinned in requirements-llama.txt) gives both: it is built into a wheel
(CPU by default, with GGML_NATIVE=OFF: a build tuned to the build machine's CPU can crash on another virtual
machine; set CMAKE_ARGS for a GPU build, e.g. "-DGGML_CUDA=on") that is installed into this environment, and
its vendor/llama.cpp converter scripts (convert_hf_to_gguf.py, convert_lora_to_gguf.py, conversion/,
gguf-py/) are copied to <prefix>/share/llama.cpp-converter-<version>, where tuna_llm.gguf finds them.
Does nothing when that version is already installed.

The source distribution and the built wheel are kept outside the environment, in
$TUNA_BUILD_CACHE (default ~/.cache/llm-tuna)/llama-cpp-python/: the wheel under a folder named by the
version, the Python tag, the platform and a hash of CMAKE_ARGS, so a new environment on the same machine
(a fresh clone, `make clean`) installs it without building again. A machine without that cache builds
from the pinned source. Both are moved into the cache whole (built in a temporary folder beside it, then
renamed), so an interrupted download or build leaves nothing behind; delete the folder to force a build.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py", "LICENSE")
DEFAULT_CMAKE_ARGS = "-DGGML_NATIVE=OFF"
PIP = (sys.executable, "-m", "pip")


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


def cmake_args() -> str:
    return os.environ.get("CMAKE_ARGS", DEFAULT_CMAKE_ARGS)


def cache_root() -> Path:
    base = os.environ.get("TUNA_BUILD_CACHE") or Path.home() / ".cache" / "llm-tuna"
    return Path(base) / "llama-cpp-python"


def wheel_key(version: str, flags: str) -> str:
    """The cache folder of one build: what changes the binary (version, interpreter, platform, CMake flags)."""
    python = sys.implementation.cache_tag or f"py{sys.version_info.major}{sys.version_info.minor}"
    platform = re.sub(r"[^A-Za-z0-9]+", "_", sysconfig.get_platform())
    digest = hashlib.sha256(flags.strip().encode()).hexdigest()[:12]
    return f"{version}-{python}-{platform}-{digest}"


def _staging(final: Path) -> Path:
    """A temporary folder beside `final`, after removing those a killed run left there (a day old or more)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}-*"):
        if time.time() - stale.stat().st_mtime > 86400:
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))


def _publish(staged: Path, final: Path) -> Path:
    """Move a finished folder into the cache in one rename; if another build got there first, keep theirs."""
    staged.chmod(0o755)  # mkdtemp's folder is private
    try:
        staged.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(staged, ignore_errors=True)
    return final


def cached_sdist(version: str, cache: Path) -> Path:
    """The pinned source distribution, downloaded once into the cache."""
    folder = cache / "sdist" / version
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz")) if folder.is_dir() else []
    if found:
        return found[0]
    print(f"Downloading the source of llama-cpp-python {version} ...", flush=True)
    staged = _staging(folder)
    try:
        pin = f"llama-cpp-python=={version}"
        subprocess.run([*PIP, "download", "--quiet", "--no-deps", "--no-binary", ":all:", pin, "-d", str(staged)], check=True)
        next(staged.glob("llama_cpp_python-*.tar.gz"))  # StopIteration: pip gave no source distribution
        _publish(staged, folder)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return next(folder.glob("llama_cpp_python-*.tar.gz"))


def cached_wheel(version: str, sdist: Path, cache: Path, flags: str) -> Path:
    """The wheel built from `sdist` with `flags`, built once per key into the cache."""
    folder = cache / "wheels" / wheel_key(version, flags)
    found = sorted(folder.glob("llama_cpp_python-*.whl")) if folder.is_dir() else []
    if found:
        print(f"llama.cpp {version}: using the wheel built before, {found[0]}", flush=True)
        return found[0]
    print(f"Building llama.cpp {version} (a few minutes, once per machine; CMAKE_ARGS={flags!r}) ...", flush=True)
    env = {
        **os.environ,
        "CMAKE_ARGS": flags,
        "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2)),
    }
    staged = _staging(folder)
    try:
        subprocess.run([*PIP, "wheel", "--quiet", "--no-deps", str(sdist), "-w", str(staged)], check=True, env=env)
        next(staged.glob("llama_cpp_python-*.whl"))  # StopIteration: pip built no wheel
        (staged / "CMAKE_ARGS").write_text(flags + "\n", encoding="utf-8")
        _publish(staged, folder)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return next(folder.glob("llama_cpp_python-*.whl"))


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated run still removes its temporary folders
    version = pinned_version()
    target = converter_target(version)
    if installed_version() == version and (target / "convert_hf_to_gguf.py").is_file():
        print(f"llama.cpp {version} (llama-cpp-python) and its converter are installed")
        return
    cache = cache_root()
    sdist = cached_sdist(version, cache)
    wheel = cached_wheel(version, sdist, cache, cmake_args())
    subprocess.run([*PIP, "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel)], check=True)
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
