"""The engine drives any plugin the same way: select, --layers, rewrite, guard, report."""

import pytest

import surgeon
from surgeon import guard, model as model_io
from surgeon.errors import UsageError
from tests.fixtures.relu_clip_plugin import GuardedClip, ReluToClip
from tests.models import CNN, assert_close_outputs, checked, op_counts, random_feeds


@pytest.fixture(scope="module")
def cnn():
    return model_io.load(CNN)


def test_rewrites_every_candidate_and_keeps_outputs(cnn):
    res = surgeon.apply(cnn, ReluToClip())
    assert op_counts(res.model).get("Relu", 0) == 0
    assert op_counts(res.model)["Clip"] == 6
    assert [l.layer for l in res.rewritten] == ["relu1", "relu2", "relu3", "relu4", "relu5", "relu_fc1"]
    checked(res.model)
    assert_close_outputs(cnn, res.model, random_feeds(cnn), rtol=0)
    assert [n.name for n in res.model.graph.node if n.op_type == "Clip"][0] == "relu1/clip/clip"


def test_input_model_is_not_modified(cnn):
    before = cnn.SerializeToString()
    surgeon.apply(cnn, ReluToClip())
    assert cnn.SerializeToString() == before


def test_layers_regex_selects_and_reports_the_rest(cnn):
    res = surgeon.apply(cnn, ReluToClip(), layers=r"^relu[12]$")
    assert [l.layer for l in res.rewritten] == ["relu1", "relu2"]
    skipped = {l.layer: l.reason for l in res.skipped}
    assert skipped["relu3"] == "not matched by --layers (or the step's select)"
    with pytest.raises(UsageError, match="bad --layers regex"):
        surgeon.apply(cnn, ReluToClip(), layers="(")


def test_per_layer_options_override(cnn):
    res = surgeon.apply(cnn, ReluToClip(), per_layer={"relu2": {"floor": "-1"}})
    floors = {l.layer: l.details["floor"] for l in res.rewritten}
    assert floors["relu2"] == -1.0 and floors["relu1"] == 0.0


def test_same_input_gives_same_bytes(cnn):
    a = surgeon.apply(cnn, ReluToClip()).model.SerializeToString(deterministic=True)
    b = surgeon.apply(cnn, ReluToClip()).model.SerializeToString(deterministic=True)
    assert a == b


def test_plugin_exception_is_reported_on_the_layer(cnn, monkeypatch):
    original = ReluToClip.rewrite

    def broken(self, graph, cand, ctx, opts):
        if cand.layer == "relu3":
            raise RuntimeError("kaboom")
        return original(self, graph, cand, ctx, opts)

    monkeypatch.setattr(ReluToClip, "rewrite", broken)
    res = surgeon.apply(cnn, ReluToClip())
    r3 = next(l for l in res.layers if l.layer == "relu3")
    assert r3.status == "failed" and "kaboom" in r3.reason
    assert [l.layer for l in res.failed] == ["relu3"]
    assert res.to_json()["failed"] == 1 and res.to_json()["layers"][2]["status"] == "failed"
    assert len(res.rewritten) == 5
    checked(res.model)


def test_guard_reverts_a_slower_rewrite(cnn, monkeypatch):
    def fake_timing(node, chain, shape, opset, threads=0, budget_s=0.6, seed=0, shapes=None):
        return guard.GuardResult(1.0, 1.6 if node.name == "relu2" else 0.5)

    monkeypatch.setattr(guard, "time_rewrite", fake_timing)
    res = surgeon.apply(cnn, GuardedClip())
    r2 = next(l for l in res.layers if l.layer == "relu2")
    assert r2.status == "skipped" and r2.reason.startswith("slower (1.60x")
    assert "relu2" in {n.name for n in res.model.graph.node}  # the original node stayed
    assert len(res.rewritten) == 5
    checked(res.model)
    assert_close_outputs(cnn, res.model, random_feeds(cnn), rtol=0)


def test_real_guard_timing_runs_on_a_node():
    """time_rewrite builds two tiny models from the graph and times them (no assertion on speed)."""
    from surgeon.plugin import Context
    m = model_io.load(CNN)
    g = model_io.to_graph(m)
    node = next(n for n in g.nodes if n.name == "relu1")
    rw = ReluToClip().rewrite(g, surgeon.Candidate(node), Context(), ReluToClip().make_options())
    r = guard.time_rewrite(node, rw.chain, (1, 32, 32, 32), 17, budget_s=0.05)
    assert r.original_ms > 0 and r.chain_ms > 0
    assert g.nodes.count(node) == 1 and all(n not in g.nodes for n in rw.chain)


def test_profiles_before_and_after(cnn):
    res = surgeon.apply(cnn, ReluToClip())
    assert res.before.total_macs == res.after.total_macs > 0
    j = res.to_json()
    assert j["rewritten"] == 6 and j["layers"][0]["status"] == "rewritten"


def test_per_layer_ranks_replace_a_global_ratio():
    """A plan gives one layer explicit ranks while the run sets --ratio: no conflict."""
    res = surgeon.apply(model_io.load(CNN), "tucker", {"ratio": "0.5", "guard": "none"},
                        per_layer={"conv3": {"ranks": "8,8"}})
    ranks = {l.layer: (l.details["R1"], l.details["R2"]) for l in res.rewritten}
    assert ranks["conv3"] == (8, 8)
    assert ranks["conv4"] == (32, 32)  # ratio 0.5 of 64 -> 64
    checked(res.model)


def test_guard_verdicts_are_cached_so_reruns_write_the_same_bytes(monkeypatch, tmp_path):
    """Timing is noisy; a repeated run must reuse the measured verdicts, not re-roll them."""
    monkeypatch.setenv("SURGEON_CACHE_DIR", str(tmp_path))
    m = model_io.load(CNN)
    first = surgeon.apply(m, "tucker", {"ratio": "0.5"})  # guard=latency is the default
    cached = sorted((tmp_path / "guard").glob("*.json"))
    assert len(cached) == len(first.rewritten) + sum(l.reason.startswith("slower") for l in first.skipped) > 0
    calls = []
    monkeypatch.setattr(guard, "latency_ab", lambda *a, **k: calls.append(1))
    second = surgeon.apply(m, "tucker", {"ratio": "0.5"})
    assert calls == []  # nothing was timed again
    assert second.model.SerializeToString(deterministic=True) == first.model.SerializeToString(deterministic=True)
    monkeypatch.setenv("SURGEON_GUARD_CACHE", "0")
    assert guard.cache_dir() is None


def test_why_no_layer_was_rewritten_groups_reasons_by_their_gist():
    """The latency guard's reasons carry each layer's figures, so no two are equal: the note
    groups them by the words before the figures and shows one in full."""
    from surgeon.engine import _why_none
    from surgeon.plugin import LayerReport
    slower = [LayerReport(f"c{i}", "Conv", "skipped", f"slower ({1.5 + i}x the original's time)") for i in range(4)]
    assert _why_none("tucker", slower) == ("tucker rewrote no layer: all 4 it looked at were skipped: slower, "
                                           "e.g. c0: slower (1.5x the original's time) (-v shows each)")
    mixed = slower[:1] + [LayerReport("fc", "Gemm", "skipped", "weight is not constant")] * 2
    assert _why_none("svd", mixed) == "svd rewrote no layer: 2 of the 3 it looked at were skipped: weight is not constant"
