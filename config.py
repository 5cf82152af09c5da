"""The config: the one loader and validator that training.py, exportquant.py and test_inference.py share.

A config is a plain dict of the keys in CONFIG_SCHEMA (the original BitNetMCU's names). It is read from a
YAML file, overridden by --set KEY=VALUE, filled with defaults and validated key by key: a typo, a wrong
type or an invalid value is a ConfigError that names the key and the valid choices.
"""
import difflib
import hashlib
import json
import math
import re
from pathlib import Path

import yaml

from BitNetMCU import CONV_TYPES, MODEL_KEYS, REQUANTIZERS, EXPORTABLE_NORMS, EXPORTABLE_TYPES, MODELS, NORM_TYPES, QUANT_TYPES
from dataset import DATASETS
from fileio import PROJECT_DIR, read_bounded


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


def _file_name_part(v):
    """runtag names files: no path separators, no hidden or overlong names."""
    return None if re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}', v) else \
        "must be 1 to 64 letters, digits, '_', '-', '.' or '+', starting with a letter or digit (it names files)"


def _stem_widths(v):
    ok = 1 <= len(v) <= 3 and all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= MAX_WIDTH for w in v)
    return None if ok else f"must be a list of 1 to 3 widths from 1 to {MAX_WIDTH}, e.g. [32, 16]"


def _threads(v):
    ok = v == 'auto' or (isinstance(v, int) and 1 <= v <= 256)
    return None if ok else "must be a whole number from 1 to 256 or 'auto'"


# Settings of where and how fast a run trains, not of what it learns: they never rename a run.
RUN_INDEPENDENT = ('device', 'threads')
MAX_WIDTH = 4096   # far beyond what a 16 KB chip holds; keeps a typo from asking for gigabytes

_NUM = (int, float)
# key: (types, default, check, help). Keys keep the original BitNetMCU names.
CONFIG_SCHEMA = {
    'model': (str, 'WindowFCMNIST', _choice(*MODELS),
              'FCMNIST (fully connected), CNNMNIST (depthwise CNN), WindowFCMNIST (a stem per image window, then '
              'fully connected) or DenseCNN (a float teacher, not exportable)'),
    'dataset': (str, 'MNIST', _choice(*DATASETS), 'MNIST or an EMNIST split (EMNIST_LETTERS, EMNIST_BALANCED, ...)'),
    'QuantType': (str, '4bitsym', _choice(*QUANT_TYPES), 'weight quantization of the linear layers'),
    'fc1_QuantType': ((str, type(None)), None, _optional_choice(*QUANT_TYPES),
                      'first linear layer override (WindowFCMNIST: of the head; null: QuantType, or 2bitsym for '
                      'CNNMNIST)'),
    'conv_QuantType': (str, '8bit', _choice(*QUANT_TYPES), 'CNNMNIST convolution weight quantization'),
    'conv_activations': (str, 'int32', _choice('int32', 'int8'),
                         'CNNMNIST feature planes on the MCU: int32 (as the original) or int8 (0..127 after each '
                         'conv, a quarter of the RAM; the network is trained with exactly that rounding)'),
    'activation_bits': (int, 8, _choice(8, 4), 'activations of the hidden fully connected layers: 8 (0..127) or 4 '
                                               '(0..15: the MCU multiplies by look-up in a product table in flash)'),
    'requantizer': (str, 'reciprocal', _choice(*REQUANTIZERS),
                    'activation_bits 4: how the sums become 0..15: reciprocal (an 8-bit reciprocal of the largest sum, '
                    'one small multiply per activation) or shift (a rounding shift)'),
    'NormType': (str, 'RMS', _choice(*NORM_TYPES), 'normalization before each linear layer'),
    'WScale': (str, 'PerTensor', _choice('PerTensor', 'PerOutput'), 'one clipping scalar per tensor or per row'),
    'maxw_algo': (str, 'octav', _choice('prop', 'octav'), 'how the clipping scalar s is chosen'),
    'maxw_update_until_epoch': (int, 45, _at_least(0), 's is re-estimated before each epoch below this'),
    'maxw_quantscale': (_NUM, 0.25, lambda v: None if v > 0 else 'must be > 0', 'prop: s = mean|w| / quantscale'),
    'num_epochs': (int, 60, _at_least(1), 'training epochs'),
    'batch_size': (int, 128, _at_least(1), 'mini-batch size'),
    'scheduler': (str, 'Cosine', _choice('StepLR', 'Cosine', 'CosineWarmRestarts'), 'learning-rate schedule'),
    'optimizer': (str, 'adam', _choice('adam', 'muon'),
                  'adam, or muon: torch.optim.Muon (orthogonalized momentum) on the hidden layers\' weight matrices, '
                  'Adam on the classifier and the rest'),
    'muon_learning_rate': (_NUM, 0.01, lambda v: None if 0 < v <= 1 else 'must be > 0 and at most 1 (0.01 is usual)',
                           'Muon learning rate (optimizer: muon), on the same schedule as learning_rate'),
    'learning_rate': (_NUM, 0.001, lambda v: None if 0 < v <= 1 else 'must be > 0 and at most 1 (Adam; 0.001 is usual)',
                      'Adam learning rate'),
    'lr_decay': (_NUM, 0.1, lambda v: None if 0 < v <= 1 else 'must be in (0, 1]', 'StepLR factor'),
    'step_size': (int, 10, _at_least(1), 'StepLR period in epochs'),
    'T_0': (int, 10, _at_least(1), 'CosineWarmRestarts first period in epochs'),
    'T_mult': (int, 2, _at_least(1), 'CosineWarmRestarts period multiplier'),
    'halve_lr_epoch': (int, -1, _at_least(-1), 'halve the learning rate from this epoch on (-1: never)'),
    'label_smoothing': (_NUM, 0.0, _between(0, 0.5), 'cross-entropy label smoothing (0: off)'),
    'ema_decay': (_NUM, 0.0, lambda v: None if 0 <= v < 1 else 'must be in [0, 1)',
                  'per-step moving average of the weights, evaluated and saved instead of them (0: off)'),
    'ema_clipping': (str, 'own', _choice('own', 'live'),
                     "the average's clipping scalars: own (re-estimated from the averaged weights) or live (the "
                     "live model's, the grid its weights were trained on)"),
    'oscillation_dampening': (_NUM, 0.0, _at_least(0),
                              'pull of the latent weights to their levels, times (1 - lr / learning_rate) (0: off)'),
    'init_from': (str, '', None, 'checkpoint (same shapes, e.g. a float run) to start from, path relative to the project'),
    'teacher': (str, '', None, 'checkpoint to distill from, path relative to the project (empty: none)'),
    'distill_weight': (_NUM, 0.5, _between(0, 1), "share of the teacher's soft targets in the loss"),
    'distill_temperature': (_NUM, 4.0, lambda v: None if v > 0 else 'must be > 0', 'softmax temperature of distillation'),
    'validation_images': (int, 0, _at_least(0), 'training images held out as a validation set (a fixed split, '
                                                 'the same for every seed), evaluated every epoch (0: none)'),
    'keep_best': (bool, False, None, 'save the epoch of the best validation accuracy instead of the last '
                                     '(needs validation_images)'),
    'augmentation': (bool, True, None, 'add 60k freshly augmented images to every epoch'),
    'rotation1': (_NUM, 5, _between(0, 180), 'first random rotation, +/- degrees'),
    'rotation2': (_NUM, 5, _between(0, 180), 'affine random rotation, +/- degrees'),
    'elastictransformprobability': (_NUM, 0.5, _between(0, 1), 'share of augmented images elastically distorted'),
    'cnn_width': (int, 16, _between(1, MAX_WIDTH), 'CNNMNIST channels (DenseCNN: of its first two convolutions)'),
    'window_size': (int, 8, _choice(4, 8, 12), 'WindowFCMNIST: the windows are window_size x window_size pixels'),
    'window_stride': (int, 4, _choice(2, 4, 8), 'WindowFCMNIST: pixels between windows (8: 4 windows of 8, 4: 9, 2: 25)'),
    'window_stem': (list, [32, 16], _stem_widths, 'WindowFCMNIST: widths of the stem layers every window goes through'),
    'window_shared': (bool, True, None, 'WindowFCMNIST: one stem for all windows (false: one per window)'),
    'network_width1': (int, 64, _between(1, MAX_WIDTH), 'first hidden width'),
    'network_width2': (int, 64, _between(1, MAX_WIDTH), 'second hidden width'),
    'network_width3': (int, 0, _between(0, MAX_WIDTH), 'third hidden width (0: no third layer)'),
    'runtag': (str, 'default', _file_name_part, 'prefix of the run name (letters, digits, _ - . +)'),
    'seed': (int, 0, _between(0, 2 ** 32 - 1), 'random seed (init, shuffling, augmentation)'),
    'device': (str, 'auto', _choice('auto', 'cpu', 'cuda'), 'auto: CUDA when available'),
    'threads': ((int, str), 1, _threads, 'CPU threads of this training: 1 (the default: two trainings side by side '
                                         'each keep their speed) or more, or auto (OMP_NUM_THREADS, else up to 4)'),
    'exportable': (bool, True, None, 'refuse settings the MCU engine cannot run (false: float, BatchNorm, '
                                     '... models, for comparison only)'),
}
DEFAULT_PARAMS = PROJECT_DIR / 'trainingparameters.yaml'


_NUMBER = re.compile(r'[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?')


def _check_value(key, value):
    """The value, checked (a number YAML 1.1 read as text, like 1e-3, is taken as the number)."""
    types, _, check, _ = CONFIG_SCHEMA[key]
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, str) and float in types and _NUMBER.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {key!r}: {value!r} must be a finite number")
    # bool is an int in Python; only accept it where bool is meant, and ints where floats are meant.
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = ' or '.join('null' if t is type(None) else t.__name__ for t in types)
        article = 'an' if type(value).__name__[0] in 'aeiou' else 'a'
        quote = (f" (to give it as text, quote it: --set {key}='{value}', or {key}: '{value}' in YAML)"
                 if str in types and isinstance(value, (int, float)) else '')
        raise ConfigError(f"config key {key!r}: {shown_value(value)} is {article} {type(value).__name__}, "
                          f"expected {names}{quote}")
    problem = check(value) if check else None
    if problem:
        raise ConfigError(f"config key {key!r}: {shown_value(value)} {problem}")
    return value


def shown_value(value, limit=60):
    """repr(value), cut to about `limit` characters: an error line stays one short line, whatever was given."""
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, str):
        return repr(value[:limit - 21])[:-1] + f"...' ({len(value)} characters)"
    return f"{text[:limit - 20]}... ({len(text)} characters)"


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
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else ''
        except yaml.YAMLError as e:
            problem = str(getattr(e, 'problem', None) or 'not valid YAML')
            raise ConfigError(f"--set {shown_value(pair)}: the value is not valid YAML ({problem}); quote text "
                              f"that holds [ ] {{ }} : or #, e.g. --set {key.strip()}=\"'...'\"") from None
    return out


MAX_CONFIG_BYTES = 1 << 20   # a config is a few KB; a device or a huge file is refused, not read without end


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice (plain YAML keeps the last one without a word) and aliases (*name:
    a config needs none, and nested ones expand a few bytes into gigabytes)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1} uses the YAML alias *{event.anchor}; config files "
                              "take no aliases: write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} is given twice (again on line {key_node.start_mark.line + 1}); "
                                  "keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path):
    """A YAML mapping from a file, every way it can be unreadable named."""
    path = Path(path)
    try:
        text = read_bounded(path, MAX_CONFIG_BYTES, 'config file', ConfigError).decode('utf-8')
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; give a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())[:300]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping of key: value, got {type(raw).__name__}")
    return raw


def load_config(path=None, overrides=None):
    """Read a YAML config, apply overrides, fill defaults, validate every key, and refuse what the MCU
    engine could not run (unless exportable: false). Returns a plain dict."""
    cfg = validate_config({**read_yaml(path or DEFAULT_PARAMS), **(overrides or {})})
    if cfg['keep_best'] and not cfg['validation_images']:
        raise ConfigError("config key 'keep_best': true needs a validation set to choose the epoch by; set "
                          "validation_images (e.g. 5000)")
    if 'window_stride' in MODELS[cfg['model']].model_keys and (16 - cfg['window_size']) % cfg['window_stride']:
        fits = [stride for stride in (2, 4, 8) if (16 - cfg['window_size']) % stride == 0]
        raise ConfigError(f"config key 'window_stride': {cfg['window_stride']} does not step {cfg['window_size']}-pixel "
                          f"windows evenly across 16 pixels; with window_size {cfg['window_size']} use one of {fits}")
    if cfg['exportable']:
        problems = export_problems(cfg)
        if problems:
            raise ConfigError('; '.join(problems) + ". The MCU engine cannot run this model: change it, or set "
                              "exportable: false to train it for comparison only")
    return cfg


def export_problems(cfg):
    """What exportquant.py would refuse in a model of this config, one message per key."""
    model = MODELS[cfg['model']]
    if model.not_exportable:
        return [f"model {cfg['model']!r} {model.not_exportable}, which the MCU engine cannot run (exportable: "
                f"{', '.join(name for name, m in MODELS.items() if not m.not_exportable)})"]
    problems = []
    types = ['QuantType', 'fc1_QuantType'] + (['conv_QuantType'] if 'conv_QuantType' in model.model_keys else [])
    for key in types:
        value = cfg[key]
        if value is None:
            continue
        conv_types = EXPORTABLE_TYPES if cfg['conv_activations'] == 'int8' else CONV_TYPES
        if key == 'conv_QuantType' and value not in conv_types:
            problems.append(f"config key 'conv_QuantType': {value!r} has no convolution kernel for "
                            f"conv_activations {cfg['conv_activations']} (exportable: {', '.join(conv_types)})")
        elif key != 'conv_QuantType' and value not in EXPORTABLE_TYPES:
            problems.append(f"config key {key!r}: {value!r} has no integer form (exportable: "
                            f"{', '.join(EXPORTABLE_TYPES)})")
    if 'window_stem' in model.model_keys and QUANT_TYPES[cfg['QuantType']].window_kernel is None \
            and cfg['QuantType'] in EXPORTABLE_TYPES:
        problems.append(f"config key 'QuantType': {cfg['QuantType']!r} has no kernel that reads a window of the image "
                        f"(window stems: {', '.join(q for q in EXPORTABLE_TYPES if QUANT_TYPES[q].window_kernel)})")
    if cfg['activation_bits'] == 4 and not QUANT_TYPES[cfg['QuantType']].product_table:
        problems.append(f"config key 'QuantType': {cfg['QuantType']!r} has no product table for activation_bits 4 "
                        f"(4-bit codes: {', '.join(q for q in QUANT_TYPES if QUANT_TYPES[q].product_table)})")
    if cfg['NormType'] not in EXPORTABLE_NORMS:
        problems.append(f"config key 'NormType': {cfg['NormType']!r} subtracts a mean, which the MCU's requantization "
                        f"cannot do (exportable: {', '.join(EXPORTABLE_NORMS)})")
    if cfg['WScale'] != 'PerTensor':
        problems.append(f"config key 'WScale': {cfg['WScale']!r} gives every row its own scale, which the integer "
                        "engine does not have (exportable: PerTensor)")
    return problems


def ignored_keys(cfg):
    """Keys set away from their default that the chosen model does not use."""
    reads = MODELS[cfg['model']].model_keys
    return [key for key in MODEL_KEYS if key not in reads and cfg[key] != CONFIG_SCHEMA[key][1]]


def validate_config(raw):
    cfg = {}
    for key, value in raw.items():
        if key not in CONFIG_SCHEMA:
            raise _unknown_key(key)
        cfg[key] = _check_value(key, value)
    for key, (_, default, _, _) in CONFIG_SCHEMA.items():
        cfg.setdefault(key, default)
    return cfg


# The defaults run names are hashed against: the schema's, except where a shipped default changed later (the
# value before it changed), so that changing a default renames no earlier run.
NAMING_DEFAULTS = {**{key: spec[1] for key, spec in CONFIG_SCHEMA.items()},
                   'model': 'FCMNIST', 'network_width3': 64}   # the default model before the 9-window one


def config_hash(cfg):
    """Short hash of every setting that shapes the trained weights (not the device). Keys at their
    naming default are left out, so adding a key to the schema renames no earlier run."""
    relevant = {k: v for k, v in sorted(cfg.items()) if k not in RUN_INDEPENDENT and v != NAMING_DEFAULTS[k]}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]


def run_name(cfg):
    """Readable summary of the main settings plus a hash of all of them: different config, different name."""
    label = MODELS[cfg['model']].run_label(cfg)
    return f"{cfg['runtag']}_{cfg['dataset']}_{label}ep{cfg['num_epochs']}_{config_hash(cfg)}"


def describe_config():
    """One line per config key: name, default, meaning (for --help)."""
    return '\n'.join(f"  {key:28s} {str(default):10s} {text}" for key, (_, default, _, text) in CONFIG_SCHEMA.items())
