"""Placeholder: the owner of raycyto/data replaces this module."""
import typer

app = typer.Typer(no_args_is_help=True, help="(not built yet)")


@app.command("todo")
def todo() -> None:
    """Not built yet."""
    raise typer.Exit(1)
