"""Params, MACs and bytes per layer, checked against hand counts."""


from surgeon import model as model_io, profile
from tests.models import CNN, MLP, conv_model


def test_conv_macs_by_hand():
    m = conv_model(c=16, f=32, k=3, hw=12, bias=True)
    p = profile(m)
    (conv,) = p.layers
    assert conv.params == 32 * 16 * 9 + 32
    assert conv.macs == 32 * 12 * 12 * 16 * 9
    assert conv.bytes == conv.params * 4


def test_strided_conv_macs():
    m = conv_model(c=8, f=8, k=3, hw=12, strides=(2, 2))
    assert profile(m).layers[0].macs == 8 * 6 * 6 * 8 * 9


def test_sample_cnn_totals():
    p = profile(model_io.load(CNN))
    names = [l.name for l in p.layers]
    assert names == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc1", "fc2"]
    fc1 = p.layers[5]
    assert fc1.weight_shape == [128, 2048] and fc1.macs == 2048 * 128
    assert p.total_macs == sum(l.macs for l in p.layers)


def test_batch_scales_macs_not_params():
    m = model_io.load(MLP)
    p1 = profile(m, {"input": (1, 64)})
    p8 = profile(m, {"input": (8, 64)})
    assert p8.total_macs == 8 * p1.total_macs
    assert p8.total_params == p1.total_params
