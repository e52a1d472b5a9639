"""What the main process shows while training: a tqdm bar on a terminal, plain log lines elsewhere.

On a terminal the bar shows the step, loss, learning rate, tokens/s and time left, updating in place; evaluation
results are printed above it. In a non-interactive log (CI, a cluster's job log) there is no bar: every logged
step is one plain line, with the time left.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


class Progress:
    def __init__(self, total_steps: int, start_step: int, is_main: bool, interactive: bool | None = None):
        self.total_steps, self.start_step = total_steps, start_step
        self.started = time.perf_counter()
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = None
        if is_main and self.interactive:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def seconds_left(self, step: int) -> float:
        done = step - self.start_step
        return (time.perf_counter() - self.started) / done * (self.total_steps - step) if done > 0 else float("nan")

    def advance(self, step: int, row: dict[str, float]) -> None:
        """Called after every step with whatever was logged for it (possibly only the step number)."""
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        shown = {"loss": row.get("loss/train"), "lr": row.get("lr"), "tok/s": row.get("tokens_per_second")}
        if any(v is not None for v in shown.values()):
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if v is not None}, refresh=False)

    def show(self, row: dict[str, float]) -> None:
        """Print a logged row: above the bar on a terminal (evaluations only), as a plain line elsewhere."""
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        if self.bar is not None:
            if any(k.endswith("/eval") for k in row):
                self.bar.write(text, file=sys.stderr)
            return
        if row["step"] > self.start_step:
            text += f"  time_left={format_seconds(self.seconds_left(row['step']))}"
        logger.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_seconds(seconds: float) -> str:
    if seconds != seconds:  # nan: nothing measured yet
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
