"""Install the pinned llama.cpp: the llama-cpp-python runtime, its GGUF converter scripts, llama-server and llama-quantize.

    python tools/install_llama_cpp.py        (run by `make install` and the Dockerfile)

One source distribution (the version pinned in requirements-llama.txt) gives all of them: it is built into a wheel
(CPU by default, with GGML_NATIVE=OFF: a build tuned to the build machine's CPU can crash on another virtual
machine; set CMAKE_ARGS for a GPU build, e.g. "-DGGML_CUDA=on") that is installed into this environment, and
its vendor/llama.cpp converter scripts (convert_hf_to_gguf.py, convert_lora_to_gguf.py, conversion/,
gguf-py/) are copied to <prefix>/share/llama.cpp-converter-<version>, where tuna_llm.gguf finds them. The same
vendor/llama.cpp is built with CMake (static libraries, the same CMAKE_ARGS, no web UI download, no HTTPS) into
llama-server and llama-quantize, installed into <prefix>/bin/ where tuna_llm.llama_tools finds them.
Does nothing when that version is already installed.

The source distribution, the built wheel and the two programs are kept outside the environment, in
$TUNA_BUILD_CACHE (default ~/.cache/llm-tuna)/llama-cpp-python/: the wheel under wheels/ in a folder named by
the version, the Python tag, the platform and a hash of CMAKE_ARGS, the programs under tools/ in a folder named
by the version, the platform and that hash, so a new environment on the same machine (a fresh clone, `make
clean`) installs them without building again. A machine without that cache builds from the pinned source. All
are moved into the cache whole (built in a temporary folder beside it, then renamed), so an interrupted
download or build leaves nothing behind; delete the folder to force a build.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
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
PROGRAMS = ("llama-server", "llama-quantize")
# What the programs' CMake build always gets, before CMAKE_ARGS: one static binary each (no libllama.so beside it
# to find), no web UI fetched from the network (the server's API is what we use), no HTTPS client, no tests.
PROGRAM_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)
INSTALLED_KEY = "programs-key"  # in the converter folder: the cache key of the programs installed in <prefix>/bin
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


def programs_key(version: str, flags: str) -> str:
    """The cache folder of llama-server + llama-quantize: the version, the platform and the CMake flags."""
    platform = re.sub(r"[^A-Za-z0-9]+", "_", sysconfig.get_platform())
    digest = hashlib.sha256(" ".join((*PROGRAM_CMAKE_ARGS, flags.strip())).encode()).hexdigest()[:12]
    return f"{version}-{platform}-{digest}"


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


def cached_programs(version: str, sdist: Path, cache: Path, flags: str) -> Path:
    """llama-server and llama-quantize built from the sdist's vendor/llama.cpp with `flags`, once per key."""
    folder = cache / "tools" / programs_key(version, flags)
    if all((folder / "bin" / name).is_file() for name in PROGRAMS):
        print(f"llama.cpp {version}: using llama-server and llama-quantize built before, {folder}", flush=True)
        return folder
    print(f"Building llama-server and llama-quantize {version} (a few minutes, once per machine) ...", flush=True)
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    staged = _staging(folder)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="llama-programs-", dir=staged) as work:
            source = extract_vendor(sdist, Path(work) / "src")
            build = Path(work) / "build"
            configure = ["cmake", "-S", str(source), "-B", str(build), *PROGRAM_CMAKE_ARGS, *shlex.split(flags)]
            _run_logged(configure, Path(work) / "configure.log")
            compile_ = ["cmake", "--build", str(build), "--target", *PROGRAMS, "-j", jobs]
            _run_logged(compile_, Path(work) / "build.log")
            (staged / "bin").mkdir()
            for name in PROGRAMS:
                shutil.copy2(build / "bin" / name, staged / "bin" / name)
        (staged / "CMAKE_ARGS").write_text(" ".join((*PROGRAM_CMAKE_ARGS, flags)) + "\n", encoding="utf-8")
        _publish(staged, folder)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    print(f"llama-server and llama-quantize built in {time.monotonic() - started:.0f} s", flush=True)
    return folder


def _run_logged(command: list[str], log: Path) -> None:
    """Run a build step with its output in `log`; on failure print the log's end (the compiler's error) and stop."""
    with log.open("w", encoding="utf-8") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"{shlex.join(command[:3])} ... failed (exit {result.returncode}); is cmake and a C++ compiler installed?")


def extract_vendor(sdist: Path, target: Path) -> Path:
    """The sdist's vendor/llama.cpp source tree, extracted into `target`."""
    with tarfile.open(sdist) as archive:
        prefix = f"{archive.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
        archive.extractall(target, members=[m for m in archive.getmembers() if m.name.startswith(prefix)], filter="data")
    return target / prefix


def install_programs(built: Path, key: str, marker: Path) -> None:
    """Copy the built programs into <prefix>/bin (each under a temporary name, then renamed) and record the key."""
    bin_dir = Path(sys.prefix) / "bin"
    for name in PROGRAMS:
        partial = bin_dir / f".{name}.{os.getpid()}.partial"
        shutil.copy2(built / "bin" / name, partial)
        partial.chmod(0o755)
        os.replace(partial, bin_dir / name)
    marker.write_text(key + "\n", encoding="utf-8")


def programs_installed(marker: Path, key: str) -> bool:
    bin_dir = Path(sys.prefix) / "bin"
    recorded = marker.read_text(encoding="utf-8").strip() if marker.is_file() else ""
    return recorded == key and all((bin_dir / name).is_file() for name in PROGRAMS)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated run still removes its temporary folders
    version = pinned_version()
    target = converter_target(version)
    flags = cmake_args()
    key = programs_key(version, flags)
    marker = target / INSTALLED_KEY
    runtime_done = installed_version() == version and (target / "convert_hf_to_gguf.py").is_file()
    if runtime_done and programs_installed(marker, key):
        print(f"llama.cpp {version} (llama-cpp-python), its converter, llama-server and llama-quantize are installed")
        return
    cache = cache_root()
    sdist = cached_sdist(version, cache)
    if not runtime_done:
        wheel = cached_wheel(version, sdist, cache, flags)
        subprocess.run([*PIP, "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel)], check=True)
        extract_converter(sdist, target)
    install_programs(cached_programs(version, sdist, cache, flags), key, marker)
    print(f"llama.cpp {version} installed; converter in {target}; llama-server and llama-quantize in {Path(sys.prefix) / 'bin'}")


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
