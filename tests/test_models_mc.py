"""MC dropout: stochastic passes with frozen batch norm, exact cheap head scope, summaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycyto.models import build_classifier, mc_head_predict, mc_predict, summarize
from raycyto.models.heads import MLPHead, StudyAHead
from raycyto.models.mc import MCDropout, MCState, mc_mode
from raycyto.models.spatial import MILMapHead, mc_map_predict


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


# ----------------------------------------------------------------------------- MC pass vs. the eval forward
P = 0.3  # not 0.5, where 1 / (1 - p) and 1 / p agree


def test_an_mc_pass_keeps_units_scaled_by_exactly_1_over_1_minus_p_and_zeroes_the_rest():
    """Rows are image-major ``[n0 t0, n0 t1, ..., n1 t0, ...]``: row ``n*T + t`` is pass t of image n,
    kept where pass t's mask (MCState: call 0 of the forward) says so."""
    n, t, dim = 3, 4, 400
    x = 1 + torch.rand(n * t, dim, generator=torch.Generator().manual_seed(0))  # no zero input
    d = MCDropout(P).eval()
    with mc_mode(d, seed=5, passes=t):
        out = d(x)
    mask = MCState(5, t).mask((dim,), P)  # [T, D], True = kept
    for r in range(n * t):
        keep = mask[r % t]
        assert torch.equal(out[r] != 0, keep)  # the units kept are the mask's
        torch.testing.assert_close(out[r][keep], x[r][keep] / (1 - P), rtol=1e-6, atol=0)
        assert torch.all(out[r][~keep] == 0)
    assert 0.6 < mask.float().mean() < 0.8  # P(keep) = 1 - p


def _dropouts(head):
    return [m for m in head.modules() if isinstance(m, MCDropout)]


@torch.no_grad()
def _mc_run(head, x, passes: int, seed: int):
    """One head-scope MC forward (rows image-major, as mc_head_predict feeds the head):
    logits ``[N, T, C]`` and, per dropout layer, its input and output ``[N*T, ...]``."""
    seen = {}

    def record(m, i, o) -> None:  # returns None: the output stays as it is
        seen[m] = (i[0].clone(), o.clone())

    hooks = [d.register_forward_hook(record) for d in _dropouts(head)]
    try:
        with mc_mode(head, seed, passes):
            logits = head(x.repeat_interleave(passes, dim=0))
    finally:
        for h in hooks:
            h.remove()
    return logits.view(x.shape[0], passes, -1), seen


@torch.no_grad()
def _eval_forward_with_masks(head, x1, kept):
    """The deterministic (eval, MC off) forward of one image, each dropout's output replaced by
    its input with the ``kept`` units scaled by 1 / (1 - p) and the others zero."""
    hooks = [d.register_forward_hook(lambda m, i, o: torch.where(kept[m], i[0] / (1 - m.p), 0.0))
             for d in kept]
    try:
        return head(x1)
    finally:
        for h in hooks:
            h.remove()


def _heads():
    torch.manual_seed(0)
    mlp = MLPHead(16, 3, hidden=(32, 24), dropout=P)
    study_a = StudyAHead(16, 3, units=24, dropout1=0.2, dropout2=0.4)
    study_a.body[0].running_mean.normal_()
    study_a.body[0].running_var.uniform_(0.5, 2.0)
    spatial = MILMapHead(8, (3, 3), 3, width=12, channel_dropout=P)  # head scope: the no-repeat readout
    spatial_el = MILMapHead(8, (3, 3), 3, width=12, channel_dropout=P, dropout=0.2, reference=0)
    for h in (spatial, spatial_el):
        h.bn.running_mean.normal_()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    maps = torch.randn(3, 8, 3, 3, generator=torch.Generator().manual_seed(2))
    return {"mlp": (mlp, x), "study_a": (study_a, x), "spatial": (spatial, maps),
            "spatial_elementwise": (spatial_el, maps)}


@pytest.mark.parametrize("name", list(_heads()))
def test_an_mc_pass_of_a_head_is_its_eval_forward_with_the_kept_units_rescaled(name):
    """Pass t of image n equals the deterministic forward of image n in which every dropout keeps
    the units that pass kept, scaled by exactly 1 / (1 - p), and zeroes the others (for every
    layer: the units it kept are those with output != 0 where the input is != 0)."""
    head, x = _heads()[name]
    head.eval()
    n, t, seed = x.shape[0], 4, 3
    logits, seen = _mc_run(head, x, t, seed)
    assert logits.std(1).amax(-1).min() > 1e-3  # the passes differ (class 0 of a reference head is pinned)
    kept = {}
    for m, (inp, out) in seen.items():
        keep = out != 0
        torch.testing.assert_close(out, torch.where(keep, inp / (1 - m.p), 0.0), rtol=1e-6, atol=0)
        kept[m] = keep
    for i in range(n):
        for j in range(t):
            row = {m: k[i * t + j:i * t + j + 1] for m, k in kept.items()}
            by_hand = _eval_forward_with_masks(head, x[i:i + 1], row)[0]
            torch.testing.assert_close(logits[i, j], by_hand, rtol=0, atol=1e-5)
    probs = mc_head_predict(head, x, passes=t, seed=seed)  # the public API: the same passes
    np.testing.assert_allclose(probs, logits.softmax(-1).numpy(), rtol=0, atol=1e-6)
    if isinstance(head, MILMapHead):
        np.testing.assert_allclose(mc_map_predict(head, x, passes=t, seed=seed), probs, rtol=0, atol=1e-6)


def test_an_mc_pass_of_a_dense_head_computed_by_hand():
    """Head ``D -> 32 -> 24 -> C`` with dropout after each ReLU, pass t by plain arithmetic: the
    masks are MCState's calls 0 and 1 of the forward, kept units times 1 / (1 - p)."""
    head, x = _heads()["mlp"]
    head.eval()
    t, seed = 5, 7
    probs = mc_head_predict(head, x, passes=t, seed=seed)  # [N, T, C]
    state = MCState(seed, t)
    m1, m2 = state.mask((32,), P).float(), state.mask((24,), P).float()  # [T, 32], [T, 24]
    l1, l2, out = head.body[0], head.body[3], head.out
    with torch.no_grad():
        h1 = torch.relu(x @ l1.weight.T + l1.bias)  # [N, 32], the eval forward
        for j in range(t):
            a = h1 * m1[j] * (1 / (1 - P))
            b = torch.relu(a @ l2.weight.T + l2.bias) * m2[j] * (1 / (1 - P))
            np.testing.assert_allclose(probs[:, j], (b @ out.weight.T + out.bias).softmax(-1).numpy(),
                                       rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp_one_layer", "study_a_dropout2", "spatial_cell_scores"])
def test_the_mean_over_many_mc_passes_approaches_the_eval_output(name):
    """Where the output is linear in the dropout mask (one dropout, then linear layers), its mean
    over T passes estimates the eval output without bias, E[mask / (1 - p)] = 1: within 4.5
    standard errors. Without the 1 / (1 - p) the mean would sit (1 - p) of the way."""
    torch.manual_seed(0)
    t = 3000
    if name == "mlp_one_layer":
        head, x = MLPHead(16, 3, hidden=(64,), dropout=P), torch.randn(4, 16)
        fn = head
    elif name == "study_a_dropout2":
        head, x = StudyAHead(16, 3, units=48, dropout1=0.0, dropout2=0.4), torch.randn(4, 16)
        fn = head
    else:
        head = MILMapHead(8, (3, 3), 3, width=16, channel_dropout=P)
        x = head.eval().trunk(torch.randn(4, 8, 3, 3))  # trunk output [N, width, h, w]: cell scores are linear in the mask
        fn = head.cell_scores
    head.eval()
    with torch.no_grad():
        plain = fn(x)
        with mc_mode(head, seed=11, passes=t):
            mc = fn(x.repeat_interleave(t, dim=0)).view(x.shape[0], t, *plain.shape[1:])
    se = mc.std(1) / t ** 0.5
    assert (mc.std(1) > 1e-3).all()  # the passes differ
    assert torch.all((mc.mean(1) - plain).abs() <= 4.5 * se + 1e-5), ((mc.mean(1) - plain).abs() / se).max()
