"""Experiment tracking (--report_to none | tensorboard | wandb): the numbers of metrics.jsonl and
eval.jsonl, also sent to TensorBoard or Weights & Biases, to watch a run and compare runs there.

The jsonl files stay the record; a tracker gets a copy of each line as it is written, at the line's
step: every field whose value is a number (int or float, NaN and inf included), exactly as written.
Other fields are skipped: strings (metrics' "skipped" reason, eval's "data" set name), booleans,
lists and objects; so is "step" itself, the x axis. An eval.jsonl line's fields go under
"eval/<set>/", e.g. eval/medqa_test/accuracy, as several sets are evaluated at one step.

  - tensorboard: torch.utils.tensorboard.SummaryWriter writing to out_dir/tensorboard (float32, as
    TensorBoard stores scalars), flushed after every line so that a killed run loses nothing. A
    fresh run empties the folder, as it does metrics.jsonl; --resume purges the steps after the
    checkpoint's (purge_step), as metrics.jsonl is cut back to them.
  - wandb: wandb.init(project=--wandb_project, dir=out_dir, config=the run's config.json). The
    run id is kept in out_dir/wandb_run_id, so that --resume continues the same W&B run
    (resume="allow"); a fresh run starts a new one. Online (log in first: `wandb login` or
    WANDB_API_KEY), W&B keeps the first values of a step: steps that a stopped attempt logged after
    its last checkpoint keep those values when resumed, and the run says so. WANDB_MODE=offline
    writes under out_dir/wandb only, a run folder per process under the one id, for `wandb sync`.

Neither package is needed unless asked for: each is imported only then, and a missing one stops the
run on the command line (`flag_problems`, before any model loads), naming the flag and the pip
command. Only rank 0 tracks, as only it writes the jsonl files; other ranks' Tracker does nothing.
A tracker is closed by common.StepLoop.close at the loop's end (the last step, or the stop a signal
asked for), and at interpreter exit on any other path (an exception, SystemExit): W&B then records
the run as failed (exit code 1).
"""
import atexit
import importlib
import shutil
from dataclasses import dataclass
from pathlib import Path

CHOICES = ("none", "tensorboard", "wandb")
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}  # what each backend imports
WANDB_ID_FILE = "wandb_run_id"


def flag_problems(report_to: str) -> list[str]:
    """What is wrong with --report_to: an unknown backend, or one whose package is missing."""
    if report_to not in CHOICES:
        return [f"--report_to {report_to!r}: choose none, tensorboard or wandb"]
    if report_to == "none":
        return []
    try:
        importlib.import_module(MODULES[report_to])
    except ImportError as e:
        return [f"--report_to {report_to} needs the {report_to} package, which does not import "
                f"({e}): pip install {report_to}"]
    return []


def numeric_fields(line: dict, prefix: str = "") -> dict:
    """The fields of a jsonl line that a tracker logs, each name with the prefix (module
    docstring)."""
    return {prefix + name: value for name, value in line.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step"}


@dataclass
class Tracker:
    """Where a run's metrics go besides the jsonl files: nowhere (backend "none", and every rank but
    0), a TensorBoard SummaryWriter, or a wandb run."""
    backend: str = "none"
    sink: object = None  # SummaryWriter | wandb Run; None once closed

    def log(self, metrics: dict, step: int, prefix: str = "") -> None:
        """One jsonl line's numbers at `step` (module docstring: which fields, under what names)."""
        if self.sink is None:
            return
        scalars = numeric_fields(metrics, prefix)
        if self.backend == "tensorboard":
            for tag, value in scalars.items():
                self.sink.add_scalar(tag, value, global_step=step)
            self.sink.flush()
        else:
            self.sink.log(scalars, step=step)

    def close(self, exit_code: int = 0) -> None:
        """Write out and close; a second call does nothing."""
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if self.backend == "tensorboard":
            sink.close()
        else:
            sink.finish(exit_code=exit_code)

    def close_at_exit(self) -> None:
        """Registered with atexit: a run still open at interpreter exit ended by an exception."""
        self.close(exit_code=1)


def start(report_to: str, out: Path, config: dict, first_step: int, resumed: bool,
          wandb_project: str, log) -> Tracker:
    """Rank 0's tracker, once the run's folder holds config.json and its logs are cut back
    (common.prepare_out_dir). first_step: the step this process trains first; resumed: it continues
    from a checkpoint."""
    if report_to == "none":
        return Tracker()
    if report_to == "tensorboard":
        sink = tensorboard_writer(out / "tensorboard", first_step, resumed)
    else:
        sink = wandb_run(out, config, first_step, resumed, wandb_project, log)
    tracker = Tracker(report_to, sink)
    atexit.register(tracker.close_at_exit)
    return tracker


def tensorboard_writer(folder: Path, first_step: int, resumed: bool):
    from torch.utils.tensorboard import SummaryWriter

    if not resumed:  # a fresh run in a used folder: its old curves would mix with the new
        shutil.rmtree(folder, ignore_errors=True)
    # On resume, TensorBoard hides what earlier event files hold for steps >= purge_step: the steps
    # that the crashed attempt logged after its last checkpoint, which this process trains again.
    return SummaryWriter(log_dir=str(folder), purge_step=first_step if resumed else None)


def wandb_run(out: Path, config: dict, first_step: int, resumed: bool, project: str, log):
    import wandb

    id_file = out / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
    run = wandb.init(project=project, dir=str(out), config=config, id=run_id, resume="allow")
    id_file.write_text(run.id + "\n")
    if run.resumed and run.step > first_step:  # W&B keeps a step's first values: say so
        log(f"--report_to wandb: W&B run {run.id} already holds steps up to {run.step - 1}; wandb "
            f"ignores what this run logs again for steps {first_step} to {run.step - 1} (the "
            f"values of the attempt before the checkpoint stay there; metrics.jsonl has this "
            f"run's)")
    return run
