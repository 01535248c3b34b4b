"""Feature cache: a frozen backbone runs once per (image, augmentation copy).

Ray Data decodes and augments the images (``raycyto.data.pipeline.image_dataset``) and an
actor pool of :class:`FeatureExtractor` (the backbone is loaded once per actor, on a GPU
when the config asks for one and the cluster has it) turns them into feature rows. The
resulting :class:`FeatureSet` (features + row metadata, sorted by (path, copy)) is put in
the object store once and shared by every fold, head and search sample of that backbone.

One pass of the backbone serves several *cuts* of its forward sequence
(``raycyto.models.split``), each its own FeatureSet:

- ``"pooled"``: the pooled features ``[M, D]`` float32 (frozen heads, the probe);
- ``"last1"`` / ``"last2"``: the output of the frozen prefix of that fine-tuning mode,
  ``[M, C, H, W]`` float16 (cached-prefix fine-tuning: only the tail runs per epoch);
- a layer name such as ``"blocks.4"``: its feature map ``[M, C, H, W]`` float16 (spatial heads).

Memory per image and copy (EfficientNet-Lite0 at 416 px): pooled 5 KB; ``last1`` (blocks.5
output, 192 x 13 x 13) 63 KB; ``last2`` / ``"blocks.4"`` (112 x 26 x 26) 148 KB.

Example::

    fs = compute_features(table, "efficientnet_lite0", cfg.data, cfg.resources)
    rows = fs.rows(test_paths, copies=False)     # copy 0 of the test images
    x = fs.features[rows]                        # [n, D]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from raycyto.config import DataConfig, ResourcesConfig
    from raycyto.data.sources import SourceTable


@dataclass
class FeatureSet:
    """Backbone features of every (image, copy), sorted by (path, copy).

    Attributes:
        backbone: registry name.
        features: [M, D] float32 (pooled), or [M, C, H, W] float16 (maps, prefix activations).
        path, label, group, copy: [M] row metadata (str, int64, str, int64).
        exact: float32 ``features`` of the copy-0 rows (the images as they are) when ``features``
            is float16: what validation, test and the served model see, so the measured
            predictions are the served ones; None otherwise.
    """

    backbone: str
    features: np.ndarray
    path: np.ndarray
    label: np.ndarray
    group: np.ndarray
    copy: np.ndarray
    exact: Optional[np.ndarray] = None

    def eval_features(self, rows: np.ndarray) -> np.ndarray:
        """Features of copy-0 ``rows`` at full precision (``exact``), else ``features[rows]``."""
        if self.exact is None:
            return self.features[rows]
        originals = np.flatnonzero(self.copy == 0)
        pos = np.searchsorted(originals, rows)
        if (pos >= len(originals)).any() or (originals[np.minimum(pos, len(originals) - 1)] != rows).any():
            raise ValueError("eval_features takes copy-0 rows only")
        return self.exact[pos]

    def rows(self, paths: Iterable[str], copies: bool) -> np.ndarray:
        """Indices of the rows of ``paths``: every copy (``copies=True``) or copy 0 only.

        Returns:
            [n] sorted int64 row indices.
        """
        wanted = np.isin(self.path, np.asarray(list(paths), dtype=str))
        if not copies:
            wanted &= self.copy == 0
        return np.flatnonzero(wanted)

    @property
    def nbytes(self) -> int:
        """Size of the feature matrix in bytes."""
        return int(self.features.nbytes)


POOLED = "pooled"


def cut_index(spec: Any, cut: str) -> int:
    """Where a cut ends in the spec's forward sequence: ``"pooled"`` at the end, a fine-tuning
    mode at its frozen prefix, a layer name just after that layer.

    Raises:
        RaycytoError: an unknown cut (the message lists the layer names).
    """
    from raycyto.config import FINETUNE_MODES
    from raycyto.errors import RaycytoError
    from raycyto.models.split import sequence_names, split_index

    names = sequence_names(spec)
    if cut == POOLED:
        return len(names)
    if cut in FINETUNE_MODES and cut not in ("frozen", "full"):
        return split_index(spec, cut)
    if cut in names:
        return names.index(cut) + 1
    raise RaycytoError(f"{spec.name}: unknown feature cut {cut!r}; pooled, last1, last2 or one of {names}")


class FeatureExtractor:
    """Callable class for ``Dataset.map_batches``: backbone built once per actor.

    Args:
        backbone: registry name.
        preprocess: the :class:`~raycyto.models.preprocessing.Preprocess` contract as a dict
            (rows arrive at its image_size; its backbone-input step runs here).
        pretrained: load ImageNet weights.
        device: "cuda" or "cpu" (default: cuda when this actor was given a GPU).
        cuts: the outputs to keep (see the module docstring), all from one forward.
    """

    def __init__(self, backbone: str, preprocess: dict, pretrained: bool = True,
                 device: Optional[str] = None, cuts: tuple[str, ...] = (POOLED,)) -> None:
        from raycyto.device import worker_device
        from raycyto.models.preprocessing import Preprocess
        from raycyto.models.registry import build_backbone, get_spec
        from raycyto.models.split import sequence_names

        spec = get_spec(backbone)
        self.pre = Preprocess.from_dict(preprocess)
        self.device = device or worker_device()
        self.model = build_backbone(backbone, pretrained).eval().to(self.device)
        self.cuts = {cut: cut_index(spec, cut) for cut in cuts}
        names = sequence_names(spec)
        self.modules = [self.model.get_submodule(n) for n in names[:max(self.cuts.values())]]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """[B] image rows -> [B] feature rows: ``features`` [B, D] float32 for the pooled cut,
        ``features:<cut>`` [B, C, H, W] for the others (float32; the driver keeps float16
        except for the copy-0 rows)."""
        import torch

        x = self.pre.to_tensor(np.stack(list(batch["image"]))).to(self.device)
        out = {k: batch[k] for k in ("path", "label", "group", "copy")}
        with torch.no_grad():
            for i, module in enumerate(self.modules, start=1):
                x = module(x)
                for cut, at in self.cuts.items():
                    if at == i:
                        out[column(cut)] = (x.flatten(1) if cut == POOLED else x).float().cpu().numpy()
        return out


def actor_cpus(cluster_cpus: float, actors: int) -> float:
    """CPUs each CPU feature actor requests: 1, unless the actors would leave less than one CPU
    to the decode and augment tasks feeding them (each asks for 1); then an equal share of the
    rest (2 actors on 2 CPUs at 1 each starve those tasks, and the stage waits forever).
    Fractional actors still run one torch thread each."""
    actors = max(1, int(actors))
    if cluster_cpus >= actors + 1:
        return 1.0
    return max(0.1, (float(cluster_cpus) - 1.0) / actors)


def column(cut: str) -> str:
    """The dataset column of a cut: ``features`` (pooled) or ``features:<cut>``."""
    return "features" if cut == POOLED else f"features:{cut}"


def feature_key(backbone: str, cut: str = POOLED) -> str:
    """Key of a cached FeatureSet in ``TrialContext.feature_refs``: ``<backbone>`` or ``<backbone>/<cut>``."""
    return backbone if cut == POOLED else f"{backbone}/{cut}"


def compute_feature_sets(table: "SourceTable", backbone: str, data: "DataConfig", resources: "ResourcesConfig",
                         seed: int = 0, pretrained: bool = True, cuts: tuple[str, ...] = (POOLED,)
                         ) -> dict[str, FeatureSet]:
    """Run ``backbone`` once over every (image, copy) of ``table`` with a Ray Data actor pool.

    Args:
        table: readable source images (bad files already removed).
        backbone: registry name.
        data: image_size, input_size, policy and copies.
        resources: ``feature_actors``, ``feature_batch_size``; a GPU per actor when
            ``gpus_per_trial > 0`` and the cluster has GPUs.
        seed: augmentation seed (copies depend on (seed, path, copy) only).
        pretrained: ImageNet weights (True) or random init.
        cuts: the outputs to cache, all from the same forward pass.

    Returns:
        {cut: FeatureSet}, rows sorted by (path, copy).
    """
    import ray

    from raycyto.data.pipeline import image_dataset
    from raycyto.models.preprocessing import Preprocess

    pre = Preprocess.build(backbone, data.image_size, data.input_size)
    ds = image_dataset(table, pre.image_size, policy=data.policy, copies=data.copies, seed=seed)
    gpus = 1 if resources.gpus_per_trial > 0 and ray.cluster_resources().get("GPU", 0) > 0 else 0
    cpus = 0 if gpus else actor_cpus(ray.cluster_resources().get("CPU", 1), resources.feature_actors)
    with warnings.catch_warnings():  # max_restarts has no named parameter in Ray 2.60: the generic
        # remote-args path, which Ray flags as deprecated at every call
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(FeatureExtractor, batch_size=resources.feature_batch_size, batch_format="numpy",
                            fn_constructor_kwargs={"backbone": backbone, "preprocess": pre.to_dict(),
                                                   "pretrained": pretrained, "cuts": tuple(cuts)},
                            compute=ray.data.ActorPoolStrategy(size=resources.feature_actors),
                            num_gpus=gpus, num_cpus=cpus,
                            # Ray Data hands its actors their constructor in the object store, so a
                            # restarted actor could not rebuild itself (ray#53727, Ray's core_worker
                            # error at every sweep): no restarts; a crashed actor fails this stage and
                            # the sweep reports it, and Tune retries nothing half-built.
                            max_restarts=0)
    keys = ["path", "label", "group", "copy", *(column(c) for c in cuts)]
    cols: dict[str, list] = {k: [] for k in keys}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=1024):
        for key in cols:
            cols[key].append(np.asarray(batch[key]))
    path = np.concatenate(cols["path"]).astype(str)
    copy = np.concatenate(cols["copy"]).astype(np.int64)
    order = np.lexsort((copy, path))  # deterministic: by path, then copy
    meta = dict(path=path[order], copy=copy[order], label=np.concatenate(cols["label"]).astype(np.int64)[order],
                group=np.concatenate(cols["group"]).astype(str)[order])
    sets = {}
    for cut in cuts:
        full = np.concatenate(cols[column(cut)])[order]
        if cut == POOLED:
            sets[cut] = FeatureSet(backbone=backbone, features=full, **meta)
        else:  # maps: float16 for every row, float32 for the originals (validation, test, serving)
            sets[cut] = FeatureSet(backbone=backbone, features=full.astype(np.float16), **meta,
                                   exact=np.ascontiguousarray(full[meta["copy"] == 0]))
        del full
    return sets


def compute_features(table: "SourceTable", backbone: str, data: "DataConfig", resources: "ResourcesConfig",
                     seed: int = 0, pretrained: bool = True) -> FeatureSet:
    """The pooled FeatureSet ``[M, D]`` float32 of ``backbone`` (see :func:`compute_feature_sets`)."""
    return compute_feature_sets(table, backbone, data, resources, seed, pretrained)[POOLED]


def feature_rows_for_split(fs: FeatureSet, table_paths: np.ndarray, split: Any) -> dict[str, np.ndarray]:
    """Feature rows of one fold: train = every copy of train images, val/test = copy 0.

    Args:
        fs: the backbone's FeatureSet.
        table_paths: [N] paths of the source table (Split indices point into it).
        split: a ``raycyto.data.splits.Split``.

    Returns:
        {"train": rows, "val": rows, "test": rows} indices into ``fs``.
    """
    return {"train": fs.rows(table_paths[split.train], copies=True),
            "val": fs.rows(table_paths[split.val], copies=False),
            "test": fs.rows(table_paths[split.test], copies=False)}


def compute_features_local(table: "SourceTable", backbone: str, data: "DataConfig", batch_size: int = 32,
                           seed: int = 0, pretrained: bool = True,
                           extractor: Optional[FeatureExtractor] = None) -> FeatureSet:
    """The same FeatureSet computed in this process without Ray (no cache: the benchmark baseline
    that re-runs the backbone inside every trial and fold).

    Args:
        table: source images; data: image_size, input_size, policy, copies; seed: augmentation seed.
        extractor: reuse an already built extractor.

    Returns:
        FeatureSet sorted by (path, copy).
    """
    from raycyto.data.augment import augment, image_key
    from raycyto.data.decode import load_image
    from raycyto.models.preprocessing import Preprocess

    extractor = extractor or FeatureExtractor(
        backbone, Preprocess.build(backbone, data.image_size, data.input_size).to_dict(), pretrained)
    rows = []  # (path, label, group, copy, image)
    for path, label, group in table.df[["path", "label", "group"]].itertuples(index=False):
        image = load_image(str(path), data.image_size)
        rows += [(str(path), int(label), str(group), c, augment(image, data.policy, seed, image_key(image), c))
                 for c in range(data.copies)]
    rows.sort(key=lambda r: (r[0], r[3]))
    feats = [extractor({"image": [r[4] for r in rows[i:i + batch_size]], "path": None, "label": None,
                        "group": None, "copy": None})["features"] for i in range(0, len(rows), batch_size)]
    return FeatureSet(backbone=backbone, features=np.concatenate(feats).astype(np.float32),
                      path=np.array([r[0] for r in rows], dtype=str), label=np.array([r[1] for r in rows], np.int64),
                      group=np.array([r[2] for r in rows], dtype=str), copy=np.array([r[3] for r in rows], np.int64))
