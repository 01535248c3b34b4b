"""MC dropout: stochastic passes with frozen batch norm, exact cheap head scope, summaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycyto.models import build_classifier, mc_head_predict, mc_predict, summarize
from raycyto.models.mc import MCDropout, mc_mode


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if "running_" in k or "num_batches_tracked" in k}


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_mc_passes_differ_but_batchnorm_is_frozen(x):
    model = build_classifier("efficientnet_lite0", "k", 2, finetune="last1", pretrained=True,
                             backbone_dropout=0.2, head_kwargs={"units": 32})
    model.train()  # even if left in training mode by a trainer, MC prediction uses eval BN
    before = _bn_state(model)
    assert any(k.startswith("head.") for k in before)  # head k's batch norm is covered too
    probs = mc_predict(model, x, passes=6, scope="full", seed=0)  # [N, T, C]
    assert probs.shape == (2, 6, 2)
    assert np.unique(probs[0, :, 0].round(6)).size == 6  # every pass different
    after = _bn_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training  # train/eval flags restored
    model.eval()
    with torch.no_grad():  # outside MC mode dropout is off: deterministic, and equal to the pass mean's limit
        plain = model(x).softmax(-1).numpy()
    assert not np.allclose(probs[:, 0], plain, atol=1e-4)  # an MC pass is not the plain forward


def test_mc_passes_are_reproducible_given_a_seed(x):
    model = build_classifier("efficientnet_lite0", "d", 3, pretrained=False)
    a = mc_predict(model, x, passes=5, seed=7)
    b = mc_predict(model, x, passes=5, seed=7)
    c = mc_predict(model, x, passes=5, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_head_scope_and_full_scope_agree_in_distribution(x):
    torch.manual_seed(0)
    model = build_classifier("efficientnet_lite0", "d", 3, pretrained=False).eval()
    with torch.no_grad():  # make the head decisive enough that dropout moves the probabilities
        model.head.out.weight.mul_(30.0)
    t = 200
    head = mc_predict(model, x, passes=t, scope="head", seed=1)
    full = mc_predict(model, x, passes=t, scope="full", seed=2)
    np.testing.assert_allclose(  # no dropout in the backbone: pass t is the same pass in both scopes
        mc_predict(model, x, passes=t, scope="full", seed=1), head, rtol=0, atol=1e-5)
    assert head.shape == full.shape == (2, t, 3)
    sd = np.sqrt(head.var(1) / t + full.var(1) / t)  # standard error of the difference
    assert head.std(1).min() > 0.01  # the test is not trivially passing on constant outputs
    assert np.all(np.abs(head.mean(1) - full.mean(1)) < 5 * sd + 1e-3)
    np.testing.assert_allclose(head.std(1), full.std(1), rtol=0.25, atol=0.01)
    feats = model.features(x)
    np.testing.assert_array_equal(  # head scope on given features == head-only API
        mc_predict(model, None, passes=t, scope="head", seed=1, features=feats),
        mc_head_predict(model.head, feats, passes=t, seed=1))


def test_mc_passes_do_not_depend_on_chunking_batch_or_pass_split():
    head = build_head_d()
    with torch.no_grad():
        head.out.weight.mul_(20.0)  # decisive head: dropout visibly moves each image's probabilities
    f = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    a = mc_head_predict(head, f, passes=10, seed=3)
    b = mc_head_predict(head, f, passes=10, seed=3, chunk_rows=20)  # 2 images per call
    assert a.shape == b.shape == (5, 10, 2)
    assert a[:, :, 0].std(1).min() > 1e-3  # passes really differ per image
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # per image and pass, not just on average
    alone = mc_head_predict(head, f[3:4], passes=10, seed=3)  # another batch composition
    np.testing.assert_allclose(alone[0], a[3], rtol=0, atol=1e-6)
    split = np.concatenate([mc_head_predict(head, f, passes=4, seed=3),  # passes 0..3
                            mc_head_predict(head, f, passes=6, seed=3, first=4)], 1)  # passes 4..9
    np.testing.assert_allclose(split, a, rtol=0, atol=1e-6)
    assert not np.allclose(mc_head_predict(head, f, passes=10, seed=4), a)


def build_head_d():
    from raycyto.models import build_head

    torch.manual_seed(0)
    return build_head("d", 16, 2)


def test_mcdropout_acts_like_dropout_in_training_and_identity_in_eval():
    d = MCDropout(0.5)
    x = torch.ones(3, 1000)  # [N, D]
    assert torch.equal(d.eval()(x), x)
    y = d.train()(x)
    assert set(y.unique().tolist()) <= {0.0, 2.0} and 0.4 < (y == 0).float().mean() < 0.6
    with mc_mode(d, seed=0):
        z = d.eval()(x)
    assert 0.4 < (z == 0).float().mean() < 0.6
    assert torch.equal(z[0], z[1])  # one mask per pass, shared by the images of a batch
    with mc_mode(d, seed=0, passes=2):  # [N * T, D] rows, image-major
        w = d(x[:2].repeat_interleave(2, 0))
    assert torch.equal(w[0], w[2]) and not torch.equal(w[0], w[1])  # pass 0 of both images
    assert torch.equal(w[0], z[0])  # pass 0 is pass 0 whatever T
    assert torch.equal(d(x), x)  # MC mode switched off again


def test_vote_confidence_matches_a_hand_computation():
    # image 0: 3 passes vote class 1, 1 pass votes class 0; image 1: a 2-2 tie -> lowest label
    probs = np.array([
        [[0.4, 0.6], [0.3, 0.7], [0.8, 0.2], [0.1, 0.9]],
        [[0.6, 0.4], [0.2, 0.8], [0.7, 0.3], [0.45, 0.55]],
    ])
    s = summarize(probs, threshold=0.8)
    np.testing.assert_array_equal(s["vote"], [1, 0])
    np.testing.assert_allclose(s["confidence"], [0.75, 0.5])
    np.testing.assert_array_equal(s["refer"], [True, True])
    mean0 = np.array([0.4, 0.6])
    np.testing.assert_allclose(s["mean"][0], mean0)
    np.testing.assert_allclose(s["std"][0], probs[0].std(0))
    h = -(mean0 * np.log(mean0)).sum()
    np.testing.assert_allclose(s["entropy"][0], h)
    per_pass = -(probs[0] * np.log(probs[0])).sum(-1).mean()
    np.testing.assert_allclose(s["mutual_information"][0], h - per_pass)
    sure = summarize(np.tile([[[0.1, 0.9]]], (1, 5, 1)), threshold=0.8)
    assert sure["confidence"][0] == 1.0 and not sure["refer"][0]
    assert sure["mutual_information"][0] == pytest.approx(0.0, abs=1e-12)
