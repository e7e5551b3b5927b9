"""docs/backend.md is true: every Python block runs as written, in order, in one namespace (the blocks
compare each reference pattern with its fused call themselves), the one-call patch of section 2 patches
a `tokenflow_utils`, and the priority order the page states is the dispatcher's."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import dropin_check
from tokenflow.ops import backends, integrations

DOC = Path(__file__).resolve().parents[1] / "docs" / "backend.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_every_python_block_runs(monkeypatch, capsys):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 8
    # Section 2 imports the reference's tokenflow_utils: the tests' re-statement stands in for it.
    utils = dropin_check.load_reference("tokenflow_utils")
    originals = {n: getattr(utils, n) for n in integrations.HOOKED}
    monkeypatch.setitem(sys.modules, "tokenflow_utils", utils)
    namespace: dict = {"__name__": "backend_doc"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/backend.md python block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"docs/backend.md python block {i + 1} fails: {type(e).__name__}: {e}\n{block}") from e
    assert all(getattr(utils, n) is not originals[n] for n in integrations.HOOKED)  # the 3-line patch took
    assert "backend 'no-such-backend' is unavailable: unknown backend" in capsys.readouterr().out


def test_the_stated_priority_order_is_the_dispatchers():
    text = " ".join(DOC.read_text().split())
    m = re.search(r"first eligible backend in priority order \(((?:`\w+`, )+`\w+`), the table's order\)", text)
    assert m, "docs/backend.md no longer states the priority order"
    assert re.findall(r"`(\w+)`", m.group(1)) == list(backends._MODULES)
