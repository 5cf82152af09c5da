"""The integer model: what the MCU runs, a numpy reference that computes exactly what the C engine computes,
the packing of its weights into the arrays the C kernels read, and the layer kinds (the last section: each kind
is one class holding its reference step, its packing, its RAM and its C call).

    model (BitNetMCU.py) --to_int_model--> IntModel --reference_logits--> logits, bit-exact with C
                                              |
                                              +--pack_model(layout)--> [PackedLayer] --> modelheader.py's header
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from BitNetMCU import (CONV_TYPES, EXPORTABLE_TYPES, LAYOUTS, BitConv2d, BitLinear, BitWindowLinear, InputQuant,
                       QuantType, RMSNorm)


# ------------------------------------------------------------------------------------------------
# The integer model and its reference engine
# ------------------------------------------------------------------------------------------------

class ExportError(ValueError):
    """The model cannot be turned into an integer model; the message says why and what would work."""


@dataclass
class IntOp:
    """One step of the integer model, in order: a layer kind (the LayerKind of the section below: what the
    step computes, how its weights are packed, the RAM it needs and the C call it is) and its parameters."""
    kind: 'LayerKind'
    qtype: Optional[QuantType] = None
    weights: Optional[np.ndarray] = None
    shift: int = 0
    name: str = ''
    window: Optional[tuple] = None   # a window stem's first layer: (size, stride) of the windows it reads
    input_bits: int = 8              # a fully connected layer's inputs: 8 bits, or 4 (multiplied by look-up)
    requantizer: Optional[str] = None   # a 4-bit requantization: 'reciprocal' or 'shift'


@dataclass
class IntModel:
    ops: list
    num_classes: int
    input_size: int = 16

    def weight_ops(self):
        return [op for op in self.ops if op.kind.weighted]


def integer_weights(layer, label):
    """The integers the C kernel multiplies by."""
    qtype = layer.qtype
    if not qtype.exportable:
        raise ExportError(f"{label}: QuantType {qtype.name!r} ({qtype.description}) has no integer form; "
                          f"train with one of {EXPORTABLE_TYPES}")
    bad = int((~torch.isfinite(layer.weight)).sum())
    if bad:
        raise ExportError(f"{label}: {bad} weights are not finite (inf or nan); the checkpoint is broken, "
                          "retrain it (a diverged run?)")
    if qtype.clipped and not (torch.isfinite(layer.s).all() and (layer.s > 0).all()):
        raise ExportError(f"{label}: its clipping scalar s = {layer.s.flatten()[:4].tolist()} is not a positive "
                          "finite number, so its weights cannot be quantized; the checkpoint is broken")
    levels = layer.weight_levels().cpu().double().numpy() * qtype.int_scale
    iw = np.rint(levels).astype(np.int64)
    if not np.array_equal(iw, levels):
        raise ExportError(f"{label}: {qtype.name} levels are not integers after scaling")
    return iw


def per_tensor(module, label, unit):
    """Refuse a layer with one scale per row or channel: the integer engine has one per layer."""
    if module.per_output:
        raise ExportError(f"{label}: WScale PerOutput gives every {unit} its own scale, which the integer engine "
                          "does not have; train with WScale PerTensor to export")


def to_int_model(model):
    """Walk model.layers once and build the integer model both the header writer and the reference use."""
    ops, int32_convs = [], []
    for index, module in model.layers.named_children():
        label = f'layers.{index}'
        if isinstance(module, BitConv2d):
            per_tensor(module, label, 'channel')
            if module.int8_activations:
                ops.append(IntOp(INT8_CONV, module.qtype, integer_weights(module, label).reshape(module.out_channels, 9),
                                 int(module.act_shift), label))
                continue
            if not module.qtype.int32_conv:
                raise ExportError(f"{label}: {module.qtype.name} weights do not fit the int8 conv kernel; "
                                  f"use conv_QuantType {' / '.join(CONV_TYPES)}")
            int32_convs.append(IntOp(CONV, module.qtype, integer_weights(module, label).reshape(module.out_channels, 9),
                                     name=label))
            ops.append(int32_convs[-1])
        elif isinstance(module, BitWindowLinear):
            per_tensor(module, label, 'row')
            iw = integer_weights(module, label)
            ops.append(IntOp(WINDOW_FC, module.qtype, iw[None] if iw.ndim == 2 else iw, int(module.act_shift), label,
                             module.window))
        elif isinstance(module, nn.MaxPool2d):
            ops.append(IntOp(MAXPOOL, name=label))
        elif isinstance(module, BitLinear):
            per_tensor(module, label, 'row')
            if not isinstance(module.norm, (RMSNorm, nn.Identity)):
                raise ExportError(f"{label}: NormType {type(module.norm).__name__} subtracts a mean, which "
                                  "the MCU's requantization cannot do; train with NormType RMS or Lin")
            if module.requantizer:
                ops.append(IntOp(REQUANTIZE4, name=f'{label} input', requantizer=module.requantizer))
            elif ops and not module.int8_input:   # the image, or int8 conv features, need no requantizing
                ops.append(IntOp(REQUANTIZE8, name=f'{label} input'))
            ops.append(IntOp(FC, module.qtype, integer_weights(module, label), name=label,
                             input_bits=4 if module.requantizer else 8))
        elif not isinstance(module, (nn.ReLU, nn.Flatten, InputQuant)):
            raise ExportError(f"{label}: {type(module).__name__} has no integer kernel")
    choose_int32_shifts(int32_convs)
    return IntModel(ops, num_classes=ops[-1].weights.shape[0])


def choose_int32_shifts(convs, image_bound=128):
    """The right shift after each int32-plane convolution: the smallest that keeps the next one's sums in int32
    for any image (|pixel| <= image_bound; ReLU and pooling grow nothing), so the planes keep every bit they can.
    The float model's ReLU and RMS normalization do not see the scale; only the floor of each shift differs from
    it, so fewer shifted bits mean fewer images where float and integer model part (a fixed shift of 7 after
    every layer lost 64 images of the 16-wide zoo CNN, these 6)."""
    gains = [int(np.abs(op.weights).sum(axis=1).max()) for op in convs]   # the most a layer multiplies its input by
    bound = image_bound
    for op, gain, following in zip(convs, gains, gains[1:] + [1]):
        total = bound * gain   # the largest sum this layer can make
        op.shift = 0
        while (total >> op.shift) * following > INT32_MAX:
            op.shift += 1
        bound = total >> op.shift


def encode_input(images):
    """Float images (N, 16, 16) or (N, 256) -> int8 as the MCU sees them: round(x * 127 / max|x|) per image.
    Rounds half to even, like torch.round in training."""
    x = images.reshape(len(images), -1).to(torch.float32)
    scale = 127.0 / x.abs().amax(dim=1, keepdim=True).clamp_min(1e-5)
    return (x * scale).round().clamp(-128, 127).to(torch.int8).numpy()


def smallest_shift(peak, top):
    """Per row, the smallest right shift that brings `peak` to `top` or less."""
    shift = np.zeros_like(peak)
    while ((peak >> shift) > top).any():
        shift += (peak >> shift) > top
    return shift


def shift_relu(sums, top):
    """ReLU and the smallest right shift per row that brings its largest sum to `top` or less, with rounding, as
    BitNetMCU_requantize4_shift() (top 15)."""
    shift = smallest_shift(sums.max(axis=1, keepdims=True), top)
    half = (1 << shift) >> 1
    return np.where(sums > 0, np.minimum((sums + half) >> shift, top), 0)


REQUANTIZE8_BITS = 23   # sums are taken to below 2^23 before requantize8 divides, so that 254 x + peak fits 31 bits


def requantize8(sums):
    """ReLU and 8-bit activations of each row's sums, as BitNetMCU_requantize8(): round(127 x / peak), half up,
    exactly what the float model's activation quantizer computes of the same sums (peak: the row's largest; rows
    with a peak of 2^23 or more are shifted right first, losing bits far below what 7 bits of output resolve)."""
    peak = np.maximum(sums.max(axis=1, keepdims=True), 1)
    shift = smallest_shift(peak, (1 << REQUANTIZE8_BITS) - 1)
    peak = peak >> shift
    return (254 * (np.maximum(sums, 0) >> shift) + peak) // (2 * peak)


REQUANTIZE4_PEAK = 15 << 21   # the largest sum the 4-bit reciprocal requantization takes (its products stay in 32 bits)


def requantize4(sums, requantizer):
    """ReLU and 4-bit activations of each row's sums, as BitNetMCU_requantize4_<requantizer>() (see there)."""
    if requantizer == 'shift':
        return shift_relu(sums, top=15)
    peak = np.maximum(sums.max(axis=1, keepdims=True), 1)
    if peak.max() > REQUANTIZE4_PEAK:
        raise ExportError(f"a sum of {int(peak.max())} is beyond what the 4-bit reciprocal requantization takes "
                          f"({REQUANTIZE4_PEAK}); use requantizer: shift")
    k = np.zeros_like(peak)
    while ((15 << k) < peak).any():
        k += (15 << k) < peak
    s = np.minimum((15 << (k + 7)) // peak, 255)
    return np.minimum((np.maximum(sums, 0) * s) >> (k + 7), 15)


def product_table(qtype):
    """The 16 x 16 int16 products BitNetMCU_fc_products() looks up: row a (0..15), column code: a x its weight."""
    levels = np.array(qtype.int_levels)
    table = np.zeros((16, 16), np.int64)
    table[:, qtype.encode(levels).astype(np.int64)] = np.arange(16)[:, None] * levels
    return table.astype(np.int16)


def fc(x, weights):
    """Fully connected: (N, n_in) @ (n_out, n_in)^T. float64 BLAS is exact here: every partial sum is an
    integer far below 2^53."""
    return np.rint(x.astype(np.float64) @ weights.T.astype(np.float64)).astype(np.int64)


def conv3x3_relu(x, weights, shift):
    """Per-channel 3x3 conv (no padding) + ReLU + right shift, as BitNetMCU_conv3x3_relu().
    x (N, 1 or C, H, W), weights (C, 9): one input channel feeds all C outputs, else depthwise."""
    n, _, h, w = x.shape
    k = weights.reshape(1, -1, 3, 3)
    acc = np.zeros((n, k.shape[1], h - 2, w - 2), dtype=np.int64)
    for dy in range(3):
        for dx in range(3):
            acc += x[:, :, dy:dy + h - 2, dx:dx + w - 2] * k[:, :, dy, dx, None, None]
    return acc, np.where(acc > 0, acc >> shift, 0)


def qconv3x3(x, weights, shift):
    """Per-channel 3x3 conv with int8 activations, as BitNetMCU_qconv3x3_*(): (sums, requantized outputs).
    x is a float32 tensor of integers, an int8 image or 7-bit planes (|x| <= 128). Every product and partial sum
    is then an integer below 2^24 (checked from the weights), which float32 holds exactly; the sums are checked
    to be integers."""
    k = torch.from_numpy(weights.astype(np.float32)).reshape(-1, 1, 3, 3)
    if 128 * float(np.abs(weights).sum(axis=1).max()) >= 2 ** 24:
        raise ExportError("the float32 convolution of the reference would not be exact")
    sums = torch.nn.functional.conv2d(x, k, groups=x.shape[1] if x.shape[1] > 1 else 1)
    out = sums + ((1 << shift) >> 1)
    if not torch.equal(out, out.round()):
        raise ExportError("the float32 convolution of the reference was not exact")
    return sums, out.mul_(2.0 ** -shift).floor_().clamp_(0, 127)


def image_windows(images, size, stride, side=16):
    """(N, side^2) images -> (N, windows, size^2): the size x size windows at `stride`, row-major."""
    views = np.lib.stride_tricks.sliding_window_view(images.reshape(len(images), side, side), (size, size), (1, 2))
    windows = views[:, ::stride, ::stride]
    return windows.reshape(len(images), -1, size * size)


def requantize(sums, shift):
    """A window stem layer's fixed-shift requantization, as BitNetMCU_requantize(): clamp((sum + 2^shift / 2) >> shift,
    0, 127)."""
    return np.clip((sums + ((1 << shift) >> 1)) >> shift, 0, 127)


def maxpool2(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


INT32_MAX = 2 ** 31 - 1
REFERENCE_BATCH = 500   # images per pass of a CNN through the reference (its planes stay in the caches)


def reference_logits(int_model, images_int8):
    """The integer reference engine: int8 images (N, 256) -> logits (N, classes), bit-exact with the C engine.
    Each op's kind computes its step (int64 numpy, checked to stay in the int32 range C computes in; int8
    planes as exact float32 tensors), REFERENCE_BATCH images at a time so that a CNN's planes stay in the caches."""
    images, size, out = np.asarray(images_int8, dtype=np.int64), int_model.input_size, []
    for i in range(0, len(images), REFERENCE_BATCH):
        x = images[i:i + REFERENCE_BATCH]
        if int_model.ops[0].kind.per_channel:
            x = x.reshape(len(x), 1, size, size)
        for op in int_model.ops:
            x = op.kind.reference(op, x)
        out.append(as_numpy(x))
    return np.concatenate(out) if out else np.zeros((0, int_model.num_classes), dtype=np.int64)


def as_numpy(x):
    """A step's output as int64 numpy (the int8-plane steps compute in float32 torch)."""
    return x.numpy().astype(np.int64) if torch.is_tensor(x) else x


def _check_int32(x, op):
    if x.size and np.abs(x).max() > INT32_MAX:
        raise ExportError(f"{op.name or op.kind.name}: sums exceed 32 bits; the C engine would overflow")
    return x


# ------------------------------------------------------------------------------------------------
# Packing: integer weights into the arrays the C kernels read
# ------------------------------------------------------------------------------------------------

def pack_codes(qtype, iw):
    """Integer weights (rows, n_in) -> packed rows, each starting a new word.
    'bits': uint32 words of codes MSB-first, first input in the top bits (zero bits pad the last word;
    the kernel stops at n_in). 'trits': uint16 groups of 10 base-3 digits, each stored as
    ceil(v * 65536 / 3^10) so that x3 brings the next trit into bits 16-17."""
    iw = np.asarray(iw, dtype=np.int64)
    rows, n_in = iw.shape
    codes = qtype.encode(iw).astype(np.int64)
    if qtype.packing == 'trits':
        codes = np.pad(codes, ((0, 0), (0, -n_in % 10)), constant_values=2)
        value = codes.reshape(rows, -1, 10) @ (3 ** np.arange(9, -1, -1))
        return ((value * 65536 + 59048) // 59049).astype(np.uint16)
    return pack_bits(codes, int(qtype.bits))


def pack_bits(codes, bits):
    """Codes (rows, n) of `bits` bits -> uint32 words MSB-first, each row starting a new word."""
    per_word = 32 // bits
    codes = np.pad(codes, ((0, 0), (0, -codes.shape[1] % per_word))).reshape(len(codes), -1, per_word)
    shifts = (32 - bits * (np.arange(per_word) + 1)).astype(np.uint64)
    return (codes.astype(np.uint64) << shifts).sum(axis=-1).astype(np.uint32)


def pack_fp130_conv(iw, shift):
    """FP130 convolution channels (channels, 9) -> 2 uint32 words each, with the set-up the kernel would otherwise
    compute per call (fp130_setup in BitNetMCU_inference.c reads it):
        word 0   the codes of weights 0-7, MSB-first        word 1, bits 28-31   the code of weight 8
        bits 20-27   max_input: the largest input (plane value) the lanes hold
        bits 15-19   lane: the width of the positive lane   bits 12-14   low = min(shift, smallest exponent)
        bits 0-11    the sum of the weights, two's complement
    A code is sign << 3 | (e - low) for a weight +-2^e: every product carries 2^low, taken out once."""
    iw = np.asarray(iw, dtype=np.int64)
    if iw.ndim != 2 or iw.shape[1] != 9:
        raise ExportError(f"an FP130 convolution has 9 weights per channel, not shape {iw.shape}")
    magnitude = np.abs(iw)
    exponent = np.rint(np.log2(np.maximum(magnitude, 1))).astype(np.int64)
    if not np.array_equal(1 << exponent, magnitude) or exponent.max() > 7:
        raise ExportError("FP130 weights are +-2^e with e in 0..7")
    low = np.minimum(exponent.min(axis=1), shift)
    relative = exponent - low[:, None]
    words = pack_bits(((iw < 0) << 3) | relative, 4)
    for channel, (w, r) in enumerate(zip(iw, relative)):
        positive, negative = int((1 << r[w > 0]).sum()), int((1 << r[w < 0]).sum())
        for max_input in range(255, 0, -1):   # the widest input range whose high lane still fits beside the low one
            lane = max(1, (max_input * positive).bit_length())
            if (max_input * negative) >> (32 - lane) == 0:
                break
        words[channel, 1] |= max_input << 20 | lane << 15 | int(low[channel]) << 12 | (int(w.sum()) & 0xFFF)
    return words


def pack_qconv(qtype, iw, shift):
    """An int8-activation convolution's weights (channels, 9) as BitNetMCU_qconv3x3_<type> reads them with this
    shift: each channel's codes from a new word (FP130: with its set-up)."""
    return pack_fp130_conv(iw, shift) if qtype.name == 'FP130' else pack_codes(qtype, iw)


def input_groups(qtype):
    """Inputs whose codes the input-major layout puts side by side, so that they make one 4-bit code:
    4 for 1-bit, 2 for 2-bit types (the kernel then adds one table entry for 4 or 2 weights), else 1."""
    return 4 // int(qtype.bits) if qtype.packing == 'bits' and qtype.bits < 4 else 1


@dataclass(frozen=True)
class PackedLayer:
    """One weight layer as the header stores it: made once by pack_model, read by the header writer, the
    summary and the buffer plan."""
    op: IntOp
    kernel: str                        # the C function that reads `words`
    layout: str                        # fc: 'input-major' or 'output-major'; conv: 'channels' (9 weights each;
                                       # qconv: packed codes, each channel starting a new word)
    words: np.ndarray                  # the weight array in the header
    outputs: int = 0                   # fc: int32 sums the kernel writes (input-major: n_out up to whole words)
    rowsums: Optional[np.ndarray] = None   # int16 sum of each output's weights: lets the kernel skip the background

    @property
    def nbytes(self):
        """Flash bytes of the layer's arrays."""
        return self.words.nbytes + (self.rowsums.nbytes if self.rowsums is not None else 0)


def pack_fc(op, layout, skip_background=False):
    """A fully connected layer in `layout`, or in the only layout its type has (Ternary: output-major).
    input-major (fast, the default): for each input the codes of all outputs (1- and 2-bit types: for each
    group of input_groups() inputs, their codes side by side as one 4-bit code per output). output-major: for
    each output the codes of all inputs (the original BitNetMCU layout). skip_background: the layer reads the image, so
    the input-major kernel skips background pixels and adds their share from the row sums (when those fit
    int16)."""
    if layout not in LAYOUTS:
        raise ExportError(f"weight layout {layout!r} is not one of {list(LAYOUTS)}")
    qtype, iw = op.qtype, np.asarray(op.weights)
    if layout not in qtype.kernels:
        layout = next(iter(qtype.kernels))
    n_out = iw.shape[0]
    if layout == 'output-major':
        return PackedLayer(op, qtype.kernels[layout], layout, pack_codes(qtype, iw), n_out)
    group = input_groups(qtype)
    bits = int(qtype.bits) * group                              # of a code the kernel looks up
    per_word = 32 // bits                                       # outputs a word of codes holds
    codes = qtype.encode(iw.T).astype(np.int64)                 # (n_in, n_out)
    codes = np.pad(codes, ((0, -len(codes) % group), (0, 0)))   # the kernel reads no input past n_in
    codes = sum(codes[j::group] << (int(qtype.bits) * (group - 1 - j)) for j in range(group))
    rowsums = iw.sum(axis=1)
    rowsums = rowsums.astype(np.int16) if skip_background and np.abs(rowsums).max() <= 32767 else None
    return PackedLayer(op, qtype.kernels[layout], layout, pack_bits(codes, bits), -(-n_out // per_word) * per_word,
                       rowsums)


def pack_model(int_model, layout=LAYOUTS[0]):
    """Every weight op of the model, packed once, in order."""
    return [op.kind.pack(op, layout, reads_image=op is int_model.ops[0]) for op in int_model.weight_ops()]


# ------------------------------------------------------------------------------------------------
# Layer kinds: each is one definition of what its step computes (the reference), how its weights are packed,
# the RAM and the C call it needs. Nothing outside a kind tests which kind an op is; the rest of the code asks
# a kind what it is (weighted, per channel, pooling, the planes it works on).
# Adding a kind: a class here, its kernel in BitNetMCU_inference.c, its case in to_int_model, its tests.
# ------------------------------------------------------------------------------------------------

class LayerKind:
    name = ''
    weighted = False       # carries weights into the header
    per_channel = False    # runs on one channel's plane at a time, inside the generated channel loop
    pools = False          # 2x2 max pooling: an int8-plane convolution before it pools in the same pass
    planes = None          # a convolution's plane type: 'int32' or 'int8' (the channel loop the header writes)

    def reference(self, op, x):
        """The step on a batch: x is (N, features) or (N, channels, size, size)."""
        raise NotImplementedError

    def out_size(self, size):
        """The plane size after the step (per-channel kinds)."""
        return size

    def multiplies(self, op):
        """Whether the kernel multiplies (the CH32V003 has no multiplier): a weighted kind's kernels multiply only
        for the weight types that say so."""
        return self.weighted and not op.qtype.multiplier_free

    def pack(self, op, layout, reads_image):
        """The PackedLayer of a weighted step."""
        raise NotImplementedError

    def summary(self, layer):
        """(shape, bits per weight) for exportquant.py's table."""
        raise NotImplementedError

    def arrays(self, layer, name):
        """The header's arrays of the layer: [(comment, C name, array)]; name is the layer's prefix."""
        raise NotImplementedError

    def call(self, op, layer, name, acts):
        """The C lines of a step after the channel loop, reading acts.source (acts: modelheader.Activations)."""
        raise ExportError(f"{op.name}: a {self.name} after the fully connected layers has no kernel")

    def channel_call(self, op, layer, loop, pooled):
        """The C call of a per-channel step for channel c, reading loop.src into loop.dst (modelheader.py)."""
        raise NotImplementedError


class FullyConnected(LayerKind):
    """int8 input -> int32 sums; weights (out, in) as the kernel multiplies them. 4-bit inputs (op.input_bits):
    BitNetMCU_fc_products(), which multiplies by look-up in the type's product table."""
    name, weighted = 'fc', True

    def reference(self, op, x):
        return _check_int32(fc(as_numpy(x).reshape(len(x), -1), op.weights), op)

    def multiplies(self, op):
        return op.input_bits == 8 and LayerKind.multiplies(self, op)

    def pack(self, op, layout, reads_image):
        if op.input_bits == 4:
            if not op.qtype.product_table:
                raise ExportError(f"{op.name}: {op.qtype.name} weights have no product table for 4-bit activations")
            layer = pack_fc(op, 'input-major')
            return PackedLayer(op, 'BitNetMCU_fc_products', layer.layout, layer.words, layer.outputs)
        return pack_fc(op, layout, skip_background=reads_image)

    def summary(self, layer):
        return f"{layer.op.weights.shape[1]} -> {layer.op.weights.shape[0]}", layer.op.qtype.bits

    def arrays(self, layer, name):
        op = layer.op
        arrays = []
        if layer.rowsums is not None:
            arrays.append((f"{op.name}: sum of each output's weights, for skipping the image background",
                           f"{name}_rowsums", layer.rowsums))
        if op.input_bits == 4:   # one table per type: the header writes an array of a name once
            arrays.append((f"4-bit activations 0..15 times every {op.qtype.name} code, for BitNetMCU_fc_products()",
                           f"BitNetMCU_products_{op.qtype.name}", product_table(op.qtype)))
        return arrays + [(f"{op.name}: fully connected {op.weights.shape[1]} -> {op.weights.shape[0]}, "
                          f"{op.qtype.name}, for {layer.kernel}()", f"{name}_weights", layer.words)]

    def call(self, op, layer, name, acts):
        n_out, n_in = op.weights.shape
        args = f"{acts.source}, {n_in}u, {name}_weights, sums, {n_out}u"
        if op.input_bits == 4:
            args += f", BitNetMCU_products_{op.qtype.name}"
        elif layer.layout == 'input-major':   # skip the background (first layer) or ReLU zeros
            args += (f", input[0], {name}_rowsums" if layer.rowsums is not None
                     else ", BITNETMCU_NO_BACKGROUND, BITNETMCU_NO_ROWSUMS")
        acts.source, acts.count = 'sums', n_out
        return [f"    {layer.kernel}({args});"]


class Requantize8(LayerKind):
    """ReLU and 8-bit activations, int32 -> 0..127 exactly as the float model's quantizer (flattens conv channels,
    channel-major)."""
    name = 'requantize8'

    def reference(self, op, x):
        return requantize8(as_numpy(x).reshape(len(x), -1))

    def kernel(self, op):
        return 'BitNetMCU_requantize8'

    def call(self, op, layer, name, acts):
        acts.act = max(acts.act, acts.count)
        line = f"    {self.kernel(op)}({acts.source}, act, {acts.count}u);"
        acts.source = 'act'
        return [line]


class Requantize4(Requantize8):
    """ReLU and 4-bit activations: int32 -> 0..15, by the 8-bit reciprocal of the largest sum or a rounding shift
    (op.requantizer)."""
    name = 'requantize4'

    def reference(self, op, x):
        return requantize4(as_numpy(x).reshape(len(x), -1), op.requantizer)

    def kernel(self, op):
        return f'BitNetMCU_requantize4_{op.requantizer}'


class MaxPool(LayerKind):
    """2x2 max pooling per channel."""
    name, per_channel, pools = 'maxpool', True, True
    KERNELS = {'int32': 'BitNetMCU_maxpool2', 'int8': 'BitNetMCU_maxpool2_u8'}

    def reference(self, op, x):
        return torch.nn.functional.max_pool2d(x, 2) if torch.is_tensor(x) else maxpool2(x)

    def out_size(self, size):
        return size // 2

    def channel_call(self, op, layer, loop, pooled):
        return f"{self.KERNELS[loop.planes]}({loop.src}, {loop.size}u, {loop.dst});"


class Conv3x3(LayerKind):
    """3x3 conv per channel + ReLU + right shift `shift`, weights (channels, 9), int32 planes."""
    name, weighted, per_channel, planes = 'conv', True, True, 'int32'

    def reference(self, op, x):
        acc, x = conv3x3_relu(x, op.weights, op.shift)
        _check_int32(acc, op)
        return _check_int32(x, op)

    def out_size(self, size):
        return size - 2

    def multiplies(self, op):
        return True   # its int8 weights, whatever their type

    def pack(self, op, layout, reads_image):
        kernel = 'BitNetMCU_conv3x3_relu_image' if reads_image else 'BitNetMCU_conv3x3_relu'
        return PackedLayer(op, kernel, 'channels', op.weights.astype(np.int8))

    def summary(self, layer):
        return f"3x3 x {layer.op.weights.shape[0]} ch", 8

    def arrays(self, layer, name):
        op = layer.op
        return [(f"{op.name}: 3x3 conv, {op.weights.shape[0]} channels, {op.qtype.name} as int8, shift {op.shift}",
                 f"{name}_weights", layer.words)]

    def channel_call(self, op, layer, loop, pooled):
        return f"{layer.kernel}({loop.src}, {loop.size}u, w{loop.conv}, {op.shift}u, {loop.dst});"


class Int8Conv3x3(Conv3x3):
    """3x3 conv per channel, int8 activations: clamp((sum + 2^shift/2) >> shift, 0, 127), uint8 planes; the
    kernel pools (2x2 max) in the same pass when a pooling follows."""
    name, planes = 'qconv', 'int8'

    def multiplies(self, op):
        return LayerKind.multiplies(self, op)

    def reference(self, op, x):
        x = x if torch.is_tensor(x) else torch.from_numpy(x.astype(np.float32))
        return qconv3x3(x, op.weights, op.shift)[1]

    def pack(self, op, layout, reads_image):
        return PackedLayer(op, f'BitNetMCU_qconv3x3_{op.qtype.name}', 'channels', pack_qconv(op.qtype, op.weights, op.shift))

    def summary(self, layer):
        return f"3x3 x {layer.op.weights.shape[0]} ch", layer.op.qtype.bits

    def arrays(self, layer, name):
        op, words = layer.op, layer.words.shape[1]
        return [(f"{op.name}: 3x3 conv, {op.weights.shape[0]} channels, {op.qtype.name} codes ({words} word"
                 f"{'s' * (words > 1)} each), int8 activations, shift {op.shift}", f"{name}_weights", layer.words)]

    def channel_call(self, op, layer, loop, pooled):
        k = loop.conv
        pool = 'BITNETMCU_POOL' if pooled else 'BITNETMCU_NO_POOL'
        call = (f"{layer.kernel}({loop.src}, {loop.offset if k == 0 else 'BITNETMCU_NO_OFFSET'}, {loop.size}u, w{k}, "
                f"{op.shift}u, {loop.dst}, ")
        if k < loop.extents:   # outside its extent every output is one value, the next convolution's fill
            return (('uint32_t fill = ' if k == 0 else 'fill = ') + call
                    + f"extent{k}, {'BITNETMCU_IMAGE_FILL' if k == 0 else 'fill'}, {pool});")
        return call + f"BITNETMCU_NO_EXTENT, BITNETMCU_NO_FILL, {pool});"


class WindowStem(LayerKind):
    """A window stem layer (BitWindowLinear): a fully connected layer run on every window of the image and requantized
    by its fixed shift, in the generated loop over the windows. Weights (stems, out, in): one stem shared by every
    window, or one per window. The first layer (op.window set) reads its window in place in the image through the
    type's window kernel; a later one reads the previous layer's 7-bit outputs of the same window. Its output, the
    windows one after the other, is (N, windows x out)."""
    name, weighted, per_channel, planes = 'window', True, True, 'windows'

    def reference(self, op, x):
        x = as_numpy(x)
        x = image_windows(x.reshape(len(x), -1), *op.window) if op.window else x.reshape(len(x), -1, op.weights.shape[2])
        w = op.weights.astype(np.float64)   # exact: every sum is an integer far below 2^53
        sums = x.astype(np.float64) @ w[0].T if len(w) == 1 else np.einsum('nwi,woi->nwo', x.astype(np.float64), w)
        sums = _check_int32(np.rint(sums).astype(np.int64), op)
        return requantize(sums, op.shift).reshape(len(x), -1)

    def pack(self, op, layout, reads_image):
        if op.window:
            if op.qtype.window_kernel is None:
                raise ExportError(f"{op.name}: a window stem's first layer reads the image through an input-major "
                                  f"kernel, which {op.qtype.name} has not; train it with one of "
                                  f"{[q for q in EXPORTABLE_TYPES if q != op.qtype.name]}")
            layout = 'input-major'
        stems = [pack_fc(IntOp(FC, op.qtype, w), layout, skip_background=bool(op.window)) for w in op.weights]
        first = stems[0]
        if op.window and any(stem.rowsums is None for stem in stems):
            raise ExportError(f"{op.name}: the sums of a window's weights do not fit int16")
        rowsums = np.concatenate([stem.rowsums for stem in stems]) if op.window else None
        return PackedLayer(op, op.qtype.window_kernel if op.window else first.kernel, first.layout,
                           np.concatenate([stem.words for stem in stems]), first.outputs, rowsums)

    def summary(self, layer):
        stems, n_out, n_in = layer.op.weights.shape
        return f"{n_in} -> {n_out} {'per window' if stems > 1 else 'shared'}", layer.op.qtype.bits

    def arrays(self, layer, name):
        op = layer.op
        stems, n_out, n_in = op.weights.shape
        arrays = []
        if layer.rowsums is not None:
            arrays.append((f"{op.name}: sum of each output's weights, for skipping the image background",
                           f"{name}_rowsums", layer.rowsums))
        return arrays + [(f"{op.name}: window stem {n_in} -> {n_out}, {'one per window' if stems > 1 else 'shared'}, "
                          f"{op.qtype.name}, shift {op.shift}, for {layer.kernel}()", f"{name}_weights", layer.words)]

    def channel_call(self, op, layer, loop, pooled):
        """The calls for window `window` (modelheader.WindowLoop): the layer, then its requantization."""
        n_out, n_in = op.weights.shape[1:]
        weights, rowsums = loop.weights(layer)
        if op.window:   # the background's share: once per image for a shared stem, else for each window's own
            size = op.window[0]
            call = (f"{layer.kernel}({loop.src}, {size}u, {size}u, {loop.side}u, {weights}, sums, {n_out}u, input[0], "
                    "background);")
            background = f"BitNetMCU_background_sums(input[0], {rowsums}, background, {n_out}u);"
            if op.weights.shape[0] == 1:
                loop.before.append(f"    {background}")
            else:
                call = background + "\n            " + call
        else:
            call = f"{layer.kernel}({loop.src}, {n_in}u, {weights}, sums, {n_out}u"
            call += ", BITNETMCU_NO_BACKGROUND, BITNETMCU_NO_ROWSUMS);" if layer.layout == 'input-major' else ");"
        return call + f"\n            BitNetMCU_requantize(sums, {op.shift}u, {loop.dst}, {n_out}u);"


FC, REQUANTIZE8, MAXPOOL, CONV, INT8_CONV = FullyConnected(), Requantize8(), MaxPool(), Conv3x3(), Int8Conv3x3()
WINDOW_FC, REQUANTIZE4 = WindowStem(), Requantize4()
