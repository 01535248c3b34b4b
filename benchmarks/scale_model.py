"""Scale model: the wall time of each study's full grid on N GPU nodes, from measured costs.

The model (every function below is plain arithmetic, tested in tests/test_scale_model.py):

* **feature cache**, once per backbone: ``rows x max(forward_s / gpu_actors, decode_s / cpus)``
  plus a fixed stage overhead, where rows = images x augmentation copies, ``gpu_actors =
  min(GPUs, resources.feature_actors)`` (the sweep's actor pool has that many actors, so more
  nodes do not help past it) and decode + augment stream on every node's CPUs;
* **one trial** (a cell x one search sample) runs its folds in turn:
  ``folds x (epochs x (train_rows x c_train + val_rows x c_eval) + (val + test rows) x c_eval)
  + trial overhead``, with ``c_train`` / ``c_eval`` per row by the cell's kind:
  heads on cached vectors (a-d, k): the per-row cost measured here on the CPU (a GPU step of a
  small MLP is launch-bound and assumed no faster); head s on cached feature maps:
  ``3 x FLOPs(head) / FLOPs(backbone) x forward_s``; last1 / last2 on the cached frozen prefix:
  ``train_factor x tail FLOP share x forward_s``; full: ``train_factor x forward_s``, never
  faster than decoding the streamed images on the trial's CPUs;
* **trials on N workers** (``N x slots per node``: 1 / gpus_per_trial): list scheduling in grid
  order (each trial goes to the first free slot, as Tune starts them), the makespan; the lower
  bound max(sum / slots, longest trial) is printed beside it.

Costs come from a run: the script runs a small sweep here with 1 and then 2 trials at a time
(``resources.max_concurrent``, 1 CPU each, the real ``run_sweep``), reads each trial's fold
seconds (``events/``), epochs (``histories/``), training rows (``fold<k>_data.json``) and the
sweep's wall time (``experiment.json``), fits the per-row head cost and the per-trial overhead on
the 1-worker run, and prints the speed-up it predicts for 2 workers next to the measured one.

GPU throughput (images/s per backbone, forward, batch 1024 or the largest that fit) comes from
timm's published benchmark CSVs in huggingface/pytorch-image-models (``PUBLISHED``: file,
commit, row), scaled to the study's input size by pixel count. bf16 = the AMP figure; fp32 =
AMP / ``--fp32-factor`` (2: NVIDIA's Ada and Hopper spec sheets give dense TF32 tensor throughput
at half the FP16/BF16 rate, and PyTorch runs fp32 convolutions in TF32 by default). The training
cost per image is the forward cost times the backbone's inference/training samples/s ratio of
timm's RTX 3090 CSVs (same GPU, same PyTorch). ``--throughput-json OUT/gpu_check.json`` (written by
benchmarks/gpu_check.sh on a lent GPU) or ``--throughput NAME=FP32,BF16@SIZE`` replace them.

Example:
    .venv/bin/python benchmarks/scale_model.py                    # local runs + the study table
    .venv/bin/python benchmarks/scale_model.py --throughput-json /tmp/gc/gpu_check.json
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
TIMM = "huggingface/pytorch-image-models"


# ----------------------------------------------------------------------------- published throughput


@dataclass(frozen=True)
class Published:
    """One backbone's rows in timm's benchmark CSVs.

    Attributes:
        timm_name: the row's ``model`` column.
        size: its image size.
        infer_amp: ``infer_samples_per_sec`` in INFER_FILE (RTX 4090, AMP, NCHW).
        infer_3090, train_3090: ``infer_samples_per_sec`` / ``train_samples_per_sec`` in the
            RTX 3090 files (AMP, PyTorch 1.12): their ratio is the cost of a training image.
    """

    timm_name: str
    size: int
    infer_amp: float
    infer_3090: float
    train_3090: float

    @property
    def train_factor(self) -> float:
        return self.infer_3090 / self.train_3090


INFER_FILE = ("results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv", "5c33776aa59f0f05bfb8008ff546ed4c09083f1a")
INFER_3090_FILE = ("results/benchmark-infer-amp-nchw-pt112-cu113-rtx3090.csv", "5e7d47ca105a59a39778102d3276291d6db5dd32")
TRAIN_3090_FILE = ("results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv", "5e7d47ca105a59a39778102d3276291d6db5dd32")
PUBLISHED: dict[str, Published] = {  # raycyto name -> timm rows (read 2026-12-04)
    "vgg16": Published("vgg16", 224, 2165.35, 1464.57, 465.36),
    "inception_v3": Published("inception_v3", 299, 3663.18, 2240.78, 602.27),
    "resnext101_32x8d": Published("resnext101_32x8d", 224, 1396.99, 873.01, 276.22),
    "senet154": Published("legacy_senet154", 224, 1041.02, 618.16, 170.27),
    "efficientnet_lite0": Published("efficientnet_lite0", 224, 10376.87, 7530.79, 1674.68),
    "efficientnet_lite1": Published("efficientnet_lite1", 240, 7085.22, 5144.81, 1171.46),
    "efficientnet_lite2": Published("efficientnet_lite2", 260, 5526.09, 3977.91, 852.10),
}
GPU_NAME = "RTX 4090 (timm's benchmark GPU)"


@dataclass(frozen=True)
class Throughput:
    """Forward images/s of one backbone on one GPU at ``size`` px.

    Attributes:
        backbone: raycyto registry name.
        size: the size the figures were measured at.
        fp32, bf16: images/s.
        train_factor: training cost of an image / its forward cost (fwd + bwd + optimiser).
        source: where the figures come from.
    """

    backbone: str
    size: int
    fp32: float
    bf16: float
    train_factor: float
    source: str

    def images_per_s(self, size: int, precision: str) -> float:
        """Scaled to ``size`` by pixel count (a convnet's FLOPs grow with H x W)."""
        value = {"fp32": self.fp32, "bf16": self.bf16}[precision]
        return value * (self.size / size) ** 2


def published_throughput(fp32_factor: float = 2.0) -> dict[str, Throughput]:
    """``Throughput`` per backbone from ``PUBLISHED`` (bf16 = AMP, fp32 = AMP / fp32_factor)."""
    return {name: Throughput(name, p.size, p.infer_amp / fp32_factor, p.infer_amp, p.train_factor,
                             f"{TIMM} {INFER_FILE[0]}@{INFER_FILE[1][:7]} row '{p.timm_name},{p.size},"
                             f"{p.infer_amp}'; fp32 = AMP/{fp32_factor:g}; train factor {p.infer_3090}/{p.train_3090} "
                             f"({INFER_3090_FILE[0]} / {TRAIN_3090_FILE[0]})")
            for name, p in PUBLISHED.items()}


def override_throughput(base: dict[str, Throughput], gpu_check_json: Optional[Path] = None,
                        flags: Sequence[str] = ()) -> dict[str, Throughput]:
    """Replace figures with gpu_check.json's measured ones and ``NAME=FP32,BF16@SIZE`` flags
    (the train factor stays the published one)."""
    out = dict(base)
    if gpu_check_json is not None:
        doc = json.loads(Path(gpu_check_json).read_text())
        if doc.get("mode") != "gpu":
            raise SystemExit(f"{gpu_check_json}: mode {doc.get('mode')!r}; only a GPU run's figures can stand for a GPU")
        for name, t in doc["throughput"].items():
            out[name] = Throughput(name, int(t["size"]), float(t["fp32"]), float(t["bf16"]), base[name].train_factor,
                                   f"measured by gpu_check on {doc.get('device')} ({doc.get('date')}), batch {t['batch']}")
    for flag in flags:
        try:
            name, rest = flag.split("=", 1)
            figures, size = rest.split("@")
            fp32, bf16 = (float(v) for v in figures.split(","))
        except ValueError:
            raise SystemExit(f"--throughput {flag!r}: expected NAME=FP32,BF16@SIZE, e.g. vgg16=600,1200@224") from None
        if name not in base:
            raise SystemExit(f"--throughput {flag!r}: unknown backbone; known: {', '.join(base)}")
        out[name] = Throughput(name, int(size), fp32, bf16, base[name].train_factor, f"--throughput {flag}")
    return out


# ----------------------------------------------------------------------------- arithmetic


def list_schedule(durations: Sequence[float], workers: int) -> float:
    """Makespan of ``durations`` run in the given order, each on the first free worker.

    Args:
        durations: seconds per job, in start order.
        workers: parallel slots (>= 1).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    free = [0.0] * min(workers, max(1, len(durations)))
    heapq.heapify(free)
    end = 0.0
    for d in durations:
        start = heapq.heappop(free)
        end = max(end, start + d)
        heapq.heappush(free, start + d)
    return end


def lower_bound(durations: Sequence[float], workers: int) -> float:
    """No schedule on ``workers`` slots finishes before max(sum / workers, longest job)."""
    return max(sum(durations) / workers, max(durations, default=0.0))


def trial_seconds(folds: int, epochs: int, train_rows: float, val_rows: float, test_rows: float,
                  c_train: float, c_eval: float, overhead: float, fold_fixed: float = 0.0) -> float:
    """One trial: its folds in turn, each ``epochs`` passes over the training rows plus a
    validation pass, then one prediction pass over validation and test rows, plus the fold's
    fixed work (MC predictions, guard, bundle files), plus the trial's overhead."""
    per_fold = epochs * (train_rows * c_train + val_rows * c_eval) + (val_rows + test_rows) * c_eval + fold_fixed
    return folds * per_fold + overhead


def feature_seconds(rows: float, forward_s: float, decode_s: float, gpu_actors: int, cpus: int,
                    overhead: float = 0.0) -> float:
    """The feature cache of one backbone: GPU forward and CPU decode stream side by side, so
    the slower of the two sets the pace."""
    return rows * max(forward_s / max(1, gpu_actors), decode_s / max(1, cpus)) + overhead


def predict_wall(feature_s: Iterable[float], trials_s: Sequence[float], slots: int) -> dict[str, float]:
    """Features (backbones one after another), then the trials on ``slots`` parallel slots."""
    features = float(sum(feature_s))
    makespan = list_schedule(trials_s, slots)
    return {"features_s": features, "trials_s": makespan, "bound_s": lower_bound(trials_s, slots),
            "total_s": features + makespan}


def speedup(wall_1: float, wall_n: float) -> float:
    return wall_1 / wall_n


# ----------------------------------------------------------------------------- the studies' grids


@dataclass(frozen=True)
class Study:
    """What the scale model needs of one study's config and data.

    ``train_rows`` etc. are per fold; rows count augmentation copies where they train.
    """

    name: str
    config: str
    n_images: int
    class_counts: dict[str, int]
    cells: tuple[tuple[str, str, str], ...]
    samples: int
    folds: int
    val_fraction: float
    epochs: int
    copies: int
    equalize: bool
    image_size: int
    input_size: int
    policy: str
    gpus_per_trial: float
    cpus_per_trial: float
    feature_actors: int
    precision: str
    data_source: str

    @property
    def trials(self) -> int:
        return len(self.cells) * self.samples

    @property
    def feature_rows(self) -> int:
        return self.n_images * self.copies

    @property
    def train_share(self) -> float:
        return (1 - 1 / self.folds) * (1 - self.val_fraction)

    @property
    def train_rows(self) -> float:
        if self.equalize:  # every class cut to the smallest after augmentation
            return self.train_share * len(self.class_counts) * min(self.class_counts.values()) * self.copies
        return self.train_share * self.n_images * self.copies

    @property
    def val_rows(self) -> float:
        return (1 - 1 / self.folds) * self.val_fraction * self.n_images

    @property
    def test_rows(self) -> float:
        return self.n_images / self.folds

    def slots(self, nodes: int, gpus_per_node: int = 1, cpus_per_node: int = 8) -> int:
        per_node = min(int(gpus_per_node / self.gpus_per_trial + 1e-9), int(cpus_per_node / self.cpus_per_trial + 1e-9))
        return max(1, nodes * per_node)


STUDY_DATA = {  # name: (config, images per class, where the counts come from)
    "A": ("jobs/configs/karyogram_study.yaml", {"normal": 105, "abnormal": 41},
          "thesis 000_83ee75ddb235a881 sec. 3.1.2 / 4.1: 105 normal + 41 abnormal karyograms (alpha dataset); "
          "data.copies 5 gives 730 rows, the study's augmented set had 692"),
    "B": ("jobs/configs/leukemia_study.yaml", {"HLT": 59, "ALL": 49, "AML": 58, "CLL": 46, "CML": 54},
          "SPEC.md / study 003: 266 ASH ImageBank images, 59 HLT 49 ALL 58 AML 46 CLL 54 CML; x33 copies"),
}


def load_study(key: str) -> Study:
    """Study A or B from its real config (raycyto.config), with the image counts of the paper."""
    from raycyto.config import load_config

    path, counts, source = STUDY_DATA[key]
    cfg = load_config(REPO / path)
    return Study(name=f"study {key} ({cfg.name})", config=path, n_images=sum(counts.values()), class_counts=counts,
                 cells=tuple(cfg.grid.cells()), samples=cfg.search.samples, folds=cfg.cv.folds,
                 val_fraction=cfg.cv.val_fraction, epochs=cfg.train.epochs, copies=cfg.data.copies,
                 equalize=cfg.data.equalize, image_size=cfg.data.image_size,
                 input_size=cfg.data.input_size or cfg.data.image_size, policy=cfg.data.policy,
                 gpus_per_trial=cfg.resources.gpus_per_trial, cpus_per_trial=cfg.resources.cpus_per_trial,
                 feature_actors=cfg.resources.feature_actors, precision=cfg.train.precision, data_source=source)


# ----------------------------------------------------------------------------- per-row costs of a cell


@dataclass
class Costs:
    """Measured and derived per-row costs (seconds) the cells use.

    Attributes:
        head_fit: per ``"<head>@<feature dim>"``: (seconds per training row and epoch, its
            per-epoch validation included; fixed seconds per fold of ``train_head``, e.g. head
            b's SVM), measured here by :func:`head_costs` at the study's rows, classes and batch
            (1 CPU thread).
        fold_fixed_s: per fold outside ``train_head``: predictions with MC passes, the OOD guard,
            the bundle files (measured here on the local runs).
        trial_overhead_s: per trial: start, model build, Tune bookkeeping (measured here).
        feature_overhead_s: fixed cost of one backbone's feature stage (measured here).
        decode_s: per row, decode + augment on one CPU core, per policy (measured here).
        tail_share: FLOP share of the trainable tail per (backbone, mode).
        head_s_share: FLOPs of head s on the backbone's map / FLOPs of the backbone.
    """

    head_fit: dict[str, tuple[float, float]]
    fold_fixed_s: float
    trial_overhead_s: float
    feature_overhead_s: float
    decode_s: dict[str, float]
    tail_share: dict[str, float] = field(default_factory=dict)
    head_s_share: dict[str, float] = field(default_factory=dict)

    @property
    def step_floor(self) -> float:
        """No GPU training row is cheaper than the cheapest measured head row (launch-bound steps)."""
        return min(c for c, _ in self.head_fit.values())


def cell_costs(cell: tuple[str, str, str], study: Study, tp: Throughput, costs: Costs, precision: str,
               feature_dim: int) -> tuple[float, float, float]:
    """(c_train, c_eval, fixed seconds per fold) of one grid cell on one GPU slot."""
    backbone, finetune, head = cell
    forward = 1.0 / tp.images_per_s(study.input_size, precision)
    floor, fixed = costs.step_floor, costs.fold_fixed_s
    if finetune == "frozen":
        if head == "s":  # the spatial head's conv + readout on the cached map, by FLOPs
            c = max(floor, 3 * costs.head_s_share[backbone] * forward)
            return c, c / 3, fixed
        c_row, fit_fixed = costs.head_fit[f"{head}@{feature_dim}"]
        return c_row, 0.0, fixed + fit_fixed  # measured: the per-epoch validation is inside c_row
    if finetune == "full":  # streams images: the trial's CPUs decode them
        decode = costs.decode_s[study.policy] / study.cpus_per_trial
        return max(tp.train_factor * forward, decode), max(forward, decode), fixed
    share = costs.tail_share[f"{backbone}/{finetune}"]
    return max(floor, tp.train_factor * share * forward), share * forward, fixed


def predict_study(study: Study, throughput: dict[str, Throughput], costs: Costs, nodes: int, precision: str,
                  gpus_per_node: int = 1, cpus_per_node: int = 8, feature_dims: Optional[dict[str, int]] = None
                  ) -> dict[str, Any]:
    """Predicted wall time of a study's full grid on ``nodes`` GPU nodes.

    ``feature_dims``: pooled feature width per backbone (default: the registry's)."""
    dims = feature_dims or {b: feature_dim(b) for b in dict.fromkeys(c[0] for c in study.cells)}
    actors = min(nodes * gpus_per_node, study.feature_actors)
    feats = [feature_seconds(study.feature_rows, 1.0 / throughput[b].images_per_s(study.input_size, precision),
                             costs.decode_s[study.policy], actors, nodes * cpus_per_node, costs.feature_overhead_s)
             for b in dict.fromkeys(c[0] for c in study.cells)]
    trials = []
    for cell in study.cells:  # grid order; each cell's samples after one another
        c_train, c_eval, fixed = cell_costs(cell, study, throughput[cell[0]], costs, precision, dims[cell[0]])
        t = trial_seconds(study.folds, study.epochs, study.train_rows, study.val_rows, study.test_rows,
                          c_train, c_eval, costs.trial_overhead_s, fixed)
        trials += [t] * study.samples
    slots = study.slots(nodes, gpus_per_node, cpus_per_node)
    return {**predict_wall(feats, trials, slots), "slots": slots, "feature_actors": actors,
            "trial_s_sum": sum(trials), "longest_trial_s": max(trials)}


# ----------------------------------------------------------------------------- measuring here


def feature_dim(backbone: str) -> int:
    from raycyto.models.registry import get_spec

    return get_spec(backbone).feature_dim


def study_head_costs(study: Study) -> dict[str, tuple[float, float]]:
    """:func:`head_costs` of the study's frozen vector-head cells at its rows, classes and smallest batch."""
    from raycyto.config import load_config

    cfg = load_config(REPO / study.config)
    pairs = list(dict.fromkeys((h, feature_dim(b)) for b, f, h in study.cells if f == "frozen" and h != "s"))
    return head_costs(pairs, int(study.train_rows), int(study.val_rows), len(study.class_counts),
                      int(min(cfg.search.batch_size)), dict(cfg.grid.head_kwargs))


def head_costs(pairs: Sequence[tuple[str, int]], n: int, m: int, classes: int, batch: int,
               head_kwargs: Optional[dict] = None, epochs: tuple[int, int] = (1, 3)) -> dict[str, tuple[float, float]]:
    """Per ``"<head>@<dim>"``: (seconds per training row and epoch, fixed seconds per fold), from
    the sweep's ``train_head`` on random features (n training rows, m validation rows), run for
    two epoch counts: the difference is the per-epoch part. One torch thread."""
    import dataclasses

    import numpy as np
    import torch

    from raycyto.config import TrainConfig
    from raycyto.tune.train import HeadData, HParams, Task, train_head

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    out = {}
    for head, dim in pairs:
        data = HeadData(rng.standard_normal((n, dim)).astype(np.float32), rng.integers(0, classes, n),
                        rng.standard_normal((m, dim)).astype(np.float32), rng.integers(0, classes, m),
                        groups_train=np.arange(n) % max(2, n // 33))
        seconds = []
        for e in epochs:
            train = dataclasses.replace(TrainConfig(), epochs=e, patience=None)
            t0 = time.perf_counter()
            train_head(head, data, task=Task(num_classes=classes, positive=1 if classes == 2 else None), train=train,
                       hp=HParams(lr=1e-3, batch_size=batch), head_kwargs=dict((head_kwargs or {}).get(head, {})))
            seconds.append(time.perf_counter() - t0)
        per_row = max(0.0, seconds[1] - seconds[0]) / ((epochs[1] - epochs[0]) * n)
        out[f"{head}@{dim}"] = (per_row, max(0.0, seconds[0] - epochs[0] * n * per_row))
    torch.set_num_threads(threads)
    return out


def fold_fixed(run: dict[str, Any], local_heads: dict[str, tuple[float, float]], dim: int) -> float:
    """Mean seconds of a local fold outside ``train_head`` (predictions, guard, files): the fold's
    measured seconds less what :func:`head_costs` gives its training at its rows and epochs."""
    rest = [f["seconds"] - (local_heads[f"{t['head']}@{dim}"][1] + f["epochs"] * f["train_rows"]
                            * local_heads[f"{t['head']}@{dim}"][0]) for t in run["trials"] for f in t["folds"]]
    return max(0.0, sum(rest) / len(rest))


def flop_shares(backbones: Iterable[str], study_sizes: dict[str, int], size: int = 128) -> tuple[dict, dict]:
    """FLOP share of each lastN tail, and of head s on the feature map, per backbone.

    Counted with ``torch.utils.flop_counter`` on random weights; tails at ``size`` px (shares
    do not depend on the size for these convnets), head s at the study's size.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from raycyto.models.heads import build_head
    from raycyto.models.registry import build_backbone, get_spec
    from raycyto.models.split import SequentialView, sequence_names, split_index

    def flops(fn) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return float(counter.get_total_flops())

    tail, head_s = {}, {}
    for b in backbones:
        spec, model = get_spec(b), build_backbone(b, pretrained=False).eval()
        names = sequence_names(spec)
        x = torch.zeros(1, 3, size, size)
        total = flops(lambda: SequentialView(model, names)(x))
        for mode in ("last1", "last2"):
            i = split_index(spec, mode)
            tail[f"{b}/{mode}"] = 1.0 - flops(lambda: SequentialView(model, names[:i], pooled=False)(x)) / total
        side = study_sizes[b]
        big = torch.zeros(1, 3, side, side)
        upto = names[:names.index(spec.feature_map.layer) + 1]
        with torch.no_grad():
            fmap = SequentialView(model, upto, pooled=False)(big)
        head = build_head("s", fmap.shape[1], 2, grid=list(fmap.shape[2:])).eval()
        head_s[b] = flops(lambda: head(fmap)) / (total * (side / size) ** 2)
    return tail, head_s


def decode_costs(out: Path, reps: int = 6) -> dict[str, float]:
    """Seconds per row to decode + augment one image at each study's size and policy (one core)."""
    import cv2
    import numpy as np

    from raycyto.data.augment import augment, image_key
    from raycyto.data.decode import load_image

    out.mkdir(parents=True, exist_ok=True)
    costs = {}
    for policy, size in (("karyogram", 416), ("leukemia", 224)):
        path = out / f"{policy}.png"  # a photo-like PNG at twice the size (decode + resize)
        img = (np.random.default_rng(0).random((2 * size, 2 * size, 3)) * 255).astype(np.uint8)
        cv2.imwrite(str(path), cv2.GaussianBlur(img, (7, 7), 2))
        t0 = time.perf_counter()
        for copy in range(reps):
            image = load_image(str(path), size)
            augment(image, policy, 0, image_key(image), copy + 1)
        costs[policy] = (time.perf_counter() - t0) / reps
    return costs


def local_config(source: str, name: str, concurrent: int) -> dict:
    """The small sweep the model is checked on: Lite0 frozen, heads a and d, 6 trials."""
    return {
        "name": name,
        "data": {"source": source, "positive_class": "abnormal", "image_size": 64, "input_size": 64},
        "cv": {"folds": 3, "seed": 0},
        "grid": {"backbones": ["efficientnet_lite0"], "finetune": ["frozen"], "heads": ["a", "d"]},
        "search": {"algorithm": "random", "samples": 3, "lr": [1e-3, 1e-2], "batch_size": [8], "seed": 0},
        "train": {"epochs": 4},
        "resources": {"cpus_per_trial": 1, "max_concurrent": concurrent, "feature_actors": 1, "feature_batch_size": 16},
        "mc": {"passes": 10},
    }


def read_run(exp: Path) -> dict[str, Any]:
    """Per-trial timings of a finished sweep: fold seconds, epochs, training rows, start order."""
    from raycyto.analysis.load import read_csv
    from raycyto.tune.trainable import read_events

    meta = json.loads((exp / "experiment.json").read_text())
    res = read_csv(exp / "results.csv")
    res = res[~res["baseline"].astype(bool)]
    trials = []
    for tid, head, time_s in zip(res["trial_id"], res["head"], res["time_s"]):
        events = read_events(exp, tid)
        folds = []
        for e in (e for e in events if e["event"] == "fold_done"):
            k = e["fold"]
            epochs = len(read_csv(exp / "histories" / tid / f"fold{k}.csv"))
            rows = json.loads((exp / "histories" / tid / f"fold{k}_data.json").read_text())["train_rows"]
            folds.append({"seconds": e["seconds"], "epochs": epochs, "train_rows": rows})
        start = min(e["time"] for e in events if e["event"] == "start")
        trials.append({"trial_id": tid, "head": head, "time_s": float(time_s), "start": start, "folds": folds})
    trials.sort(key=lambda t: t["start"])
    return {"wall_s": meta["wall_s"], "tune_wall_s": meta["tune_wall_s"], "trials": trials}


def fit_costs(run: dict[str, Any]) -> dict[str, Any]:
    """Per-row head cost (per head) and per-trial overhead from a 1-worker run."""
    by_head: dict[str, list[float]] = {}
    for t in run["trials"]:
        for f in t["folds"]:
            s, n = by_head.setdefault(t["head"], [0.0, 0.0]), f["epochs"] * f["train_rows"]
            s[0] += f["seconds"]
            s[1] += n
    head_row_s = {h: s / n for h, (s, n) in by_head.items()}
    compute = [sum(f["epochs"] * f["train_rows"] * head_row_s[t["head"]] for f in t["folds"]) for t in run["trials"]]
    # everything in the Tune loop that is not fold compute, shared evenly by the trials
    overhead = (run["tune_wall_s"] - sum(compute)) / len(compute)
    return {"head_row_s": head_row_s, "trial_overhead_s": overhead, "compute_s": compute,
            "feature_stage_s": run["wall_s"] - run["tune_wall_s"],
            "fold_s": sum(f["seconds"] for t in run["trials"] for f in t["folds"]) / sum(len(t["folds"]) for t in run["trials"])}


def measure_local(work: Path, progress: bool = True) -> dict[str, Any]:
    """The 1-worker and 2-worker runs of the small sweep (real Ray, 2 CPUs, 1 CPU per trial)."""
    import ray

    from raycyto.config import load_config
    from raycyto.synth import generate
    from raycyto.tune.sweep import run_sweep

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        generate("karyogram", work / "data", patients=24, per_patient=2, seed=0, size=64, progress=False)
        warm = load_config({**local_config(str(work / "data"), "scale-warmup", 2), "train": {"epochs": 1}})
        run_sweep(warm.replace(**{"search.samples": 1}), out=work / "exp_warmup", progress=False)  # both runs warm
        runs = {}
        for n in (1, 2):
            t0 = time.time()
            exp = run_sweep(load_config(local_config(str(work / "data"), f"scale-{n}w", n)), out=work / f"exp_{n}w",
                            progress=False)
            runs[n] = read_run(exp)
            if progress:
                print(f"[scale_model] {n} trial(s) at a time: {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    return runs


def check_speedup(runs: dict[int, dict]) -> dict[str, Any]:
    """Predicted (from the 1-worker run's costs) vs measured 1 -> 2 worker speed-ups."""
    fit = fit_costs(runs[1])
    trials = [c + fit["trial_overhead_s"] for c in fit["compute_s"]]
    pred = {n: predict_wall([fit["feature_stage_s"]], trials, n) for n in (1, 2)}
    wall = {n: runs[n]["wall_s"] for n in (1, 2)}
    tune = {n: runs[n]["tune_wall_s"] for n in (1, 2)}
    return {
        "fit": {k: v for k, v in fit.items() if k != "compute_s"},
        "measured": {"wall_s": wall, "tune_wall_s": tune, "speedup": speedup(wall[1], wall[2]),
                     "tune_speedup": speedup(tune[1], tune[2])},
        "predicted": {"wall_s": {n: p["total_s"] for n, p in pred.items()},
                      "tune_wall_s": {n: p["trials_s"] for n, p in pred.items()},
                      "speedup": speedup(pred[1]["total_s"], pred[2]["total_s"]),
                      "tune_speedup": speedup(pred[1]["trials_s"], pred[2]["trials_s"])},
        "trial_time_s": {n: [t["time_s"] for t in runs[n]["trials"]] for n in (1, 2)},
    }


# ----------------------------------------------------------------------------- report


def hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def print_table(header: Sequence[str], rows: list[Sequence[Any]]) -> None:
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for j, c in enumerate(cells):
        print(" | ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
        if j == 0:
            print("-+-".join("-" * w for w in widths))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a temp folder)")
    p.add_argument("--local-json", type=Path, default=None,
                   help="reuse a previous run's scale_model.json local measurements instead of running the sweeps")
    p.add_argument("--throughput-json", type=Path, default=None, help="gpu_check.json of a GPU run: measured images/s")
    p.add_argument("--throughput", action="append", default=[], metavar="NAME=FP32,BF16@SIZE",
                   help="images/s of one backbone (repeatable)")
    p.add_argument("--fp32-factor", type=float, default=2.0, help="published AMP images/s / fp32 images/s")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--cpus-per-node", type=int, default=8, help="CPUs of a GPU node (g5.2xlarge: 8)")
    a = p.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="raycyto_scale_"))
    out.mkdir(parents=True, exist_ok=True)

    if a.local_json:
        local = json.loads(a.local_json.read_text())["local"]
        local = {**local, "runs": {int(k): v for k, v in local["runs"].items()}}
    else:
        runs = measure_local(out)
        decode = decode_costs(out / "decode")
        studies = [load_study(k) for k in STUDY_DATA]
        backbones = list(dict.fromkeys(c[0] for s in studies for c in s.cells))
        sizes = {b: s.input_size for s in studies for b in dict.fromkeys(c[0] for c in s.cells)}
        tail, head_s = flop_shares(backbones, sizes)
        folds = [f for t in runs[1]["trials"] for f in t["folds"]]
        cfg1 = local_config("", "", 1)
        local_heads = head_costs([(h, feature_dim("efficientnet_lite0")) for h in cfg1["grid"]["heads"]],
                                 round(sum(f["train_rows"] for f in folds) / len(folds)), 10, 2,
                                 cfg1["search"]["batch_size"][0])
        head_fit = {k: v for s in studies for k, v in study_head_costs(s).items()}
        local = {"date": time.strftime("%Y-%m-%d"), "runs": runs, "decode_s": decode, "tail_share": tail,
                 "head_s_share": head_s, "local_heads": local_heads, "head_fit": head_fit,
                 "fold_fixed_s": fold_fixed(runs[1], local_heads, feature_dim("efficientnet_lite0"))}
    check = check_speedup(local["runs"])
    fit = check["fit"]
    costs = Costs(head_fit={k: tuple(v) for k, v in local["head_fit"].items()}, fold_fixed_s=local["fold_fixed_s"],
                  trial_overhead_s=fit["trial_overhead_s"],
                  feature_overhead_s=fit["feature_stage_s"], decode_s=local["decode_s"],
                  tail_share=local["tail_share"], head_s_share=local["head_s_share"])

    print(f"\nscale model check ({local['date']}, this machine; Lite0 frozen, heads a and d x 3 samples, 3 folds, "
          f"4 epochs, 48 images; 1 CPU per trial)")
    m, pr = check["measured"], check["predicted"]
    print_table(("", "1 worker", "2 workers", "speed-up 1 -> 2"), [
        ("measured sweep wall (s)", f"{m['wall_s'][1]:.1f}", f"{m['wall_s'][2]:.1f}", f"{m['speedup']:.2f}x"),
        ("predicted sweep wall (s)", f"{pr['wall_s'][1]:.1f}", f"{pr['wall_s'][2]:.1f}", f"{pr['speedup']:.2f}x"),
        ("measured Tune wall (s)", f"{m['tune_wall_s'][1]:.1f}", f"{m['tune_wall_s'][2]:.1f}", f"{m['tune_speedup']:.2f}x"),
        ("predicted Tune wall (s)", f"{pr['tune_wall_s'][1]:.1f}", f"{pr['tune_wall_s'][2]:.1f}", f"{pr['tune_speedup']:.2f}x"),
    ])
    t1, t2 = check["trial_time_s"][1], check["trial_time_s"][2]
    lh = local["local_heads"]
    print(f"1-worker run: mean fold {fit['fold_s']:.2f} s (train_head at its size: head a "
          f"{lh['a@1280'][0] * 1e6:.0f} us / row-epoch + {lh['a@1280'][1]:.2f} s, head d {lh['d@1280'][0] * 1e6:.0f} us + "
          f"{lh['d@1280'][1]:.2f} s; the rest, {costs.fold_fixed_s:.2f} s per fold, is predictions, guard and files), "
          f"trial overhead {fit['trial_overhead_s']:.2f} s, feature stage {fit['feature_stage_s']:.1f} s; "
          f"mean trial {sum(t1) / len(t1):.1f} s alone, {sum(t2) / len(t2):.1f} s two at a time")
    print("measured here for the studies (1 CPU thread): " + ", ".join(
        f"head {k} {v[0] * 1e6:.1f} us / row-epoch + {v[1]:.2f} s per fold" for k, v in costs.head_fit.items())
        + "; decode + augment per row: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in costs.decode_s.items())
        + "; FLOP share of the trained tail: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.tail_share.items())
        + "; head s / backbone FLOPs: " + ", ".join(f"{k} {v:.4f}" for k, v in costs.head_s_share.items()))

    throughput = override_throughput(published_throughput(a.fp32_factor), a.throughput_json, a.throughput)
    studies = [load_study(k) for k in STUDY_DATA]
    print(f"\nassumed GPU throughput (forward images/s; training image = forward x train factor); "
          f"GPU: {GPU_NAME if not (a.throughput_json or a.throughput) else 'as sourced'}")
    rows = []
    for name, t in throughput.items():
        at = sorted({s.input_size for s in studies if name in {c[0] for c in s.cells}})
        scaled = "; ".join(f"@{z}: {t.images_per_s(z, 'fp32'):.0f} / {t.images_per_s(z, 'bf16'):.0f}" for z in at)
        rows.append((name, f"{t.size}", f"{t.fp32:.0f}", f"{t.bf16:.0f}", f"{t.train_factor:.2f}", scaled or "-", t.source))
    print_table(("backbone", "px", "fp32", "bf16", "train x", "at study sizes fp32 / bf16", "source"), rows)

    results = {}
    for s in studies:
        print(f"\n{s.name}: {s.trials} trials ({len(s.cells)} cells x {s.samples} samples) x {s.folds} folds x "
              f"{s.epochs} epochs; {s.n_images} images x {s.copies} copies = {s.feature_rows} feature rows, "
              f"{s.train_rows:.0f} training rows per fold; {s.gpus_per_trial:g} GPU per trial, "
              f"feature_actors {s.feature_actors} [{s.data_source}]")
        rows = []
        for n in a.nodes:
            r = {prec: predict_study(s, throughput, costs, n, prec, cpus_per_node=a.cpus_per_node)
                 for prec in ("fp32", "bf16")}
            results[f"{s.name}/{n}"] = r
            f32, b16 = r["fp32"], r["bf16"]
            rows.append((n, f32["slots"], f32["feature_actors"], hms(f32["features_s"]), hms(f32["trials_s"]),
                         hms(f32["total_s"]), hms(b16["total_s"]), f"{hms(f32['bound_s'])}",
                         f"{results[f'{s.name}/{a.nodes[0]}']['fp32']['total_s'] / f32['total_s']:.1f}x"))
        print_table(("GPU nodes", "trial slots", "feature GPUs", "features fp32", "trials fp32", "total fp32",
                     "total bf16", "trials bound fp32", f"speed-up vs {a.nodes[0]}"), rows)
    (out / "scale_model.json").write_text(json.dumps(
        {"local": local, "check": check, "costs": asdict(costs), "studies": results,
         "throughput": {k: asdict(v) for k, v in throughput.items()}}, indent=2, default=float))
    print(f"\nscale model 1 -> 2 workers: predicted {pr['speedup']:.2f}x, measured {m['speedup']:.2f}x "
          f"(Tune stage {pr['tune_speedup']:.2f}x / {m['tune_speedup']:.2f}x); files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
