"""The ``wsss`` command group: logging set-up, error handling and the explicit list of commands."""

from __future__ import annotations

import logging

import click

from wsss import __version__
from wsss.errors import WsssError


class _Group(click.Group):
    """A group that turns :class:`WsssError` into a one-line ``Error: ...`` and exit code 1."""

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
      prepare -> train-cls -> make-cam -> refine -> train-seg -> predict -> eval
    """
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


def _register() -> None:
    from stages import demo_data, evaluate, prepare

    cli.add_command(demo_data.command, "demo-data")
    cli.add_command(prepare.command, "prepare")
    cli.add_command(evaluate.command, "eval")


_register()


def main() -> None:
    cli(prog_name="wsss")
