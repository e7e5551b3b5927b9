"""Build driver of tokenflow-ops: the kernels package plus the native extension tokenflow._C from the
repository's csrc/ (CMakeLists.txt at the repository root, two folders up).

build_ext runs CMake (with ninja when it is there) instead of setuptools' own compiler calls. The
extension is optional in the sense that matters to users: if it cannot be built (pybind11 or CMake
missing, as with `pip install --no-build-isolation` in an environment without them, no C++ compiler, a
broken toolchain) the package still installs, one line says why, the reason is kept next to the package
(`tokenflow/_C_not_built.txt`) for `tokenflow.ops.backends.why_unavailable("cpu")`, and the `cpu` /
`cuda` backends report themselves unavailable while the others work. TOKENFLOW_CUDA=auto|on|off picks
the CUDA half (docs/build.md); with `auto` a failed CUDA build falls back to a CPU-only extension.

Environment: TOKENFLOW_CUDA (auto), TOKENFLOW_CUDA_ARCHS (CMake's CMAKE_CUDA_ARCHITECTURES, default
"80-real;90-real;90-virtual"), TOKENFLOW_BUILD_TYPE (Release), CMAKE_BUILD_PARALLEL_LEVEL (ninja's default).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parents[2]  # the repository: CMakeLists.txt, csrc/
NOT_BUILT = "_C_not_built.txt"  # beside the module; tokenflow/ops/native.py reads it
CUDA_MODES = ("auto", "on", "off")


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])  # sources are CMake's business


def _find_tool(name: str) -> str | None:
    """A build tool from PATH, else from its PyPI package (build isolation installs `cmake` / `ninja`)."""
    found = shutil.which(name)
    if found:
        return found
    try:
        if name == "cmake":
            import cmake  # type: ignore

            return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
        if name == "ninja":
            import ninja  # type: ignore

            return str(Path(ninja.BIN_DIR) / "ninja")
    except Exception:
        return None
    return None


def _cuda_compiler() -> str | None:
    """nvcc from CUDACXX, PATH, CUDA_HOME/CUDA_PATH or /usr/local/cuda (CMake alone only searches PATH)."""
    if os.environ.get("CUDACXX"):
        return os.environ["CUDACXX"]
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    return None


def _describe(err: BaseException) -> str:
    if isinstance(err, subprocess.CalledProcessError):  # the command line is long and full of temp paths
        cmd = [Path(str(err.cmd[0])).name, *map(str, err.cmd[1:2])]
        return f"`{' '.join(cmd)}` exited with status {err.returncode}"
    return str(err)


class MissingTool(RuntimeError):
    """A build tool is absent: no point retrying CPU-only."""


def _warn(line: str) -> None:
    print(f"tokenflow-ops: WARNING: {line}", file=sys.stderr, flush=True)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        mode = os.environ.get("TOKENFLOW_CUDA", "auto").strip().lower()
        if mode not in CUDA_MODES:
            raise SystemExit(f"tokenflow-ops: TOKENFLOW_CUDA must be one of {', '.join(CUDA_MODES)}; got {mode!r}")
        # A module left by an earlier build must not pass for this one if this one fails (an in-tree build
        # directory, or the in-place copy of an editable install).
        module = Path(self.get_ext_fullpath(ext.name))
        module.unlink(missing_ok=True)
        note = module.parent / NOT_BUILT
        note.unlink(missing_ok=True)
        try:
            self._cmake_build(ext, mode)
            return
        except (subprocess.CalledProcessError, OSError, RuntimeError) as err:
            first = _describe(err)
            if mode == "on":  # asked for CUDA explicitly: fail loudly rather than install without it
                raise SystemExit(f"tokenflow-ops: building the native extension with TOKENFLOW_CUDA=on failed: {first}")
            if mode == "auto" and not isinstance(err, MissingTool):
                _warn(f"the CUDA build failed ({first}); retrying CPU-only (TOKENFLOW_CUDA=off)")
                try:
                    self._cmake_build(ext, "off", off_reason=f"the CUDA build failed at install time ({first})")
                    return
                except (subprocess.CalledProcessError, OSError, RuntimeError) as second:
                    first = _describe(second)
        reason = f"the native extension tokenflow._C was not built at install time: {first}"
        _warn(f"{reason}; installing without it (the cpu and cuda backends will be unavailable; docs/build.md)")
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text(reason + "\n")

    def _cmake_build(self, ext: Extension, mode: str, off_reason: str | None = None) -> None:
        try:
            import pybind11  # a build requirement: pyproject.toml [build-system]
        except ImportError:
            raise MissingTool("pybind11 is not installed (pip's build isolation installs it; with "
                              "--no-build-isolation, `pip install pybind11 cmake ninja` first)") from None
        cmake = _find_tool("cmake")
        if cmake is None:
            raise MissingTool("cmake not found (pip's build isolation installs it; with --no-build-isolation, "
                              "`pip install cmake` first)")

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / f"cmake-{mode}"
        build_dir.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("TOKENFLOW_BUILD_TYPE", "Release")
        args = [
            f"-S{ROOT}", f"-B{build_dir}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTOKENFLOW_OUTPUT_DIR={out_dir}",
            f"-DTOKENFLOW_CUDA={mode}",
        ]
        ninja = _find_tool("ninja")
        if ninja:
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if os.environ.get("TOKENFLOW_CUDA_ARCHS"):
            args.append(f"-DTOKENFLOW_CUDA_ARCHS={os.environ['TOKENFLOW_CUDA_ARCHS']}")
        if mode != "off":
            nvcc = _cuda_compiler()
            if nvcc:
                args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        elif off_reason:
            args.append(f"-DTOKENFLOW_CUDA_OFF_REASON={off_reason.replace(chr(10), ' ')}")
        # A stale cache from an earlier configure with other options would win over -D; start clean.
        cache = build_dir / "CMakeCache.txt"
        if cache.exists():
            cache.unlink()
        env = dict(os.environ)
        subprocess.run([cmake, *args], check=True, env=env)
        jobs = ["--parallel", str(self.parallel)] if self.parallel else []
        subprocess.run([cmake, "--build", str(build_dir), "--config", build_type, *jobs], check=True, env=env)
        built = out_dir / Path(self.get_ext_filename(ext.name)).name
        if not built.exists():
            raise RuntimeError(f"CMake finished but {built} is missing (suffix {sysconfig.get_config_var('EXT_SUFFIX')})")


class NoSdist(sdist):
    def run(self):  # the sources are two folders up, outside what an sdist of this folder can hold
        raise SystemExit("tokenflow-ops: no sdist; build a wheel from the repository checkout "
                         "(`pip wheel ./packaging/tokenflow-ops` or `pip install ./packaging/tokenflow-ops`)")


setup(
    ext_modules=[CMakeExtension("tokenflow._C")],
    cmdclass={"build_ext": CMakeBuild, "sdist": NoSdist},
)
