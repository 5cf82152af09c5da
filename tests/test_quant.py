"""Every quantization type: its levels, its straight-through gradient, and the clipping scalar."""
import pytest
import torch

from BitNetMCU import (NF4_LEVELS_INT8, QUANT_TYPES, BitConv2d, BitLinear, _StraightThrough, code_entropy_bits,
                       clipping_scalar, fake_quantize_weight, octav_clip, octav_mse, quantize_activations,
                       quantize_activations4, requantize, requantize4_scale, top_quantile)

QUANTIZED = [q.name for q in QUANT_TYPES.values() if q.levels is not None]


def wide_weights(n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, generator=g) * torch.rand(1, n, generator=g) * 3


@pytest.mark.parametrize('name', QUANTIZED)
def test_levels_are_exactly_the_documented_set(name):
    """Wide random weights reach every level of the type's row, and nothing else."""
    u, _ = QUANT_TYPES[name].quantize(wide_weights(), torch.tensor([[1.0]]))
    assert sorted(set(u.flatten().tolist())) == sorted(set(QUANT_TYPES[name].levels))


def test_the_levels_of_the_table():
    """The rows' level sets, spelled out once: what the README documents and the C kernels decode."""
    assert QUANT_TYPES['4bitsym'].int_levels == list(range(-15, 16, 2))
    assert QUANT_TYPES['2bitsym'].int_levels == [-3, -1, 1, 3]
    assert sorted(QUANT_TYPES['FP130'].int_levels) == [-128, -64, -32, -16, -8, -4, -2, -1, 1, 2, 4, 8, 16, 32, 64, 128]
    assert QUANT_TYPES['NF4'].int_levels == [-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127]
    assert QUANT_TYPES['NF2'].int_levels == [-10, -3, 3, 10]   # the original's +-0.2998, +-1 as +-0.3, +-1
    assert [q for q in QUANT_TYPES if not QUANT_TYPES[q].exportable] == ['None']


@pytest.mark.parametrize('name,w,expected', [
    ('4bitsym', [0.0, 0.01, -0.01, 0.07, 0.2, 5.0, -5.0], [0.5, 0.5, -0.5, 0.5, 1.5, 7.5, -7.5]),
    ('2bitsym', [0.0, 0.4, 0.6, -0.6, 3.0], [0.5, 0.5, 1.5, -1.5, 1.5]),
    ('4bit', [0.0, 0.06, 0.07, 1.0, -1.0], [0, 0, 1, 7, -8]),
    ('8bit', [0.004, -0.004, 0.5, 1.0, -1.0], [1, -1, 64, 127, -128]),
    ('FP130', [0.0, 0.01, 0.02, 0.1, 0.5, 1.0, 9.0, -0.09], [1, 1, 2, 16, 64, 128, 128, -8]),   # nearest power of two
    ('Ternary', [1.0, -1.0, 0.1, 0.0], [1, -1, 0, 0]),
    ('Binary', [1.0, -1.0, 0.5, 0.0], [1, -1, 1, -1]),
])
def test_known_values_with_s_one(name, w, expected):
    u, _ = QUANT_TYPES[name].quantize(torch.tensor([w]), torch.tensor([[1.0]]))
    assert u.flatten().tolist() == expected


def test_nf4_picks_nearest_level():
    """Each level maps to itself; just either side of the midpoint between two levels, the nearer one wins;
    beyond +-s the outer levels."""
    levels = NF4_LEVELS_INT8
    quantize = QUANT_TYPES['NF4'].quantize
    at_levels, step = quantize(torch.tensor([levels]) / 127, torch.tensor([[1.0]]))
    assert at_levels.flatten().tolist() == levels and step.item() == pytest.approx(1 / 127)
    for low, high in zip(levels[:-1], levels[1:]):
        mid = (low + high) / 2
        u, _ = quantize(torch.tensor([[mid - 0.01, mid + 0.01]]) / 127, torch.tensor([[1.0]]))
        assert u.flatten().tolist() == [low, high]
    u, _ = quantize(torch.tensor([[-5.0, 5.0]]), torch.tensor([[1.0]]))
    assert u.flatten().tolist() == [-127, 127]


@pytest.mark.parametrize('name', list(QUANT_TYPES))
def test_straight_through_gradient_is_identity(name):
    w = wide_weights(1000).requires_grad_()
    upstream = torch.randn_like(w)
    (fake_quantize_weight(w, torch.tensor([[0.7]]), QUANT_TYPES[name]) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_activation_quantization_is_per_sample_int8_with_ste():
    x = torch.tensor([[0.1, -2.0, 1.0], [100.0, 50.0, 0.0]], requires_grad=True)
    q = quantize_activations(x)
    scale = torch.tensor([[127 / 2.0], [127 / 100.0]])
    codes = (q * scale).round()
    assert codes.tolist() == [[6, -127, 64], [127, 64, 0]]   # 6.35 -> 6, 63.5 -> 64, 0
    assert torch.allclose(q * scale, codes, atol=1e-4)
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize('bits', [2, 4, 8])
@pytest.mark.slow
def test_octav_matches_brute_force_mse_search(bits):
    absw = wide_weights(50000, seed=bits).abs()
    s = octav_clip(absw, bits)
    grid = torch.linspace(0.01, float(absw.max()), 4000).view(-1, 1)
    mse = octav_mse(absw.expand(len(grid), -1), grid, bits).flatten()
    best = grid[mse.argmin()]
    assert float(octav_mse(absw, s, bits)) <= float(mse.min()) * 1.002
    assert float(s) == pytest.approx(float(best), rel=0.03)


def test_octav_clips_harder_for_fewer_bits():
    absw = wide_weights(20000).abs()
    assert octav_clip(absw, 2) < octav_clip(absw, 4) < octav_clip(absw, 8)


def test_prop_clipping_and_per_output_shape():
    w = torch.randn(6, 10)
    s = clipping_scalar(w, QUANT_TYPES['4bitsym'], 'prop', 0.25, per_output=False)
    assert s.shape == (1, 1) and float(s) == pytest.approx(float(w.abs().mean() / 0.25))
    rows = clipping_scalar(w, QUANT_TYPES['4bitsym'], 'octav', 0.25, per_output=True)
    assert rows.shape == (6, 1)
    assert torch.allclose(rows.flatten(), octav_clip(w.abs(), 4).flatten())


def test_layers_keep_s_as_buffer_and_quantize_per_row():
    layer = BitLinear(10, 4, QuantType='4bitsym', WScale='PerOutput')
    assert layer.s.shape == (4,) and 's' in layer.state_dict()
    assert layer.weight_levels().abs().max() <= 7.5
    conv = BitConv2d(1, 8, QuantType='8bit')
    assert conv.weight_levels().dtype == torch.float32 and conv.weight_levels().abs().max() <= 128


def test_code_entropy():
    assert code_entropy_bits(torch.tensor([1.0, -1.0, 1.0, -1.0])) == pytest.approx(1.0)
    assert code_entropy_bits(torch.tensor([3.0, 3.0])) == pytest.approx(0.0)
    assert code_entropy_bits(torch.arange(16.0)) == pytest.approx(4.0)


def reference_requantize(acc, shift):
    """The int8 activation as plain autograd (as BitNetMCU.py had it): divide, clamp, straight-through floor."""
    with torch.no_grad():
        q = torch.floor((acc + (2 ** shift // 2)) / 2 ** shift).clamp(0, 127)
    return _StraightThrough.apply((acc / 2 ** shift).clamp(0, 127), q)


@pytest.mark.parametrize('shift', [0, 1, 6])
def test_requantize_is_plain_autograd_bit_for_bit(shift):
    """The fused int8 activation gives the outputs and gradients of the plain one, signed zeros, NaN and the
    range's edges included: the training it speeds up computes the same numbers."""
    top = 127 * 2 ** shift
    g = torch.Generator().manual_seed(shift)
    edges = [0.0, -0.0, -1.0, 1.0, top, top + 1, top - 1, -top, 3.0 * top, 2 ** shift // 2, -(2 ** shift // 2)]
    acc = torch.cat([torch.tensor(edges), torch.randint(-2 * top, 3 * top, (2000,), generator=g).float()])
    upstream = torch.cat([torch.tensor([-0.0, 0.0, float('nan'), -2.5, 1e-40, -1e-40, 3.0, -0.0, float('inf'),
                                        -7.0, 0.5]), torch.randn(2000, generator=g)])
    results = []
    for function in (requantize, reference_requantize):
        x = acc.clone().requires_grad_()
        out = function(x, shift)
        out.backward(upstream)
        results.append((out.detach(), x.grad))
    (out, grad), (expected_out, expected_grad) = results
    assert torch.equal(out, expected_out)
    # bit for bit: torch.equal counts -0.0 equal to 0.0 and NaN unequal to itself
    assert torch.equal(grad.view(torch.int32), expected_grad.view(torch.int32))
    # at the edges: -0.0 passes at 0 (inside), NaN and inf are cleared at -1 and 3 x top (outside)
    assert int(grad.view(torch.int32)[0]) == -2 ** 31 and grad[2] == 0 and grad[8] == 0 and grad[3] == -2.5 / 2 ** shift


@pytest.mark.parametrize('n', [1, 2, 999, 1000, 1001, 65536, 70000])
def test_top_quantile_is_torch_quantile_bit_for_bit(n):
    g = torch.Generator().manual_seed(n)
    for values in (torch.randn(n, generator=g) * 1000, torch.randint(-3, 40, (n,), generator=g).float()):   # ties
        for q in (0.999, 0.5, 0.0, 1.0):
            assert torch.equal(top_quantile(values, q), torch.quantile(values, q)), (n, q)


@pytest.mark.parametrize('requantizer', ['reciprocal', 'shift'])
def test_4_bit_activations_in_training_are_the_mcus_requantization(requantizer):
    """quantize_activations4 on integer sums gives the codes intmodel.requantize4 (and so the C kernel) gives, for
    every peak the MCU meets above 15 (below it the MCU's exponent cannot go negative; training never sees such
    sums, as only the scale of its RMS-normalized activations matters)."""
    from intmodel import REQUANTIZE4_PEAK, requantize4
    g = torch.Generator().manual_seed(0)
    peaks = torch.cat([torch.arange(16, 3000), torch.randint(3000, REQUANTIZE4_PEAK + 1, (3000,), generator=g)])
    sums = ((torch.rand(len(peaks), 40, generator=g, dtype=torch.float64) * 1.5 - 0.5) * peaks[:, None]).round()
    sums[:, 0] = peaks.double()   # every row reaches its peak
    x = sums.clamp_min(0)
    dequantized = quantize_activations4(x, requantizer)
    codes = (dequantized * requantize4_scale(peaks[:, None].double(), requantizer)).round()
    assert torch.equal(codes, torch.from_numpy(requantize4(sums.long().numpy(), requantizer)).double())


def test_sums_beyond_the_reciprocal_requantization_are_an_export_error():
    from intmodel import REQUANTIZE4_PEAK, ExportError, requantize4
    sums = torch.tensor([[REQUANTIZE4_PEAK + 1, 5]]).numpy()
    with pytest.raises(ExportError, match=r"beyond what the 4-bit reciprocal requantization takes.*requantizer: shift"):
        requantize4(sums, 'reciprocal')
    assert requantize4(sums, 'shift').tolist() == [[15, 0]]   # the shift takes any sum
