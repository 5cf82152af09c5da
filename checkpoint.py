"""Checkpoints: ours (weights + the config they were trained with + metrics), and the original BitNetMCU's
plain state_dicts (widths from the tensor shapes, everything else from --params/--set).
"""
from pathlib import Path

import torch

from BitNetMCU import build_model, clipping_scalar, quant_layers
from config import ConfigError, load_config, validate_config
from intmodel import ExportError

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
