"""Property tests: every C kernel against its Python twin, on random sizes, weights and int8 inputs
(including the extremes). The same tests run again under AddressSanitizer + UndefinedBehaviorSanitizer."""
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from BitNetMCU import EXPORTABLE_TYPES, LAYOUTS, QUANT_TYPES
from conftest import ROOT
from cengine import build_engine
from intmodel import (FC, REQUANTIZE4_PEAK, ExportError, IntOp, conv3x3_relu, fc, image_windows, maxpool2, pack_codes,
                      pack_fc, pack_qconv, product_table, qconv3x3, requantize, requantize4, requantize8)

SANITIZE = os.environ.get('BITNETMCU_SANITIZE') == '1'
settings.register_profile('kernels', max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile('kernels')


@pytest.fixture(scope='module')
def engine():
    return build_engine(sanitize=SANITIZE, log=lambda *a: None)


def int8_vectors(n):
    """Random int8 vectors, plus the extremes: all zero, all -128, all 127."""
    return st.one_of(st.just(np.zeros(n, np.int8)), st.just(np.full(n, -128, np.int8)),
                     st.just(np.full(n, 127, np.int8)),
                     st.lists(st.integers(-128, 127), min_size=n, max_size=n).map(lambda v: np.array(v, np.int8)))


@st.composite
def fc_cases(draw):
    qtype = QUANT_TYPES[draw(st.sampled_from(EXPORTABLE_TYPES))]
    n_in, n_out = draw(st.integers(1, 300)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    weights = np.random.default_rng(seed).choice(qtype.int_levels, size=(n_out, n_in))
    if draw(st.booleans()):   # extreme weights: all at the most negative level of the type
        weights[:] = min(qtype.int_levels)
    return qtype, weights, draw(int8_vectors(n_in))


@given(fc_cases(), st.sampled_from(LAYOUTS), st.one_of(st.just(0), st.integers(-128, 127)))
def test_fc_matches_python_for_every_type_and_layout(engine, case, layout, zero):
    assume(check_fc(engine, *case, layout, zero))   # False: the row sums do not fit int16


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('name', EXPORTABLE_TYPES)
def test_fc_of_each_type_at_awkward_sizes(engine, name, layout):
    """Every type surely, not only where the random draw lands: sizes that are whole words of no type."""
    qtype = QUANT_TYPES[name]
    for n_in, n_out, zero in [(1, 1, 0), (37, 13, 0), (70, 25, -3), (9, 7, 100)]:
        rng = np.random.default_rng(n_in)
        weights = rng.choice(qtype.int_levels, size=(n_out, n_in))
        assert check_fc(engine, qtype, weights, rng.integers(-128, 128, n_in).astype(np.int8), layout, zero)


def check_fc(engine, qtype, weights, x, layout, zero):
    """The type's fully connected kernel in `layout` (input-major: skipping inputs equal to `zero`) is fc().
    False where it cannot run: the row sums do not fit int16."""
    ffi, lib = engine
    layer = pack_fc(IntOp(FC, qtype, weights), layout, skip_background=True)
    packed = np.ascontiguousarray(layer.words)
    out = np.full(layer.outputs, 12345, np.int32)
    extra = []
    if layer.layout == 'input-major':   # skip inputs equal to `zero`, add zero * rowsums
        if layer.rowsums is None:
            return False
        x = x.copy()
        x[::3] = zero   # make skipping happen, of single inputs and of whole groups of 2 and 4
        x[4:12] = zero
        extra = [zero, ffi.from_buffer('int16_t[]', np.ascontiguousarray(layer.rowsums))]
    args = [ffi.from_buffer('int8_t[]', x), len(x), ffi.from_buffer(packed), ffi.from_buffer('int32_t[]', out),
            len(weights)] + extra
    getattr(lib, layer.kernel)(*args)
    assert np.array_equal(out[:len(weights)], fc(x[None].astype(np.int64), weights)[0])
    return True


WINDOW_TYPES = [name for name in EXPORTABLE_TYPES if QUANT_TYPES[name].window_kernel]


@given(st.sampled_from(WINDOW_TYPES), st.sampled_from([(4, 4), (8, 2), (8, 4), (8, 8), (12, 4)]), st.integers(1, 40),
       st.integers(0, 2 ** 32 - 1), int8_vectors(256), st.booleans())
def test_window_fc_reads_every_window_in_place(engine, name, window, n_out, seed, image, background):
    """BitNetMCU_fc_window_<type> on each window of a 16x16 image, read where it lies (row stride 16), is the
    fully connected layer on the window's pixels; background pixels are skipped and added from the row sums."""
    ffi, lib = engine
    qtype, (size, stride) = QUANT_TYPES[name], window
    weights = np.random.default_rng(seed).choice(qtype.int_levels, size=(n_out, size * size))
    layer = pack_fc(IntOp(FC, qtype, weights), 'input-major', skip_background=True)
    assume(layer.rowsums is not None)
    image = image.copy()
    if background:   # a digit on a plain background, as MNIST is: most inputs are skipped
        image[np.random.default_rng(seed).random(256) < 0.7] = image[0]
    windows = image_windows(image[None].astype(np.int64), size, stride)[0]
    expected = fc(windows, weights)
    packed, rowsums = np.ascontiguousarray(layer.words), np.ascontiguousarray(layer.rowsums)
    background = np.zeros(n_out, np.int32)
    lib.BitNetMCU_background_sums(int(image[0]), ffi.from_buffer('int16_t[]', rowsums),
                                  ffi.from_buffer('int32_t[]', background), n_out)
    assert np.array_equal(background, int(image[0]) * layer.rowsums.astype(np.int64))
    per_side = (16 - size) // stride + 1
    for k, want in enumerate(expected):
        y, x = divmod(k, per_side)
        out = np.full(layer.outputs, 12345, np.int32)
        getattr(lib, qtype.window_kernel)(ffi.from_buffer('int8_t[]', image) + 16 * stride * y + stride * x, size, size,
                                          16, ffi.from_buffer(packed), ffi.from_buffer('int32_t[]', out), n_out,
                                          int(image[0]), ffi.from_buffer('int32_t[]', background))
        assert np.array_equal(out[:n_out], want)


PRODUCT_TYPES = [name for name in EXPORTABLE_TYPES if QUANT_TYPES[name].product_table]


@given(st.sampled_from(PRODUCT_TYPES), st.integers(1, 300), st.integers(1, 40), st.integers(0, 2 ** 32 - 1),
       st.sampled_from(['random', 'zeros', 'fifteens']))
def test_fc_products_multiplies_4_bit_activations_by_look_up(engine, name, n_in, n_out, seed, inputs):
    ffi, lib = engine
    qtype, rng = QUANT_TYPES[name], np.random.default_rng(seed)
    weights = rng.choice(qtype.int_levels, size=(n_out, n_in))
    x = {'random': rng.integers(0, 16, n_in), 'zeros': np.zeros(n_in), 'fifteens': np.full(n_in, 15)}[inputs]
    x = x.astype(np.int8)
    layer = pack_fc(IntOp(FC, qtype, weights), 'input-major')
    out = np.full(layer.outputs, 12345, np.int32)
    table = np.ascontiguousarray(product_table(qtype))
    lib.BitNetMCU_fc_products(ffi.from_buffer('int8_t[]', x), n_in, ffi.from_buffer('uint32_t[]', layer.words.ravel()),
                              ffi.from_buffer('int32_t[]', out), n_out, ffi.from_buffer('int16_t[]', table))
    assert np.array_equal(out[:n_out], fc(x[None].astype(np.int64), weights)[0])


@given(st.sampled_from(['reciprocal', 'shift']), st.integers(1, 300).flatmap(lambda n: st.one_of(
    st.lists(st.integers(-REQUANTIZE4_PEAK, REQUANTIZE4_PEAK), min_size=n, max_size=n),
    st.lists(st.integers(-40, 40), min_size=n, max_size=n), st.just([REQUANTIZE4_PEAK] * n), st.just([-7] * n),
    st.just([1] * n))))
def test_requantize4_matches_python(engine, requantizer, values):
    ffi, lib = engine
    x = np.array(values, np.int32)
    out = np.full(len(x), -1, np.int8)
    getattr(lib, f'BitNetMCU_requantize4_{requantizer}')(ffi.from_buffer('int32_t[]', x), ffi.from_buffer('int8_t[]', out),
                                                         len(x))
    expected = requantize4(x[None].astype(np.int64), requantizer)[0]
    assert np.array_equal(out, expected)
    peak = int(x.max())
    if peak > 15:   # the largest sum lands at the top: the reciprocal's 14 or 15, the shift's 8 .. 15
        assert expected.max() >= (14 if requantizer == 'reciprocal' else 8)
    elif peak > 0:  # small sums: the shift keeps them, the reciprocal's s saturates at 255 (x 255 / 128)
        assert expected.max() == (min(peak * 255 >> 7, 15) if requantizer == 'reciprocal' else peak)


@given(st.integers(0, 24), st.integers(1, 300).flatmap(lambda n: st.one_of(
    st.lists(st.integers(-2 ** 31, 2 ** 31 - 1), min_size=n, max_size=n),
    st.lists(st.integers(-3000, 3000), min_size=n, max_size=n), st.just([2 ** 31 - 1] * n))))
def test_requantize_matches_python(engine, shift, values):
    ffi, lib = engine
    x = np.array(values, np.int32)
    out = np.full(len(x), -1, np.int8)
    lib.BitNetMCU_requantize(ffi.from_buffer('int32_t[]', x), shift, ffi.from_buffer('int8_t[]', out), len(x))
    assert np.array_equal(out, requantize(x.astype(np.int64), shift))


@given(st.integers(1, 300).flatmap(lambda n: st.one_of(
    st.lists(st.integers(-2 ** 31, 2 ** 31 - 1), min_size=n, max_size=n),
    st.lists(st.integers(-2000, 2000), min_size=n, max_size=n),
    st.just([2 ** 31 - 1] * n), st.just([0] * n), st.just([-5] * n))))
def test_requantize8_matches_python(engine, values):
    ffi, lib = engine
    x = np.array(values, np.int32)
    out = np.zeros(len(x), np.int8)
    lib.BitNetMCU_requantize8(ffi.from_buffer('int32_t[]', x), ffi.from_buffer('int8_t[]', out), len(x))
    expected = requantize8(x[None].astype(np.int64))[0]
    assert np.array_equal(out, expected)
    peak = int(x.max())
    if 0 < peak < 2 ** 23:   # exactly the float quantizer's round(127 x / peak), half up
        exact = [int((Fraction(127 * max(v, 0), peak) + Fraction(1, 2)) // 1) for v in values]
        assert out.tolist() == exact
    assert out.max() == (127 if peak > 0 else 0)


@given(st.integers(3, 16), st.integers(0, 7), st.integers(0, 2 ** 32 - 1), st.sampled_from([127, 2 ** 15, 2 ** 20]))
def test_conv3x3_matches_python(engine, size, shift, seed, magnitude):
    """Into a separate buffer and in place (the generated code runs the whole stack in one buffer)."""
    ffi, lib = engine
    rng = np.random.default_rng(seed)
    x = rng.integers(-magnitude, magnitude + 1, (size, size)).astype(np.int32)
    w = rng.integers(-128, 128, 9).astype(np.int8)
    _, expected = conv3x3_relu(x[None, None].astype(np.int64), w[None].astype(np.int64), shift)
    out = np.zeros((size - 2) ** 2, np.int32)
    lib.BitNetMCU_conv3x3_relu(ffi.from_buffer('int32_t[]', x), size, ffi.from_buffer('int8_t[]', w), shift,
                               ffi.from_buffer('int32_t[]', out))
    assert np.array_equal(out, expected.flatten())
    inplace = x.flatten().copy()
    buf = ffi.from_buffer('int32_t[]', inplace)
    lib.BitNetMCU_conv3x3_relu(buf, size, ffi.from_buffer('int8_t[]', w), shift, buf)
    assert np.array_equal(inplace[:(size - 2) ** 2], expected.flatten())
    if magnitude == 127:   # the image variant reads int8
        image = np.clip(x, -128, 127).astype(np.int8)
        _, expected = conv3x3_relu(image[None, None].astype(np.int64), w[None].astype(np.int64), shift)
        lib.BitNetMCU_conv3x3_relu_image(ffi.from_buffer('int8_t[]', image), size, ffi.from_buffer('int8_t[]', w),
                                         shift, ffi.from_buffer('int32_t[]', out))
        assert np.array_equal(out, expected.flatten())


@given(st.integers(1, 8), st.integers(0, 2 ** 32 - 1))
def test_maxpool_and_argmax_match_python(engine, half, seed):
    ffi, lib = engine
    rng = np.random.default_rng(seed)
    x = rng.integers(-2 ** 31, 2 ** 31, (2 * half, 2 * half)).astype(np.int32)
    out = np.zeros(half * half, np.int32)
    expected = maxpool2(x[None, None].astype(np.int64)).flatten()
    lib.BitNetMCU_maxpool2(ffi.from_buffer('int32_t[]', x), 2 * half, ffi.from_buffer('int32_t[]', out))
    assert np.array_equal(out, expected)
    buf = ffi.from_buffer('int32_t[]', x)   # in place
    lib.BitNetMCU_maxpool2(buf, 2 * half, buf)
    assert np.array_equal(x.flatten()[:half * half], expected)
    ties = rng.integers(0, 3, 2 * half).astype(np.int32)   # many ties: the first maximum wins, as numpy
    assert lib.BitNetMCU_argmax(ffi.from_buffer('int32_t[]', ties), len(ties)) == int(np.argmax(ties))


@st.composite
def qconv_cases(draw):
    """One channel's weights of a type (random, or every weight at the type's extremes, which for FP130 leaves no
    room for its two lanes and takes the per-weight path), a plane of 0..127 or an image's 0..255 with offset."""
    qtype = QUANT_TYPES[draw(st.sampled_from(EXPORTABLE_TYPES))]
    size, shift, seed = draw(st.integers(3, 16)), draw(st.integers(0, 12)), draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    levels = qtype.int_levels
    weights = draw(st.sampled_from(['random', 'extremes', 'largest']))
    if weights == 'random':
        w = rng.choice(levels, 9)
    elif weights == 'extremes':
        w = rng.choice([min(levels), max(levels)], 9)
    else:
        w = np.full(9, max(levels, key=abs))
    offset = draw(st.sampled_from([0, -128, -19, 0, 5]))
    top = 127 - offset if offset else 127
    plane = rng.integers(0, top + 1, (size, size))
    if draw(st.booleans()):
        plane[:] = top
    return qtype, np.asarray(w, np.int64), plane.astype(np.uint8), offset, shift


@given(qconv_cases())
def test_qconv_matches_python(engine, case):
    """Every int8-activation conv kernel (FP130 in lanes and per weight) into another buffer and in place."""
    ffi, lib = engine
    qtype, w, plane, offset, shift = case
    size = plane.shape[0]
    _, expected = qconv3x3(torch.from_numpy((plane.astype(np.float32) + offset)[None, None]), w[None], shift)
    expected = expected.numpy().astype(np.uint8)
    words = pack_qconv(qtype, w[None], shift)[0]
    kernel = getattr(lib, f'BitNetMCU_qconv3x3_{qtype.name}')
    out = np.zeros((size - 2) ** 2, np.uint8)
    kernel(ffi.from_buffer('uint8_t[]', plane), offset, size, ffi.from_buffer(words), shift,
           ffi.from_buffer('uint8_t[]', out), ffi.NULL, 0, 0)
    assert np.array_equal(out, expected.flatten())
    inplace = plane.flatten().copy()
    buf = ffi.from_buffer('uint8_t[]', inplace)
    kernel(buf, offset, size, ffi.from_buffer(words), shift, buf, ffi.NULL, 0, 0)
    assert np.array_equal(inplace[:(size - 2) ** 2], expected.flatten())
    if size % 2 == 0:   # with the 2x2 max pooling that follows, in place
        pooled = maxpool2(expected.astype(np.int64)).flatten()
        inplace = plane.flatten().copy()
        buf = ffi.from_buffer('uint8_t[]', inplace)
        kernel(buf, offset, size, ffi.from_buffer(words), shift, buf, ffi.NULL, 0, 1)
        assert np.array_equal(inplace[:len(pooled)], pooled)


@pytest.mark.parametrize('size', [3, 4, 5, 6, 7, 14, 16, 31, 32, 33])
def test_fp130_qconv_at_every_kind_of_plane_size(engine, size):
    """The FP130 lane kernel in C (tests/test_rv32_kernels.py runs its RV32E assembly) has a row loop for 16-wide
    planes and a generic one, and the per-weight path above BITNETMCU_MAX_PLANE."""
    ffi, lib = engine
    rng = np.random.default_rng(size)
    qtype = QUANT_TYPES['FP130']
    for trial in range(20):
        w = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8, 16, 32], 9)
        offset = int(rng.choice([0, -19]))
        plane = rng.integers(0, 128 - offset, (size, size)).astype(np.uint8)
        shift = int(rng.integers(0, 9))
        _, expected = qconv3x3(torch.from_numpy((plane.astype(np.float32) + offset)[None, None]), w[None], shift)
        out = np.zeros((size - 2) ** 2, np.uint8)
        lib.BitNetMCU_qconv3x3_FP130(ffi.from_buffer('uint8_t[]', plane), offset, size,
                                     ffi.from_buffer(pack_qconv(qtype, w[None], shift)[0]), shift,
                                     ffi.from_buffer('uint8_t[]', out), ffi.NULL, 0, 0)
        assert np.array_equal(out, expected.numpy().astype(np.uint8).flatten()), (trial, w, offset, shift)


@given(st.sampled_from(['FP130', '4bitsym', 'Ternary']), st.integers(5, 20), st.integers(0, 2 ** 32 - 1))
def test_qconv_extents_skip_only_what_is_constant(engine, qtype, size, seed):
    """Two convolutions over a plane that is `fill` outside a random blob, with the extents of
    BitNetMCU_plane_extent / BitNetMCU_conv_extent: the outputs equal the full computation's, and the
    returned fill is the value of a window of fills."""
    ffi, lib = engine
    rng = np.random.default_rng(seed)
    qtype = QUANT_TYPES[qtype]
    plane = np.zeros((size, size), np.uint8)
    y0, x0 = rng.integers(0, size, 2)
    y1, x1 = y0 + rng.integers(0, size - y0 + 1), x0 + rng.integers(0, size - x0 + 1)
    plane[y0:y1, x0:x1] = rng.integers(0, 110, (y1 - y0, x1 - x0)) * (rng.random((y1 - y0, x1 - x0)) < 0.7)
    offset = -19
    w1, w2 = rng.choice(qtype.int_levels, 9), rng.choice(qtype.int_levels, 9)
    x = torch.from_numpy((plane.astype(np.float32) + offset)[None, None])
    _, first = qconv3x3(x, w1[None], 6)
    _, second = qconv3x3(first, w2[None], 5)
    image_extent, extent0, extent1 = (np.zeros(2 * n, np.uint8) for n in (size, size - 2, size - 4))
    lib.BitNetMCU_plane_extent(ffi.from_buffer('uint8_t[]', plane), size, ffi.from_buffer(image_extent))
    lib.BitNetMCU_conv_extent(ffi.from_buffer(image_extent), size, ffi.from_buffer(extent0))
    buf = plane.flatten().copy()
    kernel = getattr(lib, f'BitNetMCU_qconv3x3_{qtype.name}')
    fill = kernel(ffi.from_buffer('uint8_t[]', buf), offset, size, ffi.from_buffer(pack_qconv(qtype, w1[None], 6)[0]),
                  6, ffi.from_buffer('uint8_t[]', buf), ffi.from_buffer(extent0), 0, 0)
    assert np.array_equal(buf[:(size - 2) ** 2], first.numpy().astype(np.uint8).flatten())
    if not plane[:3, :3].any():   # a window of the image's background
        constant = qconv3x3(torch.full((1, 1, 3, 3), float(offset)), w1[None], 6)[1]
        assert fill == int(constant)
    lib.BitNetMCU_conv_extent(ffi.from_buffer(extent0), size - 2, ffi.from_buffer(extent1))
    pool = 1 - size % 2   # (size - 4) even: the second convolution also pools, as in the models
    expected = second.numpy().astype(np.uint8)
    expected = (maxpool2(expected.astype(np.int64)) if pool else expected).flatten()
    kernel(ffi.from_buffer('uint8_t[]', buf), 0, size - 2, ffi.from_buffer(pack_qconv(qtype, w2[None], 5)[0]), 5,
           ffi.from_buffer('uint8_t[]', buf), ffi.from_buffer(extent1), fill, pool)
    assert np.array_equal(buf[:len(expected)], expected)


@given(st.integers(1, 8), st.integers(0, 2 ** 32 - 1))
def test_unsigned_image_and_uint8_maxpool_match_python(engine, half, seed):
    ffi, lib = engine
    rng = np.random.default_rng(seed)
    image = rng.integers(-128, 128, 256).astype(np.int8)
    plane = np.zeros(256, np.uint8)
    offset = lib.BitNetMCU_unsigned_image(ffi.from_buffer('int8_t[]', image), ffi.from_buffer('uint8_t[]', plane), 256)
    assert offset == image.min() and np.array_equal(plane.astype(np.int64) + offset, image)
    x = rng.integers(0, 128, (2 * half, 2 * half)).astype(np.uint8)
    expected = maxpool2(x[None, None].astype(np.int64)).flatten()
    buf = ffi.from_buffer('uint8_t[]', x)   # in place
    lib.BitNetMCU_maxpool2_u8(buf, 2 * half, buf)
    assert np.array_equal(x.flatten()[:half * half], expected)


def test_ternary_packing_decodes_every_group():
    # All 3^10 groups of 10 trits survive the ceil(v * 65536 / 3^10) encoding.
    digits = (np.arange(3 ** 10)[:, None] // 3 ** np.arange(9, -1, -1)) % 3
    weights = np.choose(digits, [1, -1, 0])
    packed = pack_codes(QUANT_TYPES['Ternary'], weights).astype(np.int64).flatten()
    frac, decoded = packed.copy(), []
    for _ in range(10):
        frac = frac * 3
        decoded.append(frac >> 16)
        frac &= 0xFFFF
    assert np.array_equal(np.stack(decoded, 1), digits)


def test_every_kernel_of_the_type_table_is_in_the_engine_and_no_other(engine):
    """BitNetMCU.py's QUANT_TYPES and the header's BITNETMCU_FC_TYPES list name the same kernels (the cffi
    declarations come from the header itself)."""
    _, lib = engine
    named = {kernel for q in QUANT_TYPES.values() for kernel in [*q.kernels.values(), q.window_kernel] if kernel}
    named.add('BitNetMCU_fc_products')   # one kernel for every type with a product table
    in_engine = {name for name in dir(lib) if name.startswith('BitNetMCU_fc_')}
    assert named == in_engine


@pytest.mark.slow
@pytest.mark.skipif(SANITIZE, reason='this is the test that starts the sanitizer run')
def test_kernels_are_clean_under_address_and_undefined_behavior_sanitizers():
    libasan = subprocess.run(['gcc', '-print-file-name=libasan.so'], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, BITNETMCU_SANITIZE='1', LD_PRELOAD=libasan,
               ASAN_OPTIONS='detect_leaks=0', UBSAN_OPTIONS='print_stacktrace=1')
    out = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', __file__],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert 'passed' in out.stdout and 'runtime error' not in out.stderr and 'AddressSanitizer' not in out.stderr


def test_fp130_packing_refuses_weights_that_are_not_powers_of_two():
    with pytest.raises(ExportError, match=r'\+-2\^e'):
        pack_qconv(QUANT_TYPES['FP130'], np.array([[1, 2, 3, 4, 8, 16, 32, 64, 128]]), 6)
    with pytest.raises(ExportError, match=r'\+-2\^e'):
        pack_qconv(QUANT_TYPES['FP130'], np.array([[1, 2, 0, 4, 8, 16, 32, 64, -256]]), 6)
    with pytest.raises(ExportError, match='9 weights'):
        pack_qconv(QUANT_TYPES['FP130'], np.ones((2, 8), np.int64), 6)
