"""`llmkit eval report`: several models' evaluations side by side, as a markdown table, JSON and a bar chart with
95% intervals. It reads the `results.json` that `llmkit eval tasks` and `llmkit eval glue --out` write.

    model        task               shots  metric         value   95% interval     n
    smollm2      arithmetic         0      exact_match    0.021   [0.000, 0.062]   48
    runs/sft     arithmetic         0      exact_match    0.417   [0.277, 0.556]   48

lm-eval's intervals are value ± 1.96 standard errors (its bootstrap or closed-form stderr), clipped to the range of
the metrics known to be bounded (accuracy, exact match, F1... to [0, 1]; MCC to [-1, 1]); GLUE rows carry no interval.
Two runs of the same model are told apart by their folder.
"""

from __future__ import annotations

from pathlib import Path

from llmkit import io
from llmkit.errors import LlmkitError

BOUNDED = {
    "acc": (0, 1),
    "acc_norm": (0, 1),
    "exact_match": (0, 1),
    "em": (0, 1),
    "f1": (0, 1),
    "f1a": (0, 1),
    "accuracy": (0, 1),
    "precision": (0, 1),
    "recall": (0, 1),
    "token_f1": (0, 1),
    "mc1": (0, 1),
    "mc2": (0, 1),
    "mcc": (-1, 1),
}


def _interval(name: str, value: float, err: float) -> tuple[float, float]:
    low, high = value - 1.96 * err, value + 1.96 * err
    if name in BOUNDED:
        lo, hi = BOUNDED[name]
        low, high = max(lo, low), min(hi, high)
    return low, high


def rows_of(results: dict) -> list[dict]:
    """One row per (task, shots, metric) of a results.json."""
    rows = []
    model = results.get("model", "?")
    if "shots" in results and isinstance(results["shots"], dict):  # llmkit eval tasks (lm-eval)
        for k, block in results["shots"].items():
            for task, metrics in block["results"].items():
                n = (block.get("n-samples", {}).get(task) or {}).get("effective")
                for key, value in metrics.items():
                    if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                        continue
                    name, _, filt = key.partition(",")
                    err = metrics.get(f"{name}_stderr,{filt}")
                    low = high = None
                    if isinstance(err, (int, float)):
                        low, high = _interval(name, value, err)
                    rows.append(
                        {
                            "model": model,
                            "task": task,
                            "shots": int(k),
                            "metric": name if filt == "none" else f"{name} ({filt})",
                            "value": float(value),
                            "low": low,
                            "high": high,
                            "n": n,
                        }
                    )
    elif "tasks" in results:  # llmkit eval glue
        for task, metrics in results["tasks"].items():
            for name, value in metrics.items():
                if name not in ("n",):
                    rows.append(
                        {
                            "model": model,
                            "task": task,
                            "shots": results.get("shots", 0),
                            "metric": name,
                            "value": float(value),
                            "low": None,
                            "high": None,
                            "n": metrics.get("n"),
                        }
                    )
    return rows


def collect(runs: list[str | Path]) -> list[dict]:
    rows = []
    for run in runs:
        path = Path(run) / "results.json" if Path(run).is_dir() else Path(run)
        if not path.exists():
            raise LlmkitError(f"{run} holds no results.json", "point --runs at folders written by `llmkit eval tasks` (or eval glue --out)")
        rows += [{**r, "run": str(run)} for r in rows_of(io.read_json(path))]
    runs_of: dict[str, set] = {}
    for r in rows:
        runs_of.setdefault(r["model"], set()).add(r["run"])
    for r in rows:  # one model evaluated in two runs (plain and chat, before and after...): name the run too
        if len(runs_of[r["model"]]) > 1:
            r["model"] = f"{r['model']} ({r['run']})"
    if not rows:
        raise LlmkitError("the runs hold no scores", "evaluate first: llmkit eval tasks --model ... --tasks ... --out DIR")
    return rows


def markdown(rows: list[dict]) -> str:
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["| model | task | shots | metric | value | 95% interval | n |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["metric"], r["shots"], r["model"])):
        interval = f"[{fmt(r['low'])}, {fmt(r['high'])}]" if r["low"] is not None else ""
        lines.append(f"| {r['model']} | {r['task']} | {r['shots']} | {r['metric']} | {fmt(r['value'])} | {interval} | {r['n'] or ''} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars: one group per (task, metric, shots), one bar per model, with interval whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = sorted({(r["task"], r["metric"], r["shots"]) for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) * max(1, len(models)) ** 0.5 + 2), 4.8))
    for m_i, model in enumerate(models):
        xs, ys, lo, hi = [], [], [], []
        for g_i, g in enumerate(groups):
            r = next((r for r in rows if r["model"] == model and (r["task"], r["metric"], r["shots"]) == g), None)
            if r is None:
                continue
            xs.append(g_i + (m_i - (len(models) - 1) / 2) * width)
            ys.append(r["value"])
            lo.append(max(0.0, r["value"] - r["low"]) if r["low"] is not None else 0)
            hi.append(max(0.0, r["high"] - r["value"]) if r["high"] is not None else 0)
        ax.bar(xs, ys, width, label=model, yerr=np.array([lo, hi]), capsize=3)
    ax.set_xticks(range(len(groups)), [f"{t}\n{m}\n{k}-shot" for t, m, k in groups], fontsize=8)
    ax.set_ylabel("value (95% interval)")
    ax.set_title("evaluation")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    io.save_figure(fig, path)
    plt.close(fig)


def report(runs: list[str | Path], out: str | Path = "report.md") -> dict:
    """Write OUT (markdown), OUT.json and OUT.png; returns {"rows": [...]} as in the JSON."""
    rows = collect(runs)
    out = Path(out)
    io.write_text(out, "# evaluation report\n\n" + markdown(rows) + f"\n![chart]({out.with_suffix('.png').name})\n")
    io.write_json(out.with_suffix(".json"), {"rows": rows})
    plot(rows, out.with_suffix(".png"))
    return {"rows": rows}
