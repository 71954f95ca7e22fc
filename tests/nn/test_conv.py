"""Convolutional encoders and decoders: shapes retrace, the output bias is per pixel, bad options are refused."""

import pytest
import torch
from torch import nn

from elbolab.errors import InputError
from elbolab.models.vae import start_at_data_mean
from elbolab.nn.conv import (
    ConvDecoder,
    ConvEncoder,
    ConvGridDecoder,
    GatedConv2d,
    GatedConvTranspose2d,
    grid_size,
)

# (image_shape, channels, the encoder's (h, w) after each stage), worked out by hand.
SIDES = [
    ((8, 8), (2,), [(4, 4)]),
    ((8, 8), (2, 3, 4), [(4, 4), (2, 2), (1, 1)]),
    ((28, 28), (2, 3), [(14, 14), (7, 7)]),
    ((28, 20), (2, 3, 4), [(14, 10), (7, 5), (4, 3)]),
    ((7, 9), (2, 3, 2), [(4, 5), (2, 3), (1, 2)]),
    ((1, 5), (2, 3, 2), [(1, 3), (1, 2), (1, 1)]),
    ((8, 8), (2, 2, 2, 2), [(4, 4), (2, 2), (1, 1), (1, 1)]),  # a stage past 1x1 keeps 1x1
]
VARIANTS = [dict(), dict(gated=True), dict(residual=1), dict(gated=True, residual=1, kernel=5)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These convolutions are tiny: thread start-up costs more than it saves, and on a busy
    # machine oversubscribed threads spin (seconds, not milliseconds, for this file).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("image_shape", "channels", "sides"), SIDES)
@pytest.mark.parametrize("options", VARIANTS, ids=["plain", "gated", "residual", "gated-residual-k5"])
def test_shapes_round_trip_with_any_leading_dims(image_shape, channels, sides, options):
    x_dim = image_shape[0] * image_shape[1]
    encoder = ConvEncoder(image_shape, channels, **options)
    c, (h, w) = channels[-1], sides[-1]
    assert encoder.grid_shape == (c, h, w) and encoder.out_features == c * h * w
    assert grid_size(image_shape, len(channels)) == (h, w)

    x = torch.rand(4, x_dim)
    assert encoder(x).shape == (4, c * h * w)
    assert encoder.grid(x).shape == (4, c, h, w)
    assert torch.equal(encoder(x), encoder.grid(x).flatten(1))
    assert encoder(torch.rand(3, 4, x_dim)).shape == (3, 4, c * h * w)
    assert encoder(torch.rand(x_dim)).shape == (c * h * w,)
    assert encoder(torch.rand(0, x_dim)).shape == (0, c * h * w)

    decoder = ConvDecoder(6, image_shape, channels[::-1], **options)
    assert decoder.grid_shape == (channels[-1], h, w)
    assert decoder(torch.randn(4, 6)).shape == (4, x_dim)
    assert decoder(torch.randn(3, 4, 6)).shape == (3, 4, x_dim)  # [K, N] particles
    assert decoder(torch.randn(0, 6)).shape == (0, x_dim)

    grid_decoder = ConvGridDecoder(c, image_shape, channels[::-1], **options)
    assert grid_decoder.grid_shape == encoder.grid_shape
    assert grid_decoder(encoder.grid(x)).shape == (4, x_dim)
    assert grid_decoder(encoder.grid(torch.rand(3, 4, x_dim))).shape == (3, 4, x_dim)


def _stage_sides(network, run):
    """The (h, w) of each stage's output (its convolution's; residual blocks keep the size), in order."""
    sides = []
    hooks = [stage.register_forward_hook(lambda m, i, o: sides.append(tuple(o.shape[-2:]))) for stage in network.stages]
    hooks += [network.stages[0].register_forward_pre_hook(lambda m, i: sides.append(tuple(i[0].shape[-2:])))]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return sides


@pytest.mark.parametrize(("image_shape", "channels", "sides"), SIDES)
@pytest.mark.parametrize("gated", [False, True])
def test_each_decoder_stage_retraces_the_encoder_in_reverse(image_shape, channels, sides, gated):
    x_dim = image_shape[0] * image_shape[1]
    encoder = ConvEncoder(image_shape, channels, gated=gated)
    # The pre-hook records each network's input grid first, then each stage's output.
    assert _stage_sides(encoder, lambda: encoder(torch.rand(2, x_dim))) == [image_shape, *sides]
    retraced = [*sides[::-1], image_shape]  # e.g. 7 -> 14 -> 28 for 28 -> 14 -> 7
    decoder = ConvDecoder(3, image_shape, channels[::-1], gated=gated)
    assert _stage_sides(decoder, lambda: decoder(torch.randn(2, 3))) == retraced
    grid_decoder = ConvGridDecoder(5, image_shape, channels[::-1], gated=gated)
    grid = torch.randn(2, 5, *sides[-1])
    assert _stage_sides(grid_decoder, lambda: grid_decoder(grid)) == retraced


@pytest.mark.parametrize("gated", [False, True])
def test_the_output_bias_adds_one_value_per_pixel_in_row_major_order(gated):
    decoder = ConvDecoder(4, (5, 3), (3, 2), gated=gated, residual=1)
    z = torch.randn(2, 6, 4)
    before = decoder(z)
    bias = torch.arange(15.0) * 0.1 - 0.7
    with torch.no_grad():
        decoder.output_layer.bias.copy_(bias)
    assert torch.allclose(decoder(z) - before, bias.expand(2, 6, 15), atol=1e-6)
    with torch.no_grad():
        for name, parameter in decoder.named_parameters():
            if name != "output_layer.bias":
                parameter.zero_()
    assert torch.equal(decoder(z), bias.expand(2, 6, 15))


def test_start_at_data_mean_starts_a_conv_decoder_at_the_pixel_means():
    x = torch.rand(50, 28 * 20)
    decoder = ConvGridDecoder(3, (28, 20), (4, 2))
    start_at_data_mean(decoder.output_layer, x, "gaussian")
    assert torch.allclose(decoder.output_layer.bias, x.mean(0))
    with torch.no_grad():
        for name, parameter in decoder.named_parameters():
            if name != "output_layer.bias":
                parameter.zero_()
    assert torch.allclose(decoder(torch.randn(2, 3, 7, 5)), x.mean(0).expand(2, -1))


@pytest.mark.parametrize("options", VARIANTS, ids=["plain", "gated", "residual", "gated-residual-k5"])
def test_gradients_reach_every_parameter(options):
    torch.manual_seed(0)
    networks = [
        (ConvEncoder((9, 8), (3, 4), activation="tanh", **options), torch.rand(5, 72)),
        (ConvDecoder(4, (9, 8), (4, 3), activation="tanh", **options), torch.randn(5, 4)),
        (ConvGridDecoder(2, (9, 8), (4, 3), activation="tanh", **options), torch.randn(5, 2, 3, 2)),
    ]
    for network, inputs in networks:
        out = network(inputs)
        (out * torch.randn_like(out)).sum().backward()
        for name, parameter in network.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, (type(network).__name__, name)


def test_the_gated_convolution_is_conv_h_times_sigmoid_of_conv_g():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6)
    gated = GatedConv2d(3, 4, 3, stride=2, padding=1)
    expected = nn.functional.conv2d(x, gated.h.weight, gated.h.bias, 2, 1) * torch.sigmoid(
        nn.functional.conv2d(x, gated.g.weight, gated.g.bias, 2, 1)
    )
    assert torch.allclose(gated(x), expected, atol=1e-6)
    assert not torch.allclose(gated(x), gated.h(x))  # the gate does something

    transposed = GatedConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1)
    h = nn.functional.conv_transpose2d(x, transposed.h.weight, transposed.h.bias, 2, 1, 1)
    g = nn.functional.conv_transpose2d(x, transposed.g.weight, transposed.g.bias, 2, 1, 1)
    assert torch.allclose(transposed(x), h * torch.sigmoid(g), atol=1e-6)
    assert transposed(x).shape == (2, 4, 14, 12)

    # In a gated encoder the stage is the gated convolution alone: no activation after it.
    encoder = ConvEncoder((7, 6), (4,), gated=True)
    (stage,) = encoder.stages
    assert isinstance(stage[0], GatedConv2d) and len(stage) == 1
    assert torch.allclose(encoder.grid(x[:, 0].reshape(2, 42)), stage[0](x[:, :1]), atol=1e-6)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: ConvEncoder((28,)), r"image_shape must be two positive integers \(H, W\), got \(28,\)"),
        (lambda: ConvEncoder((28, 0)), r"image_shape .* got \(28, 0\)"),
        (lambda: ConvEncoder((28, 2.5)), r"image_shape .* got \(28, 2.5\)"),
        (lambda: ConvEncoder(784), r"image_shape .* got 784"),
        (lambda: ConvDecoder(4, (28, -1)), r"image_shape .* got \(28, -1\)"),
        (lambda: ConvGridDecoder(4, (True, 3)), r"image_shape .* got \(True, 3\)"),
        (lambda: ConvEncoder((8, 8), ()), r"channels must be one or more positive widths, got \(\)"),
        (lambda: ConvEncoder((8, 8), (4, 0)), r"channels .* got \(4, 0\)"),
        (lambda: ConvDecoder(4, (8, 8), (4, -2)), r"channels .* got \(4, -2\)"),
        (lambda: ConvGridDecoder(4, (8, 8), 16), r"channels .* got 16"),
        (lambda: ConvEncoder((8, 8), kernel=4), r"kernel must be an odd positive integer, got 4"),
        (lambda: ConvDecoder(4, (8, 8), kernel=0), r"kernel must be an odd positive integer, got 0"),
        (lambda: ConvGridDecoder(4, (8, 8), kernel=3.5), r"kernel .* got 3.5"),
        (lambda: ConvEncoder((8, 8), residual=-1), r"residual must be an integer >= 0 .* got -1"),
        (lambda: ConvDecoder(4, (8, 8), residual=-1), r"residual .* got -1"),
        (lambda: ConvEncoder((8, 8), activation="rlu"), r"unknown activation 'rlu'; did you mean 'relu'\?"),
        (lambda: ConvGridDecoder(4, (8, 8), activation="swish"), r"unknown activation 'swish'; valid names: elu"),
        (lambda: ConvDecoder(0, (8, 8)), r"z_dim must be a positive integer, got 0"),
        (lambda: ConvGridDecoder(0, (8, 8)), r"in_channels must be a positive integer, got 0"),
        (lambda: grid_size((8, 8), -1), r"stages must be an integer >= 0, got -1"),
        (lambda: grid_size((0, 8), 1), r"image_shape .* got \(0, 8\)"),
    ],
)
def test_bad_options_are_refused(build, match):
    with pytest.raises(InputError, match=match):
        build()


def test_inputs_of_the_wrong_width_are_refused_naming_both_widths():
    encoder = ConvEncoder((28, 28), (2, 3))
    with pytest.raises(InputError, match=r"ConvEncoder expects inputs \[\.\.\., 784\] .*\(28, 28\).* got width 783"):
        encoder(torch.zeros(5, 783))
    with pytest.raises(InputError, match=r"got width 28 \(shape \[5, 28, 28\]\)"):
        encoder.grid(torch.zeros(5, 28, 28))  # unflattened images
    with pytest.raises(InputError, match="got a 0-dim tensor"):
        encoder(torch.tensor(1.0))
    with pytest.raises(InputError, match=r"ConvDecoder expects inputs \[\.\.\., 8\] \(z_dim\), got width 7"):
        ConvDecoder(8, (28, 28), (3, 2))(torch.zeros(5, 7))
    grid_decoder = ConvGridDecoder(3, (28, 28), (3, 2))
    with pytest.raises(InputError, match=r"expects grids \[\.\.\., 3, 7, 7\] .* got shape \[5, 3, 14, 14\]"):
        grid_decoder(torch.zeros(5, 3, 14, 14))
    with pytest.raises(InputError, match=r"got shape \[7, 7\]"):
        grid_decoder(torch.zeros(7, 7))
