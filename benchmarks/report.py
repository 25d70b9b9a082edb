"""Output of the benchmark: the table on screen, the JSON rows, and the bar chart of ratios."""
from __future__ import annotations

import json
import os
from typing import List, Optional

COLUMNS = [  # (header, key, format)
    ("workload", "workload", "{}"),
    ("row", "name", "{}"),
    ("backend", "backend", "{}"),
    ("ms", "ms", "{:.3f}"),
    ("x fused", "ratio_to_torch_fused_adamw", "{:.2f}"),
    ("B/param", "bytes_per_param", "{:g}"),  # traffic: bytes moved per parameter per step
    # memory: the optimizer's live tensors, and (--peak-memory) the peak above parameters + gradients
    ("state B/p", "state_bytes_per_param", "{:.2f}"),
    ("peak B/p", "peak_bytes_per_param", "{:.2f}"),
    ("GB/s", "gbps", "{:.1f}"),
    ("stream", "fraction_of_stream", "{:.0%}"),
    ("stream GB/s", "stream_gbps", "{:.1f}"),
    ("launch", "launches_per_step", "{}"),
    ("sync", "syncs_per_step", "{}"),
    ("targets", "status", "{}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "n/a"
    return fmt.format(value)


def format_table(results: List[dict]) -> str:
    cells = [[h for h, _, _ in COLUMNS]] + [[_cell(r, k, f) for _, k, f in COLUMNS] for r in results]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS) - 1)]
    lines = []
    for n, row in enumerate(cells):
        # the last column (targets) is left unpadded: it can be long
        left = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(left + [row[-1]]))
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def format_markdown(results: List[dict]) -> str:
    header = "| " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(r, k, f) for _, k, f in COLUMNS) + " |" for r in results]
    return "\n".join([header, rule] + body)


def write_json(path: str, results: List[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)
        fh.write("\n")


def write_plot(path: str, results: List[dict], title: Optional[str] = None) -> None:
    """One horizontal bar chart per workload of each row's ms / torch fused AdamW's ms (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in results))
    rows_of = {w: [r for r in results if r["workload"] == w and r["ratio_to_torch_fused_adamw"]] for w in workloads}
    height = sum(max(len(v), 1) for v in rows_of.values()) * 0.28 + 1.2 * len(workloads)
    fig, axes = plt.subplots(len(workloads), 1, figsize=(9, max(height, 3)), squeeze=False)
    colors = {"torch": "tab:gray", "peer": "tab:purple", "ours": "tab:blue", "reference-style": "tab:orange"}
    for ax, w in zip(axes[:, 0], workloads):
        rows = rows_of[w]
        labels = [f"{r['name']} [{r['backend']}]" for r in rows]
        ratios = [r["ratio_to_torch_fused_adamw"] for r in rows]
        ax.barh(range(len(rows)), ratios, color=[colors.get(r["kind"], "tab:green") for r in rows])
        for i, r in enumerate(rows):
            if r.get("status", "").startswith("MISSING"):
                ax.text(ratios[i], i, " MISSING", va="center", fontsize=7, color="tab:red")
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(w, fontsize=9)
        ax.set_xlabel("ms per step / torch fused AdamW ms (lower is faster)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
