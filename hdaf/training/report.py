"""Results in the layout of the paper's Table 2 (markdown + JSON) and training-curve plots."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

from .metrics import EMOTIONS

COLUMNS = ["Acc6", "F1"] + [f"{e}:{k}" for e in EMOTIONS for k in ("Acc2", "F1")]


def row_values(metrics: Optional[dict]) -> List[Optional[float]]:
    """Percentages in Table 2's column order (None where not available)."""
    if not metrics:
        return [None] * len(COLUMNS)
    vals = [metrics.get("acc6"), metrics.get("f1_6")]
    per = metrics.get("per_emotion") or {}
    for e in EMOTIONS:
        pe = per.get(e) or {}
        vals += [pe.get("acc2"), pe.get("f1")]
    return [None if v is None or (isinstance(v, float) and math.isnan(v)) else 100.0 * v for v in vals]


def build_table(groups: Sequence[tuple]) -> dict:
    """``groups``: ``[(group title, [(row label, metrics or None, note), ...]), ...]``."""
    out = {"columns": COLUMNS, "groups": []}
    for title, rows in groups:
        g = {"title": title, "rows": []}
        for label, metrics, note in rows:
            g["rows"].append({"label": label, "values": row_values(metrics), "note": note,
                              "n": (metrics or {}).get("n"), "n_no_emotion": (metrics or {}).get("n_no_emotion"),
                              "bacc6": (metrics or {}).get("bacc6"), "mae": (metrics or {}).get("mae")})
        out["groups"].append(g)
    return out


def to_markdown(table: dict, title: str = "CMU-MOSEI emotion classification") -> str:
    head1 = ["Description", "Overall", ""] + sum([[f"Class: {e.capitalize()}", ""] for e in EMOTIONS], [])
    head2 = ["Metric", "Acc6", "F1"] + ["Acc2", "F1"] * len(EMOTIONS)
    lines = [f"**{title}** (percent; protocol: docs/data_and_training.md)", "",
             "| " + " | ".join(head1) + " |", "|" + "---|" * len(head1),
             "| " + " | ".join(head2) + " |"]
    best = {}
    for g in table["groups"]:
        for r in g["rows"]:
            for i, v in enumerate(r["values"]):
                if v is not None and (i not in best or v > best[i]):
                    best[i] = v
    for g in table["groups"]:
        lines.append("| *" + g["title"] + "* |" + " |" * (len(head1) - 1))
        for r in g["rows"]:
            cells = []
            for i, v in enumerate(r["values"]):
                if v is None:
                    cells.append("N/A")
                else:
                    s = f"{v:.1f}"
                    cells.append(f"**{s}**" if abs(v - best[i]) < 1e-9 else s)
            label = r["label"] + (f" ({r['note']})" if r.get("note") else "")
            lines.append("| " + label + " | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Acc6 / F1: dominant emotion (ties -> lowest index), rows with no emotion excluded "
                 "(counted as n_no_emotion); Acc2 / F1 per class: presence = intensity > 0; "
                 "F1 is support-weighted.  Best value per column in bold.")
    return "\n".join(lines)


def save_table(table: dict, folder: str, stem: str = "results",
               title: str = "CMU-MOSEI emotion classification") -> Dict[str, str]:
    os.makedirs(folder, exist_ok=True)
    pj, pm = os.path.join(folder, stem + ".json"), os.path.join(folder, stem + ".md")
    with open(pj, "w") as f:
        json.dump(table, f, indent=2, default=float)
    with open(pm, "w") as f:
        f.write(to_markdown(table, title) + "\n")
    return {"json": pj, "markdown": pm}


def plot_curves(histories: Dict[str, List[dict]], path: str) -> str:
    """One panel per run: train / valid loss per epoch across stages, valid Acc6 on a twin axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, h in histories.items() if h]
    if not names:
        raise ValueError("no training history to plot")
    cols = min(2, len(names))
    rows = int(math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        h = histories[name]
        x = list(range(1, len(h) + 1))
        # one line segment per stage: the stages optimise different objectives
        segs, start = [], 0
        for i in range(1, len(h) + 1):
            if i == len(h) or h[i]["stage"] != h[start]["stage"]:
                segs.append((start, i))
                start = i
        for j, (a, b) in enumerate(segs):
            xs = x[a:b]
            ax.plot(xs, [e["train_loss"] for e in h[a:b]], "-o", ms=3, color="tab:blue",
                    label="train loss" if j == 0 else None)
            ax.plot(xs, [e["valid_loss"] for e in h[a:b]], "-s", ms=3, color="tab:orange",
                    label="valid loss" if j == 0 else None)
            ax.axvline(a + 0.5, color="grey", lw=0.6, ls=":")
            ax.annotate(h[a]["stage"], (a + 0.6, 1.0), xycoords=("data", "axes fraction"),
                        fontsize=7, va="top")
        ax2 = ax.twinx()
        ax2.plot(x, [e.get("valid_acc6") for e in h], "--", color="tab:green", label="valid Acc6")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("valid Acc6")
        ax.set_title(name)
        ax.set_xlabel("epoch (all stages, in order)")
        ax.set_ylabel("loss (stage's own objective)")
        l1, n1 = ax.get_legend_handles_labels()
        l2, n2 = ax2.get_legend_handles_labels()
        ax.legend(l1 + l2, n1 + n2, fontsize=7, loc="center right")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
