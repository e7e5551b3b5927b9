"""The dispatch layer of `tokenflow.ops`: declared capabilities, their reasons, where a choice comes from
(per call, `use_backend`, `set_backend`, TOKENFLOW_BACKEND, auto), per-op forcing, availability, the CPU
rule of `auto`, the value check's switch, and the generated table of docs/backend.md."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import tokenflow.ops as ops
from opcheck import propagate_inputs
from tokenflow.errors import TokenFlowError
from tokenflow.ops import backends, capabilities, reference
from tokenflow.ops.backends import Backend, BackendError
from tokenflow.ops.capabilities import Capabilities

DOC = Path(__file__).resolve().parents[1] / "docs" / "backend.md"


class Spy(Backend):
    """A search-only CPU backend that auto never picks, C % 8 == 0: the reference, counting its calls."""

    name = "spy"
    caps = Capabilities(ops=("propagate", "cosine_argmax"), devices=("cpu",), channel_multiple=8,
                        auto=False, auto_note="a test double")

    def __init__(self):
        self.calls = 0

    def propagate(self, *a):
        self.calls += 1
        return reference.propagate(*a)

    def cosine_argmax(self, *a):
        self.calls += 1
        return reference.cosine_argmax(*a)


@pytest.fixture
def spy(monkeypatch):
    b = Spy()
    monkeypatch.setitem(backends._registry, "spy", b)
    monkeypatch.setattr(backends, "_noted", set())
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    yield b
    backends.set_backend(None)


def search_inputs(C=32):
    x, key_feats, key_out, which, weights, residual = propagate_inputs(2, 2, 10, C, 2, 3, torch.float32)
    return dict(x=x, key_feats=key_feats, key_out=key_out, which=which, weights=weights, residual=residual)


def attention_inputs():
    q = torch.randn(3, 1, 4, 16)
    return dict(q=q, k=q, v=q, heads=1, shared_qk=False)


def chosen(op, **inputs):
    return backends.choose(op, None, **inputs).name


def test_use_backend_is_scoped_and_a_call_argument_wins(spy):
    inputs = search_inputs()
    auto = chosen("propagate", **inputs)
    assert auto != "spy"  # auto never picks it
    with ops.use_backend("spy"):
        assert chosen("propagate", **inputs) == "spy"
        assert backends.choose("propagate", "torch", **inputs).name == "torch"  # the call's argument wins
        with ops.use_backend("auto"):
            assert chosen("propagate", **inputs) == auto
        seen = []
        t = threading.Thread(target=lambda: seen.append(chosen("propagate", **inputs)))
        t.start()
        t.join()
        assert seen == [auto]  # another thread has its own context
        out = ops.propagate(**inputs)
    assert spy.calls == 1
    torch.testing.assert_close(out, reference.propagate(**inputs))
    assert chosen("propagate", **inputs) == auto


def test_scoped_beats_process_beats_environment(spy, monkeypatch):
    inputs = search_inputs()
    monkeypatch.setenv(backends.ENV_VAR, "spy")
    assert chosen("propagate", **inputs) == "spy"
    assert backends.forced() == ("spy", "TOKENFLOW_BACKEND=spy")
    ops.set_backend("torch")
    assert chosen("propagate", **inputs) == "torch"
    with ops.use_backend("spy"):
        assert chosen("propagate", **inputs) == "spy"
    ops.set_backend("auto")
    assert chosen("propagate", **inputs) == "spy"  # the environment again
    with pytest.raises(BackendError, match="backend 'nope' is unavailable: unknown backend 'nope'"):
        ops.set_backend("nope")
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        with ops.use_backend("nope"):
            pass


def test_a_forced_backend_runs_its_ops_and_leaves_the_others_to_auto(spy, caplog):
    with ops.use_backend("spy"), caplog.at_level(logging.DEBUG, logger="tokenflow"):
        name = chosen("extended_attention", **attention_inputs())
        chosen("extended_attention", **attention_inputs())
    assert name == backends._auto("extended_attention", attention_inputs()).name
    lines = [r.getMessage() for r in caplog.records if "does not implement extended_attention" in r.getMessage()]
    assert lines == ["tokenflow.ops: use_backend('spy') does not implement extended_attention; choosing its "
                     "backend automatically"]  # once, not per call
    # Only a call's own argument insists.
    with pytest.raises(BackendError, match="backend 'spy' does not implement extended_attention; it implements "
                                           "propagate, cosine_argmax"):
        ops.extended_attention(**attention_inputs(), backend="spy")


@pytest.mark.parametrize("how", ["call", "use_backend", "set_backend", "env"])
def test_a_forced_backend_that_cannot_run_the_inputs_says_where_it_was_forced(spy, monkeypatch, how):
    inputs = search_inputs(C=12)  # the spy takes C % 8 == 0
    source = {"call": "backend 'spy'", "use_backend": r"use_backend\('spy'\)", "set_backend": r"set_backend\('spy'\)",
              "env": "TOKENFLOW_BACKEND=spy"}[how]
    if how == "env":
        monkeypatch.setenv(backends.ENV_VAR, "spy")
    elif how == "set_backend":
        ops.set_backend("spy")
    with ops.use_backend("spy") if how == "use_backend" else contextlib.nullcontext():
        with pytest.raises(BackendError, match=source + " cannot run propagate on these inputs: C = 12 is not a "
                                               "multiple of 8, which the spy backend needs"):
            ops.propagate(**inputs, backend="spy" if how == "call" else None)
    assert issubclass(BackendError, TokenFlowError) and issubclass(BackendError, ValueError)
    assert spy.calls == 0


def test_reasons_come_from_the_declaration():
    caps = Capabilities(ops=("extended_attention", "propagate"), devices=("cpu",), dtypes=(torch.float32,),
                        op_dtypes={"propagate": (torch.float32, torch.float16)}, dtype_note="why not",
                        max_head_dim=32, channel_multiple=4, max_frames=2, max_keyframes_per_frame=1,
                        max_tokens=9, device_note="a note")

    def why(op, **inputs):
        return capabilities.why_not(caps, "demo", op, inputs)

    s = search_inputs()
    assert why("cosine_argmax", x=s["x"], key_feats=s["key_feats"], which=s["which"]) == "does not implement cosine_argmax"
    assert why("propagate", **{**s, "residual": s["residual"].to("meta")}) == \
        "residual is on meta; the demo backend takes CPU tensors (a note)"
    assert why("propagate", **{**s, "x": s["x"].bfloat16()}) == \
        "x has dtype torch.bfloat16; the demo backend takes float32 or float16 (why not)"
    q = torch.zeros(3, 1, 4, 64)
    assert why("extended_attention", q=q.half(), k=q, v=q, heads=1) == \
        "q has dtype torch.float16; the demo backend takes float32 (why not)"  # per-op dtypes
    assert why("extended_attention", q=q, k=q, v=q, heads=1) == \
        "head dim 64 (C = 64, heads = 1) exceeds the demo backend's 32"
    assert why("extended_attention", q=q, k=q, v=q, heads=2) is None
    x = torch.zeros(3, 10, 6)
    base = dict(key_feats=torch.zeros(1, 10, 6), key_out=torch.zeros(1, 1, 10, 6),
                which=torch.zeros(3, 2, dtype=torch.long), weights=torch.zeros(3, 2))
    assert why("propagate", x=x, **base) == "C = 6 is not a multiple of 4, which the demo backend needs"
    assert why("propagate", x=torch.zeros(3, 10, 8), **base) == "S = 10 tokens exceed the demo backend's 9"
    assert why("propagate", x=torch.zeros(3, 9, 8), **base) == "F = 3 frames exceed the demo backend's 2 per call"
    assert why("propagate", x=torch.zeros(2, 9, 8), **{**base, "which": torch.zeros(2, 2, dtype=torch.long)}) == \
        "J = 2 keyframes per frame exceed the demo backend's 1"
    assert capabilities.why_not_here(caps, "demo", "propagate", torch.device("cuda"), torch.float32) == \
        "the model is on cuda; the demo backend takes CPU tensors (a note)"
    assert capabilities.why_not_auto(caps) is None
    assert "a test double" in capabilities.why_not_auto(Spy.caps)


def test_available_lists_only_backends_that_can_run_here():
    for name in backends.known()[1:]:
        assert (name in backends.available()) == (name in backends._MODULES and backends.why_unavailable(name) is None)
    if not torch.cuda.is_available():
        assert "cuda" not in backends.available()  # built or not, nothing here can run it
        assert "CUDA" in backends.why_unavailable("cuda")
        assert backends.explain("propagate", **search_inputs())["cuda"].startswith("unavailable: ")
    assert "torch" in backends.available() and backends.why_unavailable("torch") is None


def test_auto_on_the_cpu_takes_the_cpu_backend_only_with_the_kernel_that_beats_torch(monkeypatch):
    if "cpu" not in backends.available():
        pytest.skip(f"cpu backend: {backends.why_unavailable('cpu')}")
    from tokenflow.ops.backend_cpu import AUTO_ISAS

    inputs = search_inputs()
    want = "cpu" if capabilities.cpu_isa() in AUTO_ISAS else "torch"
    assert chosen("propagate", **inputs) == want
    monkeypatch.setattr(capabilities, "cpu_isa", lambda: "avx2")
    assert "avx2" not in AUTO_ISAS  # measured slower than torch (bench/results/propagate_cpu_isa.json)
    assert backends.get("cpu").why_not_auto().startswith("auto skips it with the avx2 CPU kernel")
    assert backends.explain("propagate", auto=True, **inputs)["cpu"] == backends.get("cpu").why_not_auto()
    assert backends.explain("propagate", **inputs)["cpu"] is None  # by name it runs
    assert chosen("propagate", **inputs) == "torch"
    assert ops.propagate(**inputs, backend="cpu").shape == (3, 2, 10, 32)  # by name it still runs


def test_the_isa_cap_reaches_auto():
    """End to end in a fresh process (the kernel variant is chosen once per process)."""
    code = ("import torch; from tokenflow.ops import backends, capabilities\n"
            "x = torch.randn(2, 10, 32); w = torch.zeros(2, 2, dtype=torch.long)\n"
            "print(capabilities.cpu_isa(), backends.choose('cosine_argmax', None, x=x, key_feats=x, which=w).name)")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TOKENFLOW_CPU_ISA="avx2"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    isa, name = r.stdout.split()
    if isa != "None":  # the extension is built
        assert isa in ("avx2", "generic") and name == "torch", r.stdout


def test_value_checks_read_gpu_tensors_only_when_asked(monkeypatch):
    cuda, cpu, meta = torch.device("cuda"), torch.device("cpu"), torch.device("meta")
    monkeypatch.delenv(ops.CHECKS_ENV, raising=False)
    try:
        assert ops.reads_values(cpu) and not ops.reads_values(meta)
        assert not ops.reads_values(cuda)  # a device sync per call otherwise
        monkeypatch.setenv(ops.CHECKS_ENV, "1")
        assert ops.reads_values(cuda) and not ops.reads_values(meta)
        ops.set_checks(False)
        assert not ops.reads_values(cuda) and ops.reads_values(cpu)
        monkeypatch.delenv(ops.CHECKS_ENV)
        ops.set_checks(True)
        assert ops.reads_values(cuda)
    finally:
        ops.set_checks(None)


def test_one_validation_and_one_capability_check_per_call(monkeypatch):
    counts = {"validate": 0, "caps": 0}

    def counting(key, fn):
        def wrapped(*a, **kw):
            counts[key] += 1
            return fn(*a, **kw)
        return wrapped
    monkeypatch.setattr(ops, "check_propagate", counting("validate", ops.check_propagate))
    monkeypatch.setattr(capabilities, "why_not", counting("caps", capabilities.why_not))
    ops.propagate(**search_inputs(), backend="torch")
    assert counts == {"validate": 1, "caps": 1}


def test_doc_table_is_generated_from_the_declarations():
    text = DOC.read_text()
    m = re.search(r"<!-- generated by tokenflow\.ops\.backends\.doc_table\(\).*?-->\n(.*?)<!-- end of generated table -->",
                  text, re.S)
    assert m, "docs/backend.md lost its generated-table markers"
    assert m.group(1) == backends.doc_table(), "regenerate it: python scripts/backend_table.py"
    for name in backends._MODULES:  # every shipped backend is declared, whatever this machine has
        assert f"| `{name}` |" in m.group(1)


def test_triton_declares_the_kernels_head_dim():
    pytest.importorskip("triton")
    from tokenflow.kernels import extended_attention as kea
    from tokenflow.ops import backend_triton
    assert backend_triton.MAX_HEAD_DIM == kea.MAX_HEAD_DIM
