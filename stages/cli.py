"""The ``wsss`` command group: logging set-up, error handling and the explicit list of commands."""

from __future__ import annotations

import importlib
import logging

import click

from wsss import __version__
from wsss.errors import WsssError


# Every command, in pipeline order: name -> module exposing ``command``.  Modules are imported only
# when their command runs (or --help lists them), so `wsss eval` does not pay for importing torch.
COMMANDS = {
    "demo-data": "stages.demo_data",
    "prepare": "stages.prepare",
    "pretrain": "stages.pretrain",
    "train-cls": "stages.train_cls",
    "make-cam": "stages.make_cam",
    "train-aff": "stages.train_aff",
    "refine": "stages.refine",
    "train-seg": "stages.train_seg",
    "predict": "stages.predict",
    "eval": "stages.evaluate",
    "report": "stages.report",
}


class _Group(click.Group):
    """The wsss group: lazily imported commands, and :class:`WsssError` as a one-line ``Error: ...``, exit 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return importlib.import_module(COMMANDS[name]).command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except WsssError as err:
            raise click.ClickException(str(err)) from None


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
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def main() -> None:
    cli(prog_name="wsss")


if __name__ == "__main__":  # torchrun -m stages.cli ...
    main()
