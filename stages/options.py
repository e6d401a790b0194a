"""Options shared by several commands, defined once.

Each decorator adds one option with the same name, type and help text
everywhere it is used.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from wsss.datasets.prepared import DATASET_KINDS


class FiniteFloat(click.FloatRange):
    """A float option that must be finite (``nan`` and ``inf`` are refused) and, optionally, in a range.

    The same arguments as :class:`click.FloatRange`; the error names the option, e.g.
    ``Error: Invalid value for '--lr': 'nan' is not a finite number.``
    """

    name = "float"

    def convert(self, value, param, ctx):
        number = click.types.FloatParamType.convert(self, value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)

_existing_dir = click.Path(exists=False, file_okay=False, path_type=Path)


def root_option(required: bool = True):
    return click.option("--root", type=_existing_dir, required=required,
                        help="Dataset root prepared with `wsss prepare` (e.g. VOCdevkit/VOC2012).")


def dataset_option(default: str | None = None):
    return click.option("--dataset", type=click.Choice(DATASET_KINDS), default=default, show_default=True,
                        help="Dataset kind; must match what `wsss prepare` wrote under --root.")


def split_option(default: str, help_text: str = "Split to use."):
    return click.option("--split", default=default, show_default=True, help=help_text)


def out_option(help_text: str = "Output folder."):
    return click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
                        help=help_text)


def cams_option():
    """``--cams DIR`` (required), the CAM folder a stage reads."""
    return click.option("--cams", "cam_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
                        help="Folder of CAM files <id>.npz from `wsss make-cam` (IRN-style <id>.npy with "
                             "--allow-pickle).")


device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                             help="auto = cuda when available, else cpu.")
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same device, same outputs).")
workers_option = click.option("--workers", type=click.IntRange(min=0), default=None,
                              help="Worker processes (default: all cores).")
overwrite_option = click.option("--overwrite/--resume", default=False, show_default=True,
                                help="Redo finished outputs instead of skipping them.")
amp_option = click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "off"]), default="auto", show_default=True,
                          help="Mixed precision: auto = bf16 on CUDA GPUs that support it, off on CPU.")
compile_option = click.option("--compile", "compile_model", is_flag=True,
                              help="torch.compile the network (slow start, faster steps on GPU).")
threads_option = click.option("--threads", type=click.IntRange(min=1), default=None,
                              help="Threads for torch/OpenCV/BLAS in this process (default: the cores divided "
                                   "among the worker processes).")
def _parse_shard(ctx, param, text):
    from wsss.device import parse_shard
    from wsss.errors import WsssError

    try:
        return parse_shard(text)
    except WsssError as err:
        raise click.BadParameter(str(err).split(": ", 1)[-1]) from None


shard_option = click.option("--shard", default=None, metavar="I/N", callback=_parse_shard,
                            help="Process only shard I of N of the split (0 <= I < N), e.g. one task of a job "
                                 "array; outputs merge by file name.")
allow_pickle_option = click.option("--allow-pickle", is_flag=True,
                                   help="Allow IRN-style pickled .npy CAM dicts (unpickling runs code from the file).")


def sgd_options(lr: float, head: str):
    """The SGD + poly schedule options of the training stages (``head`` names the new layers)."""
    decorators = [
        click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=lr, show_default=True,
                     help="Backbone learning rate."),
        click.option("--head-lr-mult", type=FiniteFloat(min=0, min_open=True), default=10.0, show_default=True,
                     help=f"{head} learning rate factor."),
        click.option("--weight-decay", type=FiniteFloat(min=0), default=1e-4, show_default=True),
        click.option("--momentum", type=FiniteFloat(0, 1, max_open=True), default=0.9, show_default=True),
        click.option("--poly-power", type=FiniteFloat(min=0), default=0.9, show_default=True,
                     help="lr = base lr x (1 - step / steps) ^ power."),
    ]

    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command
    return apply


def float_list(text: str) -> tuple[float, ...]:
    """Parse ``"1.0,0.5,1.5"`` into finite floats (a click callback helper)."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(value) for value in values):
        raise click.BadParameter(f"expected finite numbers (no nan or inf), got {text!r}")
    return values


def parse_range(text: str) -> tuple[float, float, float]:
    """Parse ``"start:stop:step"`` (stop inclusive; finite, at most ``wsss.evaluation.MAX_THRESHOLDS`` values)."""
    from wsss.evaluation import threshold_range as thresholds_of

    parts = text.split(":")
    try:
        start, stop, step = (float(part) for part in parts)
    except ValueError:
        raise click.BadParameter(f"expected start:stop:step, got {text!r}") from None
    try:
        thresholds_of(start, stop, step)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    return start, stop, step


# click callbacks built on the parsers above ------------------------------------------------------

def positive_pair(ctx, param, text: str) -> tuple[float, float]:
    """``MIN,MAX`` with ``0 < MIN <= MAX`` (scale ranges)."""
    values = float_list(text)
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise click.BadParameter(f"expected MIN,MAX with 0 < MIN <= MAX, got {text!r}")
    return values


def positive_scales(ctx, param, text: str) -> tuple[float, ...]:
    """Comma-separated positive scales (multi-scale inference)."""
    values = float_list(text)
    if not values or min(values) <= 0:
        raise click.BadParameter(f"expected positive comma-separated scales, got {text!r}")
    return values


def fixed_floats(count: int, name: str, positive: tuple[int, ...] = ()):
    """A callback that takes exactly ``count`` comma-separated numbers >= 0 (``name`` says which, e.g.
    SXY,COMPAT); the values at the positions in ``positive`` must be > 0."""
    def parse(ctx, param, text):
        if text is None:
            return None
        values = float_list(text)
        if len(values) != count:
            raise click.BadParameter(f"expected {count} comma-separated numbers ({name}), got {text!r}")
        names = name.split(",")
        for index, value in enumerate(values):
            if value < 0 or (index in positive and value == 0):
                bound = "> 0" if index in positive else ">= 0"
                label = names[index] if len(names) == count else f"value {index + 1}"
                raise click.BadParameter(f"{label} must be {bound} ({name}), got {text!r}")
        return values
    return parse


def threshold_range(ctx, param, text: str) -> tuple[float, float, float]:
    """``start:stop:step`` (a threshold sweep), checked before any work is done."""
    return parse_range(text)
