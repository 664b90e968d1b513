"""The core on what users bring: control flow, models onnxruntime cannot run, odd inputs, and
tables that stay readable at 80 columns (issue 8)."""

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

import surgeon
from surgeon import model as model_io, report
from surgeon.calibration import synthesize
from surgeon.errors import UsageError
from surgeon.plugin import LayerReport, registry
from surgeon.profile import profile
from surgeon.validate import validate
from tests.models import CNN, CNN_TEST, checked, conv_model, init, make_model, run, tensor


# --- control flow -----------------------------------------------------------------------------------

def loop_model(seed=0):
    """fc0 (Gemm) -> Loop x3 { MatMul(h, W_loop) -> Relu } -> fc1 (Gemm); W_loop lives outside the body."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W_loop"], ["h_mm"], name="loop_fc"),
         helper.make_node("Relu", ["h_mm"], ["h_out"], name="loop_relu"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond_id")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 16])])
    nodes = [helper.make_node("Gemm", ["x", "w0"], ["h0"], name="fc0", transB=1),
             helper.make_node("Loop", ["trip", "cond", "h0"], ["h_final"], name="loop", body=body),
             helper.make_node("Gemm", ["h_final", "w1"], ["y"], name="fc1", transB=1)]
    inits = [init("w0", rng.standard_normal((16, 32)).astype(np.float32)),
             init("w1", rng.standard_normal((10, 16)).astype(np.float32)),
             init("W_loop", rng.standard_normal((16, 16)).astype(np.float32) * 0.3),
             init("trip", np.array(3, np.int64)), init("cond", np.array(True))]
    return make_model(nodes, [tensor("x", [1, 32])], [tensor("y", [1, 10])], inits)


def _all_initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out.update(_all_initializers(a.g))
    return out


def test_weights_inside_a_loop_are_skipped_with_a_reason_never_corrupted():
    m = checked(loop_model())
    res = surgeon.apply(m, "svd", {"rank": 4, "guard": "none"})
    status = {l.layer: (l.status, l.reason) for l in res.layers}
    assert status["fc0"][0] == status["fc1"][0] == "rewritten"
    assert status["loop_fc"] == ("skipped", "inside a Loop subgraph (loop, body): not rewritten")
    checked(res.model)
    w_loop = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "W_loop"))
    np.testing.assert_array_equal(_all_initializers(res.model.graph)["W_loop"], w_loop)
    x = np.random.default_rng(1).standard_normal((1, 32)).astype(np.float32)
    assert run(res.model, {"x": x})[0].shape == (1, 10)


def test_a_model_with_a_loop_keeps_its_outputs_when_nothing_outside_is_rewritten():
    m = loop_model()
    res = surgeon.apply(m, "svd", {"rank": 4, "guard": "none"}, layers="^$")
    x = np.random.default_rng(2).standard_normal((1, 32)).astype(np.float32)
    np.testing.assert_array_equal(run(res.model, {"x": x})[0], run(m, {"x": x})[0])


def test_weights_in_both_branches_of_an_if_are_reported():
    def branch(name, scale):
        return helper.make_graph([helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"], name=f"{name}_fc")],
                                 name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 4])],
                                 [init(f"{name}_w", np.full((8, 4), scale, np.float32))])
    node = helper.make_node("If", ["c"], ["y"], name="gate", then_branch=branch("then", 1.0),
                            else_branch=branch("else", 2.0))
    m = make_model([node], [tensor("x", [1, 8]), tensor("c", [], TensorProto.BOOL)], [tensor("y", [1, 4])])
    res = surgeon.apply(m, "svd")
    assert sorted((l.layer, l.reason) for l in res.layers) == [
        ("else_fc", "inside an If subgraph (gate, else_branch): not rewritten"),
        ("then_fc", "inside an If subgraph (gate, then_branch): not rewritten")]


# --- models onnxruntime cannot run --------------------------------------------------------------------

def custom_op_model():
    """A conv followed by an op in a custom domain: valid ONNX, but onnxruntime cannot load it."""
    m = conv_model(c=16, f=32, relu=False)
    m.graph.node.append(helper.make_node("Mystery", ["y"], ["z"], name="mystery", domain="custom.ops"))
    m.graph.output[0].CopyFrom(tensor("z", [1, 32, None, None]))
    m.opset_import.append(helper.make_opsetid("custom.ops", 1))
    return m


def test_a_model_onnxruntime_cannot_load_is_still_rewritten():
    """Issue 8: graph plugins rewrite it; measuring it is what cannot be done (and says so)."""
    m = custom_op_model()
    res = surgeon.apply(m, "tucker", {"ratio": 0.5, "guard": "none"})
    assert [l.layer for l in res.rewritten] == ["conv"]
    checked(res.model)
    assert res.before.total_macs == 32 * 12 * 12 * 16 * 9  # shape inference alone was enough here
    # the mini models hold only the conv, so even the guard can time it (its verdict depends on the machine)
    (layer,) = surgeon.apply(m, "tucker", {"ratio": 0.5}).layers
    assert layer.details.get("guard") is not None
    with pytest.raises(UsageError, match="onnxruntime cannot load the model"):
        validate(m, res.model, synthesize(m))


def test_weight_that_is_a_graph_input_is_skipped():
    m = conv_model()
    w = m.graph.initializer[0]
    m.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.dims)))
    del m.graph.initializer[0]
    res = surgeon.apply(m, "tucker")
    (layer,) = res.layers
    assert layer.status == "skipped" and layer.reason == "weight is not constant"


def test_sequence_inputs_are_refused_with_a_reason():
    seq = helper.make_tensor_sequence_value_info("xs", TensorProto.FLOAT, [1, 4])
    m = make_model([helper.make_node("ConcatFromSequence", ["xs"], ["y"], axis=0)], [seq], [tensor("y", None)])
    with pytest.raises(UsageError, match="not plain tensors"):
        synthesize(m)


def test_fp16_weights_load_profile_and_save(tmp_path):
    from tests.models import detector_model
    m = detector_model(dtype=np.float16)
    path = model_io.save(m, tmp_path / "det16.onnx")
    back = model_io.load(path)
    assert back.graph.initializer[0].data_type == TensorProto.FLOAT16
    sig = model_io.input_signature(back)
    assert sig == [("images", [1, 3, "h", "w"], np.dtype(np.float16))]
    assert profile(back, {"images": (1, 3, 16, 16)}).total_macs > 0


# --- readable at 80 columns ---------------------------------------------------------------------------

LONG = "/model/backbone/stage3/block2/attention/output/dense/MatMul_with_a_very_long_name"


def render(renderable, width=80) -> list[str]:
    c = Console(width=width, record=True, color_system=None)
    c.print(renderable)
    return c.export_text().splitlines()


def _details(i):
    return {"R1": 48, "R2": 96, "rel_error": 0.41234, "params_before": 166080 * i, "params_after": 64700,
            "macs_before": 112140000 * i, "macs_after": 52900000, "complexity_ratio": 2.57, "guard": {"speedup": 2.13}}


def test_layers_table_stays_readable_at_80_columns():
    """Issue 8: at 80 columns the per-layer table collapsed `op` to nothing and truncated every value."""
    layers = [LayerReport(f"{LONG}_{i}", "ConvTranspose" if i == 2 else "Conv", "rewritten", "", _details(i))
              for i in range(1, 4)]
    lines = render(report.layers_table(layers, title="tucker on a_model.onnx"))
    assert all(len(l) <= 80 for l in lines)
    text = "\n".join(lines)
    assert "…" not in "".join(re.findall(r"\d[\d.,]*[kMG]?", text))
    # every value whole (a before→after pair may wrap after its arrow, each number intact)
    for value in ("166.08k→", "498.24k→", "64.70k", "112.14M→", "336.42M→", "52.90M", "2.57x", "2.13x",
                  "0.412", "48,96", "ConvTranspose"):
        assert value in text, value
    # long names are elided in the middle: both ends stay, so layers remain distinguishable
    rows = [l for l in lines if "/model" in l]
    assert len(rows) == 3 and all("…" in r for r in rows)
    assert [re.search(r"…([^│┃ ]*)", r).group(1)[-6:] for r in rows] == ["name_1", "name_2", "name_3"]


def test_names_that_elide_alike_wrap_instead():
    """EfficientNet-Lite0's layers all read '/_blocks…nv/Conv' when elided at 80 columns: the
    name column then wraps, and every name is there whole."""
    names = [f"/_blocks.{i}/_{kind}_conv/Conv" for i in range(9, 16) for kind in ("expand", "project")]
    layers = [LayerReport(n, "Conv", "rewritten", "", _details(1)) for n in names]
    lines = render(report.layers_table(layers, title="tucker"))
    assert all(len(l) <= 80 for l in lines)
    cells = [re.match(r"│([^│]*)│", l).group(1).strip() for l in lines if l.startswith("│")]
    assert "".join(cells) == "".join(names)  # wrapped pieces, in order, nothing cut
    assert not any("…" in c for c in cells)


def test_every_core_table_fits_80_columns():
    m = model_io.load(CNN)
    prof = profile(m)
    v = validate(m, m, surgeon.load_data(CNN_TEST, m).take(16), repeats=3).to_json()
    skipped = [LayerReport(LONG, "Conv", "skipped", "grouped conv (group=32): Tucker-2 does not apply to grouped "
                                                    "kernels, which already factor the channels")]
    tables = [report.profile_table(prof, LONG), report.totals_table(prof, prof), report.skipped_table(skipped),
              *report.validation_tables(v), *report.plugins_tables(registry())]
    for t in tables:
        lines = render(t)
        assert all(len(l) <= 80 for l in lines), "\n".join(lines)
    text = "\n".join(render(report.skipped_table(skipped)))
    assert "already factor the channels" in text.replace("│", " ").replace("\n", " ").replace("  ", " ") or \
        "channels" in text  # the reason wraps, it is never cut
    assert "403.37k" in "\n".join(render(report.profile_table(prof)))
    # the speedup is one line of its own, not a caption folded to the latency table's width
    (speed,) = [line for t in report.validation_tables(v) for line in render(t) if "speedup" in line]
    assert speed.startswith("speedup ") and "(95% interval, per pair)" in speed


def test_tables_take_the_layout_with_the_fewest_lines():
    """EfficientNet-Lite0's tucker table at 80 columns: with every before→after pair whole its
    30-character names wrapped at 13, 3 lines per layer; splitting the pairs after their
    arrows leaves the names 25 columns, 2 lines per layer, each name whole."""
    names = [f"/_blocks.{i}/_{kind}_conv/Conv" for i in range(9, 16) for kind in ("expand", "project")]
    details = {"R1": 32, "R2": 32, "rel_error": 1.758, "out_error": 0.831, "params_before": 75380,
               "params_after": 25200, "macs_before": 14750000, "macs_after": 4920000, "complexity_ratio": 3.0,
               "guard": {"speedup": 2.45}}
    layers = [LayerReport(n, "Conv", "rewritten", "", details) for n in names]
    # the head, 320 -> 1280: the widest pair
    layers.append(LayerReport("/_conv_head/Conv", "Conv", "rewritten", "", {**details, "params_before": 409600,
                                                                              "params_after": 122880}))
    names.append("/_conv_head/Conv")
    lines = render(report.layers_table(layers, title="tucker"))
    assert all(len(l) <= 80 for l in lines), "\n".join(lines)
    body = [l for l in lines if l.startswith("│")]
    assert len(body) == 2 * len(names), "\n".join(lines)
    cells = [re.match(r"│([^│]*)│", l).group(1).strip() for l in body]
    assert "".join(cells) == "".join(names)
    text = "\n".join(lines)
    assert text.count("75.38k→") == len(names) - 1 and "409.60k→" in text and text.count("14.75M→") == len(names)
    # wide enough for every pair on one line: one line per layer, as before
    assert len([l for l in render(report.layers_table(layers), width=120) if l.startswith("│")]) == len(names)


def test_folded_names_break_after_a_separator():
    assert report.fold_name("/_blocks.2/_expand_conv/Conv", 25) == "/_blocks.2/_expand_conv/\nConv"
    assert report.fold_name("/_blocks.12/_project_conv/Conv", 13) == "/_blocks.12/_\nproject_conv/\nConv"
    assert report.fold_name("abcdefghijklmnop", 6) == "abcdef\nghijkl\nmnop"  # no separator: cut at the width
    assert report.fold_name("short", 25) == "short"


def test_data_fits_show_both_errors_at_80_columns():
    """Issue 13: the report gives the weight-space and the output-space error; a data-aware
    fit's weight error can exceed 1 while its output error is small, so the table shows both."""
    names = [f"/_blocks.{i}/_{kind}_conv/Conv" for i in range(9, 16) for kind in ("expand", "project")]
    layers = [LayerReport(n, "Conv", "rewritten", "", {**_details(1), "rel_error": 1.174, "out_error": 0.0791})
              for n in names]
    lines = render(report.layers_table(layers, title="tucker"))
    assert all(len(l) <= 80 for l in lines), "\n".join(lines)
    text = "\n".join(lines)
    assert "w err" in text and "out err" in text and "1.174" in text and "0.079" in text
    assert "which fit=data minimises" in " ".join(l.strip() for l in lines)
    weights_only = "\n".join(render(report.layers_table([LayerReport("conv", "Conv", "rewritten", "", _details(1))])))
    assert "out err" not in weights_only and "w err" not in weights_only and "error" in weights_only
    # the detector's widths (ranks 120,240, params 332.16k->118.08k): one line per layer, as
    # before the output error was added (with one-line headers the pairs wrapped, 2 lines each)
    det = [LayerReport(f"Conv_{i}", "Conv", "rewritten", "", {**_details(2), "R1": 120, "R2": 240,
                                                             "params_after": 118080, "out_error": 0.042})
           for i in range(140, 146)]
    lines = render(report.layers_table(det, title="tucker"))
    rows = [l for l in lines if l.startswith("│Conv_")]
    assert len(rows) == 6 and all("332.16k→118.08k" in r and "224.28M→52.90M" in r for r in rows), "\n".join(lines)
    assert all(len(l) <= 80 for l in lines)


def test_wide_consoles_show_names_whole():
    layers = [LayerReport(f"{LONG}_1", "Conv", "rewritten", "", _details(1))]
    assert any(f"{LONG}_1" in l for l in render(report.layers_table(layers), width=200))


def test_unknown_macs_show_as_unknown_with_the_hint():
    from tests.models import detector_model
    p = profile(detector_model())
    text = "\n".join(render(report.profile_table(p), width=120))
    assert "?" in text and "--shape images=1x3x?x?" in text.replace("\n", "")
    tot = "\n".join(render(report.totals_table(p, p), width=120))
    assert re.search(r"MACs\s*│\s*\?\s*│\s*\?\s*│\s*-", tot)


def test_nan_outputs_are_flagged_in_the_drift_table():
    v = {"data": "d.npz", "synthetic_data": False, "samples": 4, "accuracy": None, "latency": None,
         "outputs": {"logits": {"max_abs": float("nan"), "mean_abs": float("nan"), "rel_l2": float("nan"),
                                "cosine": float("nan"), "non_finite": 40, "constant": False,
                                "top1_agreement": 0.0, "agreement_rows": 3}}}
    text = "\n".join(render(report.validation_tables(v)[0]))
    assert "NaN/Inf x40" in text and "over the 3 of 4 rows" in text


def test_plugin_options_read_as_prose_at_80_columns():
    """With type and default as columns of their own, int8's long type list squeezed the
    meaning to 15 characters at 80 columns: a word or two per line."""
    int8 = next(t for t in report.plugins_tables(registry()) if "int8" in t.title)
    lines = render(int8)
    assert all(len(l) <= 80 for l in lines)
    text = " ".join(l.split("│")[2].strip() for l in lines if l.count("│") == 3)
    assert "how activation ranges are computed from the calibration data" in text
    assert "minmax|entropy|percentile|auto|minmax-or-percentile, default 'minmax-or-percentile'" in text
    assert len(lines) < 100  # 183 lines before, 83 after ("BatchNormalizat|ion" was cut mid-word)


def test_a_column_no_row_fills_is_left_out():
    """A detector has no top-1: a sweep's agreement and accuracy columns were all '-' and
    squeezed the others at 80 columns. Optional columns go when empty, stay when any row has one."""
    cols = ["ratio", "ms", "drift", "agreement", "accuracy"]
    empty = render(report.table("sweep", cols, [["0.25", "3.1", "0.1", "-", "-"], ["0.5", "2.0", "0.2", "-", "-"]],
                                optional=("agreement", "accuracy")))
    header = next(l for l in empty if "ratio" in l)
    assert "drift" in header and "agreement" not in header and "accuracy" not in header
    assert any("0.25" in l and "3.1" in l for l in empty)
    one = render(report.table("sweep", cols, [["0.25", "3.1", "0.1", "-", "-"], ["0.5", "2.0", "0.2", "91.0%", "-"]],
                              optional=("agreement", "accuracy")))
    header = next(l for l in one if "ratio" in l)
    assert "agreement" in header and "accuracy" not in header
    kept = render(report.table("sweep", cols, [["0.25", "3.1", "0.1", "-", "-"]]))  # not optional: shown
    assert "agreement" in next(l for l in kept if "ratio" in l)
