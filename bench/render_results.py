"""Render the newest benchmark results into the README and a bar chart.

Reads the newest ``bench/results/optimizer_step-<device>-<date>.json`` and
``train_step-<device>-<date>.json`` per device, rewrites the README block between
``<!-- bench:start -->`` and ``<!-- bench:end -->`` with their median tables (conditions and
commit included), and draws ``bench/results/summary.png`` (median ms per implementation).

    python bench/render_results.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def newest(stem: str) -> dict[str, Path]:
    """device type -> newest results file of ``stem``."""
    found: dict[str, Path] = {}
    for path in sorted(RESULTS.glob(f"{stem}-*.json")):
        device = path.stem[len(stem) + 1:].split("-")[0]
        if device in ("cpu", "cuda"):  # not a variant such as train_step-bf16-cuda-<date>
            found[device] = path  # sorted by date: the last one wins
    return found


def table(path: Path, baseline: str) -> tuple[str, dict]:
    data = json.loads(path.read_text())
    env = data["env"]
    lines = [f"{env['device']}; torch {env['torch']}, triton {env['triton']}; commit "
             f"{env['commit']}; {env['date'][:10]} (`bench/results/{path.name}`)", ""]
    medians = {}
    for model, samples in data["raw"].items():
        if "/" in model:  # a breakdown (e.g. "wrn16_8/optimizer_side"), not a table
            continue
        med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        medians[model] = med
        # CUDA-graph rows (bench_train_step.py --cuda-graph) over the graphed baseline
        base = {k: med.get(f"{baseline}, CUDA graph", med.get(baseline))
                if k.endswith(", CUDA graph") else med.get(baseline) for k in med}
        lines.append(f"**{model}**\n")
        mode = " (same mode)" if any(k.endswith(", CUDA graph") for k in med) else ""
        lines.append(f"| implementation | median ms | x {baseline}{mode} |")
        lines.append("|---|---|---|")
        lines += [f"| {k} | {v:.2f} | {v / base[k]:.2f} |" for k, v in med.items()]
        lines.append("")
    return "\n".join(lines), medians


def main() -> None:
    blocks, charts = [], {}
    for stem, baseline, title in (("optimizer_step", "SGD(fused) alone", "Optimizer step"),
                                  ("train_step", "SGD", "Training step")):
        for device, path in newest(stem).items():
            text, medians = table(path, baseline)
            blocks.append(f"#### {title}, {device}\n\n{text}")
            charts[f"{title}, {device}"] = medians
    if not blocks:
        print("no results")
        return
    readme = README.read_text()
    if START in readme and END in readme:
        head, rest = readme.split(START, 1)
        _, tail = rest.split(END, 1)
        README.write_text(f"{head}{START}\n{chr(10).join(blocks)}\n{END}{tail}")
        print("updated", README)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(t, m, md) for t, ms in charts.items() for m, md in ms.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, model, med) in zip(axes[0], panels):
        ax.barh(list(med), list(med.values()), color="tab:blue")
        ax.set(title=f"{title}: {model}", xlabel="median ms")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "summary.png", dpi=100)
    print("wrote", RESULTS / "summary.png")


if __name__ == "__main__":
    main()
