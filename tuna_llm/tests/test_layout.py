"""The layout shows the architecture: the model package is Django-free and holds every ML import."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "tuna_llm"
ML = {"torch", "transformers", "peft", "accelerate", "llama_cpp", "trl"}
APPS = ("tuna_site", "datasets_app", "training_app", "evaluation_app", "inference_app")


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def package_modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "tests" not in p.relative_to(PACKAGE).parts]


@pytest.mark.process
def test_it_keeps_django_out_of_the_model_package():
    offenders = {p.name: sorted(imported_roots(p) & ({"django", "rest_framework", "django_q"} | set(APPS))) for p in package_modules()}
    assert {name: bad for name, bad in offenders.items() if bad} == {}
    # And at run time: importing every module pulls in no Django, even indirectly.
    names = [f"tuna_llm.{p.relative_to(PACKAGE).with_suffix('').as_posix().replace('/', '.')}" for p in package_modules()]
    code = (
        f"import importlib, sys\nfor n in {names!r}: importlib.import_module(n.removesuffix('.__init__'))\nprint('django' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_it_keeps_every_ml_import_in_the_model_package():
    outside = [p for app in APPS for p in (ROOT / app).rglob("*.py") if "tests" not in p.parts and "migrations" not in p.parts]
    offenders = {str(p.relative_to(ROOT)): sorted(imported_roots(p) & ML) for p in outside}
    assert {name: bad for name, bad in offenders.items() if bad} == {}
