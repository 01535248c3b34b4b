"""On a small set of the default synthetic karyograms, the spatial head beats pooled features.

The generator is the default one (nothing made easier); the test keeps the normal patients and
those with whole-chromosome changes (trisomy 13/18/21, 45,X), the kinds a small training set
can learn, and drops deletions and translocations, which need a few hundred patients (README,
"How learnable the synthetic sets are"). Frozen EfficientNet-Lite0 at 416 px, one forward
for both cuts; the probe (the sweep's baseline: logistic regression on standardised pooled
features, C chosen on validation) against head s on the blocks.4 map, same rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

PATIENTS = 200


@pytest.fixture(scope="module")
def karyogram_features(tmp_path_factory):
    import torch

    from raycyto.data.decode import load_image
    from raycyto.models.preprocessing import Preprocess
    from raycyto.synth import generate
    from raycyto.tune.features import FeatureExtractor

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("karyo")
    generate("karyogram", out, patients=PATIENTS, per_patient=1, seed=0, size=416, progress=False, parallel=False)
    man = pd.read_csv(out / "manifest.csv")
    man = man[man["subtype"].isin(["normal", "trisomy13", "trisomy18", "trisomy21", "monosomyX"])].reset_index(drop=True)
    pre = Preprocess.build("efficientnet_lite0", 416, 416)
    ext = FeatureExtractor("efficientnet_lite0", pre.to_dict(), cuts=("pooled", "blocks.4"))
    pooled, maps = [], []
    for i in range(0, len(man), 16):
        batch = {"image": [load_image(str(out / p), 416) for p in man["path"][i:i + 16]],
                 **{k: None for k in ("path", "label", "group", "copy")}}
        got = ext(batch)
        pooled.append(got["features"])
        maps.append(got["features:blocks.4"].astype(np.float16))  # as the sweep caches them
    y = (man["label"] == "abnormal").to_numpy().astype(np.int64)
    return np.concatenate(pooled), np.concatenate(maps), y


def test_spatial_head_beats_the_probe_on_pooled_features(karyogram_features):
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedShuffleSplit

    from raycyto.config import TrainConfig
    from raycyto.tune.probe import fit_probe
    from raycyto.tune.train import HeadData, HParams, Task, train_head

    pooled, maps, y = karyogram_features
    assert maps.shape[1:] == (112, 26, 26) and 0.3 < y.mean() < 0.7
    rest, test = next(StratifiedShuffleSplit(1, test_size=0.25, random_state=0).split(y, y))
    tr, va = next(StratifiedShuffleSplit(1, test_size=0.25, random_state=0).split(y[rest], y[rest]))
    tr, va = rest[tr], rest[va]
    task = Task(2, positive=1)
    train = TrainConfig(epochs=40, patience=10, optimizer="adamw", weight_decay=0.01, label_smoothing=0.1)

    probe = fit_probe(HeadData(pooled[tr], y[tr], pooled[va], y[va]), task, train)[0]
    import torch

    with torch.no_grad():
        pooled_bacc = balanced_accuracy_score(y[test], probe(torch.from_numpy(pooled[test])).argmax(1).numpy())
    head = train_head("s", HeadData(maps[tr], y[tr], maps[va].astype(np.float32), y[va]), task=task, train=train,
                      hp=HParams(lr=2e-3, batch_size=16), seed=0,
                      head_kwargs={"grid": [26, 26], "reference": 0}).model
    with torch.no_grad():
        spatial_bacc = balanced_accuracy_score(y[test], head(torch.from_numpy(maps[test])).argmax(1).numpy())
    print(f"test balanced accuracy: pooled probe {pooled_bacc:.3f}, spatial head {spatial_bacc:.3f}")
    assert spatial_bacc >= pooled_bacc + 0.1 and spatial_bacc >= 0.8, (pooled_bacc, spatial_bacc)
