"""Evidence maps (issue 22): the additive decomposition of the map head's logit is exact, the
layout names the chromosome under a hot cell, Grad-CAM gives a non-negative map at the layer's
grid, the deletion-test pieces do what they say, the synthetic truth is what the generator drew,
and the gallery links each thumbnail to its full-size image."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from raycyto.errors import ConfigError
from raycyto.evidence.evaluation import Explained, fill, fine_peak, on_white_cell, random_box
from raycyto.evidence.layout import attribute, karyogram_layout, parse_layout, top
from raycyto.evidence.maps import EvidenceMap, gradcam, overlay
from raycyto.models.heads import HEADS, head_spec
from raycyto.models.spatial import MILMapHead


@pytest.mark.parametrize("classes,reference", [(2, 1), (2, 0), (3, None)])
def test_additive_decomposition_sums_to_the_logit(classes, reference):
    torch.manual_seed(0)
    head = MILMapHead(8, (5, 6), classes, width=4, temperature=0.7, reference=reference).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics and biases
        head.bn.running_mean.uniform_(-0.5, 0.5)
        head.bias.uniform_(-1, 1)
    maps = torch.randn(4, 8, 5, 6)
    logits = head(maps).detach().double()
    for target in [None, *range(classes)]:
        ev = head.evidence(None, None, target, embedding=maps)
        assert ev.method == "additive" and ev.values.shape == (4, 5, 6)
        np.testing.assert_allclose(ev.values.sum((1, 2)) + ev.bias, ev.logit, rtol=0, atol=1e-12)
        t = logits.argmax(-1).numpy() if target is None else np.full(4, target)
        np.testing.assert_array_equal(ev.target, t)
        if reference is None:
            want = logits[torch.arange(4), torch.as_tensor(t)].numpy()
        else:  # the margin against the other class (binary)
            want = (logits[torch.arange(4), torch.as_tensor(t)] - logits[torch.arange(4), torch.as_tensor(1 - t)]).numpy()
        np.testing.assert_allclose(ev.logit, want, atol=1e-5)
        np.testing.assert_allclose(ev.share.sum((1, 2)), 1.0)


def test_registry_describes_every_head():
    assert head_spec("s").reads_map and head_spec("s").evidence == "additive"
    assert all(not HEADS[h].reads_map and HEADS[h].evidence == "gradcam" for h in "abcdk")
    assert head_spec("b").post_fit is not None and head_spec("probe").baseline
    with pytest.raises(Exception, match="unknown head"):
        head_spec("zz")


def test_layout_names_the_chromosome_under_a_hot_cell():
    layout = karyogram_layout()
    grid = (26, 26)
    for name in ("21", "1", "X", "13"):
        x0, y0, x1, y1 = layout.boxes[name]
        share = np.full(grid, 1e-4)
        share[int((y0 + y1) / 2 * 26), int((x0 + x1) / 2 * 26)] = 1.0
        share /= share.sum()
        ranked = top(attribute(share, layout), 3)
        assert ranked[0]["chromosome"] == name and ranked[0]["score"] > 0.9
        assert [set(r) for r in ranked] == [{"chromosome", "score"}] * 3
    assert sum(attribute(np.full(grid, 1 / 676), layout).values()) == pytest.approx(1.0)  # slots tile the image


def test_user_layout_json_and_csv():
    j = parse_layout(json.dumps({"boxes": {"21": [0.1, 0.2, 0.3, 0.4], "X": [0.5, 0.5, 1, 1]}}))
    c = parse_layout("name,x0,y0,x1,y1\n21,0.1,0.2,0.3,0.4\nX,0.5,0.5,1,1\n")
    assert dict(j.boxes) == dict(c.boxes) and j.box_of(0.2, 0.3) == "21"
    for bad, msg in [('{"boxes": {"23": [0, 0, 1, 1]}}', "not a chromosome"),
                     ('{"boxes": {"1": [0.5, 0, 0.2, 1]}}', "x0 < x1"), ("a,b\n1,2", "columns")]:
        with pytest.raises(ConfigError, match=msg) as e:
            parse_layout(bad)
        assert e.value.field == "layout"


def test_gradcam_map_shape_and_target():
    from raycyto.models.classifier import build_classifier

    model = build_classifier("efficientnet_lite0", "a", 3, pretrained=False, seed=0).eval()
    x = torch.randn(2, 3, 64, 64)
    ev = gradcam(model, x, target=[2, 0])
    assert ev.method == "gradcam" and ev.values.shape == (2, 4, 4)  # blocks.4: stride 16
    assert np.isfinite(ev.values).all() and (ev.values >= 0).all()
    assert ev.target.tolist() == [2, 0] and not any(p.grad is not None for p in model.parameters())
    assert model.head.evidence(model, x, None).values.shape == (2, 4, 4)  # the protocol method


def test_deletion_pieces():
    img = np.zeros((100, 100, 3), np.uint8)
    img[:60] = 200
    out = fill(img, (0.1, 0.7, 0.3, 0.9))
    assert (out[70:90, 10:30] == 200).all() and (out[:70] == img[:70]).all()  # filled with the median
    rng = np.random.default_rng(0)
    for _ in range(50):
        b = random_box(rng, 0.2, 0.3)
        assert 0 <= b[0] and b[2] <= 1 and 0 <= b[1] and b[3] <= 1
        assert b[2] - b[0] == pytest.approx(0.2) and b[3] - b[1] == pytest.approx(0.3)
    share = np.zeros((8, 8))
    share[2, 5] = 1
    x, y = fine_peak(share)
    assert abs(x - 5.5 / 8) < 0.03 and abs(y - 2.5 / 8) < 0.03
    assert on_white_cell((x, y), [(5.5 / 8, 2.5 / 8, 0.05, "myeloblast")])
    assert not on_white_cell((x, y), [(0.1, 0.1, 0.05, "lymphocyte")])


def test_synthetic_truth():
    from raycyto.synth import leukemia
    from raycyto.synth.base import image_rng
    from raycyto.synth.karyogram import abnormal_chromosomes

    assert abnormal_chromosomes("47,XY,+21") == ("21",)
    assert abnormal_chromosomes("46,XX,del(10)(q)") == ("10",)
    assert abnormal_chromosomes("46,XY,t(1;7)(q;q)") == ("1", "7")
    assert abnormal_chromosomes("45,X") == ("X", "Y") and abnormal_chromosomes("46,XX") == ()
    patient = leukemia.plan(0, 5)[1]
    img, cells = leukemia.render_with_cells(patient, image_rng(0, 1, 0), 96)
    np.testing.assert_array_equal(img, leukemia.render(patient, image_rng(0, 1, 0), 96))
    assert cells and all(0 < x < 1 and 0 < y < 1 and 0 < r < 0.5 for x, y, r, _ in cells)
    x, y, r, _ = cells[0]
    i, j = int(y * 96), int(x * 96)
    assert img[i, j].mean() < np.median(img.reshape(-1, 3), 0).mean()  # a stained cell, darker than the field


def test_gallery_links_thumbnails_to_full_images(tmp_path):
    from raycyto.analysis.evidence import gallery_rows, write_gallery

    rows = []
    for k in range(6):
        path = tmp_path / "data" / f"p{k}_i0.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
        rows.append({"trial_id": "t", "split": "test", "fold": k % 2, "path": str(path), "label": k % 2,
                     "mc_label": 0 if k < 5 else 1, "mc_confidence": 0.6 + 0.05 * k, "refer": k == 0,
                     "subtype": ["trisomy21", "normal"][k % 2], "karyotype": ["47,XY,+21", "46,XY"][k % 2],
                     "prob_abnormal": 0.7, "prob_normal": 0.3})
    preds = pd.DataFrame(rows)
    exp = SimpleNamespace(predictions=preds, class_names=["abnormal", "normal"],
                          prob_columns=["prob_abnormal", "prob_normal"])
    picks = gallery_rows(preds)
    assert len(picks["referred"]) == 1 and len(picks["misclassified"]) == 2
    layout = karyogram_layout()
    cases = []
    for idx, r in preds.iterrows():
        share = np.random.default_rng(idx).random((26, 26))
        share /= share.sum()
        ev = EvidenceMap("additive", share[None], np.array([0]), np.array([1.0]), np.array([0.0]))
        cases.append(Explained(r, np.full((64, 64, 3), 200, np.uint8), ev, 0, 0.7, attribute(share, layout),
                               layout=layout))
    page = write_gallery(exp, cases, picks, tmp_path / "report", 0.9, "aps")
    assert "Case gallery" in page and "true: abnormal (trisomy21, 47,XY,+21)" in page and "set (90%)" in page
    import re

    links = re.findall(r'<a href="(gallery/[^"]+\.png)"><img src="(gallery/[^"]+_thumb\.png)"', page)
    assert len(links) == sum(len(df) for df in picks.values()) > 0
    for full, thumb in links:
        assert (tmp_path / "report" / full).is_file() and (tmp_path / "report" / thumb).is_file()
    assert overlay(np.zeros((32, 32, 3), np.uint8), np.eye(4)).shape == (32, 32, 3)
