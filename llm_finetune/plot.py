"""Plots of ``metrics.jsonl``: train and eval loss, learning rate and tokens/s over optimizer
steps, one line per run, so runs compare on one figure; benchmark scores, when
``python -m llm_finetune.evaluate`` recorded some, at the step of the model scored.

    python -m llm_finetune.plot output/run_a output/run_b --out plots/

Without ``--out`` the PNGs go to ``plots/`` in the first run's directory. A run writes its own
plots at its end when matplotlib is installed (``--plot_metrics``, on by default).
"""

from pathlib import Path

import fire

from llm_finetune.metrics import read_metrics, read_scores

PANELS = (("loss", "training loss (faint: per step; line: moving average), eval loss (dots)"), ("lr", "learning rate"),
          ("tokens_per_s", "tokens/s"))


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (shorter at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def score_series(records: list[dict]) -> dict[str, tuple[list, list, list]]:
    """``task/metric`` -> (steps, values, stderrs) of the tasks each record was asked for (a
    group's subtasks stay in the file, not in the figure), in step order (a base scored after
    its run is recorded at step 0)."""
    series: dict[str, tuple[list, list, list]] = {}
    for record in sorted(records, key=lambda r: r["step"]):
        for key, value in record["scores"].items():
            if key.split("/")[0] in record["tasks"]:
                steps, values, errors = series.setdefault(key, ([], [], []))
                steps.append(record["step"])
                values.append(value)
                errors.append(record["stderr"].get(key, 0.0))
    return series


def plot_scores(plt, runs: dict[str, list[dict]], path: Path) -> str:
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, records in runs.items():
        for key, (steps, values, errors) in score_series(records).items():
            axes.errorbar(steps, values, yerr=errors, marker="o", capsize=3,
                          label=f"{name}: {key}")
    axes.set(xlabel="optimizer step", title="benchmark scores (lm-eval; bars: stderr)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)


def plot(*run_dirs: str, out: str = "") -> list[str]:
    """Write loss.png, lr.png and tokens_per_s.png, and scores.png when a run has benchmark
    scores; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise SystemExit("give one or more run directories (output_dir of a run)")
    target = Path(out) if out else Path(run_dirs[0]) / "plots"
    target.mkdir(parents=True, exist_ok=True)
    runs = {Path(d).resolve().name: read_metrics(Path(d)) for d in run_dirs}
    written = []
    for key, title in PANELS:
        figure, axes = plt.subplots(figsize=(7, 4))
        for name, (steps, evals) in runs.items():
            x, y = [s["step"] for s in steps], [s[key] for s in steps]
            if key == "lr":
                axes.plot(x, y, label=name)
                continue
            # per-step values are noisy: faint, with their moving average on top
            raw, = axes.plot(x, y, alpha=0.25, linewidth=0.8)
            axes.plot(x, moving_average(y, max(1, len(y) // 40)), color=raw.get_color(),
                      label=name)
            if key == "loss" and evals:
                axes.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o--",
                          color=raw.get_color(), markeredgecolor="black", markersize=7,
                          linewidth=2, zorder=3, label=f"{name} (eval)")
        axes.set(xlabel="optimizer step", title=title)
        axes.legend(fontsize="small")
        figure.tight_layout()
        path = target / f"{key}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(str(path))
    scores = {Path(d).resolve().name: read_scores(Path(d)) for d in run_dirs}
    if any(scores.values()):
        written.append(plot_scores(plt, scores, target / "scores.png"))
    return written


if __name__ == "__main__":
    fire.Fire(plot)
