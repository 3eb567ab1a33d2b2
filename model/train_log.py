"""What a run reports: the metrics file (one JSON record a logged step), its plot, and the progress bar."""
import json
import sys
from pathlib import Path

from .files import atomic_write


def read_metrics(path, say=None):
    """The records of a metrics file. A line that is not a JSON record (a run killed while writing it) is
    skipped, and say() is told which one."""
    rows = []
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            if say:
                say(f"{path}:{n}: skipped a torn line (not a JSON record; a run was stopped while writing it)")
            continue
        rows.append(row)
    return rows


def progress_bar(name, total, done, enabled=True):
    """A live bar on stderr (step/total, loss, tokens/s, ETA) while the log lines go to stdout through its write(),
    so a log file keeps every line and a terminal shows where the run is."""
    from tqdm import tqdm
    return tqdm(total=total, initial=done, desc=name, unit="step", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5, disable=not enabled)


def plot_metrics(metrics_path, png_path, title, keys=("loss",)):
    """Loss (and any other logged metrics named in keys, one panel each) against step from a metrics file, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics_path, print)
    if not rows:
        return
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 3.5 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        logged = [r for r in rows if key in r]
        ax.plot([r["step"] for r in logged], [r[key] for r in logged])
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(title)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


class RunLog:
    """A stage's metrics file `<stem>.metrics.jsonl` and plot `<stem>.loss.png` beside its weights, and the line
    a logged step prints (loss, the stage's own metrics, LR, tokens/s, MFU, memory, ETA)."""

    def __init__(self, out_weights, metric_names=(), plot_keys=("loss",)):
        out_weights = Path(out_weights)
        self.stem, self.metric_names, self.plot_keys = out_weights.stem, metric_names, plot_keys
        self.path = out_weights.with_name(f"{self.stem}.metrics.jsonl")
        self.plot_path = out_weights.with_name(f"{self.stem}.loss.png")

    def clear(self):
        """A fresh run starts a new file."""
        if self.path.exists():
            self.path.unlink()

    def append(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate(self, step, say):
        """Keep the records up to the resumed step (a torn line of the killed run is dropped, and said so)."""
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path, say) if r["step"] <= step]
        if len(kept) == len(self.path.read_text(encoding="utf-8", errors="replace").splitlines()):
            return  # nothing to drop: the file stays as it is
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))

    def show(self, bar, metrics, where, tok_s, eta):
        """The step's line through the progress bar (`where`: "step s/total epoch e/epochs")."""
        extra = "".join(f" {k} {metrics[k]:.4f}" for k in self.metric_names if k in metrics)
        bar.set_postfix_str(f"loss {metrics['loss']:.4f}{extra} {tok_s:.0f} tok/s", refresh=False)
        bar.write(f"{self.stem} {where} loss {metrics['loss']:.4f}{extra} lr {metrics['lr']:.3e} {tok_s:.0f} tok/s"
                  + (f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else "")
                  + f" mem {metrics['peak_mem_gib']:.2f} GiB eta {eta / 60:.1f} min", file=sys.stdout)
        sys.stdout.flush()

    def plot(self):
        plot_metrics(self.path, self.plot_path, title=self.stem, keys=self.plot_keys)
