"""Checkpoints: ours (weights + the config they were trained with + metrics), and the original BitNetMCU's
plain state_dicts (widths from the tensor shapes, everything else from --params/--set).
"""
import re
from pathlib import Path

import torch

from BitNetMCU import EXPORTABLE_TYPES, QUANT_TYPES, build_model, quant_layers
from config import ConfigError, load_config, validate_config
from intmodel import ExportError

CHECKPOINT_FORMAT = 'BitNetMCU-checkpoint-v1'
# What a checkpoint of CHECKPOINT_FORMAT holds, and of which type (a tampered or hand-made one is named)
CHECKPOINT_FIELDS = {'config': dict, 'num_classes': int, 'state_dict': dict}


class UnstatedQuantType(ExportError):
    """An original BitNetMCU checkpoint whose QuantType neither its name nor the command line states."""


def load_checkpoint(path, params=None, overrides=None):
    """-> (model in eval mode, config, metrics or None). For the original project's checkpoints the
    config comes from params/overrides, the layer widths from the tensor shapes."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except IsADirectoryError:
        raise ConfigError(f"checkpoint {path} is a directory; give a .pth file") from None
    except Exception as e:   # torch's own text advises unsafe loading: not repeated here
        raise ExportError(f"checkpoint {path} cannot be read ({type(e).__name__}): it is not a PyTorch checkpoint, "
                          "or it was cut short (copy it again)") from None
    overrides = overrides or {}
    if isinstance(obj, dict) and obj.get('format') == CHECKPOINT_FORMAT:
        for key, kind in CHECKPOINT_FIELDS.items():
            if not isinstance(obj.get(key), kind) or isinstance(obj.get(key), bool):
                found = 'no ' + key if key not in obj else f"{key} of type {type(obj[key]).__name__}"
                raise ExportError(f"{path} is damaged: a {CHECKPOINT_FORMAT} file holds {key} ({kind.__name__}), this "
                                  f"one has {found}; train it again or use an intact copy")
        if params is not None:
            raise ConfigError(f"--params {params}: {path} carries the config it was trained with, --params only "
                              "applies to the original BitNetMCU's checkpoints; leave it out (--set checks a key)")
        try:
            cfg = validate_config(obj['config'])
        except ConfigError as e:
            raise ExportError(f"{path} holds an invalid config ({e}); train it again or use an intact copy") from None
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
    if isinstance(obj, dict) and str(obj.get('format', '')).startswith('BitNetMCU-checkpoint-'):
        raise ExportError(f"{path} is a {obj['format']} file, this BitNetMCU reads {CHECKPOINT_FORMAT}: it was "
                          "written by another version of BitNetMCU; use that version, or update this one")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        model, cfg = _import_original(obj, path, params, overrides)
        return model.eval(), cfg, None
    raise ExportError(f"{path} is neither a BitNetMCU checkpoint nor a state_dict of tensors (the original "
                      "BitNetMCU's format)")


def named_in_file_name(path):
    """What the original BitNetMCU's run names state: the QuantType (a token such as _Binary_) and the
    widths (_width160_160_160_)."""
    stated = {}
    tokens = {t.lower() for t in re.split(r'[_.\-]', Path(path).stem)}
    types = [name for name in QUANT_TYPES if name.lower() in tokens]
    if len(types) > 1:
        raise ExportError(f"{path}: its name states several QuantTypes {types}; pass --set QuantType=...")
    if types:
        stated['QuantType'] = types[0]
    widths = re.search(r'width(\d+)_(\d+)_(\d+)', Path(path).stem)
    if widths:
        stated.update(zip(('network_width1', 'network_width2', 'network_width3'), map(int, widths.groups())))
    return stated


def original_clipping(w, qtype, quantscale, s=None):
    """Our clipping scalar for a layer of the original BitNetMCU: its own `s`, or in the v0.2a layout (no s)
    mean|w| / quantscale with the original's fixed quantscale for some types; FP130 scaled so that our
    nearest-level rule reproduces the original's truncation."""
    if s is None:
        s = w.abs().mean() / (qtype.original_quantscale or quantscale)
    return s * qtype.original_s_factor


def _import_original(state, path, params, overrides):
    """The original BitNetMCU's layouts: fc1/fc2/fc3/fcl, model.N/classifier; with or without clipping `s`."""
    weights = [(k[:-len('.weight')], v) for k, v in state.items() if k.endswith('.weight')]
    convs = [(k, v) for k, v in weights if v.dim() == 4]
    linears = [(k, v) for k, v in weights if v.dim() == 2]
    if not 2 <= len(linears) <= 4 or len(weights) != len(convs) + len(linears):
        raise ExportError(f"{path}: unrecognized layout {[k for k, _ in weights]}; expected fc1, fc2, [fc3], fcl "
                          "(or model.N / classifier) weights")
    stated = named_in_file_name(path)
    if 'QuantType' in overrides and 'QuantType' in stated and overrides['QuantType'] != stated['QuantType']:
        raise ExportError(f"{path.name} names QuantType {stated['QuantType']!r}; --set says {overrides['QuantType']!r}")
    qtype = overrides.get('QuantType') or stated.get('QuantType')
    if qtype is None and params is None:
        raise UnstatedQuantType(f"{path}: an original BitNetMCU checkpoint does not record its QuantType, and neither "
                          f"its name nor --set states it; pass --set QuantType=<{'|'.join(EXPORTABLE_TYPES)}>")
    cfg = load_config(params, {**overrides, **({'QuantType': qtype} if qtype else {})})
    shape_keys = {'model': 'CNNMNIST' if convs else 'FCMNIST',
                  'network_width1': linears[0][1].shape[0], 'network_width2': linears[1][1].shape[0],
                  'network_width3': linears[2][1].shape[0] if len(linears) == 4 else 0}
    if convs:
        shape_keys['cnn_width'] = convs[0][1].shape[0]
    for source, said in (('--set', overrides), ('its file name', stated)):
        clash = {k: v for k, v in shape_keys.items() if k in said and said[k] != v}
        if clash:
            raise ExportError(f"{path} holds " + ', '.join(f"{k}={v!r}" for k, v in clash.items())
                              + f"; {source} says " + ', '.join(f"{k}={said[k]!r}" for k in clash))
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
            s = original_clipping(w, layer.qtype, cfg['maxw_quantscale'], state.get(key + '.s'))
            layer.s.copy_(torch.as_tensor(s).flatten().expand_as(layer.s))
    return model, cfg
