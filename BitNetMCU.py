"""BitNetMCU: quantization-aware training of tiny MNIST models for multiplier-free microcontrollers.

The PyTorch side of the project. Read it top to bottom:
  1. quantization types  - one row per weight type (QUANT_TYPES): everything training, export, the integer
                           reference and the C engine need to know about it
  2. clipping scalar     - how each layer's clipping value `s` is chosen (prop / OCTAV)
  3. layers              - BitLinear, BitConv2d and BitWindowLinear: fake-quantized weights and 8-bit
                           activations (STE), or exactly the MCU's integers (Int8Output)
  4. models              - FCMNIST, CNNMNIST and WindowFCMNIST, each one flat nn.Sequential called `layers`, and
                           DenseCNN, a float teacher for distillation that the MCU cannot run
Config loading is in config.py, the integer model the MCU runs in intmodel.py, checkpoints in checkpoint.py.
"""
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------
# 1. Quantization types
#
# Every quantizer maps float weights w and the layer's clipping scalar s to levels u and a float step,
# so that the fake-quantized weight is u * step. The C kernels multiply by the integers u * int_scale;
# the step is absorbed by the normalization that follows every layer.
# ------------------------------------------------------------------------------------------------

# NormalFloat4 (QLoRA, Dettmers et al. 2023), rounded to int8 so the C engine can use the exact
# same levels as training: the trained model and the integer model agree by construction.
NF4_LEVELS_FLOAT = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
NF4_LEVELS_INT8 = [round(v * 127) for v in NF4_LEVELS_FLOAT]
# NormalFloat2 (the original BitNetMCU's 2026 type): +-0.2998 and +-1, as the integers +-3 and +-10 (0.3: small
# enough that a group of two inputs' summed products fits the kernels' int16 tables, and x3, x10 are two adds).
NF2_LEVELS = [-10, -3, 3, 10]


# Binary and Ternary take their statistics over the whole tensor: the integer engine has one scale per
# layer, so a per-row step would make the exported model differ from the trained one.
def _quant_binary(w, s):
    # s is not used: the sign around the mean is the whole quantizer; mean|w| keeps the scale sensible.
    u = torch.where(w - w.mean() >= 0, 1.0, -1.0)
    return u, w.abs().mean().reshape(1)


def _quant_ternary(w, s):
    # s is not used: BitNet b1.58's absmean rule sets the zero band.
    step = w.abs().mean().clamp_min(1e-8).reshape(1)
    return (w / step).round().clamp(-1, 1), step


def _quant_sym(levels):
    """Symmetric levels without zero: {±0.5, ±1.5, ...} times s/levels."""
    def quantize(w, s):
        return (w * levels / s - 0.5).round().clamp(-levels, levels - 1) + 0.5, s / levels
    return quantize


def _quant_twos_complement(levels):
    """Two's complement integers -levels .. levels-1 times s/levels."""
    def quantize(w, s):
        return (w * levels / s).round().clamp(-levels, levels - 1), s / levels
    return quantize


def _quant_fp130(w, s):
    # sign x 2^e with e in 0..7: a multiply becomes a shift. Zero maps to +1 (there is no zero code).
    # The nearest level: 2^(e+1) from 1.5 * 2^e on, i.e. e = floor(log2(4/3 * |w| * 128 / s)).
    e = torch.log2((w.abs() * (128 * 4 / 3) / s).clamp_min(1.0)).floor().clamp(0, 7)
    return torch.where(w >= 0, 1.0, -1.0) * torch.exp2(e), s / 128


def _quant_normal_float(integer_levels):
    """The nearest of the integer levels (the largest is `top`) to w / s * top, times s / top."""
    table = torch.tensor(integer_levels, dtype=torch.float32)
    top = max(integer_levels)

    def quantize(w, s):
        levels = table.to(w.device)
        idx = ((w / s).clamp(-1, 1).unsqueeze(-1) * top - levels).abs().argmin(dim=-1)
        return levels[idx], s / top
    return quantize


def _quant_none(w, s):
    return w, torch.ones_like(s)


# Export encodings: integer weight (u * int_scale) -> the code stored in the header. The C kernels
# decode them (BitNetMCU_inference.h documents every code).
def _sign_magnitude(bits, magnitude):
    return lambda iw: ((iw < 0).astype(np.uint32) << (bits - 1)) | magnitude(np.abs(iw)).astype(np.uint32)


def _twos_complement(bits):
    return lambda iw: (iw & ((1 << bits) - 1)).astype(np.uint32)


def _nf4_index(iw):
    levels = np.array(NF4_LEVELS_INT8)
    return np.abs(iw[..., None] - levels).argmin(-1).astype(np.uint32)


def _nf2_code(iw):
    """sign bit, then 1 for the outer level (|w| = 10) and 0 for the inner one (3)."""
    return ((iw < 0).astype(np.uint32) << 1) | (np.abs(iw) == 10).astype(np.uint32)


def _trit(iw):
    return np.select([iw == 1, iw == -1], [0, 1], 2).astype(np.uint32)


LAYOUTS = ('input-major', 'output-major')   # fully connected weight layouts, the fast one first


def _fc_kernels(name, layouts=LAYOUTS):
    """The C kernel of each weight layout the engine has for a type: BitNetMCU_fc_<name> reads the
    input-major layout, BitNetMCU_fc_rows_<name> the output-major one (see BitNetMCU_inference.h)."""
    prefix = {'input-major': 'BitNetMCU_fc_', 'output-major': 'BitNetMCU_fc_rows_'}
    return {layout: prefix[layout] + name for layout in layouts}


@dataclass(frozen=True)
class QuantType:
    name: str                        # the config value, e.g. QuantType: 4bitsym
    bits: float                      # storage bits per weight on the MCU
    levels: Optional[tuple]          # every level u the quantizer produces (None: float weights)
    quantize: Callable               # (w, s) -> (levels u, step); the fake-quantized weight is u * step
    octav_bits: int                  # the bit width OCTAV's noise model assumes when it chooses s
    int_scale: int = 1               # the C kernels multiply by u * int_scale (2 makes the *sym levels odd integers)
    encode: Optional[Callable] = None     # integer weights -> the codes packed into the header
    packing: str = 'bits'            # 'bits': codes MSB-first in uint32 words; 'trits': 10 base-3 digits per uint16
    kernels: dict = field(default_factory=dict)   # weight layout -> C kernel of a fully connected layer
    int32_conv: bool = False         # its levels fit the int32-plane convolution's int8 weights
    clipped: bool = True             # the quantizer reads the clipping scalar s (Binary, Ternary: mean|w| instead)
    original_quantscale: Optional[float] = None   # the original BitNetMCU's s-less (v0.2a) checkpoints: its fixed
                                     # quantscale for this type (None: the configured maxw_quantscale)
    original_s_factor: float = 1.0   # our s = the original's s x this (FP130: 4/3 turns its floor into our rounding)
    multiplier_free: bool = True     # its fully connected kernels never multiply (the CH32V003 has no multiplier)
    description: str = ''

    @property
    def exportable(self):
        return bool(self.kernels)

    @property
    def product_table(self):
        """Whether a layer of 4-bit activations can multiply by look-up: one 4-bit code per weight, 16 x 16 products."""
        return self.exportable and self.bits == 4 and self.packing == 'bits'

    @property
    def window_kernel(self):
        """The input-major kernel on a window of the image (a window stem's first layer), or None."""
        return 'BitNetMCU_fc_window_' + self.name if 'input-major' in self.kernels else None

    @property
    def int_levels(self):
        """The integers the C kernels multiply by."""
        return [round(u * self.int_scale) for u in self.levels]


QUANT_TYPES = {q.name: q for q in [
    QuantType(name='Binary', bits=1, levels=(-1, 1), quantize=_quant_binary, octav_bits=1,
              encode=lambda iw: (iw > 0).astype(np.uint32), kernels=_fc_kernels('Binary'), int32_conv=True,
              clipped=False, description='sign(w - mean(w)) in {-1, +1}'),
    QuantType(name='Ternary', bits=1.6, levels=(-1, 0, 1), quantize=_quant_ternary, octav_bits=2,
              encode=_trit, packing='trits', kernels=_fc_kernels('Ternary', ['output-major']), int32_conv=True,
              clipped=False, description='clip(round(w / mean|w|), -1, 1); 10 trits per 16 bit'),
    QuantType(name='2bitsym', bits=2, levels=(-1.5, -0.5, 0.5, 1.5), quantize=_quant_sym(2), octav_bits=2,
              int_scale=2, encode=_sign_magnitude(2, lambda m: m == 3), kernels=_fc_kernels('2bitsym'),
              int32_conv=True, original_quantscale=0.5, description='{±0.5, ±1.5}, multiplier-free'),
    QuantType(name='4bitsym', bits=4, levels=tuple(k + 0.5 for k in range(-8, 8)), quantize=_quant_sym(8),
              octav_bits=4, int_scale=2, encode=_sign_magnitude(4, lambda m: (m - 1) // 2),
              kernels=_fc_kernels('4bitsym'), int32_conv=True, description='{±0.5 ... ±7.5}, multiplier-free'),
    QuantType(name='5bitsym', bits=5, levels=tuple(k + 0.5 for k in range(-16, 16)), quantize=_quant_sym(16),
              octav_bits=5, int_scale=2, encode=_sign_magnitude(5, lambda m: (m - 1) // 2),
              kernels=_fc_kernels('5bitsym'), int32_conv=True, description='{±0.5 ... ±15.5}, 6 per word, multiplier-free'),
    QuantType(name='4bit', bits=4, levels=tuple(range(-8, 8)), quantize=_quant_twos_complement(8), octav_bits=4,
              encode=_twos_complement(4), kernels=_fc_kernels('4bit'), int32_conv=True,
              description="two's complement -8 .. 7"),
    QuantType(name='8bit', bits=8, levels=tuple(range(-128, 128)), quantize=_quant_twos_complement(128),
              octav_bits=8, encode=_twos_complement(8), kernels=_fc_kernels('8bit'), int32_conv=True,
              multiplier_free=False, description="two's complement -128 .. 127"),
    QuantType(name='FP130', bits=4, levels=tuple(sign * 2 ** e for sign in (-1, 1) for e in range(8)),
              quantize=_quant_fp130, octav_bits=4, encode=_sign_magnitude(4, lambda m: np.log2(m).round()),
              kernels=_fc_kernels('FP130'), original_s_factor=4 / 3, description='sign x 2^e, e in 0..7, shifts only'),
    QuantType(name='NF2', bits=2, levels=tuple(NF2_LEVELS), quantize=_quant_normal_float(NF2_LEVELS),
              octav_bits=2, encode=_nf2_code, kernels=_fc_kernels('NF2'), int32_conv=True,
              description='NormalFloat2 levels +-0.3, +-1 (+-3, +-10) times s, multiplier-free'),
    QuantType(name='NF4', bits=4, levels=tuple(NF4_LEVELS_INT8), quantize=_quant_normal_float(NF4_LEVELS_INT8), octav_bits=4,
              encode=_nf4_index, kernels=_fc_kernels('NF4'), int32_conv=True,
              description='NormalFloat4 levels (rounded to int8) times s'),
    QuantType(name='None', bits=32, levels=None, quantize=_quant_none, octav_bits=8, multiplier_free=False,
              description='float weights, for comparison only (not exportable)'),
]}
EXPORTABLE_TYPES = [q.name for q in QUANT_TYPES.values() if q.exportable]
CONV_TYPES = [q.name for q in QUANT_TYPES.values() if q.int32_conv]


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized value. Backward: the gradient passes through unchanged (STE)."""

    @staticmethod
    def forward(ctx, x, quantized):
        return quantized

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize_weight(w, s, qtype: QuantType):
    with torch.no_grad():
        u, step = qtype.quantize(w, s)
        quantized = u * step
    return _StraightThrough.apply(w, quantized)


def quantize_activations(x):
    """Per-sample symmetric 8-bit quantization (scale 127 / max|x|), straight-through gradient."""
    with torch.no_grad():
        flat = x.flatten(1)
        scale = 127.0 / flat.abs().amax(dim=1).clamp_min(1e-5)
        scale = scale.view(-1, *([1] * (x.dim() - 1)))
        quantized = (x * scale).round().clamp(-128, 127) / scale
    return _StraightThrough.apply(x, quantized)


REQUANTIZERS = ('reciprocal', 'shift')   # 4-bit activations: how the MCU scales a layer's sums to 0 .. 15
ACT4_MAX = 15


def requantize4_scale(peak, requantizer):
    """The factor that maps a layer's activations to 4-bit codes, min(floor(x * factor), 15) (reciprocal) or
    min(floor(x * factor + 1/2), 15) (shift), from their largest value `peak` (per sample, > 0), as the MCU computes
    it from integer sums (intmodel.requantize4): the 8-bit reciprocal s / 2^t, s = floor(15 * 2^t / peak) with t the
    smallest exponent with 15 * 2^t >= peak, plus 7; or 2^-k, k the smallest with floor(peak / 2^k) <= 15."""
    if requantizer == 'reciprocal':
        t = torch.ceil(torch.log2(peak / ACT4_MAX)) + 7
        t = t + (ACT4_MAX * torch.exp2(t - 7) < peak)   # log2's rounding: the exponent must reach peak
        return torch.floor(ACT4_MAX * torch.exp2(t) / peak).clamp(max=255) * torch.exp2(-t)
    k = torch.floor(torch.log2(peak / (ACT4_MAX + 1))) + 1
    k = k + (torch.floor(peak * torch.exp2(-k)) > ACT4_MAX)
    return torch.exp2(-k)


def quantize_activations4(x, requantizer):
    """4-bit activations 0 .. 15 of ReLU outputs x (N, features), straight-through gradient: the MCU's requantization
    of the sums (requantize4_scale), on the float activations."""
    with torch.no_grad():
        peak = x.amax(dim=1, keepdim=True).clamp_min(1e-12)
        scale = requantize4_scale(peak, requantizer)
        codes = (x * scale + (0.5 if requantizer == 'shift' else 0.0)).floor().clamp(0, ACT4_MAX)
        quantized = codes / scale
    return _StraightThrough.apply(x, quantized)


def code_entropy_bits(u):
    """Shannon entropy (bits) of the histogram of quantization levels u."""
    _, counts = torch.unique(u, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(p * p.log2()).sum())


# ------------------------------------------------------------------------------------------------
# 2. Clipping scalar s
# ------------------------------------------------------------------------------------------------

def octav_clip(absw, bits, iterations=30):
    """OCTAV optimal clipping (Sakr et al., 2022) of |w| along the last dim.

    Minimizes the expected quantization noise s^2 * 4^-bits / 3 * P(|w| <= s) plus the clipping noise
    E[(|w| - s)^2; |w| > s], by the paper's fixed-point iteration
        s <- E[|w|; |w| > s] / (4^-bits / 3 * P(|w| <= s) + P(|w| > s)).
    """
    noise = 4.0 ** -bits / 3
    s = absw.mean(dim=-1, keepdim=True).clamp_min(1e-8)
    for _ in range(iterations):
        above = (absw > s).to(absw.dtype)
        below = 1 - above
        s = (absw * above).sum(-1, keepdim=True) / (noise * below.sum(-1, keepdim=True)
                                                    + above.sum(-1, keepdim=True)).clamp_min(1e-8)
        s = s.clamp_min(1e-8)
    return s


def octav_mse(absw, s, bits):
    """The objective octav_clip minimizes (per row of |w|), for tests and plots."""
    noise = 4.0 ** -bits / 3
    clipped = (absw - s).clamp_min(0) ** 2
    return (noise * s ** 2 * (absw <= s) + clipped).mean(-1, keepdim=True)


def clipping_scalar(w, qtype: QuantType, algo, quantscale, per_output):
    """The clipping scalar s: one per tensor, or one per output row with per_output."""
    absw = w.detach().abs().flatten(1) if per_output else w.detach().abs().reshape(1, -1)
    if algo == 'prop':
        s = absw.mean(dim=1, keepdim=True) / quantscale
    else:
        s = octav_clip(absw, qtype.octav_bits)
    s = s.clamp_min(1e-8)
    return s.view(-1, *([1] * (w.dim() - 1))) if per_output else s.view(1, *([1] * (w.dim() - 1)))


# ------------------------------------------------------------------------------------------------
# 3. Layers
# ------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x / rms(x) per sample: scale-only, so the MCU can replace it by a shift (no learned gain)."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6)


def make_norm(norm_type, features):
    if norm_type == 'RMS':
        return RMSNorm()
    if norm_type == 'Lin':
        return nn.Identity()    # no normalization: the per-sample activation quantizer sets the scale
    if norm_type == 'BatchNorm':
        return nn.BatchNorm1d(features, affine=False)
    if norm_type == 'LayerNorm':
        return nn.LayerNorm(features, elementwise_affine=False)
    raise ValueError(f"NormType {norm_type!r} is not one of {NORM_TYPES}")


NORM_TYPES = ['RMS', 'Lin', 'BatchNorm', 'LayerNorm']
EXPORTABLE_NORMS = ['RMS', 'Lin']   # the MCU's requantization scales; it cannot subtract a mean


class QuantMixin:
    """Shared by BitLinear and BitConv2d: the quantization type and the clipping scalar buffer `s`."""

    def init_quant(self, quant_type, wscale, maxw_algo, quantscale):
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"QuantType {quant_type!r} is not one of {list(QUANT_TYPES)}")
        self.qtype = QUANT_TYPES[quant_type]
        self.per_output = wscale == 'PerOutput'
        self.maxw_algo = maxw_algo
        self.quantscale = quantscale
        self.register_buffer('s', torch.ones(self.weight.shape[0] if self.per_output else 1))
        self.update_clipping()

    def _s_view(self):
        return self.s.view(-1, *([1] * (self.weight.dim() - 1)))

    @torch.no_grad()
    def update_clipping(self):
        s = clipping_scalar(self.weight, self.qtype, self.maxw_algo, self.quantscale, self.per_output)
        self.s.copy_(s.flatten())

    def quantized_weight(self):
        return fake_quantize_weight(self.weight, self._s_view(), self.qtype)

    def oscillation_penalty(self):
        """Mean squared distance of the latent weights to their quantized values, in steps, capped at
        half a step (weights clipped far beyond the outer level feel no pull). Pulling weights to their
        level keeps them from flipping between two levels at every step late in training (Nagel et
        al. 2022, dampening). Float weights are their own level (step 1): zero."""
        with torch.no_grad():
            u, step = self.qtype.quantize(self.weight, self._s_view())
        return ((self.weight - u * step) / step).clamp(-0.5, 0.5).pow(2).mean()

    def integer_weight(self):
        """The weights as the integers the C kernel multiplies by; the gradient reaches the latent weights."""
        with torch.no_grad():
            u, step = self.qtype.quantize(self.weight, self._s_view())
            unit = step / self.qtype.int_scale
        return _StraightThrough.apply(self.weight / unit, u * self.qtype.int_scale)

    @torch.no_grad()
    def weight_levels(self):
        """The levels u the exporter packs (integers, or half-integers for the *sym types)."""
        return self.qtype.quantize(self.weight, self._s_view())[0]


class BitLinear(nn.Linear, QuantMixin):
    """Norm -> 8-bit activations -> linear layer with fake-quantized weights. No bias.
    int8_input: the input already is what the MCU holds (int8-activation convolution or window stem features), so
    it is neither normalized nor quantized again. requantizer (a hidden layer's ReLU outputs only): 4-bit
    activations, scaled as the MCU's 'reciprocal' or 'shift' requantization does (None: 8-bit)."""

    def __init__(self, in_features, out_features, QuantType='4bitsym', NormType='RMS',
                 WScale='PerTensor', maxw_algo='octav', quantscale=0.25, int8_input=False, requantizer=None):
        super().__init__(in_features, out_features, bias=False)
        self.int8_input = int8_input
        self.requantizer = requantizer
        self.norm = nn.Identity() if int8_input else make_norm(NormType, in_features)
        self.init_quant(QuantType, WScale, maxw_algo, quantscale)

    def forward(self, x):
        if self.requantizer:
            x = quantize_activations4(self.norm(x), self.requantizer)
        elif not self.int8_input:
            x = quantize_activations(self.norm(x))
        return F.linear(x, self.quantized_weight())


ACT_MAX = 127   # int8 convolution activations are 0 .. ACT_MAX (7 bits, like the fully connected layers' inputs)
ACT_QUANTILE = 0.999   # the sum a layer's shift maps to ACT_MAX: this quantile of its sums in training


def _kept(keep, x):
    """torch.where(keep, x, 0.0) bit for bit (NaN and -0.0 included), by clearing the bits of what is not kept:
    several times faster than torch.where on a CPU."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return (x.view(bits) & keep.to(bits).neg_()).view(x.dtype)


class _Requantize(torch.autograd.Function):
    """ReLU and the MCU's int8 activation of integer sums: clamp((acc + 2^shift/2) >> shift, 0, ACT_MAX). The
    gradient is acc / 2^shift's, passed straight through where that is inside the range and zero outside it:
    autograd's divide and clamp bit for bit (scaling by 2^-shift is exact, as dividing by 2^shift is), in one
    node whose backward clears bits where clamp's calls torch.where."""

    @staticmethod
    def forward(ctx, acc, shift):
        ctx.scale = 2.0 ** -shift
        ctx.save_for_backward(acc.clamp(0, ACT_MAX * 2 ** shift) == acc)   # 0 <= acc <= the top, in one compare
        return ((acc + (2 ** shift // 2)) * ctx.scale).floor_().clamp_(0, ACT_MAX)

    @staticmethod
    def backward(ctx, grad):
        inside, = ctx.saved_tensors
        return _kept(inside, grad * ctx.scale), None


def requantize(acc, shift):
    """_Requantize of sums that hold integers (BitConv2d rounds them first)."""
    return _Requantize.apply(acc, shift)


def top_quantile(flat, q):
    """torch.quantile(flat, q) of a 1-D tensor, bit for bit, from its top elements instead of a full sort (30x
    faster on the 65,536 sums a layer observes per batch)."""
    n = flat.numel()
    rank = torch.tensor(q, dtype=flat.dtype) * (n - 1)   # as torch.quantile computes it, in the input's dtype
    below, above = int(rank.floor()), int(rank.ceil())
    top = flat.topk(n - below).values                    # descending: order statistic `below` comes last
    return torch.lerp(top[-1], top[n - 1 - above], rank - below)


class Int8Output:
    """A layer whose integer sums the MCU requantizes by a fixed shift: clamp((sums + 2^shift/2) >> shift, 0, 127),
    7-bit activations computed exactly as in C. act_shift is chosen from a running quantile of the sums
    (act_peak) whenever the clipping scalar is, and frozen with it. Mixed into BitConv2d and BitWindowLinear."""

    def init_int8_output(self):
        self.register_buffer('act_shift', torch.zeros(()))
        self.register_buffer('act_peak', torch.zeros(()))

    def int8_output(self, acc):
        acc = _StraightThrough.apply(acc, acc.detach().round())   # exact integers, whatever the algorithm
        if self.training:
            self.observe(acc)
        return requantize(acc, int(self.act_shift))

    @torch.no_grad()
    def observe(self, acc):
        flat = acc.detach().flatten()
        peak = top_quantile(flat[::max(1, flat.numel() >> 16)].float(), ACT_QUANTILE).clamp_min(1.0)
        first = bool(self.act_peak == 0)
        self.act_peak.copy_(peak if first else 0.9 * self.act_peak + 0.1 * peak)
        if first:
            self.update_shift()

    @torch.no_grad()
    def update_shift(self):
        """The smallest shift that brings act_peak into 0 .. ACT_MAX."""
        if self.act_peak > 0:
            self.act_shift.fill_(max(0, math.ceil(math.log2(float(self.act_peak) / (ACT_MAX + 0.5)))))


class BitConv2d(nn.Conv2d, QuantMixin, Int8Output):
    """3x3 convolution with fake-quantized weights, no padding, no bias.

    activations 'int32' (the original BitNetMCU's scheme): the MCU keeps 32-bit feature planes, so only the
    image is quantized and the layers after it see full-precision activations.
    activations 'int8': the layer computes exactly what the MCU computes. Its input is integer (the int8 image
    or the previous layer's 0 .. 127), its weights are the integers the C kernel uses, and its output is
    the 7-bit planes of Int8Output, a quarter of the RAM of int32 ones.
    """

    def __init__(self, in_channels, out_channels, groups=1, QuantType='8bit', WScale='PerTensor',
                 maxw_algo='octav', quantscale=0.25, activations='int32'):
        super().__init__(in_channels, out_channels, kernel_size=3, padding=0, groups=groups, bias=False)
        self.int8_activations = activations == 'int8'
        if self.int8_activations:
            self.init_int8_output()
        self.init_quant(QuantType, WScale, maxw_algo, quantscale)

    def forward(self, x):
        if not self.int8_activations:
            return F.conv2d(x, self.quantized_weight(), groups=self.groups)
        return self.int8_output(F.conv2d(x, self.integer_weight(), groups=self.groups))

    @torch.no_grad()
    def update_clipping(self):
        super().update_clipping()
        if self.int8_activations:
            self.update_shift()


class BitWindowLinear(nn.Module, QuantMixin, Int8Output):
    """A window stem layer: one linear layer applied to every window of the image, in the MCU's exact integers.

    The first layer of a stem (window = (size, stride)) reads the int8 image through size x size windows at the
    stride, row-major; a later one reads the previous layer's 7-bit outputs of each window. Each window's sums
    are requantized by the layer's fixed shift (Int8Output): one scale for all windows and images, so a window
    needs no other window's sums in RAM. Weights (out, in) shared by every window, or (windows, out, in), one
    set per window. Output (N, windows, out): flattened, the windows one after the other."""

    def __init__(self, in_features, out_features, windows, shared=True, window=None, QuantType='4bitsym',
                 WScale='PerTensor', maxw_algo='octav', quantscale=0.25):
        super().__init__()
        self.window, self.windows = window, windows
        shape = (out_features, in_features) if shared else (windows, out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape))
        bound = 1 / math.sqrt(in_features)   # nn.Linear's initialization, per window
        nn.init.uniform_(self.weight, -bound, bound)
        self.init_int8_output()
        self.init_quant(QuantType, WScale, maxw_algo, quantscale)

    def forward(self, x):
        if self.window:
            size, stride = self.window
            x = F.unfold(x.view(-1, 1, 16, 16), size, stride=stride).transpose(1, 2)   # (N, windows, size^2)
        else:
            x = x.view(len(x), self.windows, -1)
        w = self.integer_weight()
        acc = x @ w.t() if w.dim() == 2 else torch.einsum('nwi,woi->nwo', x, w)
        return self.int8_output(acc)

    @torch.no_grad()
    def update_clipping(self):
        super().update_clipping()
        self.update_shift()


class _MaxPool2(torch.autograd.Function):
    """2x2 max pooling of planes of even size: max_pool2d's outputs and gradients bit for bit for inputs without
    NaN (the gradient goes to the first maximum of each window in row order, and -0.0 becomes 0.0 as
    max_pool2d's zeros + gradient makes it), in under half its time on a CPU."""

    @staticmethod
    def forward(ctx, x):
        out = torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                            torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        passed = grad + 0.0
        taken = torch.zeros_like(out, dtype=torch.bool)
        grad_x = torch.empty_like(x)
        for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
            first = (x[..., dy::2, dx::2] == out) & ~taken
            taken |= first
            grad_x[..., dy::2, dx::2] = _kept(first, passed)
        return grad_x


class MaxPool2(nn.MaxPool2d):
    """nn.MaxPool2d(2), through _MaxPool2 where the planes are of even size."""

    def __init__(self):
        super().__init__(2)

    def forward(self, x):
        return _MaxPool2.apply(x) if x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0 else super().forward(x)


class InputQuant(nn.Module):
    """The image as the MCU sees it: per-image int8 (127 / max|x|). integer: the int8 values themselves (what
    int8-activation convolutions read); else scaled back to the input's range."""

    def __init__(self, integer=False):
        super().__init__()
        self.integer = integer

    def forward(self, x):
        if self.integer:
            with torch.no_grad():
                scale = 127.0 / x.flatten(1).abs().amax(dim=1).clamp_min(1e-5)
                return (x * scale.view(-1, *([1] * (x.dim() - 1)))).round().clamp(-128, 127)
        return quantize_activations(x)


# ------------------------------------------------------------------------------------------------
# 4. Models. Each is one flat nn.Sequential `layers`, so export can walk it in order.
# ------------------------------------------------------------------------------------------------

def _linear_stack(widths, cfg, first_qtype, int8_input=False):
    """BitLinear layers through `widths`, ReLU between them, none after the classifier. The layers after the first
    read activation_bits (8, or 4 requantized by `requantizer`)."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(BitLinear(n_in, n_out, QuantType=first_qtype if i == 0 else cfg['QuantType'],
                                NormType=cfg['NormType'], WScale=cfg['WScale'],
                                maxw_algo=cfg['maxw_algo'], quantscale=cfg['maxw_quantscale'],
                                int8_input=int8_input and i == 0,
                                requantizer=cfg['requantizer'] if i > 0 and cfg['activation_bits'] == 4 else None))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return layers


def hidden_widths(cfg):
    widths = [cfg['network_width1'], cfg['network_width2']]
    return widths + ([cfg['network_width3']] if cfg['network_width3'] > 0 else [])


# Each model says what config.py needs to know of it: which of the keys only some models read it reads
# (MODEL_KEYS; the others it ignores), why the MCU engine cannot run it (None: it can), and the architecture part
# of its run name.
CNN_KEYS = ('cnn_width', 'conv_QuantType', 'conv_activations')
WINDOW_KEYS = ('window_size', 'window_stride', 'window_stem', 'window_shared')
MODEL_KEYS = CNN_KEYS + WINDOW_KEYS


def _quant_name(cfg):
    return f"{cfg['QuantType']}_{cfg['NormType']}_{cfg['maxw_algo']}_"


class FCMNIST(nn.Module):
    """256 -> width1 -> width2 -> [width3] -> classes, ReLU between, fully connected."""
    model_keys, not_exportable = (), None

    @staticmethod
    def run_label(cfg):
        return 'FC' + 'x'.join(map(str, hidden_widths(cfg))) + '_' + _quant_name(cfg)

    def __init__(self, cfg, num_classes):
        super().__init__()
        widths = [256] + hidden_widths(cfg) + [num_classes]
        self.layers = nn.Sequential(*_linear_stack(widths, cfg, cfg['fc1_QuantType'] or cfg['QuantType']))

    def forward(self, x):
        return self.layers(x.flatten(1))


class CNNMNIST(nn.Module):
    """Sequential depthwise CNN: 16x16 -> conv 14x14 -> dw 12x12 -> pool 6x6 -> dw 4x4 -> pool 2x2 -> FC.
    conv_activations 'int8': every convolution ends in its own ReLU and 7-bit requantization (BitConv2d)."""
    model_keys, not_exportable = CNN_KEYS, None

    @staticmethod
    def run_label(cfg):
        return f"CNN{cfg['cnn_width']}_" + 'x'.join(map(str, hidden_widths(cfg))) + '_' + _quant_name(cfg)

    def __init__(self, cfg, num_classes):
        super().__init__()
        c = cfg['cnn_width']
        int8 = cfg['conv_activations'] == 'int8'
        conv = dict(QuantType=cfg['conv_QuantType'], WScale=cfg['WScale'], maxw_algo=cfg['maxw_algo'],
                    quantscale=cfg['maxw_quantscale'], activations=cfg['conv_activations'])
        relu = [] if int8 else [nn.ReLU()]
        widths = [c * 2 * 2] + hidden_widths(cfg) + [num_classes]
        self.layers = nn.Sequential(
            InputQuant(integer=int8),
            BitConv2d(1, c, **conv), *relu,
            BitConv2d(c, c, groups=c, **conv), *relu, MaxPool2(),
            BitConv2d(c, c, groups=c, **conv), *relu, MaxPool2(),
            nn.Flatten(),
            *_linear_stack(widths, cfg, cfg['fc1_QuantType'] or '2bitsym', int8_input=int8))

    def forward(self, x):
        return self.layers(x.view(-1, 1, 16, 16))


def window_count(cfg):
    """Windows of window_size at window_stride across one side of the 16x16 image."""
    return (16 - cfg['window_size']) // cfg['window_stride'] + 1


class WindowFCMNIST(nn.Module):
    """Windowed FC ("patch" model, the original's 2026 design): every window_size^2 window of the image at
    window_stride (row-major) goes through a stem of 1-3 linear layers (window_stem widths), shared by all
    windows or one per window (window_shared), with the MCU's exact integers and 7-bit outputs (BitWindowLinear);
    the windows' outputs, one window after the other, feed a fully connected head (network_width1..3)."""
    model_keys, not_exportable = WINDOW_KEYS, None

    @staticmethod
    def run_label(cfg):
        n = window_count(cfg)
        return (f"Win{n * n}s{cfg['window_stride']}{'' if cfg['window_shared'] else 'own'}_"
                + 'x'.join(map(str, cfg['window_stem'])) + '_' + 'x'.join(map(str, hidden_widths(cfg))) + '_'
                + _quant_name(cfg))

    def __init__(self, cfg, num_classes):
        super().__init__()
        windows = window_count(cfg) ** 2
        quant = dict(QuantType=cfg['QuantType'], WScale=cfg['WScale'], maxw_algo=cfg['maxw_algo'],
                     quantscale=cfg['maxw_quantscale'])
        widths = [cfg['window_size'] ** 2] + list(cfg['window_stem'])
        stem = [BitWindowLinear(n_in, n_out, windows, cfg['window_shared'],
                                window=(cfg['window_size'], cfg['window_stride']) if i == 0 else None, **quant)
                for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:]))]
        head = [windows * widths[-1]] + hidden_widths(cfg) + [num_classes]
        self.layers = nn.Sequential(InputQuant(integer=True), *stem, nn.Flatten(),
                                    *_linear_stack(head, cfg, cfg['fc1_QuantType'] or cfg['QuantType'],
                                                   int8_input=True))

    def forward(self, x):
        return self.layers(x.view(-1, 1, 16, 16))


class DenseCNN(nn.Module):
    """A float CNN to distill from, not to export: full (not depthwise) convolutions with padding, so it sees far
    more of each digit than the MCU models can, and trains on a CPU in minutes. 16x16 -> 2x conv (cnn_width) ->
    pool 8x8 -> 2x conv (2 cnn_width) -> pool 4x4 -> linear network_width1 -> dropout 0.3 -> classes."""
    model_keys, not_exportable = ('cnn_width',), 'is a float teacher for distillation'

    @staticmethod
    def run_label(cfg):
        return f"Dense{cfg['cnn_width']}_{cfg['network_width1']}_"   # float: no types, no clipping

    def __init__(self, cfg, num_classes):
        super().__init__()
        c, hidden = cfg['cnn_width'], cfg['network_width1']

        def conv(n_in, n_out):
            return [nn.Conv2d(n_in, n_out, 3, padding=1), nn.ReLU()]
        self.layers = nn.Sequential(*conv(1, c), *conv(c, c), nn.MaxPool2d(2), *conv(c, 2 * c), *conv(2 * c, 2 * c),
                                    nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * c * 16, hidden), nn.ReLU(),
                                    nn.Dropout(0.3), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.layers(x.view(-1, 1, 16, 16))


MODELS = {'FCMNIST': FCMNIST, 'CNNMNIST': CNNMNIST, 'WindowFCMNIST': WindowFCMNIST, 'DenseCNN': DenseCNN}


def build_model(cfg, num_classes):
    return MODELS[cfg['model']](cfg, num_classes)


def quant_layers(model):
    """The quantized layers of a model, in order, with readable names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantMixin)]


def describe_quant_types():
    return '\n'.join(f"  {q.name:8s} {q.bits:>4} bit  {q.description}" for q in QUANT_TYPES.values())


if __name__ == '__main__':
    import argparse
    argparse.ArgumentParser(description='List the quantization types (python BitNetMCU.py). The module itself is '
                                        'imported by training.py, exportquant.py and the others.').parse_args()
    print('Quantization types:\n' + describe_quant_types())
    print(f"NF4 int8 levels: {NF4_LEVELS_INT8}")
