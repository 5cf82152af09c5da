"""BitNetMCU: quantization-aware training of tiny MNIST models for multiplier-free microcontrollers.

This is the one shared module. Read it top to bottom:
  1. quantization types  - one table entry per weight type (QUANT_TYPES)
  2. clipping scalar     - how each layer's clipping value `s` is chosen (prop / OCTAV)
  3. layers              - BitLinear and BitConv2d: fake-quantized weights and 8-bit activations (STE)
  4. models              - FCMNIST and CNNMNIST, each one flat nn.Sequential called `layers`
  5. config              - the one place where trainingparameters.yaml is read and validated
  6. integer model       - what the MCU runs, and the numpy reference that is bit-exact with C
  7. packing             - integer weights into the words the C kernels read (both layouts)
  8. checkpoints         - ours (with config) and the original BitNetMCU's (plain state_dicts)
"""
import difflib
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

PROJECT_DIR = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------
# 1. Quantization types
#
# Every quantizer maps float weights w and the layer's clipping scalar s to integer (or half-integer)
# levels u and a float step, so that the fake-quantized weight is u * step. The levels u are what the
# exporter packs; the step is absorbed by the normalization that follows every layer.
# ------------------------------------------------------------------------------------------------

# NormalFloat4 (QLoRA, Dettmers et al. 2023), rounded to int8 so the C engine can use the exact
# same levels as training: the trained model and the integer model agree by construction.
NF4_LEVELS_FLOAT = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
NF4_LEVELS_INT8 = [round(v * 127) for v in NF4_LEVELS_FLOAT]


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


_NF4 = torch.tensor(NF4_LEVELS_INT8, dtype=torch.float32)


def _quant_nf4(w, s):
    levels = _NF4.to(w.device)
    idx = ((w / s).clamp(-1, 1).unsqueeze(-1) * 127 - levels).abs().argmin(dim=-1)
    return levels[idx], s / 127


def _quant_none(w, s):
    return w, torch.ones_like(s)


# Export encodings: the integer weight the C kernel multiplies by (levels u times int_scale) -> the
# bit field stored in the header. Packing, decoding and the multiplier-free kernels are in
# BitNetMCU_inference.c, one switch branch per type.
def _sign_magnitude(bits, magnitude):
    return lambda iw: ((iw < 0).astype(np.uint32) << (bits - 1)) | magnitude(np.abs(iw)).astype(np.uint32)


def _twos_complement(bits):
    return lambda iw: (iw & ((1 << bits) - 1)).astype(np.uint32)


def _nf4_index(iw):
    levels = np.array(NF4_LEVELS_INT8)
    return np.abs(iw[..., None] - levels).argmin(-1).astype(np.uint32)


@dataclass(frozen=True)
class QuantType:
    name: str
    bits: float                    # storage bits per weight on the MCU
    quantize: Callable             # (w, s) -> (levels u, step); fake-quantized weight = u * step
    octav_bits: int                # bit width OCTAV's noise model assumes when choosing s
    int_scale: int                 # integer weight in C = u * int_scale (2 for the half-integer *sym levels)
    encode: Optional[Callable]     # integer weights -> stored bit fields (None: Ternary packs trits, None: float)
    conv_shift: Optional[int]      # right shift after a 3x3 conv with these weights (None: not for convs)
    description: str

    @property
    def exportable(self):
        return self.name != 'None'


QUANT_TYPES = {q.name: q for q in [
    QuantType('Binary', 1, _quant_binary, 1, 1, lambda iw: (iw > 0).astype(np.uint32), 0,
              'sign(w - mean(w)) in {-1, +1}'),
    QuantType('Ternary', 1.6, _quant_ternary, 2, 1, None, 0,
              'clip(round(w / mean|w|), -1, 1); 10 trits per 16 bit'),
    QuantType('2bitsym', 2, _quant_sym(2), 2, 2, _sign_magnitude(2, lambda m: m == 3), 2,
              '{±0.5, ±1.5}, multiplier-free'),
    QuantType('4bitsym', 4, _quant_sym(8), 4, 2, _sign_magnitude(4, lambda m: (m - 1) // 2), 4,
              '{±0.5 ... ±7.5}, multiplier-free'),
    QuantType('4bit', 4, _quant_twos_complement(8), 4, 1, _twos_complement(4), 3, "two's complement -8 .. 7"),
    QuantType('8bit', 8, _quant_twos_complement(128), 8, 1, _twos_complement(8), 7, "two's complement -128 .. 127"),
    QuantType('FP130', 4, _quant_fp130, 4, 1, _sign_magnitude(4, lambda m: np.log2(m).round()), None,
              'sign x 2^e, e in 0..7, shifts only'),
    QuantType('NF4', 4, _quant_nf4, 4, 1, _nf4_index, 7, 'NormalFloat4 levels (rounded to int8) times s'),
    QuantType('None', 32, _quant_none, 8, 1, None, None, 'float weights, for comparison only (not exportable)'),
]}


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized value. Backward: the gradient passes through unchanged (STE)."""

    @staticmethod
    def forward(ctx, x, quantized):
        return quantized

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize_weight(w, s, qtype: QuantType):
    if qtype.name == 'None':
        return w
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

    @torch.no_grad()
    def weight_levels(self):
        """The levels u the exporter packs (integers, or half-integers for the *sym types)."""
        return self.qtype.quantize(self.weight, self._s_view())[0]


class BitLinear(nn.Linear, QuantMixin):
    """Norm -> 8-bit activations -> linear layer with fake-quantized weights. No bias."""

    def __init__(self, in_features, out_features, QuantType='4bitsym', NormType='RMS',
                 WScale='PerTensor', maxw_algo='octav', quantscale=0.25):
        super().__init__(in_features, out_features, bias=False)
        self.norm = make_norm(NormType, in_features)
        self.init_quant(QuantType, WScale, maxw_algo, quantscale)

    def forward(self, x):
        x = quantize_activations(self.norm(x))
        return F.linear(x, self.quantized_weight())


class BitConv2d(nn.Conv2d, QuantMixin):
    """3x3 convolution with fake-quantized weights, no padding, no bias.

    The MCU keeps 32-bit activations through the convolutions, so only the first layer's input
    (the int8 image) is quantized; the layers after it see full-precision activations.
    """

    def __init__(self, in_channels, out_channels, groups=1, QuantType='8bit', WScale='PerTensor',
                 maxw_algo='octav', quantscale=0.25):
        super().__init__(in_channels, out_channels, kernel_size=3, padding=0, groups=groups, bias=False)
        self.init_quant(QuantType, WScale, maxw_algo, quantscale)

    def forward(self, x):
        return F.conv2d(x, self.quantized_weight(), groups=self.groups)


class InputQuant(nn.Module):
    """The image as the MCU sees it: per-image int8 (127 / max|x|)."""

    def forward(self, x):
        return quantize_activations(x)


# ------------------------------------------------------------------------------------------------
# 4. Models. Each is one flat nn.Sequential `layers`, so export can walk it in order.
# ------------------------------------------------------------------------------------------------

def _linear_stack(widths, cfg, first_qtype):
    """BitLinear layers through `widths`, ReLU between them, none after the classifier."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(BitLinear(n_in, n_out, QuantType=first_qtype if i == 0 else cfg['QuantType'],
                                NormType=cfg['NormType'], WScale=cfg['WScale'],
                                maxw_algo=cfg['maxw_algo'], quantscale=cfg['maxw_quantscale']))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return layers


def hidden_widths(cfg):
    widths = [cfg['network_width1'], cfg['network_width2']]
    return widths + ([cfg['network_width3']] if cfg['network_width3'] > 0 else [])


class FCMNIST(nn.Module):
    """256 -> width1 -> width2 -> [width3] -> classes, ReLU between, fully connected."""

    def __init__(self, cfg, num_classes):
        super().__init__()
        widths = [256] + hidden_widths(cfg) + [num_classes]
        self.layers = nn.Sequential(*_linear_stack(widths, cfg, cfg['fc1_QuantType'] or cfg['QuantType']))

    def forward(self, x):
        return self.layers(x.flatten(1))


class CNNMNIST(nn.Module):
    """Sequential depthwise CNN: 16x16 -> conv 14x14 -> dw 12x12 -> pool 6x6 -> dw 4x4 -> pool 2x2 -> FC."""

    def __init__(self, cfg, num_classes):
        super().__init__()
        c = cfg['cnn_width']
        conv = dict(QuantType=cfg['conv_QuantType'], WScale=cfg['WScale'],
                    maxw_algo=cfg['maxw_algo'], quantscale=cfg['maxw_quantscale'])
        widths = [c * 2 * 2] + hidden_widths(cfg) + [num_classes]
        self.layers = nn.Sequential(
            InputQuant(),
            BitConv2d(1, c, **conv), nn.ReLU(),
            BitConv2d(c, c, groups=c, **conv), nn.ReLU(), nn.MaxPool2d(2),
            BitConv2d(c, c, groups=c, **conv), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            *_linear_stack(widths, cfg, cfg['fc1_QuantType'] or '2bitsym'))

    def forward(self, x):
        return self.layers(x.view(-1, 1, 16, 16))


MODELS = {'FCMNIST': FCMNIST, 'CNNMNIST': CNNMNIST}


def build_model(cfg, num_classes):
    return MODELS[cfg['model']](cfg, num_classes)


def quant_layers(model):
    """The quantized layers of a model, in order, with readable names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantMixin)]


# ------------------------------------------------------------------------------------------------
# 5. Config: the one loader and validator all scripts share.
# ------------------------------------------------------------------------------------------------

class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message says which and what is valid."""


def _choice(*options):
    return lambda v: None if v in options else f"must be one of {list(options)}"


def _at_least(lo):
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _between(lo, hi):
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}"


def _optional_choice(*options):
    return lambda v: None if v is None or v in options else f"must be null or one of {list(options)}"


def _dataset_name(v):
    from dataset import DATASETS  # late import: dataset.py imports this module
    return _choice(*DATASETS)(v)


_NUM = (int, float)
# key: (types, default, check, help). Keys keep the original BitNetMCU names.
CONFIG_SCHEMA = {
    'model': (str, 'FCMNIST', _choice(*MODELS), 'FCMNIST (fully connected) or CNNMNIST (depthwise CNN)'),
    'dataset': (str, 'MNIST', _dataset_name, 'MNIST or an EMNIST split (EMNIST_LETTERS, EMNIST_BALANCED, ...)'),
    'QuantType': (str, '4bitsym', _choice(*QUANT_TYPES), 'weight quantization of the linear layers'),
    'fc1_QuantType': ((str, type(None)), None, _optional_choice(*QUANT_TYPES),
                      'first linear layer override (null: QuantType for FCMNIST, 2bitsym for CNNMNIST)'),
    'conv_QuantType': (str, '8bit', _choice(*QUANT_TYPES), 'CNNMNIST convolution weight quantization'),
    'NormType': (str, 'RMS', _choice(*NORM_TYPES), 'normalization before each linear layer'),
    'WScale': (str, 'PerTensor', _choice('PerTensor', 'PerOutput'), 'one clipping scalar per tensor or per row'),
    'maxw_algo': (str, 'octav', _choice('prop', 'octav'), 'how the clipping scalar s is chosen'),
    'maxw_update_until_epoch': (int, 45, _at_least(0), 's is re-estimated before each epoch below this'),
    'maxw_quantscale': (_NUM, 0.25, lambda v: None if v > 0 else 'must be > 0', 'prop: s = mean|w| / quantscale'),
    'num_epochs': (int, 60, _at_least(1), 'training epochs'),
    'batch_size': (int, 128, _at_least(1), 'mini-batch size'),
    'scheduler': (str, 'Cosine', _choice('StepLR', 'Cosine', 'CosineWarmRestarts'), 'learning-rate schedule'),
    'learning_rate': (_NUM, 0.001, lambda v: None if v > 0 else 'must be > 0', 'Adam learning rate'),
    'lr_decay': (_NUM, 0.1, lambda v: None if 0 < v <= 1 else 'must be in (0, 1]', 'StepLR factor'),
    'step_size': (int, 10, _at_least(1), 'StepLR period in epochs'),
    'T_0': (int, 10, _at_least(1), 'CosineWarmRestarts first period in epochs'),
    'T_mult': (int, 2, _at_least(1), 'CosineWarmRestarts period multiplier'),
    'halve_lr_epoch': (int, -1, _at_least(-1), 'halve the learning rate from this epoch on (-1: never)'),
    'label_smoothing': (_NUM, 0.0, _between(0, 0.5), 'cross-entropy label smoothing (0: off)'),
    'ema_decay': (_NUM, 0.0, lambda v: None if 0 <= v < 1 else 'must be in [0, 1)',
                  'per-step moving average of the weights, evaluated and saved instead of them (0: off)'),
    'oscillation_dampening': (_NUM, 0.0, _at_least(0),
                              'pull of the latent weights to their levels, times (1 - lr / learning_rate) (0: off)'),
    'init_from': (str, '', None, 'checkpoint (same shapes, e.g. a float run) to start from, path relative to the project'),
    'teacher': (str, '', None, 'checkpoint to distill from, path relative to the project (empty: none)'),
    'distill_weight': (_NUM, 0.5, _between(0, 1), "share of the teacher's soft targets in the loss"),
    'distill_temperature': (_NUM, 4.0, lambda v: None if v > 0 else 'must be > 0', 'softmax temperature of distillation'),
    'augmentation': (bool, True, None, 'add 60k freshly augmented images to every epoch'),
    'rotation1': (_NUM, 5, _between(0, 180), 'first random rotation, +/- degrees'),
    'rotation2': (_NUM, 5, _between(0, 180), 'affine random rotation, +/- degrees'),
    'elastictransformprobability': (_NUM, 0.5, _between(0, 1), 'share of augmented images elastically distorted'),
    'cnn_width': (int, 16, _at_least(1), 'CNNMNIST channels'),
    'network_width1': (int, 64, _at_least(1), 'first hidden width'),
    'network_width2': (int, 64, _at_least(1), 'second hidden width'),
    'network_width3': (int, 64, _at_least(0), 'third hidden width (0: no third layer)'),
    'runtag': (str, 'default', None, 'free text prefix of the run name'),
    'seed': (int, 0, _at_least(0), 'random seed (init, shuffling, augmentation)'),
    'device': (str, 'auto', _choice('auto', 'cpu', 'cuda'), 'auto: CUDA when available'),
}
DEFAULT_PARAMS = PROJECT_DIR / 'trainingparameters.yaml'


def _check_value(key, value):
    types, _, check, _ = CONFIG_SCHEMA[key]
    types = types if isinstance(types, tuple) else (types,)
    # bool is an int in Python; only accept it where bool is meant, and ints where floats are meant.
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = ' or '.join('null' if t is type(None) else t.__name__ for t in types)
        raise ConfigError(f"config key {key!r}: {value!r} is a {type(value).__name__}, expected {names}")
    problem = check(value) if check else None
    if problem:
        raise ConfigError(f"config key {key!r}: {value!r} {problem}")


def _unknown_key(key):
    close = difflib.get_close_matches(key, CONFIG_SCHEMA, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ''
    return ConfigError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(CONFIG_SCHEMA)}")


def parse_overrides(pairs):
    """['KEY=VALUE', ...] -> dict, VALUE parsed as YAML (so 8 is an int, true a bool, null None)."""
    out = {}
    for pair in pairs or []:
        if '=' not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set num_epochs=10")
        key, text = pair.split('=', 1)
        out[key.strip()] = yaml.safe_load(text) if text.strip() else ''
    return out


def load_config(path=None, overrides=None):
    """Read a YAML config, apply overrides, fill defaults, validate every key. Returns a plain dict."""
    path = Path(path) if path else DEFAULT_PARAMS
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping of key: value, got {type(raw).__name__}")
    return validate_config({**raw, **(overrides or {})})


def validate_config(raw):
    cfg = {}
    for key, value in raw.items():
        if key not in CONFIG_SCHEMA:
            raise _unknown_key(key)
        _check_value(key, value)
        cfg[key] = value
    for key, (_, default, _, _) in CONFIG_SCHEMA.items():
        cfg.setdefault(key, default)
    return cfg


def config_hash(cfg):
    """Short hash of every setting that shapes the trained weights (not the device). Keys at their
    default are left out, so adding a key to the schema renames no earlier run."""
    relevant = {k: v for k, v in sorted(cfg.items()) if k != 'device' and v != CONFIG_SCHEMA[k][1]}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]


def run_name(cfg):
    """Readable summary of the main settings plus a hash of all of them: different config, different name."""
    if cfg['model'] == 'CNNMNIST':
        arch = f"CNN{cfg['cnn_width']}_" + 'x'.join(map(str, hidden_widths(cfg)))
    else:
        arch = 'FC' + 'x'.join(map(str, hidden_widths(cfg)))
    return (f"{cfg['runtag']}_{cfg['dataset']}_{arch}_{cfg['QuantType']}_{cfg['NormType']}_"
            f"{cfg['maxw_algo']}_ep{cfg['num_epochs']}_{config_hash(cfg)}")


def atomic_write(path, data):
    """Write bytes or text to a temporary file beside `path`, then rename it into place: a crash or an
    error never leaves half a file, and never clobbers the previous one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    """torch.save, atomically (see atomic_write)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------------
# 6. The integer model: what the MCU runs, and a numpy reference that computes exactly what C does
# ------------------------------------------------------------------------------------------------

class ExportError(ValueError):
    """The model cannot be turned into an integer model; the message says why and what would work."""


@dataclass
class IntOp:
    """One step of the integer model, in order. kind:
    'fc'        int8 input -> int32 sums, weights (out, in) as the kernel multiplies them
    'conv'      3x3 conv per channel + ReLU + right shift `shift`, weights (channels, 9), int32 in/out
    'maxpool'   2x2 max pooling per channel
    'shiftnorm' ShiftNorm + ReLU: int32 -> int8 0..127 (flattens conv channels, channel-major)"""
    kind: str
    qtype: Optional[QuantType] = None
    weights: Optional[np.ndarray] = None
    shift: int = 0
    name: str = ''


@dataclass
class IntModel:
    ops: list
    num_classes: int
    input_size: int = 16
    layout: str = 'input-major'    # how the header packs fully connected weights (see pack_layer)

    def weight_ops(self):
        return [op for op in self.ops if op.weights is not None]


def integer_weights(layer, label):
    """The integers the C kernel multiplies by."""
    qtype = layer.qtype
    if not qtype.exportable:
        raise ExportError(f"{label}: QuantType 'None' (float) has no integer form; "
                          f"train with one of {[q for q in QUANT_TYPES if q != 'None']}")
    levels = layer.weight_levels().cpu().double().numpy() * qtype.int_scale
    iw = np.rint(levels).astype(np.int64)
    if not np.array_equal(iw, levels):
        raise ExportError(f"{label}: {qtype.name} levels are not integers after scaling")
    return iw


def to_int_model(model):
    """Walk model.layers once and build the integer model both the header writer and the reference use."""
    ops = []
    for index, module in model.layers.named_children():
        label = f'layers.{index}'
        if isinstance(module, BitConv2d):
            if module.per_output:
                raise ExportError(f"{label}: WScale PerOutput gives every channel its own scale, which the "
                                  "integer engine does not have; train with WScale PerTensor to export")
            if module.qtype.conv_shift is None:
                raise ExportError(f"{label}: {module.qtype.name} weights do not fit the int8 conv kernel; "
                                  f"use conv_QuantType 8bit, 4bit, 4bitsym, 2bitsym, Ternary, Binary or NF4")
            ops.append(IntOp('conv', module.qtype, integer_weights(module, label).reshape(module.out_channels, 9),
                             module.qtype.conv_shift, label))
        elif isinstance(module, nn.MaxPool2d):
            ops.append(IntOp('maxpool', name=label))
        elif isinstance(module, BitLinear):
            if module.per_output:
                raise ExportError(f"{label}: WScale PerOutput gives every row its own scale, which the integer "
                                  "engine does not have; train with WScale PerTensor to export")
            if not isinstance(module.norm, (RMSNorm, nn.Identity)):
                raise ExportError(f"{label}: NormType {type(module.norm).__name__} subtracts a mean, which "
                                  "the MCU's ShiftNorm cannot do; train with NormType RMS or Lin")
            if ops:   # the first layer's input is the int8 image itself
                ops.append(IntOp('shiftnorm', name=f'{label} input'))
            ops.append(IntOp('fc', module.qtype, integer_weights(module, label), name=label))
        elif not isinstance(module, (nn.ReLU, nn.Flatten, InputQuant)):
            raise ExportError(f"{label}: {type(module).__name__} has no integer kernel")
    return IntModel(ops, num_classes=ops[-1].weights.shape[0])


def encode_input(images):
    """Float images (N, 16, 16) or (N, 256) -> int8 as the MCU sees them: round(x * 127 / max|x|) per image.
    Rounds half to even, like torch.round in training."""
    x = images.reshape(len(images), -1).to(torch.float32)
    scale = 127.0 / x.abs().amax(dim=1, keepdim=True).clamp_min(1e-5)
    return (x * scale).round().clamp(-128, 127).to(torch.int8).numpy()


def shiftnorm_relu(sums):
    """ShiftNorm + ReLU per row, exactly as BitNetMCU_shiftnorm_relu() in C."""
    peak = sums.max(axis=1, keepdims=True)
    shift = np.zeros_like(peak)
    while ((peak >> shift) > 127).any():
        shift += (peak >> shift) > 127
    half = (1 << shift) >> 1
    return np.where(sums > 0, np.minimum((sums + half) >> shift, 127), 0)


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


def maxpool2(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


INT32_MAX = 2 ** 31 - 1


def reference_logits(int_model, images_int8):
    """The integer reference engine: int8 images (N, 256) -> logits (N, classes), batch-wise, bit-exact with
    the C engine (int64 arithmetic here, checked to stay in the int32 range C computes in)."""
    x = np.asarray(images_int8, dtype=np.int64)
    size = int_model.input_size
    if any(op.kind == 'conv' for op in int_model.ops):
        x = x.reshape(len(x), 1, size, size)
    for op in int_model.ops:
        if op.kind == 'fc':
            x = fc(x, op.weights)
        elif op.kind == 'shiftnorm':
            x = shiftnorm_relu(x.reshape(len(x), -1))
        elif op.kind == 'conv':
            acc, x = conv3x3_relu(x, op.weights, op.shift)
            _check_int32(acc, op)
        elif op.kind == 'maxpool':
            x = maxpool2(x)
        _check_int32(x, op)
    return x


def _check_int32(x, op):
    if x.size and np.abs(x).max() > INT32_MAX:
        raise ExportError(f"{op.name or op.kind}: sums exceed 32 bits; the C engine would overflow")


# ------------------------------------------------------------------------------------------------
# 7. Packing integer weights into the words the C kernels read
# ------------------------------------------------------------------------------------------------

def pack_rows(qtype, iw):
    """Integer weights (rows, n_in) -> packed array: uint32 words MSB-first, first input in the top bits,
    each row starting a new word (zero bits pad the last one; the kernel stops at n_in). Ternary: uint16
    groups of 10 trits, each stored as ceil(v * 65536 / 3^10) so that x3 yields the next trit in bits 16-17."""
    iw = np.asarray(iw, dtype=np.int64)
    rows, n_in = iw.shape
    if qtype.name == 'Ternary':
        trits = np.select([iw == 1, iw == -1], [0, 1], 2)
        trits = np.pad(trits, ((0, 0), (0, -n_in % 10)), constant_values=2)
        value = trits.reshape(rows, -1, 10) @ (3 ** np.arange(9, -1, -1))
        return ((value * 65536 + 59048) // 59049).astype(np.uint16)
    bits = int(qtype.bits)
    per_word = 32 // bits
    codes = qtype.encode(iw).astype(np.uint64)
    codes = np.pad(codes, ((0, 0), (0, -n_in % per_word))).reshape(rows, -1, per_word)
    shifts = (32 - bits * (np.arange(per_word) + 1)).astype(np.uint64)
    return (codes << shifts).sum(axis=-1).astype(np.uint32)


LAYOUTS = ('input-major', 'output-major')


def pack_layer(qtype, iw, layout='input-major'):
    """(packed weights, C kernel name, outputs the kernel writes) of one fully connected layer.
    input-major (fast, the default): for each input the codes of all outputs; the kernel writes n_out
    rounded up to a whole word of codes. output-major: the original BitNetMCU layout. Ternary has only
    its row layout."""
    if layout not in LAYOUTS:
        raise ExportError(f"weight layout {layout!r} is not one of {list(LAYOUTS)}")
    n_out = iw.shape[0]
    if qtype.name == 'Ternary' or layout == 'output-major':
        return pack_rows(qtype, iw), f'BitNetMCU_fc_rows_{qtype.name}', n_out
    per_word = 32 // int(qtype.bits)
    return pack_rows(qtype, np.asarray(iw).T), f'BitNetMCU_fc_{qtype.name}', -(-n_out // per_word) * per_word


# ------------------------------------------------------------------------------------------------
# 8. Checkpoints: ours carry their config; the original BitNetMCU's are plain state_dicts
# ------------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = 'BitNetMCU-checkpoint-v1'


def load_checkpoint(path, params=None, overrides=None):
    """-> (model in eval mode, config, metrics or None). For the original project's checkpoints the
    config comes from params/overrides, the layer widths from the tensor shapes."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ExportError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                          "is it a PyTorch file, completely written?") from None
    overrides = overrides or {}
    if isinstance(obj, dict) and obj.get('format') == CHECKPOINT_FORMAT:
        cfg = validate_config(obj['config'])
        validate_config({**cfg, **overrides})   # an invalid --set value is named as such first
        clash = {k: (v, cfg.get(k)) for k, v in overrides.items() if cfg.get(k) != v}
        if clash:
            raise ExportError(f"{path} was trained with " + ', '.join(f"{k}={old!r}" for k, (_, old) in clash.items())
                              + "; it cannot be exported with " + ', '.join(f"{k}={new!r}" for k, (new, _) in clash.items()))
        model = build_model(cfg, obj['num_classes'])
        try:
            model.load_state_dict(obj['state_dict'])
        except RuntimeError as e:
            raise ExportError(f"{path}: weights do not match its config: {str(e)[:300]}") from None
        return model.eval(), cfg, obj.get('metrics')
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        model, cfg = _import_original(obj, path, params, overrides)
        return model.eval(), cfg, None
    raise ExportError(f"{path} is neither a BitNetMCU checkpoint nor a state_dict of tensors")


def _import_original(state, path, params, overrides):
    """The original BitNetMCU's layouts: fc1/fc2/fc3/fcl, model.N/classifier; with or without clipping `s`."""
    weights = [(k[:-len('.weight')], v) for k, v in state.items() if k.endswith('.weight')]
    convs = [(k, v) for k, v in weights if v.dim() == 4]
    linears = [(k, v) for k, v in weights if v.dim() == 2]
    if not 2 <= len(linears) <= 4 or len(weights) != len(convs) + len(linears):
        raise ExportError(f"{path}: unrecognized layout {[k for k, _ in weights]}; expected fc1, fc2, [fc3], fcl "
                          "(or model.N / classifier) weights")
    cfg = load_config(params, overrides)
    shape_keys = {'model': 'CNNMNIST' if convs else 'FCMNIST',
                  'network_width1': linears[0][1].shape[0], 'network_width2': linears[1][1].shape[0],
                  'network_width3': linears[2][1].shape[0] if len(linears) == 4 else 0}
    if convs:
        shape_keys['cnn_width'] = convs[0][1].shape[0]
    clash = {k: v for k, v in shape_keys.items() if k in overrides and overrides[k] != v}
    if clash:
        raise ExportError(f"{path} holds " + ', '.join(f"{k}={v!r}" for k, v in clash.items())
                          + "; --set says otherwise")
    cfg.update(shape_keys)
    model = build_model(cfg, linears[-1][1].shape[0])
    layers = quant_layers(model)
    if len(layers) != len(weights):
        raise ExportError(f"{path}: {len(weights)} weight tensors, the {cfg['model']} config has {len(layers)} layers")
    with torch.no_grad():
        for (name, layer), (key, w) in zip(layers, convs + linears):
            if layer.weight.shape != w.shape:
                raise ExportError(f"{path}: {key}.weight has shape {tuple(w.shape)}, {name} needs "
                                  f"{tuple(layer.weight.shape)}")
            layer.weight.copy_(w)
            s = state.get(key + '.s')
            if s is None:   # v0.2 layout: s = mean|w| / quantscale
                s = clipping_scalar(w, layer.qtype, 'prop', cfg['maxw_quantscale'], layer.per_output)
            layer.s.copy_(s.flatten().expand_as(layer.s))
    return model, cfg


def describe_config():
    """One line per config key: name, default, meaning (for --help)."""
    return '\n'.join(f"  {key:28s} {str(default):10s} {text}" for key, (_, default, _, text) in CONFIG_SCHEMA.items())


def describe_quant_types():
    return '\n'.join(f"  {q.name:8s} {q.bits:>4} bit  {q.description}" for q in QUANT_TYPES.values())


if __name__ == '__main__':
    print('Quantization types:\n' + describe_quant_types())
    print(f"NF4 int8 levels: {NF4_LEVELS_INT8}")
