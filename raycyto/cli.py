"""The ``raycyto`` command. Each pipeline stage contributes its own sub-commands."""

from __future__ import annotations

import typer

from raycyto import run as run_cmd
from raycyto.analysis import cli as analysis_cli
from raycyto.data import cli as data_cli
from raycyto.models import cli as models_cli
from raycyto.monitor import cli as monitor_cli
from raycyto.serve import cli as serve_cli
from raycyto.export import cli as export_cli
from raycyto.synth import cli as synth_cli
from raycyto.tune import cli as tune_cli

app = typer.Typer(
    name="raycyto",
    help="Train, evaluate and serve karyogram and leukemia-smear classifiers on Ray.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
def _version(value: bool) -> None:
    if value:
        from raycyto import __version__

        typer.echo(f"raycyto {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Train, evaluate and serve karyogram and leukemia-smear classifiers on Ray."""


app.add_typer(synth_cli.app, name="synth")
app.add_typer(data_cli.app, name="data")
app.add_typer(models_cli.app, name="models")
app.command("sweep")(tune_cli.sweep)
app.command("report")(analysis_cli.report)
app.command("export")(export_cli.export)
app.command("serve")(serve_cli.serve)
app.command("predict")(serve_cli.predict)
app.command("run")(run_cmd.run)
app.command("monitor")(monitor_cli.monitor)


if __name__ == "__main__":
    app()
