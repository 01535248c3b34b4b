"""The scale model's arithmetic (benchmarks/scale_model.py) on small hand-built inputs: no Ray, no torch."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("scale_model", Path(__file__).parents[1] / "benchmarks" / "scale_model.py")
sm = importlib.util.module_from_spec(SPEC)
sys.modules["scale_model"] = sm  # dataclasses look their module up there
SPEC.loader.exec_module(sm)


def test_list_schedule_is_greedy_in_order_not_total_over_workers():
    assert sm.list_schedule([4, 4, 4, 4], 2) == 8
    assert sm.list_schedule([5, 1, 1, 1, 1, 1], 2) == 5          # the long job sets the pace
    assert sm.list_schedule([1, 1, 1, 1, 1, 5], 2) == 7          # in order: the long job starts last (at 2)
    assert sm.list_schedule([3, 3, 3], 2) == 6                   # not sum / workers = 4.5
    assert sm.list_schedule([2, 7, 3], 1) == 12
    assert sm.list_schedule([2, 7, 3], 10) == 7                  # more workers than jobs
    assert sm.list_schedule([], 3) == 0
    with pytest.raises(ValueError):
        sm.list_schedule([1], 0)


def test_lower_bound_never_above_the_schedule():
    for jobs, w in (([4, 4, 4, 4], 2), ([5, 1, 1, 1, 1, 1], 2), ([1, 1, 1, 1, 1, 5], 2), ([3, 3, 3], 2)):
        assert sm.lower_bound(jobs, w) <= sm.list_schedule(jobs, w)
    assert sm.lower_bound([3, 3, 3], 2) == 4.5
    assert sm.lower_bound([9, 1], 4) == 9


def test_trial_and_feature_seconds():
    # 2 folds x (3 epochs x (10 rows x 0.1 + 4 x 0.05) + (4 + 5) x 0.05) + 1
    assert sm.trial_seconds(2, 3, 10, 4, 5, 0.1, 0.05, 1.0) == pytest.approx(2 * (3 * 1.2 + 0.45) + 1)
    assert sm.trial_seconds(2, 3, 10, 4, 5, 0.1, 0.05, 1.0, fold_fixed=0.5) == pytest.approx(2 * (3 * 1.2 + 0.95) + 1)
    # the GPU forward is the bottleneck, then the CPU decode
    assert sm.feature_seconds(100, 0.02, 0.01, gpu_actors=1, cpus=8, overhead=5) == pytest.approx(7)
    assert sm.feature_seconds(100, 0.02, 0.8, gpu_actors=2, cpus=8) == pytest.approx(10)
    assert sm.feature_seconds(100, 0.02, 0.01, gpu_actors=4, cpus=8) == pytest.approx(0.5)


def test_predict_wall_adds_features_to_the_makespan_and_speedup_saturates():
    trials = [10.0] * 8
    one, four, many = (sm.predict_wall([5, 5], trials, n) for n in (1, 4, 16))
    assert one["total_s"] == 90 and four["total_s"] == 30 and many["total_s"] == 20
    assert sm.speedup(one["total_s"], four["total_s"]) == 3.0
    # the fixed feature stage bounds the speed-up (Amdahl), however many slots
    assert sm.speedup(one["total_s"], many["total_s"]) == 4.5 < 16


def test_throughput_scales_with_pixels_and_overrides(tmp_path):
    t = sm.Throughput("vgg16", 224, 1000.0, 2000.0, 3.0, "x")
    assert t.images_per_s(448, "fp32") == pytest.approx(250)
    assert t.images_per_s(224, "bf16") == 2000
    base = sm.published_throughput(2.0)
    assert base["vgg16"].bf16 == 2165.35 and base["vgg16"].fp32 == pytest.approx(2165.35 / 2)
    assert base["vgg16"].train_factor == pytest.approx(1464.57 / 465.36)
    gc = tmp_path / "gpu_check.json"
    gc.write_text(json.dumps({"mode": "gpu", "device": "H200", "date": "d",
                              "throughput": {"senet154": {"size": 224, "fp32": 900.0, "bf16": 2500.0, "batch": 64}}}))
    out = sm.override_throughput(base, gc, ["vgg16=600,1200@416"])
    assert (out["senet154"].fp32, out["senet154"].bf16) == (900.0, 2500.0)
    assert out["senet154"].train_factor == base["senet154"].train_factor and "H200" in out["senet154"].source
    assert (out["vgg16"].size, out["vgg16"].fp32, out["vgg16"].bf16) == (416, 600.0, 1200.0)
    gc.write_text(json.dumps({"mode": "cpu", "throughput": {}}))
    with pytest.raises(SystemExit, match="GPU run"):
        sm.override_throughput(base, gc)
    with pytest.raises(SystemExit, match="NAME=FP32,BF16@SIZE"):
        sm.override_throughput(base, None, ["vgg16=600@224"])


def _study(**kw) -> "sm.Study":
    base = dict(name="t", config="x", n_images=100, class_counts={"a": 60, "b": 40},
                cells=(("vgg16", "frozen", "a"), ("vgg16", "full", "k")), samples=2, folds=5, val_fraction=0.2,
                epochs=10, copies=3, equalize=False, image_size=224, input_size=224, policy="karyogram",
                gpus_per_trial=0.25, cpus_per_trial=2, feature_actors=2, precision="fp32", data_source="hand")
    return sm.Study(**{**base, **kw})


def test_study_rows_and_slots():
    s = _study()
    assert s.trials == 4 and s.feature_rows == 300
    assert s.train_rows == pytest.approx(0.8 * 0.8 * 100 * 3)
    assert s.val_rows == pytest.approx(16) and s.test_rows == 20
    assert _study(equalize=True).train_rows == pytest.approx(0.64 * 2 * 40 * 3)   # truncated to the smallest class
    assert s.slots(1) == 4 and s.slots(4) == 16                                  # 0.25 GPU: 4 per GPU
    assert s.slots(1, cpus_per_node=4) == 2                                      # CPUs run out first
    assert _study(gpus_per_trial=1, cpus_per_trial=4).slots(16) == 16


def test_predict_study_by_hand():
    s = _study()
    tp = {"vgg16": sm.Throughput("vgg16", 224, 100.0, 200.0, 3.0, "hand")}
    costs = sm.Costs(head_fit={"a@512": (1e-4, 0.5)}, fold_fixed_s=0.25, trial_overhead_s=2.0,
                     feature_overhead_s=1.0, decode_s={"karyogram": 0.004})
    predict = lambda **kw: sm.predict_study(s, tp, costs, feature_dims={"vgg16": 512}, **kw)  # noqa: E731
    r = predict(nodes=1, precision="fp32")
    # features: 300 rows x max(0.01 s / 1 GPU actor, 0.004 s / 8 CPUs) + 1 s overhead
    assert r["features_s"] == pytest.approx(300 * 0.01 + 1)
    # frozen head a: 5 folds x (10 epochs x 192 rows x 1e-4 + its fit's 0.5 s + 0.25 s fold work) + 2 s
    frozen = 5 * (10 * 192 * 1e-4 + 0.5 + 0.25) + 2
    # full fine-tuning: a training row costs 3 x the 0.01 s forward, validation and test rows one forward
    full = 5 * (10 * (192 * 0.03 + 16 * 0.01) + 36 * 0.01 + 0.25) + 2
    assert r["trial_s_sum"] == pytest.approx(2 * frozen + 2 * full)
    assert r["slots"] == 4 and r["trials_s"] == pytest.approx(full)        # 4 trials on 4 slots: the longest
    assert predict(nodes=1, precision="bf16")["trials_s"] < r["trials_s"]
    # a second GPU adds a feature actor (feature_actors = 2); a third does not
    f2, f3 = (predict(nodes=n, precision="fp32")["features_s"] for n in (2, 3))
    assert f2 == pytest.approx(300 * 0.005 + 1) and f3 == f2


def test_fit_costs_and_check_speedup_on_a_hand_built_run():
    trial = lambda head, secs: {"head": head, "time_s": secs, "start": 0.0,  # noqa: E731
                                "folds": [{"seconds": secs / 2, "epochs": 2, "train_rows": 10}] * 2}
    run1 = {"wall_s": 50.0, "tune_wall_s": 40.0, "trials": [trial("a", 8.0), trial("a", 8.0), trial("d", 16.0)]}
    fit = sm.fit_costs(run1)
    assert fit["head_row_s"] == {"a": pytest.approx(0.2), "d": pytest.approx(0.4)}
    assert fit["trial_overhead_s"] == pytest.approx((40 - 32) / 3)
    assert fit["feature_stage_s"] == 10
    run2 = {**run1, "wall_s": 35.0, "tune_wall_s": 25.0}
    check = sm.check_speedup({1: run1, 2: run2})
    o = 8 / 3
    # 2 slots, in order: [8+o, 8+o] then 16+o starts at 8+o
    assert check["predicted"]["tune_wall_s"][2] == pytest.approx(8 + o + 16 + o)
    assert check["predicted"]["tune_wall_s"][1] == pytest.approx(40)
    assert check["predicted"]["speedup"] == pytest.approx(50 / (10 + 24 + 2 * o))
    assert check["measured"]["speedup"] == pytest.approx(50 / 35)


def test_fold_fixed_is_what_train_head_does_not_explain():
    run = {"trials": [{"head": "a", "folds": [{"seconds": 3.0, "epochs": 2, "train_rows": 10}]},
                      {"head": "d", "folds": [{"seconds": 5.0, "epochs": 2, "train_rows": 10}]}]}
    heads = {"a@8": (0.05, 1.0), "d@8": (0.1, 1.0)}
    assert sm.fold_fixed(run, heads, 8) == pytest.approx(((3 - 2) + (5 - 3)) / 2)


def test_study_grids_come_from_the_real_configs():
    a, b = sm.load_study("A"), sm.load_study("B")
    assert a.n_images == 146 and a.trials == 80 and a.input_size == 416 and a.gpus_per_trial == 1
    assert {c[1] for c in a.cells} == {"frozen", "last1", "last2", "full"}
    assert b.n_images == 266 and b.trials == 48 and b.copies == 33 and b.equalize and b.gpus_per_trial == 0.25
    assert b.train_rows == pytest.approx(0.64 * 5 * 46 * 33)
