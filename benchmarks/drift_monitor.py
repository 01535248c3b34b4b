"""Drift monitor: how often it alarms on clean windows (false alarms) and on shifted ones (power).

``raycyto monitor`` compares windows of served answers with the validation reference a bundle
stores at export (``model.json["reference"]``: the exported fold's test images as the bundle
answers them). This script measures it on a bundle with such a reference:

- **clean**: fresh images of the bundle's synthetic task, drawn with the generator settings of
  its sweep (``config.data.synthetic``) and new seeds (1000, 1001, ...): new patients the model
  never saw, from the distribution it was trained and validated on;
- **shifted**: the same images as a second lab would send them: ``jpeg q30`` (re-saved as JPEG
  at quality 30, the file sent as is); the mild families of :data:`raycyto.data.shift.SHIFTS`,
  one copy each (``blur`` sigma 0.6-1.2 px, ``contrast`` and ``colour`` (white balance / stain
  batch) x0.85-1.15, ``scanner``: all at once, the shift the per-image guard tolerates), and the
  fixed, stronger shifts of ``tests/test_monitor.py`` (``blur s1.5``: sigma 1.5 px; ``stain``:
  RGB gains 1.2 / 0.85 / 1.1, a magenta cast; ``contrast x0.6``), sent as PNG;
- **other task**: the other synthetic task's images (blood smears to a karyogram model and the
  reverse), at that task's default size.

Every image is answered by :class:`raycyto.serve.predict.LocalPredictor` (the endpoint's code,
seeds and rule) and written as a real audit record (:class:`raycyto.serve.audit.AuditLog`);
the monitor's own code (:func:`raycyto.monitor.core.monitor_records`) then judges, per set and
window size N:

- *cases*: R windows of N images drawn at random from the set's pool (independent cases), each
  judged as a log of its own (bound alpha / the tests of one window): the share that alarm;
- *patients*: R windows of whole patients drawn at random, each patient's images one after the
  other (how a lab sends them: a patient's images are alike, so a window holds fewer independent
  cases than answers), each judged alone: the share that alarm;
- *logs*: R/2 logs of the whole pool, patients in a random order, each judged as ``raycyto
  monitor`` judges a log (Bonferroni over all its windows): the share that say DRIFT.

On clean images the shares are false-alarm rates (the bound promises <= alpha for independent
cases); on the others, the power. The last column names the statistics that alarmed most in
the *patients* windows. Windows share images across resamples, so the shares are conditional on
the pool (``--images``).

Usage::

    .venv/bin/python benchmarks/drift_monitor.py --model /tmp/monitor_demo_model
        [--images 800] [--windows 50,100,200] [--resamples 200] [--alpha 0.05] [--seed 1000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raycyto.monitor.core import load_monitored, monitor_records, read_audit  # noqa: E402
from raycyto.monitor.drift import STATISTICS  # noqa: E402

OTHER_TASK = {"karyogram": "leukemia", "leukemia": "karyogram"}


def _png(image: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    assert ok
    return buf.tobytes()


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def _family(name: str) -> Callable[[np.ndarray, int], bytes]:
    from raycyto.data.shift import shifted_copy

    return lambda image, seed: _png(shifted_copy(image, name, seed))


def _fixed(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray, int], bytes]:
    return lambda image, seed: _png(np.clip(np.rint(fn(image.astype(np.float32))), 0, 255).astype(np.uint8))


def _blur15(x: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(x, (0, 0), 1.5)


SETS: dict[str, Callable[[np.ndarray, int], bytes]] = {
    "clean": lambda image, seed: _png(image),
    "jpeg q30": lambda image, seed: _jpeg(image, 30),
    "blur": _family("blur"),
    "contrast": _family("contrast"),
    "colour": _family("colour"),
    "scanner": _family("scanner"),
    "blur s1.5": _fixed(_blur15),
    "stain": _fixed(lambda x: x * np.array([1.2, 0.85, 1.1], np.float32)),
    "contrast x0.6": _fixed(lambda x: (x - x.mean()) * 0.6 + x.mean()),
}
"""Set name -> (clean image, seed) -> the encoded file a client sends; plus ``other task``."""


def fresh_images(task_cfg: dict, n: int, seed: int, work: Path) -> tuple[list[np.ndarray], list[str], list[str]]:
    """``n`` new images of the sweep's synthetic task (its settings, seeds ``seed``, ``seed + 1``...),
    their patients and their true labels."""
    from raycyto.data.decode import load_image
    from raycyto.synth import generate

    cfg = {k: v for k, v in task_cfg.items() if v is not None and k not in ("task", "seed")}
    task, per = task_cfg["task"], int(cfg.pop("per_patient", 2))
    counts = cfg.pop("class_counts", None)
    cfg.pop("patients", None)
    images: list[np.ndarray] = []
    groups: list[str] = []
    labels: list[str] = []
    s = seed
    while len(images) < n:
        out = work / f"{task}-{s}"
        if not (out / "manifest.csv").is_file():
            if counts:
                generate(task, out, None, per, s, class_counts=counts, progress=False, **cfg)
            else:
                generate(task, out, max(1, math.ceil((n - len(images)) / per)), per, s, progress=False, **cfg)
        import pandas as pd

        manifest = pd.read_csv(out / "manifest.csv").iloc[: n - len(images)]
        images += [load_image(str(out / p)) for p in manifest["path"]]
        groups += [f"{s}/{g}" for g in manifest["group"]]
        labels += [str(x) for x in manifest["label"]]
        s += 1
    return images, groups, labels


@dataclass
class SetAnswers:
    name: str
    records: list
    seconds: float


def answer_set(name: str, files: list[bytes], predictor, served, work: Path) -> SetAnswers:
    """Every file answered by the predictor and written as an audit record, read back."""
    from raycyto.serve.audit import AuditLog

    path = work / f"audit-{name.replace(' ', '_').replace('.', '')}.jsonl"
    if path.is_file():  # answered by this bundle already (--work reused)
        records, problems = read_audit([path])
        if (not problems and len(records) == len(files)
                and all(r.data["model_sha256"] == served.sha256 for r in records)):
            return SetAnswers(name, [r for r in sorted(records, key=lambda r: r.line)], 0.0)
    path.unlink(missing_ok=True)
    log = AuditLog(str(path), max_bytes=1 << 30)
    t0 = time.perf_counter()
    for data in files:
        log.write(served, hashlib.sha256(data).hexdigest(), predictor.predict_bytes(data), route="/predict")
    seconds = time.perf_counter() - t0
    log.close()
    records, problems = read_audit([path])
    assert not problems, problems[:3]
    return SetAnswers(name, sorted(records, key=lambda r: r.line), seconds)


def _alarmed(records: list, bundle, window: int, alpha: float) -> list[str]:
    """The statistics a log of ``records`` alarms on (any window), judged as ``raycyto monitor`` does."""
    report = monitor_records(records, bundle, window=window, min_window=window, alpha=alpha)
    return [c.statistic for w in report.drifted for c in report.alarms(w)]


def judge(records: list, groups: list[str], bundle, window: int, resamples: int, alpha: float,
          rng: np.random.Generator) -> dict:
    """Alarm shares of random-case windows, whole-patient windows and whole logs in patient order."""
    patients: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        patients.setdefault(g, []).append(i)
    names = list(patients)
    by: dict[str, int] = {s: 0 for s in STATISTICS}
    cases = patient = logs = 0
    n_cases = resamples if len(records) >= window else 0
    for _ in range(n_cases):
        pick = rng.choice(len(records), size=window, replace=False)
        cases += bool(_alarmed([records[i] for i in pick], bundle, window, alpha))
        order = [i for g in rng.permutation(names) for i in patients[g]][:window]
        hit = _alarmed([records[i] for i in order], bundle, window, alpha)
        patient += bool(hit)
        for stat in set(hit):
            by[stat] += 1
    n_logs = resamples // 2 if len(records) >= window else 0
    for _ in range(n_logs):
        order = [i for g in rng.permutation(names) for i in patients[g]]
        logs += bool(_alarmed([records[i] for i in order], bundle, window, alpha))
    return {"cases": (cases, n_cases), "patients": (patient, n_cases), "logs": (logs, n_logs), "by": by}


def main(argv: list[str] | None = None) -> int:
    import torch

    from raycyto.serve.api import ServedModel
    from raycyto.serve.predict import LocalPredictor
    from raycyto.synth.core import DEFAULTS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="bundle exported with a validation reference")
    ap.add_argument("--images", type=int, default=800, help="clean images (each set has as many)")
    ap.add_argument("--windows", default="50,100,200", help="window sizes N, comma-separated")
    ap.add_argument("--resamples", type=int, default=200, help="resampled windows per set and size")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1000, help="first seed of the fresh images (the sweep used its own)")
    ap.add_argument("--work", default=None, help="folder for generated images and audit logs [a temporary one]")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    meta = json.loads((Path(args.model) / "model.json").read_text())
    synthetic = ((meta.get("config") or {}).get("data") or {}).get("synthetic")
    if not synthetic:
        sys.exit(f"{args.model}: the bundle's sweep did not use a synthetic task; this benchmark draws fresh "
                 "images from one")
    bundle = load_monitored(args.model)
    predictor = LocalPredictor(args.model)
    m = predictor.model
    served = ServedModel(key=str(args.model), name=m.name, version=m.sha256[:12], sha256=m.sha256,
                         class_names=tuple(m.class_names), input_size=int(meta["input_size"]),
                         passes=m.default_passes, threshold=m.default_threshold)
    work = Path(args.work or tempfile.mkdtemp(prefix="raycyto-drift-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    clean, groups, truth = fresh_images(synthetic, args.images, args.seed, work)
    other_task = OTHER_TASK[synthetic["task"]]
    other, other_groups, _ = fresh_images({"task": other_task, "per_patient": 2, **DEFAULTS[other_task]},
                                       args.images, args.seed + 1000, work)
    print(f"drew {len(clean)} fresh {synthetic['task']} images (seeds from {args.seed}) and {len(other)} "
          f"{other_task} images in {time.perf_counter() - t0:.0f} s; answering them ({m.default_passes} passes)",
          flush=True)
    answers = []
    for name, make in SETS.items():
        files = [make(img, args.seed + i) for i, img in enumerate(clean)]
        answers.append(answer_set(name, files, predictor, served, work))
        print(f"  {name}: {len(files)} answers in {answers[-1].seconds:.0f} s", flush=True)
    answers.append(answer_set("other task", [_png(img) for img in other], predictor, served, work))
    print(f"  other task ({other_task}): {len(other)} answers in {answers[-1].seconds:.0f} s", flush=True)

    ref = bundle.reference
    print(f"\nmodel {bundle.name}; reference: {ref.n} answers on {bundle.reference_source}")
    print(f"alpha {args.alpha} (Bonferroni over the tested statistics of a window; a whole log: of all "
          f"its windows); {args.resamples} resampled windows and {args.resamples // 2} logs per cell, "
          f"seed {args.seed}; {len(clean)} images per set")
    print(f"{len(groups) / max(len(set(groups)), 1):.1f} images per patient in the clean pool\n")
    print("accuracy: the served label against the synthetic truth, on the whole set (clean: the model's own "
          "accuracy on new patients)\n")
    header = (f"{'set':<14} {'accuracy':>8} {'N':>4} {'cases':>15} {'patients':>15} {'logs':>13}  "
              "most alarmed (patients)")
    print(header)
    print("-" * len(header))
    table = []
    sets_groups = {a.name: (other_groups if a.name == "other task" else groups) for a in answers}

    def share(k: int, n: int) -> str:
        return f"{k}/{n} {k / max(n, 1):.3f}"

    for size in [int(x) for x in args.windows.split(",")]:
        for a in answers:
            rng = np.random.default_rng(args.seed + size)
            r = judge(a.records, sets_groups[a.name], bundle, size, args.resamples, args.alpha, rng)
            top = sorted(((v, s) for s, v in r["by"].items() if v), reverse=True)[:3]
            most = ", ".join(f"{s} {v / max(r['patients'][1], 1):.0%}" for v, s in top) or "-"
            acc = ("-" if a.name == "other task" else
                   f"{np.mean([r.data['label'] == t for r, t in zip(a.records, truth)]):.3f}")
            print(f"{a.name:<14} {acc:>8} {size:>4} {share(*r['cases']):>15} {share(*r['patients']):>15} "
                  f"{share(*r['logs']):>13}  {most}", flush=True)
            table.append({"set": a.name, "accuracy": acc, "window": size, **{k: list(r[k]) for k in ("cases", "patients", "logs")},
                          "by": r["by"]})
        print()
    if args.json:
        Path(args.json).write_text(json.dumps({"model": bundle.name, "alpha": args.alpha, "rows": table}, indent=1))
    print(f"clean rows: false-alarm rates (bound: <= {args.alpha} for independent cases); every other row: power")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
