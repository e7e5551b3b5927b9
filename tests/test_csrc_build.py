"""The native half builds and is wired up: tokenflow._C imports and describes itself, the backends
register, the CUDA source compiles with nvcc (compile only: CI has no GPU, but the .cu must not rot),
and a CPU-only CMake build (TOKENFLOW_CUDA=off) works and says why CUDA is absent."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    return None


def test_extension_imports_and_reports_build_info():
    from tokenflow import _C

    info = _C.build_info()
    assert {"version", "compiler", "openmp", "cpu_isas_built", "cpu_isa", "cuda", "cuda_archs",
            "cuda_absent_reason"} <= set(info)
    assert info["cpu_isa"] in info["cpu_isas_built"].split(",")
    assert "generic" in info["cpu_isas_built"]
    assert info["cuda"] == _C.has_cuda()
    if info["cuda"]:
        assert "80" in info["cuda_archs"] and "90" in info["cuda_archs"]
        assert isinstance(_C.cuda_runtime_status(), str)
    else:
        assert info["cuda_absent_reason"], "a build without CUDA must say why"


def test_backends_register_or_say_why():
    from tokenflow import _C
    from tokenflow.ops import backends

    assert "cpu" in backends.available(), backends.why_unavailable("cpu")
    if not _C.has_cuda():
        assert "without its CUDA kernels" in backends.why_unavailable("cuda")
    elif torch.cuda.is_available():
        assert "cuda" in backends.available(), backends.why_unavailable("cuda")
    else:  # built, but nothing here can run it: not listed, and the reason says so
        assert "cuda" not in backends.available()
        assert backends.why_unavailable("cuda") == "PyTorch sees no CUDA device"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_cuda_source_compiles(arch, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin")
    # The header CMake would generate (configure_file of csrc/build_config.h.in).
    (tmp_path / "tf_build_config.h").write_text(f'#pragma once\n#define TF_CUDA_ARCHS "{arch}"\n')
    cmd = [nvcc, "-c", "-std=c++17", "-O3", f"-arch={arch}", "-Werror", "all-warnings", "-Xptxas", "-v",
           f"-I{CSRC}", f"-I{tmp_path}", str(CSRC / "propagate_cuda.cu"), "-o", str(tmp_path / "propagate_cuda.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "propagate_cuda.o").stat().st_size > 0
    # Every kernel fits its registers (ptxas -v): no stack frame, no spills.
    report = proc.stdout + proc.stderr
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(frames) >= 4 and all(f == ("0", "0", "0") for f in frames), report
    # The search runs on tensor cores: WMMA in the PTX for both feature dtypes (f16 and bf16 inputs).
    ptx = tmp_path / "propagate_cuda.ptx"
    cmd = [nvcc, "-ptx", "-std=c++17", "-O3", f"-arch={arch}", f"-I{CSRC}", f"-I{tmp_path}",
           str(CSRC / "propagate_cuda.cu"), "-o", str(ptx)]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    mma = set(re.findall(r"wmma\.mma\.sync\.aligned\.row\.col\.m16n16k16\.f32\.(\w+)", ptx.read_text()))
    assert {"bf16", "f32"} <= mma, mma  # .f32.bf16.bf16.f32 (bf16 inputs) and .f32.f32 (f16 inputs)


def test_cpu_only_cmake_build(tmp_path):
    # What `pip install` does with TOKENFLOW_CUDA=off (or after a failed CUDA build), from a clean tree.
    cmake = shutil.which("cmake")
    pybind11 = pytest.importorskip("pybind11")
    if cmake is None:
        pytest.skip("cmake not on PATH")
    out = tmp_path / "out"
    gen = ["-GNinja"] if shutil.which("ninja") else []
    configure = [cmake, f"-S{ROOT}", f"-B{tmp_path / 'build'}", *gen, "-DTOKENFLOW_CUDA=off",
                 f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                 f"-DTOKENFLOW_OUTPUT_DIR={out}"]
    for cmd in (configure, [cmake, "--build", str(tmp_path / "build")]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    built = list(out.glob("_C*"))
    assert len(built) == 1, built
    spec = importlib.util.spec_from_file_location("_C", built[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    info = mod.build_info()
    assert info["cuda"] is False and not mod.has_cuda()
    assert "TOKENFLOW_CUDA=off" in info["cuda_absent_reason"]


def test_bad_cuda_mode_is_refused(tmp_path):
    cmake = shutil.which("cmake")
    pybind11 = pytest.importorskip("pybind11")
    if cmake is None:
        pytest.skip("cmake not on PATH")
    proc = subprocess.run([cmake, f"-S{ROOT}", f"-B{tmp_path}", "-DTOKENFLOW_CUDA=maybe",
                           f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "TOKENFLOW_CUDA must be auto, on or off" in proc.stderr
