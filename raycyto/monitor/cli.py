"""``raycyto monitor`` (registered as a command by the root CLI)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from raycyto.monitor import DEFAULT_ALPHA, DEFAULT_MIN_WINDOW, DEFAULT_WINDOW


def _p(p: Optional[float]) -> str:
    return "n/a" if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def monitor(
    audit: list[Path] = typer.Argument(..., help="audit log(s) written by `raycyto serve --audit-log` "
                                       "(rotated ones too: audit.jsonl.1 audit.jsonl; read in time order)"),
    model: str = typer.Option(..., "--model", "-m", help="the bundle that answered (folder written by "
                              "`raycyto export`, a main-job folder such as runs/demo, or s3://... URI): "
                              "its answers are those with its model.json SHA-256, compared with its "
                              "validation reference"),
    window: int = typer.Option(DEFAULT_WINDOW, "--window", "-n", help="answers per window"),
    min_window: int = typer.Option(DEFAULT_MIN_WINDOW, "--min-window", help="test the last, partial window "
                                   "only if it has at least this many answers"),
    alpha: float = typer.Option(DEFAULT_ALPHA, "--alpha", help="false-alarm rate of the whole log (Bonferroni "
                                "over every statistic of every window)"),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="keep only answers served under this "
                                             "model name"),
    version: Optional[str] = typer.Option(None, "--version", help="keep only answers served under this "
                                          "version label"),
    as_json: bool = typer.Option(False, "--json", help="print the report as one JSON object instead"),
) -> None:
    """Compare served answers with the model's own validation reference, window by window:
    class mix, referral rate, out-of-distribution rate, confidence and the guard's distances.

    Exit status: 0 no drift, 1 drift beyond the stated bound in some window, 2 input it cannot judge.

    Example: raycyto monitor logs/audit-*.jsonl --model runs/demo/model --window 200
    """
    from rich.console import Console
    from rich.table import Table

    from raycyto.monitor.core import MonitorInputError, monitor_log
    from raycyto.monitor.drift import STATISTICS

    try:
        report = monitor_log(audit, model, window=window, min_window=min_window, alpha=alpha,
                             model_name=model_name, version=version)
    except MonitorInputError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        sys.stdout.write(json.dumps(report.to_json()) + "\n")
        raise typer.Exit(1 if report.drifted else 0)

    console = Console(width=None if sys.stdout.isatty() else 160, highlight=False, soft_wrap=True)
    for line in report.problems[:20]:
        typer.echo(f"skipped malformed line {line}", err=True)
    if len(report.problems) > 20:
        typer.echo(f"... and {len(report.problems) - 20} more malformed lines", err=True)
    b = report.bundle
    console.print(f"model {b.name} (model.json sha256 {b.sha256[:12]}): {report.kept} answers"
                  + (f"; skipped {sum(report.skipped.values())} of other models/versions" if report.skipped else "")
                  + (f"; {len(report.problems)} malformed lines" if report.problems else ""))
    console.print(f"reference: {b.reference.n} answers on {b.reference_source}")
    console.print(f"bound: alarm when p < alpha / m = {report.alpha:g} / {report.tests} = {report.bound:.2g} "
                  f"(Bonferroni over {report.tests} tests: {len(report.windows)} window(s) of up to "
                  f"{report.window} answers; a log without drift alarms with probability <= {report.alpha:g})")
    table = Table(show_lines=False)
    for col, kw in (("window", {}), ("statistic", {}), ("value", {}), ("reference", {}), ("test", {}),
                    ("p", {"justify": "right"}), ("bound", {"justify": "right"}), ("alarm", {})):
        table.add_column(col, **kw)
    for w in report.windows:
        for i, c in enumerate(w.checks):
            alarm = c.alarm(report.bound)
            table.add_row(f"{w.index} (#{w.first}-{w.last})\n{w.start[:19]}" if i == 0 else "", c.statistic,
                          c.value, c.reference, c.test if c.tested else f"{c.test}: n/a", _p(c.p),
                          f"< {report.bound:.2g}" if c.tested else "-",
                          "[bold red]DRIFT[/bold red]" if alarm else ("ok" if c.tested else "-"),
                          end_section=i == len(w.checks) - 1)
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")
    if report.left_out:
        console.print(f"note: the last {report.left_out} answers (fewer than --min-window {report.min_window}) "
                      "are not tested")
    for w in report.drifted:
        names = ", ".join(f"{c.statistic} (p {_p(c.p)})" for c in report.alarms(w))
        console.print(f"[bold red]ALARM[/bold red] window {w.index} (answers {w.first}-{w.last}, "
                      f"{w.start} .. {w.end}): {names}")
    drifted = report.drifted
    if drifted:
        stats = sorted({c.statistic for w in drifted for c in report.alarms(w)}, key=list(STATISTICS).index)
        console.print(f"[bold red]verdict: DRIFT[/bold red] in {len(drifted)} of {len(report.windows)} windows "
                      f"(first at {drifted[0].start}; {', '.join(stats)}): the served images no longer look like "
                      "the model's validation images; check the scanner, stain and image pipeline, and do not "
                      "trust the referral guarantees until it is explained")
        raise typer.Exit(1)
    console.print(f"[bold green]verdict: no drift[/bold green] in {len(report.windows)} window(s), "
                  f"{report.kept - report.left_out} answers: every statistic within its bound")
