"""The two distributions of this repository stay consistent: tokenflow-ops (packaging/tokenflow-ops) holds
tokenflow.ops, tokenflow.kernels and the native extension and needs torch only; the editor (the root
pyproject) holds the rest and pins tokenflow-ops at the version tokenflow.ops reports."""
from __future__ import annotations

import tomllib
from pathlib import Path

import tokenflow.ops as ops

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def test_versions_and_requirements_agree():
    kernels = load(ROOT / "packaging" / "tokenflow-ops" / "pyproject.toml")
    editor = load(ROOT / "pyproject.toml")
    assert kernels["project"]["name"] == "tokenflow-ops"
    assert kernels["project"]["version"] == ops.__version__
    assert kernels["project"]["dependencies"] == ["torch>=2.4"]  # nothing that could move a client's pins
    assert f"tokenflow-ops=={ops.__version__}" in editor["project"]["dependencies"]
    extras = editor["project"]["optional-dependencies"]
    assert extras["triton"] == [f"tokenflow-ops[triton]=={ops.__version__}"]
    assert set(kernels["project"]["optional-dependencies"]) == {"triton", "faiss"}


def test_each_package_belongs_to_one_distribution():
    kernels = load(ROOT / "packaging" / "tokenflow-ops" / "pyproject.toml")["tool"]["setuptools"]
    editor = load(ROOT / "pyproject.toml")["tool"]["setuptools"]
    assert kernels["packages"] == ["tokenflow.ops", "tokenflow.kernels"]
    assert "tokenflow" not in kernels["packages"]  # tokenflow/__init__.py is the editor's: a namespace here
    assert not set(kernels["packages"]) & set(editor["packages"])
    here = ROOT / "packaging" / "tokenflow-ops"
    assert (here / kernels["package-dir"]["tokenflow"]).resolve() == ROOT / "tokenflow"
    assert (here / kernels["package-dir"]["tokenflow.kernels"]).resolve() == ROOT / "kernels"
    # Nothing in tokenflow.ops or the kernels imports the editor's modules (only tokenflow.errors, optionally).
    for py in [*(ROOT / "tokenflow" / "ops").glob("*.py"), *(ROOT / "kernels").glob("*.py")]:
        for line in py.read_text().splitlines():
            words = line.split()
            if words[:1] in (["from"], ["import"]) and len(words) > 1 and words[1].split(".")[0] == "tokenflow":
                module = words[1]
                assert module.startswith(("tokenflow.ops", "tokenflow.kernels")) or \
                    (words[1] == "tokenflow" and words[3:4] == ["_C"]) or module == "tokenflow.errors", (py, line)
