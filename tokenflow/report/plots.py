"""The report's plots (matplotlib, headless): time per frame against frames, time per stage, metric
distributions. Each returns PNG bytes, or None when the records hold nothing to plot."""
from __future__ import annotations

import io

from tokenflow.metrics.names import NUMBERS

NOT_EDIT = ("eval",)  # stages that are not part of making the edit


def _figure(w: float, h: float):
    import matplotlib

    matplotlib.use("Agg")  # no display; also keeps tests off any GUI backend
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(w, h), dpi=100)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.1)  # "tight" keeps an outside legend
    plt.close(fig)
    return buf.getvalue()


def edit_seconds(record: dict) -> float | None:
    s = {k: v for k, v in (record.get("seconds") or {}).items() if k not in NOT_EDIT}
    return sum(s.values()) if s else None


def seconds_per_frame(records: list[dict]) -> bytes | None:
    pts = [(r["frames"], edit_seconds(r) / r["frames"], r["name"]) for r in records
           if r.get("frames") and edit_seconds(r) is not None]
    if len(pts) < 2:  # one point says nothing a table does not
        return None
    plt, fig, ax = _figure(4.6, 3.2)
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="#2b6cb0", zorder=3)
    if len(pts) <= 12:
        for x, y, name in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("frames")
    ax.set_ylabel("seconds per frame (edit)")
    ax.set_title("Time per frame against video length", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return _png(plt, fig)


def stage_times(records: list[dict], max_items: int = 40) -> bytes | None:
    rows = [r for r in records if r.get("seconds")]
    if not rows:
        return None
    stages = list(dict.fromkeys(k for r in rows for k in r["seconds"]))
    mean = len(rows) > max_items  # too many bars to read: one bar, the mean per stage
    labels = ["mean of %d" % len(rows)] if mean else [r["name"] for r in rows]
    plt, fig, ax = _figure(4.6, max(2.0, 0.9 + 0.28 * len(labels)))
    left = [0.0] * len(labels)
    colors = plt.get_cmap("tab10")
    for j, st in enumerate(stages):
        vals = [sum(r["seconds"].get(st, 0.0) for r in rows) / len(rows)] if mean else \
               [r["seconds"].get(st, 0.0) for r in rows]
        ax.barh(labels, vals, left=left, label=st, color=colors(j % 10))
        left = [a + b for a, b in zip(left, vals)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("Time per stage", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _png(plt, fig)


def metric_distributions(records: list[dict]) -> bytes | None:
    def has(r, k):
        return isinstance((r.get("metrics") or {}).get(k), (int, float))

    keys = [k for k in NUMBERS if sum(has(r, k) for r in records) >= 2]  # a distribution needs two values
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.1 * cols, 2.3 * nrows), dpi=100, squeeze=False)
    for ax, k in zip(axes.flat, keys):
        vals = [r["metrics"][k] for r in records if has(r, k)]
        ax.hist(vals, bins=min(20, max(1, len(vals))), color="#2f855a")
        ax.set_title(f"{k} (n={len(vals)})", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(plt, fig)
