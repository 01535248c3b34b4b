"""Every registry backbone's forward as a sequence: the view equals the backbone, and the
frozen prefix then the trainable tail equals the whole (what cached-prefix fine-tuning needs)."""

from __future__ import annotations

import pytest
import torch

from raycyto.models.finetune import apply_finetune
from raycyto.models.registry import BACKBONES, build_backbone
from raycyto.models.split import SequentialView, prefix_tail, sequence_names, split_index


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_sequence_view_is_the_backbone_and_prefix_then_tail_is_the_whole(name):
    spec = BACKBONES[name]
    torch.manual_seed(0)
    backbone = build_backbone(name, pretrained=False).eval()
    size = max(spec.min_input_size, 64)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = backbone(x)
        assert want.shape == (2, spec.feature_dim)
        torch.testing.assert_close(SequentialView(backbone, sequence_names(spec))(x), want, rtol=1e-5, atol=1e-5)
        for mode in ("last1", "last2"):
            prefix, tail = prefix_tail(backbone, spec, mode)
            acts = prefix(x)
            assert acts.ndim == 4  # a feature map to cache
            torch.testing.assert_close(tail(acts), want, rtol=1e-5, atol=1e-5)
            # the cut is where training starts: nothing before it trains, everything after does
            first = apply_finetune(backbone, spec.block_groups, mode)[0]
            assert tail._mods[0] is first
            assert not any(p.requires_grad for m in prefix._mods for p in m.parameters())
            assert all(p.requires_grad for m in tail._mods for p in m.parameters())
    assert split_index(spec, "full") == 0 and split_index(spec, "frozen") == len(sequence_names(spec))
