"""Fine-tuning modes train exactly the intended parameters; frozen batch norm stays in eval."""

from __future__ import annotations

import re

import pytest
import torch

from raycyto.models import BACKBONES, build_classifier


def _group_prefixes(group: str) -> list[str]:
    out = []
    for ref in group.split("+"):
        m = re.fullmatch(r"(.+)\.(\d+)-(\d+)", ref)
        out += ([f"{m[1]}.{i}." for i in range(int(m[2]), int(m[3]) + 1)] if m else [ref + "."])
    return out


@pytest.mark.parametrize("name", list(BACKBONES))
@pytest.mark.parametrize("mode", ["frozen", "last1", "last2", "full"])
def test_finetune_mode_leaves_exactly_the_intended_parameters_trainable(name, mode):
    with torch.device("meta"):  # requires_grad bookkeeping only: no memory, fast
        model = build_classifier(name, "a", 2, finetune=mode, pretrained=False, seed=None)
    groups = {"frozen": [], "last1": model.spec.block_groups[-1:],
              "last2": model.spec.block_groups[-2:], "full": None}[mode]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    all_names = {n for n, _ in model.named_parameters()}
    heads = {n for n in all_names if n.startswith("head.")}
    if groups is None:
        expected = all_names
    else:
        prefixes = tuple("backbone." + p for g in groups for p in _group_prefixes(g))
        expected = heads | {n for n in all_names if n.startswith(prefixes)}
    assert trainable == expected
    assert heads <= trainable
    if mode == "last1":  # strictly fewer than last2, strictly more than frozen
        assert len(trainable) > len(heads)


def test_frozen_batchnorm_stays_in_eval_and_keeps_its_statistics():
    model = build_classifier("efficientnet_lite0", "a", 2, finetune="last1", pretrained=False)
    model.train()
    frozen_bn = model.backbone.bn1  # stem: frozen in last1
    live_bn = model.backbone.bn2  # in the last group
    assert not frozen_bn.training and live_bn.training
    before_frozen = frozen_bn.running_mean.clone()
    before_live = live_bn.running_mean.clone()
    out = model(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert torch.equal(frozen_bn.running_mean, before_frozen)
    assert not torch.equal(live_bn.running_mean, before_live)
    assert frozen_bn.weight.grad is None and live_bn.weight.grad is not None


def test_backbone_dropout_sits_before_the_first_trainable_group():
    model = build_classifier("resnet18", "a", 2, finetune="last1", pretrained=False,
                             backbone_dropout=0.5).eval()
    seen = []
    model.backbone.layer4.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    x = torch.randn(1, 3, 64, 64)
    from raycyto.models import mc_mode

    with torch.no_grad(), mc_mode(model, seed=1):
        model(x)
    assert (seen[0] == 0).float().mean() > 0.3  # about half the activations dropped
