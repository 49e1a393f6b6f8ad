"""Progress of the training loop: tqdm's bar on a terminal, plain lines everywhere else.

Redirected to a file (a batch job's log, ``> run.log``), a tqdm bar writes a carriage-return
frame at every refresh: 168 KB for a one-minute run, unreadable in an editor. Off a terminal
the same information comes as one plain line every ``LINE_INTERVAL_S`` seconds and at the end.
"""

import sys
import time

from tqdm import tqdm

LINE_INTERVAL_S = 30.0


def on_terminal() -> bool:
    return sys.stderr.isatty()


def progress_bar(total: int, desc: str, enabled: bool):
    """Something with tqdm's ``update``, ``set_postfix`` and ``close``."""
    if on_terminal():
        return tqdm(total=total, desc=desc, disable=not enabled)
    return LineProgress(total, desc, enabled)


class LineProgress:
    """Plain progress lines on stderr: the first step, then every ``interval_s``, and the last."""

    def __init__(self, total: int, desc: str, enabled: bool, interval_s: float = LINE_INTERVAL_S):
        self.total, self.desc, self.enabled, self.interval_s = total, desc, enabled, interval_s
        self.done, self.postfix = 0, {}
        self.started = self.printed_at = time.perf_counter()

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (self.done == n or self.done >= self.total
                             or now - self.printed_at >= self.interval_s):
            self.printed_at = now
            values = " ".join(f"{key}={value}" for key, value in self.postfix.items())
            print(f"{self.desc}: step {self.done}/{self.total} {values} "
                  f"({now - self.started:.0f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def quiet_library_bars_off_terminal() -> None:
    """Off a terminal, turn off the bars of datasets (tokenising), transformers (loading and
    writing shards) and the Hugging Face hub (downloads) as well: their frames would fill the
    log the same way."""
    if on_terminal():
        return
    import datasets
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()
