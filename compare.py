"""The study's Figure 3: runs of eval.py side by side (`python eval.py --compare DIR ...`), as a
markdown table (rows = runs and a uniform random guess, columns = data sets, cells accuracy ±
its bootstrap std) and, with matplotlib installed, a grouped bar chart. Reads each run's
results.json (eval.py --out DIR)."""
import json
import sys
from pathlib import Path


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def load_results(run_dir: str) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        sys.exit(f"{path} not found: is {run_dir} an eval.py --out folder?")
    return json.loads(path.read_text())


def run_label(run_dir: str, results: dict) -> str:
    """"NAME (prompt)"; a sampled run's accuracy is its mean over samples, which the label says."""
    cfg = results.get("config", {})
    sampling = ""
    if cfg.get("num_samples", 1) > 1:
        sampling = f", mean of {cfg['num_samples']} samples at T={cfg['temperature']:g}"
    elif cfg.get("temperature", 0) > 0:
        sampling = f", sampled at T={cfg['temperature']:g}"
    return f"{Path(run_dir).name} ({cfg.get('prompt', '?')}{sampling})"


def load_runs(run_dirs: list[str]) -> tuple[list, list[str], dict]:
    """[(dir, results)], the data sets in first-seen order, and each set's chance accuracy (a
    uniform guess over its options, from the first run that has it)."""
    runs = [(run_dir, load_results(run_dir)) for run_dir in run_dirs]
    sets = list(dict.fromkeys(name for _, results in runs for name in results["sets"]))
    chance = {name: next((results["sets"][name]["chance"] for _, results in runs
                          if results["sets"].get(name, {}).get("chance")), None)
              for name in sets}
    return runs, sets, chance


def compare_table(run_dirs: list[str]) -> str:
    """Rows = runs (then a uniform random guess), columns = data sets, cells "acc ± std" in %."""
    runs, sets, chance = load_runs(run_dirs)
    lines = ["| run | " + " | ".join(sets) + " |", "| --- |" + " ---: |" * len(sets)]
    for run_dir, results in runs:
        cells = []
        for name in sets:
            if name in results["sets"]:
                set_metrics = results["sets"][name]
                cells.append(f"{pct(set_metrics['accuracy'])} ± "
                             f"{pct(set_metrics['accuracy_std'])}")
            else:
                cells.append("-")
        lines.append(f"| {run_label(run_dir, results)} | " + " | ".join(cells) + " |")
    if any(chance.values()):
        guesses = [pct(chance[name]) if chance[name] else "-" for name in sets]
        lines.append("| random guess | " + " | ".join(guesses) + " |")
    return "\n".join(lines) + "\n"


def compare_plot(run_dirs: list[str], path: str) -> bool:
    """Grouped bar chart (groups = data sets, one bar per run, bootstrap std as error bars, a
    dashed line at chance); False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs, sets, chance = load_runs(run_dirs)
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(sets) * max(1, len(runs) / 2)), 4))
    for run_index, (run_dir, results) in enumerate(runs):
        acc = [100 * results["sets"][name]["accuracy"] if name in results["sets"] else 0
               for name in sets]
        err = [100 * results["sets"][name]["accuracy_std"] if name in results["sets"] else 0
               for name in sets]
        positions = [set_index - 0.4 + width * (run_index + 0.5) for set_index in range(len(sets))]
        bars = ax.bar(positions, acc, width, yerr=err, capsize=3,
                      label=run_label(run_dir, results))
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    for set_index, name in enumerate(sets):
        if chance[name]:
            ax.hlines(100 * chance[name], set_index - 0.45, set_index + 0.45, colors="gray",
                      linestyles="dashed", label="random guess" if set_index == 0 else None)
    ax.set_xticks(range(len(sets)), sets)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
