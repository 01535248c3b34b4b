"""Task registry and the generator driver shared by every synthetic task."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from raycyto.errors import ConfigError, DataError
from raycyto.synth import karyogram, leukemia
from raycyto.synth.base import SynthTask, encode_png, image_rng, resize_to

TASKS: dict[str, SynthTask] = {t.name: t for t in (karyogram.TASK, leukemia.TASK)}

# The "default sets" `raycyto run` generates when no data source is given.
DEFAULTS: dict[str, dict[str, Any]] = {
    "karyogram": {"patients": 60, "per_patient": 2, "size": 416, "abnormal_fraction": 0.5},
    "leukemia": {"patients": 60, "per_patient": 2, "size": 224},
}

# Tasks whose ``plan`` takes ``labels`` (one class per patient), so ``class_counts`` can set them.
COUNTED_TASKS = ("leukemia",)

MARKER = "synth.json"
MIN_SIZE = 16


def get_task(name: str) -> SynthTask:
    """The registered task called ``name``; unknown names raise ``ConfigError("task", ...)``."""
    if name not in TASKS:
        raise ConfigError("task", f"unknown synthetic task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def _check_int(field: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(field, f"must be an integer >= {minimum}, got {value!r}")
    return value


def patients_from_counts(task: str, class_counts: Mapping[str, int], per_patient: int,
                         patients: int | None = None, field: str = "class_counts") -> list[tuple[str, int]]:
    """One ``(label, images)`` pair per patient, for ``class_counts[label]`` images of each class.

    Classes come in the task's label order (the mapping's order does not matter); each class's
    images go ``per_patient`` to a patient, and its last patient holds the remainder.

    Raises:
        ConfigError(field, ...): a task without class counts, an empty mapping, an unknown class,
            a count that is not a positive integer, or ``patients`` given and not equal to the
            number of patients the counts make.
    """
    spec = get_task(task)
    if task not in COUNTED_TASKS:
        raise ConfigError(field, f"synthetic task {task!r} does not take class counts "
                                 f"(tasks that do: {', '.join(COUNTED_TASKS)})")
    if not isinstance(class_counts, Mapping) or not class_counts:
        raise ConfigError(field, f"expected a mapping class -> images, e.g. {{HLT: 59, ALL: 49}}, "
                                 f"got {class_counts!r}")
    unknown = sorted(set(class_counts) - set(spec.labels))
    if unknown:
        raise ConfigError(field, f"unknown class(es) {unknown}; {task} classes: {list(spec.labels)}")
    out = []
    for label in (c for c in spec.labels if c in class_counts):
        n = class_counts[label]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(field, f"{label}: expected a positive number of images, got {n!r}")
        out += [(label, min(per_patient, n - first)) for first in range(0, n, per_patient)]
    if patients is not None and patients != len(out):
        raise ConfigError(field, f"the counts make {len(out)} patients of up to {per_patient} images, "
                                 f"but patients is {patients}; leave patients out (null) or set it to {len(out)}")
    return out


def plan_counts(task: str, seed: int, class_counts: Mapping[str, int], per_patient: int,
                patients: int | None = None, **options: Any) -> list[dict[str, Any]]:
    """The task's ``plan`` for ``class_counts`` images per class (see ``patients_from_counts``).

    Patients get their class in an order shuffled by ``seed``; each patient dict also holds
    ``images``, the number of images it draws. Everything else is planned as without counts.
    """
    counted = patients_from_counts(task, class_counts, per_patient, patients)
    order = np.random.default_rng([seed, len(counted), 2, 1]).permutation(len(counted))
    counted = [counted[i] for i in order]
    cohort = get_task(task).plan(seed, len(counted), labels=[label for label, _ in counted], **options)
    return [{**patient, "images": images} for patient, (_, images) in zip(cohort, counted)]


def _prepare_out(out: Path) -> None:
    """Create ``out`` or clear a previous synthetic set in it; refuse unrelated non-empty folders."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder; pick a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    ours = (out / MARKER).exists() or (out / "manifest.csv").exists()
    if not ours and any(out.iterdir()):
        raise DataError(f"--out {out} is not empty and holds no synthetic set ({MARKER}); "
                        "pick a new or empty folder")
    for old in sorted(out.glob("*/p*_i*.png")):
        old.unlink()
    for sub in sorted(p for p in out.iterdir() if p.is_dir()):
        if not any(sub.iterdir()):
            sub.rmdir()


def _progress(enabled: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), disable=not enabled)


def _render_range(task: str, cohort: list[dict[str, Any]], first: int, out: str, per_patient: int, seed: int,
                  size: int, digits: int) -> list[list[Any]]:
    """Draw and write every image of patients ``first .. first + len(cohort) - 1``; manifest rows.

    A patient draws ``per_patient`` images, or ``patient["images"]`` when its plan says so
    (class counts). Each image depends only on (seed, patient, image), so any split of the
    patients over workers writes the same bytes."""
    spec = TASKS[task]
    draw_side = max(size, spec.base_size)
    rows = []
    for p, patient in enumerate(cohort, start=first):
        label = patient["label"]
        (Path(out) / label).mkdir(exist_ok=True)
        group = f"p{p:0{digits}d}"
        for i in range(patient.get("images", per_patient)):
            image = spec.render(patient, image_rng(seed, p, i), draw_side)  # [S, S, 3]
            rel = f"{label}/{group}_i{i}.png"
            (Path(out) / rel).write_bytes(encode_png(resize_to(image, size)))
            rows.append([rel, label, group] + [patient[c] for c in spec.extra_columns])
    return rows


def generate(task: str, out: Path, patients: int | None, per_patient: int, seed: int,
             size: int | None = None, progress: bool = True, parallel: bool | None = None,
             class_counts: Mapping[str, int] | None = None, **kw: Any) -> Path:
    """Write a synthetic dataset: ``out/<label>/p<patient>_i<k>.png`` and ``out/manifest.csv``.

    Args:
        task: a key of ``TASKS`` ("karyogram", "leukemia").
        out: output folder (created; a previous synthetic set in it is replaced).
        patients: number of synthetic patients (manifest ``group``); each gets its class once.
            None: the task's default (60), or as many as ``class_counts`` needs.
        per_patient: images per patient, each a new realisation (field, stain, jitter).
        seed: non-negative seed; same arguments give byte-identical files.
        size: square image side in pixels (default: the task's base size).
        progress: show a rich progress bar.
        parallel: draw on Ray workers (chunks of patients as Ray tasks); None: when Ray is
            already running and the set has at least 64 images. Same bytes either way.
        class_counts: images per class, e.g. ``{"HLT": 59, "ALL": 49}`` (tasks in
            ``COUNTED_TASKS``). Each class's images go ``per_patient`` to a patient, its last
            patient holding the remainder; patients get their class in an order shuffled by
            ``seed``, the rest of each patient (mix, stain bias, images) is drawn as without
            counts. ``patients``, when given, must equal the number of patients this makes;
            anything else raises ``ConfigError("class_counts", ...)``.
        **kw: task options (karyogram: ``abnormal_fraction``).
    Returns:
        Path of ``out/manifest.csv`` (columns ``path,label,group`` + task extra columns,
        ``path`` relative to ``out``).
    """
    spec = get_task(task)
    unknown = sorted(set(kw) - set(spec.options))
    if unknown:
        known = ", ".join(spec.options) or "none"
        raise ConfigError(unknown[0], f"not an option of synthetic task {task!r}; known: {known}")
    options = {**spec.options, **kw}
    spec.check(options)
    if patients is not None:
        _check_int("patients", patients, 1)
    _check_int("per_patient", per_patient, 1)
    _check_int("seed", seed, 0)
    size = spec.base_size if size is None else _check_int("size", size, MIN_SIZE)
    if class_counts is None:
        patients = DEFAULTS[task]["patients"] if patients is None else patients
        cohort = spec.plan(seed, patients, **options)
    else:
        cohort = plan_counts(task, seed, class_counts, per_patient, patients, **options)
        patients = len(cohort)

    out = Path(out)
    _prepare_out(out)
    params = {"task": task, "patients": patients, "per_patient": per_patient, "seed": seed,
              "size": size, "options": options}
    if class_counts is not None:
        params["class_counts"] = dict(class_counts)
    (out / MARKER).write_text(json.dumps(params, sort_keys=True, indent=1) + "\n")

    total = sum(p.get("images", per_patient) for p in cohort)
    digits = max(3, len(str(patients - 1)))
    if parallel is None:
        import sys

        parallel = "ray" in sys.modules and sys.modules["ray"].is_initialized() and total >= 64
    step = max(1, min(16, -(-patients // 32))) if parallel else 1  # patients per unit of work
    chunks = [(first, cohort[first:first + step]) for first in range(0, patients, step)]
    args = (str(out), per_patient, seed, size, digits)
    parts: dict[int, list] = {}
    with _progress(progress) as bar:
        job = bar.add_task(f"synth {task}", total=total)
        if parallel:  # Ray tasks over chunks of patients; rows gathered back in patient order
            import ray

            render = ray.remote(num_cpus=1)(_render_range)
            pending = {render.remote(task, chunk, first, *args): first for first, chunk in chunks}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                first = pending.pop(done[0])
                parts[first] = ray.get(done[0])
                bar.advance(job, len(parts[first]))
        else:
            for first, chunk in chunks:
                parts[first] = _render_range(task, chunk, first, *args)
                bar.advance(job, len(parts[first]))
    rows = [row for first in sorted(parts) for row in parts[first]]

    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label", "group", *spec.extra_columns])
        writer.writerows(rows)
    return manifest
