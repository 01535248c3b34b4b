"""``raycyto synth``: write the built-in synthetic datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True,
                  help="Generate synthetic karyograms and blood-smear fields (offline datasets).")


def parse_counts(text: Optional[str]) -> Optional[dict[str, int]]:
    """``"HLT=59,ALL=49"`` -> ``{"HLT": 59, "ALL": 49}`` (None stays None); malformed text is a usage error."""
    if text is None:
        return None
    counts: dict[str, int] = {}
    for item in text.split(","):
        label, sep, number = item.partition("=")
        if not sep or not label.strip() or not number.strip().isdigit():
            raise typer.BadParameter(f"expected CLASS=IMAGES,... like HLT=59,ALL=49; got {item!r}")
        counts[label.strip()] = int(number)
    return counts


def _run(task: str, out: Path, patients: Optional[int], per_patient: int, seed: int,
         size: Optional[int], **options) -> None:
    """Generate, then print counts per label (and per subtype when the task has one)."""
    import csv
    from collections import Counter

    from rich.console import Console
    from rich.table import Table

    from raycyto.errors import RaycytoError
    from raycyto.synth import generate

    console = Console()
    try:
        manifest = generate(task, out, patients=patients, per_patient=per_patient, seed=seed,
                            size=size, progress=True, **options)
    except RaycytoError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    key = "subtype" if rows and "subtype" in rows[0] else "label"
    counts = Counter((r["label"], r[key]) for r in rows)
    table = Table(title=f"{task}: {len(rows)} images from {len({r['group'] for r in rows})} patients")
    table.add_column("label")
    if key != "label":
        table.add_column(key)
    table.add_column("images", justify="right")
    for (label, sub), n in sorted(counts.items()):
        table.add_row(*([label, sub] if key != "label" else [label]), str(n))
    console.print(table)
    console.print(f"wrote {out} (manifest: {manifest.name})")


@app.command("karyogram")
def karyogram(
    out: Path = typer.Option(..., "--out", help="Output folder (created)."),
    patients: int = typer.Option(60, "--patients", help="Synthetic patients (groups)."),
    per_patient: int = typer.Option(2, "--per-patient", help="Images per patient."),
    seed: int = typer.Option(0, "--seed", help="Seed; same arguments give identical files."),
    size: int = typer.Option(416, "--size", help="Image side in pixels."),
    abnormal_fraction: float = typer.Option(0.5, "--abnormal-fraction",
                                            help="Share of abnormal patients (0..1)."),
) -> None:
    """Ordered G-banded karyograms, labels normal/abnormal (subtype = abnormality kind).

    Example: raycyto synth karyogram --out data/karyo --patients 20 --per-patient 2 --seed 0
    """
    _run("karyogram", out, patients, per_patient, seed, size, abnormal_fraction=abnormal_fraction)


@app.command("leukemia")
def leukemia(
    out: Path = typer.Option(..., "--out", help="Output folder (created)."),
    patients: Optional[int] = typer.Option(
        None, "--patients", show_default=False,
        help="Synthetic patients (groups), classes balanced (default 60; with --class-counts: as many as it needs)."),
    per_patient: int = typer.Option(2, "--per-patient", help="Images per patient."),
    seed: int = typer.Option(0, "--seed", help="Seed; same arguments give identical files."),
    size: int = typer.Option(224, "--size", help="Image side in pixels."),
    class_counts: Optional[str] = typer.Option(
        None, "--class-counts", callback=parse_counts,
        help="Images per class, CLASS=N,... (study B: HLT=59,ALL=49,AML=58,CLL=46,CML=54), "
             "--per-patient to a patient; a class's last patient holds the remainder."),
) -> None:
    """Blood-smear fields, labels ALL, AML, CLL, CML, HLT.

    Example: raycyto synth leukemia --out data/leuk --patients 20 --per-patient 2 --seed 0

    Study B's 266 images: raycyto synth leukemia --out data/leuk --class-counts HLT=59,ALL=49,AML=58,CLL=46,CML=54
    """
    _run("leukemia", out, patients, per_patient, seed, size, class_counts=class_counts)
