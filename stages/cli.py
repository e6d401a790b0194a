"""The ``wsss`` command group: logging set-up, error handling and the explicit list of commands."""

from __future__ import annotations

import importlib
import logging

import click

from wsss import __version__
from wsss.errors import WsssError


# Every command, in pipeline order: name -> (module exposing ``command``, what ``wsss --help`` says of it).
# Modules are imported only when their command runs or prints its own help, so `wsss --help` and `wsss eval`
# do not pay for importing torch.
COMMANDS = {
    "demo-data": ("wsss.stages.demo_data", "Write the synthetic demo dataset (VOC layout)."),
    "prepare": ("wsss.stages.prepare", "Prepare a dataset once: split lists and image-level labels."),
    "pretrain": ("wsss.stages.pretrain", "Self-supervised pretraining of the backbone on the split's images."),
    "train-cls": ("wsss.stages.train_cls", "Train the multi-label CAM classifier."),
    "make-cam": ("wsss.stages.make_cam", "Class activation maps of a split (multi-scale, flip, erasing)."),
    "train-aff": ("wsss.stages.train_aff", "Learn pixel affinities from the CAMs' confident regions."),
    "refine": ("wsss.stages.refine", "CAMs -> pseudo-labels + reliability (GMM threshold, dense CRF)."),
    "train-seg": ("wsss.stages.train_seg", "Train DeepLab on pseudo-labels (or ground truth)."),
    "predict": ("wsss.stages.predict", "Segment a split, or any image files, with a train-seg checkpoint."),
    "export": ("wsss.stages.export", "Export a train-seg checkpoint: TorchScript, ONNX or torch.export."),
    "eval": ("wsss.stages.evaluate", "mIoU of label maps or CAMs against ground truth."),
    "report": ("wsss.stages.report", "Summarise a pipeline run into report.md."),
    "pipeline": ("wsss.stages.pipeline", "Run every stage from a recipe (shipped name or TOML file)."),
}


def log_level(verbose: int, quiet: bool) -> int:
    """The logging level of ``-v`` (INFO, the default), ``-vv`` (DEBUG) and ``-q`` (WARNING)."""
    return logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)


def one_line(err: BaseException) -> str:
    """The one-line message of an error a user can fix.

    A DataLoader worker re-raises an error as the same type with the message
    ``Caught WsssError in DataLoader worker process N.\nOriginal Traceback ...\n<module.Type>: <message>``;
    the original message is its last line.  Any other message is cut to its first line.
    """
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
        text = last[len(prefix):] if last.startswith(prefix) else last.split(": ", 1)[-1]
    return (text.splitlines() or [""])[0]


class _Group(click.Group):
    """The wsss group: lazily imported commands, and the one place where errors become one line.

    * :class:`WsssError` (also re-raised from a DataLoader or pool worker) -> ``Error: <message>``, exit 1;
    * an :class:`OSError` about a file (``--out`` under a file, a folder where a file belongs, no
      permission, disk full) -> ``Error: <file>: <reason>``, exit 1;
    * :class:`EOFError` (an empty file read past its end) -> one line, exit 1, never click's bare
      "Aborted!".
    Anything else is a bug and keeps its traceback.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, summary = COMMANDS[name]
        command = importlib.import_module(module).command
        command.short_help = summary
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``wsss --help``, from :data:`COMMANDS` alone (no command is imported)."""
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, summary) in COMMANDS.items()])

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except WsssError as err:
            raise click.ClickException(one_line(err)) from None
        except OSError as err:
            if err.filename is None:
                if str(err).startswith("Caught "):  # from a DataLoader worker: the file is in the message
                    raise click.ClickException(one_line(err)) from None
                raise
            names = " -> ".join(str(name) for name in (err.filename, err.filename2) if name is not None)
            hint = " (a file stands where a folder is needed)" if isinstance(
                err, (FileExistsError, NotADirectoryError)) else ""
            raise click.ClickException(f"{names}: {err.strerror or one_line(err)}{hint}") from None
        except EOFError as err:
            raise click.ClickException(f"unexpected end of a file ({one_line(err) or 'empty file'}); "
                                       "delete the empty or truncated file and run again") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="wsss")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """Weakly supervised semantic segmentation from image-level labels.

    \b
    Stages (each reads and writes plain files):
      prepare -> [pretrain] -> train-cls -> make-cam -> [train-aff] -> refine -> train-seg -> predict -> eval
    """
    logging.basicConfig(level=log_level(verbose, quiet), format="%(levelname)s %(name)s: %(message)s", force=True)


def main() -> None:
    cli(prog_name="wsss")


if __name__ == "__main__":  # torchrun -m wsss.stages.cli ...
    main()
