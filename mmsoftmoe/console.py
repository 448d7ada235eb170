"""What mmsoftmoe's commands write to the console: progress bars only on a terminal, third-party warnings once.

A progress bar redraws itself with carriage returns; in a file (a SLURM `.out`, a CI log) every redraw stays, so
bars are drawn only when stderr is a terminal, and never when `TQDM_DISABLE` is set (tqdm's own switch, which it
ignores when a caller passes `disable=` explicitly, as every bar here must). In a log file the per-step line of
`train.log` carries the same numbers. Every tqdm bar of the tree is made by `progress_bar`.

Hugging Face datasets' and hub's bars follow the same rule (`quiet_third_party_bars`). Warnings that every process
of a `torchrun` launch would repeat are shown by the main process only: the `mmsoftmoe` command filters them out
on the others before anything is imported. `quiet` silences exporters' chatter (`mmsoftmoe export` without
`--verbose`).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def progress_enabled(show: bool = True) -> bool:
    """Whether a progress bar should be drawn: asked for (`show`, e.g. the main process), stderr is a terminal,
    and `TQDM_DISABLE` is not set."""
    return show and sys.stderr.isatty() and not _env_flag("TQDM_DISABLE")


def progress_bar(*, show: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar (tqdm's keyword arguments) drawn only where `progress_enabled(show)`; otherwise a disabled bar,
    whose `update` / `set_postfix` calls do nothing."""
    return tqdm(disable=not progress_enabled(show), **kwargs)


def quiet_third_party_bars(force: bool = False) -> None:
    """Hugging Face datasets', hub's and transformers' progress bars (Arrow conversion, downloads, weight loading
    and saving) off where ours are, or always with `force`."""
    if progress_enabled() and not force:
        return
    import datasets  # imported here: drawing a bar of ours does not need them loaded
    import huggingface_hub.utils
    import transformers.utils.logging

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """While open (if `enabled`): third-party progress bars off and what libraries print to stdout dropped (the
    ONNX exporter's step-by-step lines); warnings and errors still reach stderr."""
    if not enabled:
        yield
        return
    quiet_third_party_bars(force=True)
    with contextlib.redirect_stdout(io.StringIO()):
        yield
