"""`auto` by measurement (tokenflow/ops/autotune.py), with a fake timer: the fastest eligible backend per
shape class, measured once per process and reused from the file by later processes; the off switch; a
backend that fails while timed; explain's account; the CPU-kernel rule moot once auto measures."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from opcheck import propagate_inputs
from tokenflow.ops import autotune, backends, capabilities, reference
from tokenflow.ops.backends import Backend
from tokenflow.ops.capabilities import Capabilities


class Fake(Backend):
    """A CPU search backend auto may pick: the reference under another name."""

    caps = Capabilities(ops=("propagate", "cosine_argmax"), devices=("cpu",))

    def __init__(self, name, fail=False):
        self.name, self.fail = name, fail

    def propagate(self, *a):
        if self.fail:
            raise RuntimeError("kernel crashed")
        return reference.propagate(*a)

    def cosine_argmax(self, *a):
        return reference.cosine_argmax(*a)


class FakeTimer:
    """Seconds per backend name, as told; counts the runs it times (and runs them: they must work)."""

    def __init__(self, seconds):
        self.seconds, self.calls = dict(seconds), []

    def __call__(self, name, run, device):
        self.calls.append(name)
        run()
        return self.seconds[name]


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """Measurement on, a private cache file, and two fake backends ahead of torch in priority order."""
    monkeypatch.setenv(autotune.ENV, "1")
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "autotune.json"))
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    backends._load()
    modules = {"fast": "-", "slow": "-", **backends._MODULES}
    monkeypatch.setattr(backends, "_MODULES", modules)
    for b in (Fake("fast"), Fake("slow")):
        monkeypatch.setitem(backends._registry, b.name, b)
    # Only the fakes and torch compete: the real native / faiss backends stay out of this test.
    for name in ("cuda", "triton", "cpu", "faiss"):
        monkeypatch.setitem(backends._unavailable, name, "left out by the test")
    autotune.forget()
    yield tmp_path / "autotune.json"
    autotune.forget()


def inputs(S=10, F=2):
    x, key_feats, key_out, which, weights, residual = propagate_inputs(F, 2, S, 16, 2, 3, torch.float32)
    return dict(x=x, key_feats=key_feats, key_out=key_out, which=which, weights=weights, residual=residual)


def chosen(**kw):
    return backends.choose("propagate", None, **kw).name


@pytest.mark.parametrize("times,winner", [({"fast": 0.01, "slow": 0.02, "torch": 0.03}, "fast"),
                                          ({"fast": 0.02, "slow": 0.01, "torch": 0.03}, "slow"),
                                          ({"fast": 0.02, "slow": 0.03, "torch": 0.01}, "torch")])
def test_auto_takes_the_fastest_and_measures_once_per_shape_class(tuned, monkeypatch, times, winner):
    timer = FakeTimer(times)
    monkeypatch.setattr(autotune, "timer", timer)
    assert chosen(**inputs()) == winner
    # A warm-up each, then the interleaved rounds.
    assert timer.calls == ["fast", "slow", "torch"] * (1 + autotune.ROUNDS)
    assert chosen(**inputs()) == winner and chosen(**inputs(S=15)) == winner  # same class: S rounds up to 16
    assert len(timer.calls) == 3 * (1 + autotune.ROUNDS)
    chosen(**inputs(S=17))  # another class
    assert len(timer.calls) == 6 * (1 + autotune.ROUNDS)


def test_long_runs_are_timed_once_after_the_warm_up(tuned, monkeypatch):
    timer = FakeTimer({"fast": 2 * autotune.LONG_RUN_S, "slow": 0.01, "torch": 0.03})
    monkeypatch.setattr(autotune, "timer", timer)
    assert chosen(**inputs()) == "slow"
    assert timer.calls == ["fast", "slow", "torch"] * 2


def test_a_later_process_reuses_the_file(tuned, monkeypatch):
    monkeypatch.setattr(autotune, "timer", FakeTimer({"fast": 0.02, "slow": 0.01, "torch": 0.03}))
    assert chosen(**inputs()) == "slow"
    data = json.loads(tuned.read_text())
    (device, entries), = data["entries"].items()
    assert device.startswith("cpu: ") and "threads" in device and "torch " in device
    record = entries[autotune.shape_class("propagate", inputs())]
    assert record["backend"] == "slow" and record["seconds"] == {"fast": 0.02, "slow": 0.01, "torch": 0.03}
    autotune.forget()  # as a new process

    def never(*a):
        raise AssertionError("measured again although the file holds the answer")
    monkeypatch.setattr(autotune, "timer", never)
    assert chosen(**inputs()) == "slow"
    # Another set of candidates than the one measured: measure again.
    autotune.forget()
    monkeypatch.setitem(backends._unavailable, "fast", "gone")
    timer = FakeTimer({"slow": 2.0, "torch": 1.0})
    monkeypatch.setattr(autotune, "timer", timer)
    assert chosen(**inputs()) == "torch" and timer.calls


def test_a_damaged_file_is_measured_over(tuned, monkeypatch):
    tuned.write_text("{not json")
    timer = FakeTimer({"fast": 1.0, "slow": 2.0, "torch": 3.0})
    monkeypatch.setattr(autotune, "timer", timer)
    assert chosen(**inputs()) == "fast"
    assert json.loads(tuned.read_text())["format"] == autotune.FORMAT


def test_turned_off_auto_takes_the_priority_order_without_timing(tuned, monkeypatch):
    monkeypatch.setenv(autotune.ENV, "0")
    timer = FakeTimer({"fast": 2.0, "slow": 1.0, "torch": 0.5})
    monkeypatch.setattr(autotune, "timer", timer)
    assert chosen(**inputs()) == "fast" and timer.calls == []
    assert not tuned.exists()


def test_a_backend_that_fails_while_timed_is_skipped(tuned, monkeypatch, caplog):
    monkeypatch.setitem(backends._registry, "fast", Fake("fast", fail=True))
    monkeypatch.setattr(autotune, "timer", FakeTimer({"fast": 0.1, "slow": 2.0, "torch": 1.0}))
    with caplog.at_level(logging.WARNING, logger="tokenflow"):
        assert chosen(**inputs()) == "torch"
    assert "backend 'fast' failed while auto timed it for propagate (RuntimeError: kernel crashed)" in caplog.text


def test_explain_names_the_backends_measured_slower(tuned, monkeypatch):
    monkeypatch.setattr(autotune, "timer", FakeTimer({"fast": 0.002, "slow": 0.001, "torch": 0.003}))
    x = inputs()
    chosen(**x)
    why = backends.explain("propagate", auto=True, **x)
    assert why["slow"] is None
    assert why["fast"].startswith("measured slower here: 2 ms against slow's 1 ms")
    assert why["torch"].startswith("measured slower here: 3 ms")
    assert backends.explain("propagate", **x)["fast"] is None  # by name it runs


def test_measured_auto_weighs_the_cpu_kernel_on_any_isa(monkeypatch, tmp_path):
    """The static rule (only the avx512bf16 kernel) is for unmeasured auto; measured, the timing decides,
    so an AVX2-only host takes the cpu backend only where it is faster there."""
    if "cpu" not in backends.available():
        pytest.skip(f"cpu backend: {backends.why_unavailable('cpu')}")
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "autotune.json"))
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(capabilities, "cpu_isa", lambda: "avx2")
    x = inputs()
    monkeypatch.setenv(autotune.ENV, "0")
    assert chosen(**x) == "torch"  # unmeasured: the AVX2 kernel measured slower elsewhere
    monkeypatch.setenv(autotune.ENV, "1")
    for cpu_s, want in ((1.0, "cpu"), (3.0, "torch")):
        autotune.forget()
        (tmp_path / "autotune.json").unlink(missing_ok=True)
        monkeypatch.setattr(autotune, "timer", FakeTimer({"cpu": cpu_s, "torch": 2.0}))
        assert chosen(**x) == want
    autotune.forget()


def test_shape_classes_and_the_real_timer():
    x = inputs(S=1000, F=5)
    assert autotune.shape_class("propagate", x) == \
        "propagate|float32|F<=8|S<=1024|C=16|K<=2|J=2|R=3|out=float32|residual=float32"
    q = torch.zeros(3, 3, 64, 40)
    assert autotune.shape_class("extended_attention", dict(q=q, k=q, v=q, heads=2, shared_qk=True)) == \
        "extended_attention|float32|R=3|K<=4|S<=64|C=40|heads=2|shared_qk=1"
    ran = []
    seconds = autotune._time_once("torch", lambda: ran.append(1), torch.device("cpu"))
    assert ran == [1] and seconds >= 0.0
