"""Where step records go: the console (averaged over ``--log-interval``, with elapsed time and ETA),
``metrics.jsonl`` (every step, or every interval), TensorBoard and Weights & Biases; evaluation
records go to the same places at their own step. Only the last rank writes: it holds the loss, and
every record is already reduced over ranks."""

import json
import math
import os
import socket
import time
import warnings
from typing import TYPE_CHECKING, Dict, List, Optional
from urllib.parse import urlparse

from megatron_psft.platform import parallel

if TYPE_CHECKING:  # evaluation imports Megatron-Core; the logger must not
    from megatron_psft.engine.evaluation import EvalResult

# Console columns: (record key, label, format).
CONSOLE = (("loss", "loss", ".5f"), ("entropy", "entropy", ".4f"), ("clip_fraction", "clip frac", ".4f"),
           ("ratio_mean", "ratio", ".4f"), ("ratio_min", "ratio min", ".3f"), ("ratio_max", "ratio max", ".3f"),
           ("approx_kl", "kl", ".2e"), ("grad_norm", "grad norm", ".4f"), ("learning_rate", "lr", ".3e"),
           ("tokens_per_s", "tok/s", ".0f"), ("tflops_per_gpu", "TFLOP/s/GPU", ".3f"),
           ("old_policy_s", "old-policy s", ".2f"), ("moe_load_balance_max", "moe lb max", ".3f"),
           ("routing_flip_fraction", "routing flips", ".4f"), ("memory/allocated_gib", "mem GiB", ".2f"),
           ("memory/peak_gib", "peak GiB", ".2f"))


def drop_steps_after(jsonl_path: str, last_step: int) -> None:
    """Forget the records of steps a resumed run will train again (they were logged after the
    checkpoint it resumes from), so each step appears once. A line cut short by a kill or a full
    disk is dropped with a warning rather than blocking the resume."""
    if not os.path.isfile(jsonl_path):
        return
    kept = []
    with open(jsonl_path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{jsonl_path}:{number}: dropping an unreadable (truncated?) record")
                continue
            if record["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(jsonl_path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(jsonl_path + ".tmp", jsonl_path)


def average_records(records: List[Dict[str, object]]) -> Dict[str, object]:
    """One record for an interval: numbers averaged (``*_min`` / ``*_max`` take the extreme),
    None where no step had a value; other values from the last step."""
    result: Dict[str, object] = {}
    for key in dict.fromkeys(k for record in records for k in record):
        values = [r[key] for r in records if r.get(key) is not None]
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            result[key] = records[-1].get(key)
        elif key.endswith("_min"):
            result[key] = min(values)
        elif key.endswith("_max"):
            result[key] = max(values)
        else:
            result[key] = sum(values) / len(values)
    return result


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class MetricsLogger:
    """Per-step records to the console, a JSONL file, TensorBoard and W&B (on the last rank only)."""

    @classmethod
    def from_config(cls, config, run_config: dict, resumed_step: Optional[int]) -> "MetricsLogger":
        """The logger a run's configuration asks for (--metrics-file, --tensorboard-dir, --log-interval, W&B)."""
        settings, save = config.logging, config.checkpoint.save
        wandb = None
        if settings.wandb_project:
            wandb = dict(project=settings.wandb_project, name=settings.wandb_exp_name, config=run_config,
                         save_dir=settings.wandb_save_dir or (os.path.join(save, "wandb") if save else None))
        return cls(settings.metrics_file, settings.tensorboard_dir, config.training.train_iters, resumed_step,
                   log_interval=settings.log_interval, jsonl_every_interval=settings.metrics_file_every_interval,
                   wandb=wandb)

    def __init__(self, jsonl_path: Optional[str], tensorboard_dir: Optional[str], train_steps: int,
                 resumed_step: Optional[int] = None, log_interval: int = 1, jsonl_every_interval: bool = False,
                 wandb: Optional[dict] = None):
        self.active = parallel.is_reporting_rank()
        self.train_steps, self.log_interval, self.jsonl_every_interval = train_steps, log_interval, jsonl_every_interval
        self.jsonl = self.writer = self.wandb_run = None
        self.pending: List[Dict[str, object]] = []
        self.started = time.monotonic()
        self.first_step = None
        if not self.active:
            return
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            if resumed_step is not None:
                drop_steps_after(jsonl_path, resumed_step)
            self.jsonl = open(jsonl_path, "a")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("--tensorboard-dir needs the tensorboard package") from e
            self.writer = SummaryWriter(tensorboard_dir)
        if wandb:
            self.wandb_run = self._start_wandb(**wandb)

    @staticmethod
    def _start_wandb(project: str, name: Optional[str], save_dir: Optional[str], config: dict):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("--wandb-project needs the wandb package: pip install 'megatron-psft[wandb]'") from e
        mode = os.environ.get("WANDB_MODE")
        if mode is None:  # no network (an air-gapped cluster): write the run offline, `wandb sync` it later
            mode = "online" if _reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")) else "offline"
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
        return wandb.init(project=project, name=name, dir=save_dir, config=config, mode=mode)

    def log(self, step: int, record: Dict[str, object]) -> None:
        """Record `step` (0-based); the console prints at each interval's last step."""
        if not self.active:
            return
        record = {"step": step + 1, **record}
        if self.first_step is None:
            self.first_step = step
        self.pending.append(record)
        at_interval = (step + 1) % self.log_interval == 0 or step + 1 == self.train_steps
        if self.jsonl and (not self.jsonl_every_interval or at_interval):
            out = average_records(self.pending) if self.jsonl_every_interval else record
            self.jsonl.write(json.dumps({**out, "step": step + 1}) + "\n")
            self.jsonl.flush()
        scalars = {key: value for key, value in record.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"}
        if self.writer:
            for key, value in scalars.items():
                self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step + 1)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({key if "/" in key else f"train/{key}": value for key, value in scalars.items()},
                               step=step + 1)
        if at_interval:
            self._print(step, average_records(self.pending))
            self.pending = []

    def _print(self, step: int, record: Dict[str, object]) -> None:
        elapsed = time.monotonic() - self.started
        done = step + 1 - self.first_step
        eta = elapsed / done * (self.train_steps - step - 1) if done else math.nan
        parts = [f" iteration {step + 1:>6}/{self.train_steps:>6}", f"phase: {record.get('phase', '')}",
                 f"elapsed {_format_duration(elapsed)}", f"ETA {_format_duration(eta)}"]
        for key, label, fmt in CONSOLE:
            value = record.get(key)
            if value is not None:
                parts.append(f"{label}: {value:{fmt}}")
        timings = [f"{key[5:-2]} {value:.2f}" for key, value in record.items()
                   if key.startswith("time/") and isinstance(value, float) and value > 0]
        if timings:
            parts.append("s: " + ", ".join(timings))
        print(" | ".join(parts), flush=True)

    def log_eval(self, step: int, results: Dict[str, "EvalResult"], seconds: Optional[float] = None) -> None:
        """Record an evaluation after `step` optimizer steps (0: before training) as one JSONL line
        ``{"step", "eval/NAME/nll", "eval/NAME/entropy", "eval/NAME/tokens"}``, one console line and
        the same scalars in TensorBoard and W&B at that step. It shares the training records' step
        numbering, so a resume drops and redoes it exactly like them."""
        if not self.active:
            return
        record = {f"eval/{name}/{key}": getattr(result, key)
                  for name, result in results.items() for key in ("nll", "entropy", "tokens")}
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
            self.jsonl.flush()
        scalars = {key: value for key, value in record.items() if value is not None}
        if self.writer:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)
        parts = [f" evaluation at step {step:>6}/{self.train_steps:>6}"]
        for name, result in results.items():
            if result.tokens:
                parts.append(f"{name}: nll {result.nll:.5f}, entropy {result.entropy:.4f}, tokens {result.tokens}")
            else:
                parts.append(f"{name}: no response tokens")
        if seconds is not None:
            parts.append(f"{seconds:.2f} s")
        print(" | ".join(parts), flush=True)

    def note(self, line: str) -> None:
        """A line outside the step records (a summary, a hint)."""
        if self.active:
            print(line, flush=True)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.writer:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
