"""The channel dependency analysis: which layers are coupled, which channels must stay, and
that removing channels equals masking them (surgeon/channel_groups.py, surgeon/channel_removal.py)."""

from __future__ import annotations

import pytest

from surgeon.channel_groups import analyze
from surgeon.channel_removal import head_of, mask_channels, prune_channels
from surgeon.engine import prepare
from surgeon.model import to_graph, to_model
from tests import models as M


def groups_of(model):
    """The analysis, and each layer's group by layer name."""
    an = analyze(to_graph(prepare(model)))
    return an, {m.name: g for g in an.groups for m in g.members}


def layer_sets(an):
    return sorted(sorted(m.name for m in g.members) for g in an.groups)


def test_residual_blocks_are_one_group():
    an, groups = groups_of(M.prune_residual())
    # both blocks' outputs meet at the Add / Sum: the projection skip, b1b and b2b share channels
    assert ["b1b", "b1s", "b2b"] in layer_sets(an)
    assert len(groups["b1b"].slots) == 32
    # the classifier's outputs reach the graph output and stay
    fc = groups["fc"]
    assert len(fc.fixed) == 10 and "graph output" in next(iter(fc.fixed.values()))


def test_concat_offsets_and_untraced_input():
    an, groups = groups_of(M.prune_concat_split())
    # the image's 3 channels in the Concat come from no layer: the mix conv keeps them, nothing else is fixed
    assert not groups["ca"].fixed and not groups["cb"].fixed
    # Split / Slice parts, and every layer, must each keep a channel
    assert sorted(len(s) for s in an.segments[:3]) == [8, 16, 16]
    assert len(an.segments) == 3 + len(an.members)


def test_se_and_depthwise_follow_their_input():
    an, groups = groups_of(M.prune_se_depthwise(mult=2))
    g = groups["expand"]
    assert sorted(m.name for m in g.members) == ["dw", "expand", "se.fc2"]
    assert len(g.slots) == 32  # the depthwise conv's 64 outputs are 2 per input channel
    dw = next(m for m in g.members if m.name == "dw")
    assert dw.kind == "depthwise" and len(set(dw.atoms)) == 32
    assert ["project", "stem"] in layer_sets(an)  # the residual Add couples them


def test_fixed_with_reasons():
    an, groups = groups_of(M.prune_untraceable())
    assert "Reshape" in next(iter(groups["a"].fixed.values()))
    assert "Gather" in next(iter(groups["b"].fixed.values()))
    assert "f(0) != 0" in next(iter(groups["c"].fixed.values()))
    assert not groups["e"].fixed


def test_head_is_the_affine_chain_after_a_layer():
    graph = to_graph(M.prune_residual())
    nodes = {n.name: n for n in graph.nodes}
    assert [n.name for n in head_of(nodes["b1b"], graph)] == ["b1b.bn"]
    assert [n.name for n in head_of(nodes["fc"], graph)] == []


@pytest.mark.parametrize("build", [M.prune_residual, M.prune_concat_split, M.prune_se_depthwise,
                                   M.prune_decoder, M.prune_flatten_gemm, M.prune_matmul_seq])
def test_removing_every_other_free_channel_equals_masking(build):
    """Remove the odd slots of every group (all that are not fixed): the smaller model must
    compute what the original computes with those channels zeroed."""
    model = prepare(build())
    graph = to_graph(model)
    an = analyze(graph)
    removed = {s for g in an.groups for i, s in enumerate(g.slots) if i % 2 and s not in g.fixed}
    assert removed
    names = {m.name: [j for j, a in enumerate(m.atoms) if an.find(a) in removed] for m in an.members}
    prune_channels(graph, an, removed)
    small = M.checked(to_model(graph, like=model))
    masked = mask_channels(model, names)
    feeds = M.random_feeds(model, 2)
    for a, b, o in zip(M.run(masked, feeds), M.run(small, feeds), M.run(model, feeds)):
        assert a.shape == b.shape == o.shape
        assert M.rel_l2(a, b) < 1e-5
        assert M.rel_l2(o, b) > 1e-3  # the test can fail: pruning changed the output


def test_mask_leaves_the_input_model_alone():
    model = prepare(M.prune_residual())
    before = model.SerializeToString()
    mask_channels(model, {"b1a": [0, 1]})
    assert model.SerializeToString() == before
