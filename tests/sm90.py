"""Compile (not interpret) Triton kernels for sm_90 offline, in a subprocess; shared by the kernel tests."""
import json
import os
import subprocess
import sys

import pytest


def run_sm90(script: str):
    """Run `script` (which prints "JSON" then a JSON document) without TRITON_INTERPRET; skip if no ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        if "ptxas" in r.stderr and ("not found" in r.stderr or "No such file" in r.stderr):
            pytest.skip("no ptxas in the triton wheel: cannot compile for sm_90 offline")
        raise AssertionError(r.stderr[-3000:])
    return json.loads(r.stdout.split("JSON", 1)[1])
