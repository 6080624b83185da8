"""Writing a continual run: results.json, a markdown table and the accuracy-after-each-task plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def stage_accuracies(acc_matrix: list[list[float]], task_sizes: list[int] | None = None) -> list[float]:
    """Accuracy over everything seen after each task (sample-weighted when sizes are given)."""
    out = []
    for row in acc_matrix:
        sizes = task_sizes[: len(row)] if task_sizes else [1] * len(row)
        out.append(sum(a * n for a, n in zip(row, sizes, strict=True)) / sum(sizes))
    return out


def markdown_table(methods: dict[str, dict[str, Any]]) -> str:
    lines = ["| method | Avg acc (%) | Last acc (%) | forgetting (pts) | new-task acc (%) | changed weights | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in methods.items():
        lines.append(f"| {name} | {r['avg_acc']:.2f} | {r['last_acc']:.2f} | {r['forgetting']:.2f} | "
                     f"{r.get('new_task_acc', float('nan')):.2f} | {100 * r['changed_fraction']:.3f}% | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def plot_accuracy(methods: dict[str, dict[str, Any]], path: Path, title: str = "",
                  task_sizes: list[int] | None = None) -> None:
    """One panel per host; the frozen host dashed black, each adaptation method its own colour in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    hosts = sorted({name.split("+")[0] for name in methods})
    variants = sorted({name.partition("+")[2] for name in methods} - {""})
    colours = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    fig, axes = plt.subplots(1, len(hosts), figsize=(5.2 * len(hosts), 4.2), squeeze=False, sharey=True)
    for ax, host in zip(axes[0], hosts, strict=True):
        for name, r in methods.items():
            base, _, variant = name.partition("+")
            if base != host:
                continue
            acc = stage_accuracies(r["acc_matrix"], task_sizes)
            style = {"color": "black", "linestyle": "--"} if not variant else {"color": colours[variant]}
            ax.plot(range(1, len(acc) + 1), acc, marker="o", markersize=3, label=name, **style)
        ax.set_title(f"{title}: {host}" if title else host, fontsize=9)
        ax.set_xlabel("tasks learned")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("accuracy on all seen classes (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: dict[str, Any], output_dir: str | Path, title: str = "",
                  task_sizes: list[int] | None = None) -> str:
    """Write the three files and return the markdown table."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown_table(results["methods"])
    (out / "results.md").write_text(f"# {title}\n\n{table}\n" if title else table + "\n")
    plot_accuracy(results["methods"], out / "accuracy.png", title, task_sizes)
    return table
