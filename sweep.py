"""Hardware-aware sweeps on Optuna: the most accurate model that fits a chip, on one machine or many.

    python sweep.py sweeps/smoke.yaml                        # embedded storage: sweeps/<study>/study.db
    python sweep.py sweeps/fc_v003.yaml --workers 2          # two worker processes on this machine
    python sweep.py sweeps/fc_v003.yaml --storage postgresql://user:pw@host/db --workers 4   # on every machine
    python sweep.py sweeps/fc_v003.yaml --report             # the table, plots and best configs only

A trial trains base config + `set` + the keys it samples from `space`, exports the integer model and scores
it on the validation images with the Python reference (bit-exact with the C engine). Weight bytes and
activation RAM come from the export; flash, RAM with stack, and instructions per inference from the
emulated firmware when the budget or an objective names them. A trial over budget is recorded as
infeasible (an Optuna constraint), before any training when its size already says so. With one objective,
trials whose per-epoch validation accuracy falls behind are pruned.

Running the same command again continues the study; a worker killed mid-trial stops beating its heartbeat,
and the next worker to start a trial marks it failed and retries its parameters (the retry resumes the
killed trial's training from its last epoch). Everything a sweep writes goes to sweeps/<study>/: the
embedded storage, the trials' runs and models, results.csv, pareto.png and best/*.yaml (training configs
that `training.py --params` takes as they are).
"""
import argparse
import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from config import CONFIG_SCHEMA, RUN_INDEPENDENT, ConfigError, _check_value, load_config, read_yaml, run_name
from dataset import DataError, load_dataset
from fileio import PROJECT_DIR, OutputError, atomic_write
from chips import CHIPS
from intmodel import ExportError, encode_input, pack_model, reference_logits, to_int_model
from modelheader import activation_ram

SWEEPS_DIR = PROJECT_DIR / 'sweeps'
# budget key: what it limits, and whether only the emulated firmware can measure it
BUDGETS = {
    'weight_bytes': ('flash bytes of the weight arrays (export summary)', False),
    'ram_bytes': ("activation buffers in RAM, bytes (export summary)", False),
    'flash_bytes': ('flash bytes of the firmware image: engine, model and 3 test images', True),
    'instructions': ('mean instructions per inference on the emulated chip', True),
}
OBJECTIVES = ('accuracy',) + tuple(BUDGETS)   # accuracy is maximized, a second objective minimized
SWEEP_KEYS = {   # key: (default, meaning)
    'study': (None, 'study name (default: the file name); names sweeps/<study>/'),
    'base': ('trainingparameters.yaml', 'training config every trial starts from (relative to the project)'),
    'set': ({}, 'config keys fixed for every trial'),
    'space': (None, 'config keys to search: {choices: [...]}, {int: [lo, hi], step, log} or {float: [lo, hi], log}'),
    'chip': ('CH32V003', f"target chip: {' or '.join(CHIPS)} (the CH32V003 has no multiplier)"),
    'budget': ({}, 'limits, each optional: ' + ', '.join(BUDGETS)),
    'objectives': (['accuracy'], 'accuracy (validation, integer model), optionally a second one to minimize: '
                                 + ', '.join(BUDGETS) + ' (a Pareto front)'),
    'trials': (None, 'trials to finish (done, pruned or infeasible; failed ones are retried)'),
    'epochs': (None, 'training epochs per trial (num_epochs)'),
    'train_images': (0, 'train on the first N training images only (0: all), for quick sweeps'),
    'pruning': ({'warmup_epochs': 1, 'startup_trials': 4, 'percentile': 25},
                'prune a trial whose validation accuracy after an epoch is in the bottom `percentile` of the '
                'earlier trials at that epoch (single objective), or false'),
    'firmware_images': (1000, 'validation images the emulated firmware runs when it is measured'),
    'heartbeat_seconds': (20, 'a trial whose worker is silent for twice this is failed and retried'),
    'keep': (3, 'single objective: the best N feasible trials are written as training configs'),
    'seed': (0, 'sampler seed'),
}


class SweepError(ValueError):
    """A sweep file or command line that cannot run; the message names the key and the valid values."""


def _optuna():
    try:
        import optuna
    except ImportError:
        raise SweepError("sweep.py needs Optuna: pip install 'optuna>=5.0' (make setup installs it)") from None
    import warnings
    # ERROR: a failed or interrupted trial is reported by this script in one line, not by Optuna's traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings('ignore', category=optuna.exceptions.ExperimentalWarning)
    return optuna


# ------------------------------------------------------------------------------------------------
# The sweep file
# ------------------------------------------------------------------------------------------------

def _whole(value, key, least=0):
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise SweepError(f"sweep key {key!r}: {value!r} must be a whole number >= {least}")
    return value


NOT_SAMPLED = {   # config keys a trial cannot sample, and why
    'dataset': "is loaded once for the whole sweep: set it in 'set' (or the base config), or run one sweep per dataset",
    'device': "says where a trial trains, not what: set it in 'set'",
    'threads': "says how fast a trial trains, not what: set it in 'set'",
}


def _check_range_options(key, kind, spec):
    """What Optuna would refuse in an int or float range only after the first trial started."""
    low, high = spec[kind]
    log, step = spec.get('log', False), spec.get('step')
    if not isinstance(log, bool):
        raise SweepError(f"sweep key 'space.{key}.log': {log!r} must be true or false")
    if log and low <= 0:
        raise SweepError(f"sweep key 'space.{key}': a log range needs low > 0, got {low!r}")
    if step is not None:
        if log:
            raise SweepError(f"sweep key 'space.{key}': step and log cannot both be given (Optuna samples a log range "
                             "without steps); drop one")
        whole = isinstance(step, int) and not isinstance(step, bool)
        if not (whole or (kind == 'float' and isinstance(step, float))) or step <= 0:
            raise SweepError(f"sweep key 'space.{key}.step': {step!r} must be a {'whole ' if kind == 'int' else ''}"
                             "number > 0")
        if step > high - low:
            raise SweepError(f"sweep key 'space.{key}.step': {step!r} is wider than the range [{low}, {high}]")


def _check_space(space):
    if not isinstance(space, dict) or not space:
        raise SweepError("sweep key 'space': give at least one config key to search, e.g. "
                         "space: {network_width1: {int: [32, 128], step: 16}}")
    for key, spec in space.items():
        if key not in CONFIG_SCHEMA:
            raise SweepError(f"sweep key 'space': {key!r} is not a config key (valid: {', '.join(CONFIG_SCHEMA)})")
        if key in NOT_SAMPLED:
            raise SweepError(f"sweep key 'space': {key!r} {NOT_SAMPLED[key]}")
        kinds = [kind for kind in ('choices', 'int', 'float') if isinstance(spec, dict) and kind in spec]
        if len(kinds) != 1:
            raise SweepError(f"sweep key 'space.{key}': {spec!r} must be a mapping with exactly one of choices: "
                             "[...], int: [lo, hi] or float: [lo, hi]")
        kind = kinds[0]
        extra = set(spec) - {kind, 'step', 'log'} if kind != 'choices' else set(spec) - {'choices'}
        if extra:
            raise SweepError(f"sweep key 'space.{key}': unknown {', '.join(sorted(map(str, extra)))} "
                             f"({kind} takes {'nothing else' if kind == 'choices' else 'step and log'})")
        values = spec[kind]
        try:
            if kind == 'choices':
                if not isinstance(values, list) or not values:
                    raise SweepError(f"sweep key 'space.{key}.choices': {values!r} must be a non-empty list")
                for value in values:
                    _check_value(key, value)
            else:
                if not (isinstance(values, list) and len(values) == 2 and values[0] < values[1]):
                    raise SweepError(f"sweep key 'space.{key}.{kind}': {values!r} must be [low, high] with low < high")
                for value in values:
                    _check_value(key, int(value) if kind == 'int' else float(value))
                _check_range_options(key, kind, spec)
        except ConfigError as e:
            raise SweepError(f"sweep key 'space.{key}': {e}") from None
        except TypeError:
            raise SweepError(f"sweep key 'space.{key}.{kind}': {values!r} must hold numbers") from None


def load_sweep(path, out_dir=None):
    """The sweep file, every key checked (base and set are loaded as a training config once to find errors
    before any trial)."""
    path = Path(path)
    try:
        raw = read_yaml(path)
    except ConfigError as e:
        raise SweepError(str(e).replace('config file', 'sweep file')) from None
    unknown = set(raw) - set(SWEEP_KEYS)
    if unknown:
        raise SweepError(f"sweep file {path}: unknown key {sorted(unknown)[0]!r} (valid: {', '.join(SWEEP_KEYS)})")
    sweep = {key: raw.get(key, default) for key, (default, _) in SWEEP_KEYS.items()}
    sweep['study'] = sweep['study'] or path.stem
    if not isinstance(sweep['study'], str) or not sweep['study'].replace('-', '_').isidentifier():
        raise SweepError(f"sweep key 'study': {sweep['study']!r} must be letters, digits, '_' or '-' (it names a folder)")
    for key in ('trials', 'epochs'):
        if sweep[key] is None:
            raise SweepError(f"sweep file {path}: key {key!r} is missing ({SWEEP_KEYS[key][1]})")
        _whole(sweep[key], key, 1)
    for key in ('train_images', 'keep', 'seed'):
        _whole(sweep[key], key)
    _whole(sweep['firmware_images'], 'firmware_images', 1)
    _whole(sweep['heartbeat_seconds'], 'heartbeat_seconds', 1)
    if sweep['chip'] not in CHIPS:
        raise SweepError(f"sweep key 'chip': {sweep['chip']!r} is not one of {', '.join(CHIPS)}")
    if not isinstance(sweep['budget'], dict):
        raise SweepError(f"sweep key 'budget': {sweep['budget']!r} must be a mapping, e.g. budget: {{weight_bytes: 12608}}")
    for key, limit in sweep['budget'].items():
        if key not in BUDGETS:
            raise SweepError(f"sweep key 'budget': {key!r} is not a budget (valid: {', '.join(BUDGETS)})")
        _whole(limit, f'budget.{key}', 1)
    objectives = sweep['objectives']
    if (not isinstance(objectives, list) or not 1 <= len(objectives) <= 2 or objectives[0] != 'accuracy'
            or any(o not in OBJECTIVES for o in objectives[1:])):
        raise SweepError(f"sweep key 'objectives': {objectives!r} must be [accuracy] or [accuracy, X] with X one "
                         f"of {', '.join(BUDGETS)}")
    pruning = sweep['pruning']
    if pruning is not False:
        if not isinstance(pruning, dict) or set(pruning) - set(SWEEP_KEYS['pruning'][0]):
            raise SweepError(f"sweep key 'pruning': {pruning!r} must be false or a mapping of "
                             f"{', '.join(SWEEP_KEYS['pruning'][0])}")
        sweep['pruning'] = {**SWEEP_KEYS['pruning'][0], **pruning}
        for key, value in sweep['pruning'].items():
            _whole(value, f'pruning.{key}')
        if not 1 <= sweep['pruning']['percentile'] <= 50:
            raise SweepError(f"sweep key 'pruning.percentile': {sweep['pruning']['percentile']} must be 1 to 50 "
                             "(50: prune everything below the median)")
    if not isinstance(sweep['set'], dict):
        raise SweepError(f"sweep key 'set': {sweep['set']!r} must be a mapping of config keys")
    _check_space(sweep['space'])
    sweep['base'] = PROJECT_DIR / sweep['base']
    try:
        cfg = load_config(sweep['base'], fixed_keys(sweep))
    except ConfigError as e:
        raise SweepError(f"sweep file {path}: base and set: {e}") from None
    if not cfg['validation_images']:
        raise SweepError(f"sweep file {path}: trials are scored on validation images, never the test set; set "
                         "validation_images (e.g. 5000) in 'set' or in the base config")
    if sweep['train_images'] and sweep['train_images'] <= cfg['validation_images']:
        raise SweepError(f"sweep key 'train_images': {sweep['train_images']} leaves no training images once the "
                         f"{cfg['validation_images']} validation images are held out; give more than "
                         f"{cfg['validation_images']}, or fewer validation_images")
    sweep['definition'] = definition(sweep, cfg)
    sweep['dir'] = Path(out_dir) if out_dir else SWEEPS_DIR / sweep['study']
    sweep['firmware'] = any(BUDGETS[key][1] for key in list(sweep['budget']) + objectives[1:])
    return sweep


def fixed_keys(sweep):
    return {**sweep['set'], 'num_epochs': sweep['epochs']}


def recorded_config(cfg):
    """The keys of a config away from their defaults (what a trial records, and its best/*.yaml holds)."""
    return {k: v for k, v in cfg.items() if v != CONFIG_SCHEMA[k][1] and k not in RUN_INDEPENDENT}


def definition(sweep, cfg):
    """Everything that defines a trial's result: the config every trial starts from, what it samples, the data
    and how it is measured. Kept in the study: a study only takes trials of one definition."""
    return {'config': recorded_config(cfg), 'space': sweep['space'], 'train_images': sweep['train_images'],
            'chip': sweep['chip'], 'budget': sweep['budget'], 'objectives': sweep['objectives'],
            'firmware_images': sweep['firmware_images']}


def check_definition(study, sweep, study_name):
    """Refuse to add trials to (or report on) a study made by another sweep definition: its trials' results
    would be mixed with, or described by, settings they never ran with."""
    stored = study.user_attrs.get('definition')
    if stored is None:
        if study.get_trials(deepcopy=False):
            raise SweepError(f"study {study_name!r} holds trials of an older sweep.py that recorded no definition; "
                             "start a new one with --study <new name>")
        study.set_user_attr('definition', sweep['definition'])
        return
    ours = json.loads(json.dumps(sweep['definition']))   # as stored: tuples become lists
    if stored != ours:
        changed = sorted({f"config.{k}" for k in set(stored['config']) | set(ours['config'])
                          if stored['config'].get(k) != ours['config'].get(k)}
                         | {k for k in set(stored) | set(ours) if k != 'config' and stored.get(k) != ours.get(k)})
        raise SweepError(f"study {study_name!r} was run with another sweep definition (differs in "
                         f"{', '.join(changed)}); its trials would not be what this file says: give a new --study, "
                         "or restore the sweep file it was run with")


# ------------------------------------------------------------------------------------------------
# One trial
# ------------------------------------------------------------------------------------------------

def suggest(trial, space):
    """The config keys a trial samples from the search space."""
    params = {}
    for key, spec in space.items():
        if 'choices' in spec:
            params[key] = trial.suggest_categorical(key, spec['choices'])
        elif 'int' in spec:
            params[key] = trial.suggest_int(key, int(spec['int'][0]), int(spec['int'][1]), step=spec.get('step', 1),
                                            log=spec.get('log', False))
        else:
            params[key] = trial.suggest_float(key, float(spec['float'][0]), float(spec['float'][1]),
                                              step=spec.get('step'), log=spec.get('log', False))
    return params


def export_costs(int_model):
    """What the export says of a model, trained or not (sizes depend only on shapes and types)."""
    packed = pack_model(int_model)
    return {'weight_bytes': sum(layer.nbytes for layer in packed), 'ram_bytes': activation_ram(int_model, packed),
            'multiplies': any(op.kind.multiplies(op) for op in int_model.ops)}


def budget_problems(sweep, costs):
    """({constraint: value, <= 0 where kept}, what is over, in words)."""
    values, over = {}, []
    for key, limit in sweep['budget'].items():
        used = costs.get(key)
        values[key] = 0.0 if used is None else float(used - limit)
        if used is not None and used > limit:
            over.append(f"{key} {used} > {limit}")
    values['multiplier'] = 1.0 if costs.get('multiplies') and sweep['chip'] == 'CH32V003' else 0.0
    if values['multiplier'] > 0:
        over.append('it multiplies, and the CH32V003 has no multiplier')
    values['fits'] = 1.0 if costs.get('fits') is False else 0.0
    if values['fits'] > 0:
        over.append(f"the firmware does not fit the {sweep['chip']}: {costs.get('why_not_fits', '?')}")
    values['config'] = 1.0 if 'problem' in costs else 0.0
    if values['config'] > 0:
        over.append(costs['problem'])
    return values, over


BUSY_WAIT = 3600   # seconds a trial waits for another worker training the same config


def trial_dirs(sweep):
    return sweep['dir'] / 'runs', sweep['dir'] / 'modeldata'


def train_trial(trial, cfg, sweep, data, report, log):
    """The trained model of cfg: trained now (resuming a killed trial's epochs), or the model another trial of
    the same config trained already (two workers on one config: the second waits for the first, at most
    BUSY_WAIT seconds). A checkpoint that cannot be resumed (cut short, tampered) is trained over from epoch 0."""
    import training
    runs_dir, model_dir = trial_dirs(sweep)
    name = run_name(cfg)
    model_path, checkpoint = model_dir / f'{name}.pth', runs_dir / name / 'checkpoint.pt'
    restart = False
    for _ in range(BUSY_WAIT // 2):
        if model_path.exists():
            return model_path
        try:
            return training.train(cfg, resume=checkpoint.exists() and not restart, restart=restart, data=data,
                                  log=log, on_epoch_end=report, runs_dir=runs_dir, model_dir=model_dir)
        except training.RunBusy:
            time.sleep(2)
        except training.UnresumableRun as e:
            if restart:
                raise
            trial.set_user_attr('restarted', str(e))
            restart = True
        except ConfigError:   # the run's files changed between the check and the start: look again
            if not (model_path.exists() or checkpoint.exists()):
                raise
            time.sleep(2)
    raise OutputError(f"{runs_dir / name} stayed busy for {BUSY_WAIT}s; is a worker stuck? Stop it and run the sweep "
                      "again")


def integer_accuracy(int_model, validation):
    """Accuracy of the integer model (the Python reference, bit-exact with C) on the validation images."""
    images, labels = validation
    logits = reference_logits(int_model, encode_input(images))
    return float((logits.argmax(1) == labels.numpy()).mean())


def firmware_costs(model_path, cfg, sweep, data, work):
    """Flash, RAM with stack, instructions per inference and fit of the firmware on the emulated chip, run
    on validation images (C against Python on each of them too)."""
    import pipeline
    import training
    _, held = training.validation_indices(len(data['train_y']), cfg['validation_images'])
    held = held[:sweep['firmware_images']]
    shown = {**data, 'test_x16': data['train_x16'][held], 'test_y': data['train_y'][held]}
    row = pipeline.measure_model(model_path, work, shown, targets=(sweep['chip'],))[sweep['chip']]
    return {'flash_bytes': row['flash'], 'instructions': round(row['sim']['mean']), 'fits': row['fits'],
            'why_not_fits': row['why'], 'stack_bytes': row['sim']['stack'], 'multiplies': not row['nomul']}


def run_trial(trial, sweep, data, log):
    """Train, export and score one trial; returns its objective values."""
    from BitNetMCU import build_model
    from checkpoint import load_checkpoint
    import training
    optuna = _optuna()
    params = suggest(trial, sweep['space'])
    try:
        cfg = load_config(sweep['base'], {**fixed_keys(sweep), **params})
    except ConfigError as e:   # a combination the engine cannot run: a constraint, not a crash
        return record(trial, sweep, {'problem': str(e)}, None)
    torch.manual_seed(cfg['seed'])
    costs = export_costs(to_int_model(build_model(cfg, data['num_classes'])))
    if budget_problems(sweep, costs)[1]:   # over budget whatever the weights: not worth training
        return record(trial, sweep, costs, None)
    trial.set_user_attr('run', run_name(cfg))
    trial.set_user_attr('config', recorded_config(cfg))
    trial.set_user_attr('pid', os.getpid())
    single = len(sweep['objectives']) == 1

    def report(metrics):
        if not single:   # Optuna prunes single-objective studies only
            return
        trial.report(metrics['val_acc'], metrics['epoch'])
        if sweep['pruning'] and trial.should_prune():
            raise optuna.TrialPruned(f"validation accuracy {100 * metrics['val_acc']:.2f}% after epoch "
                                     f"{metrics['epoch']}")
    model_path = train_trial(trial, cfg, sweep, data, report, lambda *a: None)
    model, cfg, _ = load_checkpoint(model_path)
    int_model = to_int_model(model)
    costs.update(export_costs(int_model))
    validation = training.split_validation(data, cfg['validation_images'])[1]
    accuracy = integer_accuracy(int_model, validation)
    if sweep['firmware']:
        costs.update(firmware_costs(model_path, cfg, sweep, data, sweep['dir'] / 'firmware' / f'trial{trial.number}'))
    return record(trial, sweep, costs, accuracy)


def record(trial, sweep, costs, accuracy):
    """Keep a trial's costs and constraints in the study; returns its objective values (an infeasible
    trial's count for nothing: its constraints rank it below every feasible one)."""
    constraints, over = budget_problems(sweep, costs)
    for key, value in constraints.items():
        trial.set_constraint(key, value)
    for key, value in costs.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr('infeasible', '; '.join(over))
    trial.set_user_attr('accuracy', accuracy)
    values = [accuracy if accuracy is not None and not over else 0.0]
    for key in sweep['objectives'][1:]:
        values.append(float(costs[key]) if costs.get(key) is not None else math.inf)
    return values[0] if len(values) == 1 else values


# ------------------------------------------------------------------------------------------------
# The study
# ------------------------------------------------------------------------------------------------

def embedded_storage_url(sweep):
    return f"sqlite:///{sweep['dir'] / 'study.db'}"


def _check_writable(storage_url):
    """An embedded study file (or its folder) that cannot be written is named before Optuna fails on it."""
    if not storage_url.startswith('sqlite:///'):
        return
    path = Path(storage_url[len('sqlite:///'):])
    for target in (path, path.parent):
        if target.exists() and not os.stat(target).st_mode & 0o222:
            raise SweepError(f"the study storage {target} is read-only; make it writable (chmod u+w) or copy the "
                             "study elsewhere (--dir)")


def open_study(sweep, storage_url, study_name, worker=0, create=True):
    """The study in the storage (created by the first worker unless create is false), with heartbeats, retries
    and constraints; a study of another sweep definition is refused."""
    optuna = _optuna()
    if create:
        _check_writable(storage_url)
        if storage_url.startswith('sqlite:///'):
            Path(storage_url[len('sqlite:///'):]).parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    # SQLite: wait for another worker's write instead of failing at once
    engine = {'connect_args': {'timeout': 60}} if storage_url.startswith('sqlite') else None
    for attempt in range(5):
        try:
            storage = RDBStorage(storage_url, engine_kwargs=engine, heartbeat_interval=sweep['heartbeat_seconds'],
                                 grace_period=2 * sweep['heartbeat_seconds'],
                                 heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
            break
        except Exception as e:   # an unreachable server, a missing driver, a malformed URL
            if 'already exists' in str(e) and attempt < 4:   # another worker is creating the tables right now
                time.sleep(1 + attempt)
                continue
            if isinstance(e, ImportError) and storage_url.startswith('postgres'):
                raise SweepError("the PostgreSQL driver is not installed: pip install psycopg2-binary (for --storage "
                                 f"{storage_url.split('://')[0]}://...)") from None
            raise SweepError(f"storage {storage_url.split('@')[-1]!r} cannot be opened: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300]}") from None
    single = len(sweep['objectives']) == 1
    # Optuna's percentile is the share of trials kept: the top (100 - bottom) percent
    # startup_trials counts trials that reported the epoch (the infeasible ones finish without training)
    pruner = (optuna.pruners.PercentilePruner(100 - sweep['pruning']['percentile'],
                                              n_startup_trials=sweep['pruning']['startup_trials'],
                                              n_warmup_steps=sweep['pruning']['warmup_epochs'],
                                              n_min_trials=max(1, sweep['pruning']['startup_trials']))
              if single and sweep['pruning'] else optuna.pruners.NopPruner())
    directions = ['maximize'] + ['minimize'] * (len(sweep['objectives']) - 1)
    if not create and study_name not in optuna.study.get_all_study_names(storage):
        known = optuna.study.get_all_study_names(storage)
        raise SweepError(f"no study {study_name!r} in {storage_url.split('@')[-1]} (it holds "
                         f"{', '.join(map(repr, known)) or 'none'}); run the sweep first, or give --study")
    study = optuna.create_study(storage=storage, study_name=study_name, pruner=pruner, directions=directions,
                                load_if_exists=True)
    check_definition(study, sweep, study_name)
    # Every worker, and every re-run, draws its own random start: no two repeat each other's first samples.
    seed = sweep['seed'] + 1_000_003 * worker + 7919 * len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                               n_startup_trials=min(10, max(2, sweep['trials'] // 4)))
    return study


def counts(study):
    """Trials by outcome: done (feasible), infeasible, pruned, failed, running."""
    from optuna.trial import TrialState
    out = {'done': 0, 'infeasible': 0, 'pruned': 0, 'failed': 0, 'running': 0}
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            out['infeasible' if t.user_attrs.get('infeasible') else 'done'] += 1
        elif t.state == TrialState.PRUNED:
            out['pruned'] += 1
        elif t.state == TrialState.FAIL:
            out['failed'] += 1
        elif t.state == TrialState.RUNNING:
            out['running'] += 1
    return out


def feasible(study):
    from optuna.trial import TrialState
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if not t.user_attrs.get('infeasible') and t.user_attrs.get('accuracy') is not None]


def progress_line(study, worker=None):
    c = counts(study)
    best = max(feasible(study), key=lambda t: t.user_attrs['accuracy'], default=None)
    shown = f"best {100 * best.user_attrs['accuracy']:.2f}% (trial {best.number})" if best else 'no feasible trial yet'
    who = f"worker {worker}: " if worker is not None else ''
    return (f"{who}{c['done'] + c['infeasible'] + c['pruned']} finished: done {c['done']} · pruned {c['pruned']} · "
            f"infeasible {c['infeasible']} · failed {c['failed']} · running {c['running']} | {shown}")


def work(sweep, storage_url, study_name, worker, data, log=print):
    """One worker: trials until the study has `trials` finished or running ones."""
    optuna = _optuna()
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState
    study = open_study(sweep, storage_url, study_name, worker)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    from training import Diverged, raise_if_stopped

    def objective(trial):
        try:
            return run_trial(trial, sweep, data, log=lambda *a: None)
        except KeyboardInterrupt:   # Optuna fails the trial; its parameters go first when the sweep runs again
            study.enqueue_trial(trial.params, skip_if_exists=False)
            raise
        except (Diverged, ExportError) as e:   # the trial fails; the line after it says why
            trial.set_user_attr('error', ' '.join(str(e).split())[:300])
            raise

    def after(study, frozen):
        note = frozen.user_attrs.get('infeasible') or (frozen.state.name.lower() if frozen.state != TrialState.COMPLETE
                                                       else f"{100 * frozen.user_attrs['accuracy']:.2f}%")
        if frozen.user_attrs.get('error'):
            note += f": {frozen.user_attrs['error']}"
        log(f"trial {frozen.number} {frozen.params}: {note}\n  {progress_line(study, worker)}")
    while True:
        raise_if_stopped()
        fail_stale_trials(study)   # a killed worker's trial: failed, and its parameters queued again
        taken = len(study.get_trials(deepcopy=False, states=finished + (TrialState.RUNNING,)))
        if taken >= sweep['trials']:
            return study
        failed = counts(study)['failed']
        if failed >= sweep['trials']:
            raise SweepError(f"{failed} trials failed (diverged, or could not be exported): "
                             "look at the base config and the search space (e.g. a smaller learning rate)")
        study.optimize(objective, n_trials=1, callbacks=[after], catch=(Diverged, ExportError))


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------

def pareto_front(trials, key):
    """The trials no other beats on both accuracy (higher) and `key` (lower)."""
    ranked = sorted((t for t in trials if t.user_attrs.get(key) is not None),
                    key=lambda t: (t.user_attrs[key], -t.user_attrs['accuracy']))
    front, best = [], -1.0
    for t in ranked:
        if t.user_attrs['accuracy'] > best:
            front.append(t)
            best = t.user_attrs['accuracy']
    return front


COLUMNS = ('trial', 'state', 'accuracy', 'weight_bytes', 'ram_bytes', 'flash_bytes', 'instructions', 'infeasible')


def results_rows(study):
    rows = []
    for t in study.get_trials(deepcopy=False):
        acc = t.user_attrs.get('accuracy')
        row = {'trial': t.number, 'state': t.state.name.lower(),
               'accuracy': '' if acc is None else f"{100 * acc:.2f}",
               **{key: t.user_attrs.get(key, '') for key in COLUMNS[3:]},
               **{k: f"{v:.4g}" if isinstance(v, float) else v for k, v in t.params.items()}}
        if t.state.name == 'COMPLETE' and row['infeasible']:
            row['state'] = 'infeasible'
        rows.append(row)
    return rows


def results_table(rows, params, limit=None):
    """The trials, most accurate first, as aligned text."""
    order = sorted(rows, key=lambda r: -float(r['accuracy'] or -1))[:limit]
    cols = list(COLUMNS[:-1]) + params
    cells = [[str(r.get(c, '')) for c in cols] for r in order]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ['  '.join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ['  '.join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return '\n'.join(lines)


def write_plot(study, sweep, path):
    """Accuracy against each measured cost: feasible trials, the Pareto front joined, infeasible ones greyed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    good = feasible(study)
    trained_bad = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get('infeasible')
                   and t.user_attrs.get('accuracy') is not None]
    keys = [k for k in ('weight_bytes', 'instructions') if any(t.user_attrs.get(k) is not None for t in good)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.scatter([t.user_attrs[key] for t in good if t.user_attrs.get(key) is not None],
                   [100 * t.user_attrs['accuracy'] for t in good if t.user_attrs.get(key) is not None],
                   s=18, color='tab:blue', label='feasible trials')
        bad = [t for t in trained_bad if t.user_attrs.get(key) is not None]
        if bad:
            ax.scatter([t.user_attrs[key] for t in bad], [100 * t.user_attrs['accuracy'] for t in bad], s=18,
                       marker='x', color='0.6', label='over budget')
        front = pareto_front(good, key)
        ax.step([t.user_attrs[key] for t in front], [100 * t.user_attrs['accuracy'] for t in front], where='post',
                color='tab:red', label='Pareto front')
        for t in front:
            ax.annotate(str(t.number), (t.user_attrs[key], 100 * t.user_attrs['accuracy']), fontsize=7,
                        xytext=(3, -9), textcoords='offset points')
        if key in sweep['budget']:
            ax.axvline(sweep['budget'][key], color='0.3', linestyle='--', linewidth=1, label='budget')
        ax.set_xlabel({'weight_bytes': 'weight bytes (flash)', 'instructions': 'instructions per inference'}[key])
        ax.set_ylabel('validation accuracy, integer model (%)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"sweep {sweep['study']} on {sweep['chip']}: {len(good)} feasible trials", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def best_trials(study, sweep):
    """The trials worth training fully: the Pareto front with two objectives, else the best `keep`."""
    good = feasible(study)
    if len(sweep['objectives']) == 2:
        return sorted(pareto_front(good, sweep['objectives'][1]), key=lambda t: -t.user_attrs['accuracy'])
    return sorted(good, key=lambda t: -t.user_attrs['accuracy'])[:sweep['keep']]


def config_yaml(trial, sweep):
    """A trial's training config as a YAML file training.py takes as it is: the keys away from their defaults."""
    keys = trial.user_attrs['config']   # as the trial ran, whatever the sweep file says now
    a = trial.user_attrs
    costs = ', '.join(f"{key} {a[key]}" for key in BUDGETS if a.get(key) is not None)
    subset = f" on {sweep['train_images']} training images" if sweep['train_images'] else ''
    head = (f"# From sweep {sweep['study']} ({sweep['chip']}), trial {trial.number}: validation accuracy "
            f"{100 * a['accuracy']:.2f}% (integer model) after {sweep['epochs']} epochs{subset}; {costs}.\n"
            f"# Sampled: {', '.join(f'{k}={v!r}' for k, v in trial.params.items())}. "
            "Raise num_epochs for the final training.\n")
    return head + yaml.safe_dump(keys, sort_keys=False)


def write_results(study, sweep, log=print):
    """results.csv, pareto.png and best/*.yaml under sweeps/<study>/; the table and progress on the console."""
    out = sweep['dir']
    out.mkdir(parents=True, exist_ok=True)
    rows = results_rows(study)
    params = list(sweep['space'])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS) + params, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / 'results.csv', buf.getvalue())
    log(results_table(rows, params, limit=20))
    log(progress_line(study))
    best = best_trials(study, sweep)
    if not feasible(study):
        log("No feasible trial yet: no plot, no configs.")
        return []
    write_plot(study, sweep, out / 'pareto.png')
    written = []
    for t in best:
        path = out / 'best' / f"trial{t.number}.yaml"
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, config_yaml(t, sweep))
        written.append(path)
    log(f"Wrote {out / 'results.csv'}, {out / 'pareto.png'} and {len(written)} training configs in {out / 'best'}/")
    return written


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def load_data(sweep):
    cfg = load_config(sweep['base'], fixed_keys(sweep))
    data = load_dataset(cfg['dataset'], log=lambda *a: None)
    if sweep['train_images']:
        n = sweep['train_images']
        data = {**data, **{key: data[key][:n] for key in ('train_x28', 'train_x16', 'train_y')}}
    return data


def spawn_workers(args, sweep, n):
    """n worker processes of this command on this machine, sharing the cores; their exit statuses."""
    from training import raise_if_stopped
    threads = str(max(1, (os.cpu_count() or 1) // n))
    procs = []
    for worker in range(1, n + 1):
        cmd = [sys.executable, str(Path(__file__).resolve()), args.sweep, '--workers', '1', '--worker-id',
               str(worker), '--no-report', '--study', args.study, '--dir', str(sweep['dir'])]
        cmd += ['--storage', args.storage] if args.storage else []
        procs.append(subprocess.Popen(cmd, env={**os.environ, 'OMP_NUM_THREADS': threads}))
    try:
        while any(p.poll() is None for p in procs):
            raise_if_stopped()
            time.sleep(0.2)
        return [p.returncode for p in procs]
    except KeyboardInterrupt:   # Ctrl-C reaches the workers too; SIGTERM (kill) only this process: pass it on
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog='sweep file keys:\n' + '\n'.join(f"  {k:18s} {v[1]}" for k, v in
                                                                            SWEEP_KEYS.items()))
    parser.add_argument('sweep', help='sweep YAML, e.g. sweeps/smoke.yaml')
    parser.add_argument('--storage', default=None,
                        help='Optuna storage URL shared by workers on many machines, e.g. postgresql://user:pw@host/db '
                             '(default: the embedded sweeps/<study>/study.db)')
    parser.add_argument('--study', default=None, help='study name (default: the sweep file\'s study key)')
    parser.add_argument('--dir', default=None, help="where the sweep's files go (default: sweeps/<study>/)")
    parser.add_argument('--workers', type=int, default=1, help='worker processes on this machine (default 1)')
    parser.add_argument('--report', action='store_true', help='only print the table and write plots and configs')
    parser.add_argument('--no-report', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--worker-id', type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.workers < 1:
            raise SweepError(f"--workers {args.workers}: give 1 or more")
        sweep = load_sweep(args.sweep, args.dir)
        args.study = args.study or sweep['study']
        storage = args.storage or embedded_storage_url(sweep)
        if args.report:
            if not args.storage and not (sweep['dir'] / 'study.db').exists():
                raise SweepError(f"no study in {sweep['dir']}: run the sweep first (python sweep.py {args.sweep})")
            write_results(open_study(sweep, storage, args.study, create=False), sweep)
            return 0
        if args.workers > 1:
            open_study(sweep, storage, args.study)   # the tables and the study exist before the workers start
            statuses = spawn_workers(args, sweep, args.workers)
            if any(statuses):
                print(f"error: worker exit statuses {statuses}", file=sys.stderr)
                return 1
            study = open_study(sweep, storage, args.study)
        else:
            study = work(sweep, storage, args.study, args.worker_id, load_data(sweep))
        if not args.no_report:
            write_results(study, sweep)
    except (SweepError, ConfigError, DataError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nInterrupted: finished trials are in the study; the running one is retried when the sweep runs "
              "again (same command).", file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    from training import stop_on_signals
    stop_on_signals()   # `kill` stops a sweep as Ctrl-C does: its trial is queued again
    sys.exit(main())
