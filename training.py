"""Train a BitNetMCU model with quantization-aware training.

    python training.py                                  # trainingparameters.yaml
    python training.py --params configs/x.yaml --set num_epochs=10 --set QuantType=2bitsym
    python training.py --resume                         # continue an interrupted run exactly

Writes modeldata/<run name>.pth (state_dict + config + metrics: all later scripts need) and
runs/<run name>/ (metrics.csv, resumable checkpoint.pt, TensorBoard logs when tensorboard is installed).
"""
import argparse
import copy
import csv
import io
import math
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from BitNetMCU import MODELS, build_model, code_entropy_bits, quant_layers
from checkpoint import CHECKPOINT_FORMAT, UnstatedQuantType, load_checkpoint
from config import ConfigError, describe_config, ignored_keys, load_config, parse_overrides, run_name
from dataset import DataError, augment, load_dataset, normalize
from fileio import PROJECT_DIR, OutputError, atomic_save, atomic_write
from intmodel import ExportError

MODEL_DIR = PROJECT_DIR / 'modeldata'
RUNS_DIR = PROJECT_DIR / 'runs'

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety, not a requirement
    tqdm = None
try:
    import fcntl
except ImportError:  # not on Windows: no lock against two trainings of one run
    fcntl = None


# Ctrl-C and `kill`: Python raises KeyboardInterrupt wherever the signal lands. Inside one of the weakref callbacks
# torch runs, the exception is printed as "Exception ignored" and lost, and the run went on. So the signal is also
# recorded, the lost exception is not printed, and the training loop raises it again at its next batch.
_stop_signal = None


def _stop(signum, frame):
    global _stop_signal
    _stop_signal = signum
    raise KeyboardInterrupt


def _unraisable(event):
    if not (_stop_signal and isinstance(event.exc_value, KeyboardInterrupt)):
        sys.__unraisablehook__(event)


def stop_on_signals():
    """Ctrl-C and SIGTERM stop this process with KeyboardInterrupt, never lost. The command line calls it, not
    main(): tests call main() in-process."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:   # a background job keeps ignoring Ctrl-C
        signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    sys.unraisablehook = _unraisable


def raise_if_stopped():
    if _stop_signal:
        raise KeyboardInterrupt


class Diverged(RuntimeError):
    """The loss stopped being a finite number; the message says where and what usually cures it."""


class RunBusy(ConfigError):
    """Another process is training this exact config now."""


class UnresumableRun(ConfigError):
    """The checkpoint of an interrupted run is damaged, foreign or incomplete: only --restart helps."""


def pick_device(cfg):
    if cfg['device'] == 'cuda' and not torch.cuda.is_available():
        raise ConfigError("config key 'device': 'cuda' was asked for but no CUDA device is available; "
                          "use 'auto' or 'cpu'")
    if cfg['device'] == 'cpu' or not torch.cuda.is_available():
        return torch.device('cpu')
    return torch.device('cuda')


def thread_count(cfg):
    """The CPU threads a training uses (config key threads). One by default: these layers are so small that
    one thread costs at most a quarter of the speed alone, while two trainings of default threads side by side
    (a sweep, a test run beside `make`) each ran 8-25x slower than alone (docs/guide.md, "Threads")."""
    if cfg['threads'] != 'auto':
        return cfg['threads']
    env = os.environ.get('OMP_NUM_THREADS', '')
    return int(env) if env.isdigit() and int(env) > 0 else max(1, min(4, os.cpu_count() or 1))


def lr_at(cfg, epoch):
    """Learning rate of an epoch: a pure function of the config, so resuming needs no scheduler state."""
    base = cfg['learning_rate']
    if cfg['scheduler'] == 'StepLR':
        lr = base * cfg['lr_decay'] ** (epoch // cfg['step_size'])
    elif cfg['scheduler'] == 'Cosine':
        lr = base * 0.5 * (1 + math.cos(math.pi * epoch / cfg['num_epochs']))
    else:  # CosineWarmRestarts
        period, start = cfg['T_0'], 0
        while epoch >= start + period:
            start, period = start + period, period * cfg['T_mult']
        lr = base * 0.5 * (1 + math.cos(math.pi * (epoch - start) / period))
    if 0 <= cfg['halve_lr_epoch'] <= epoch:
        lr /= 2
    return lr


class MuonAndAdam:
    """optimizer: muon. torch.optim.Muon on the weight matrices of every fully connected layer but the last (Muon
    orthogonalizes a matrix's update; a shared window stem is one matrix too), Adam on the classifier, the
    convolutions, per-window stems and the rest; stepped together. Each param group keeps the ratio of its learning
    rate to learning_rate in 'lr_scale'."""

    def __init__(self, model, cfg):
        linear = [m for _, m in quant_layers(model) if m.weight.dim() == 2]
        hidden = [m.weight for m in linear[:-1]]
        rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
        self.muon = torch.optim.Muon(hidden, lr=cfg['muon_learning_rate'], weight_decay=0.0)
        self.adam = torch.optim.Adam(rest, lr=cfg['learning_rate'])
        self.muon.param_groups[0]['lr_scale'] = cfg['muon_learning_rate'] / cfg['learning_rate']

    @property
    def param_groups(self):
        return self.muon.param_groups + self.adam.param_groups

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adam.zero_grad(set_to_none)

    def step(self):
        self.muon.step()
        self.adam.step()

    def state_dict(self):
        return {'muon': self.muon.state_dict(), 'adam': self.adam.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state['muon'])
        self.adam.load_state_dict(state['adam'])


def make_optimizer(model, cfg):
    if cfg['optimizer'] == 'muon':
        return MuonAndAdam(model, cfg)
    return torch.optim.Adam(model.parameters(), lr=cfg['learning_rate'])


def epoch_generator(cfg, epoch):
    """Each epoch's shuffling and augmentation depend only on (seed, epoch): resume is exact."""
    return torch.Generator().manual_seed(cfg['seed'] * 1_000_003 + epoch)


VALIDATION_SPLIT_SEED = 20240414   # one split for every run: validation figures of different seeds compare


def validation_indices(total, n):
    """(kept, held-out) indices of a training set of `total` images: the held-out ones are the last n of a
    fixed permutation, so the split never depends on the run's seed."""
    if n >= total:
        raise ConfigError(f"config key 'validation_images': {n} leaves no training images (the {total} of the "
                          f"dataset); use fewer, e.g. {total // 6}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(VALIDATION_SPLIT_SEED))
    return order[:-n].sort().values, order[-n:].sort().values


def split_validation(data, n):
    """(training data without the held-out images, the normalized validation images and their labels)."""
    if n == 0:
        return data, None
    keep, held = validation_indices(len(data['train_y']), n)
    train = {**data, **{key: data[key][keep] for key in ('train_x28', 'train_x16', 'train_y')}}
    return train, (normalize(data['train_x16'][held]), data['train_y'][held])


def epoch_data(data, cfg, epoch):
    """The shuffled training set of one epoch: clean images, plus as many freshly augmented ones."""
    gen = epoch_generator(cfg, epoch)
    x, y = normalize(data['train_x16']), data['train_y']
    if cfg['augmentation']:
        extra = augment(data['train_x28'], gen, cfg['rotation1'], cfg['rotation2'],
                        cfg['elastictransformprobability'])
        x, y = torch.cat([x, normalize(extra)]), torch.cat([y, y])
    order = torch.randperm(len(y), generator=gen)
    return x[order], y[order]


def load_config_checkpoint(cfg, key):
    """The model of the checkpoint a config key names (teacher, init_from)."""
    path = PROJECT_DIR / cfg[key]
    if not path.exists():
        raise ConfigError(f"config key {key!r}: {cfg[key]!r} does not exist (paths are relative to {PROJECT_DIR})")
    try:
        return load_checkpoint(path)[0]
    except UnstatedQuantType:   # --set QuantType would change this run's model, not the checkpoint's
        raise ConfigError(f"config key {key!r}: {cfg[key]!r} is an original BitNetMCU checkpoint whose name states "
                          f"no QuantType; rename it to state one (e.g. {path.stem}_4bitsym{path.suffix}) or give "
                          "a checkpoint trained by training.py") from None
    except ExportError as e:
        raise ConfigError(f"config key {key!r}: {e}") from None


def init_weights(model, cfg):
    """Start from another run's weights (low-bit QAT from a float model loses less than from scratch)."""
    if not cfg['init_from']:
        return
    try:
        model.load_state_dict(load_config_checkpoint(cfg, 'init_from').state_dict())
    except RuntimeError as e:
        raise ConfigError(f"config key 'init_from': {cfg['init_from']!r} has other layer shapes: {str(e)[:300]}") from None
    for _, layer in quant_layers(model):
        layer.update_clipping()   # its s was made for its own quantization type


def load_teacher(cfg, device, num_classes):
    """The frozen model whose softened predictions the student learns too (distillation), or None."""
    if not cfg['teacher']:
        return None
    teacher = load_config_checkpoint(cfg, 'teacher')
    with torch.no_grad():
        classes = teacher(torch.zeros(1, 1, 16, 16)).shape[1]
    if classes != num_classes:
        raise ConfigError(f"config key 'teacher': {cfg['teacher']!r} predicts {classes} classes, {cfg['dataset']} "
                          f"has {num_classes}; give a teacher trained on {cfg['dataset']}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()


def loss_fn(out, y, cfg, teacher_out=None):
    """Cross-entropy (with label smoothing), mixed with the KL divergence to the teacher's softened
    predictions; T^2 keeps the soft term's gradient scale independent of the temperature."""
    loss = F.cross_entropy(out, y, label_smoothing=cfg['label_smoothing'])
    if teacher_out is None:
        return loss
    t, a = cfg['distill_temperature'], cfg['distill_weight']
    soft = F.kl_div(F.log_softmax(out / t, dim=1), F.log_softmax(teacher_out / t, dim=1),
                    log_target=True, reduction='batchmean') * t * t
    return (1 - a) * loss + a * soft


class WeightAverage:
    """Exponential moving average of a model's parameters, updated after every optimizer step. Its clipping
    scalars are its own, re-estimated from the averaged weights like the live model's (own_clipping), or the
    live model's, the grid the averaged weights were trained on (docs/guide.md, qf32l: the live ones cost
    accuracy while they are re-estimated every epoch, and gain none after)."""

    def __init__(self, model, decay, own_clipping=True):
        self.model = copy.deepcopy(model)
        self.decay, self.steps, self.own_clipping = decay, 0, own_clipping

    @torch.no_grad()
    def update(self, model):
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))   # short memory at the start
        for avg, live in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(live, 1 - decay)
        for (name, avg), live in zip(self.model.named_buffers(), model.buffers()):
            if not (self.own_clipping and name.endswith('.s')):   # e.g. BatchNorm statistics follow the live model
                avg.copy_(live)

    def update_clipping(self):
        """Re-estimate its own clipping scalars from the averaged weights (as the live model's are); live ones
        arrive with every update."""
        if self.own_clipping:
            for _, layer in quant_layers(self.model):
                layer.update_clipping()

    def state_dict(self):
        return {'model': self.model.state_dict(), 'steps': self.steps}

    def load_state_dict(self, state):
        self.model.load_state_dict(state['model'])
        self.steps = state['steps']


def train_epoch(model, optimizer, x, y, cfg, device, teacher=None, average=None, dampening=0.0, desc='train'):
    """One pass over (x, y) in order; returns mean loss and accuracy of the training batches.
    `dampening` weighs the pull of the latent weights to their quantized levels."""
    batch_size = cfg['batch_size']
    batches = range(0, len(y), batch_size)
    if tqdm is not None:
        batches = tqdm(batches, desc=desc, leave=False, disable=None, unit='batch', mininterval=0.5)
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    damped = [layer for _, layer in quant_layers(model)] if dampening else []
    for i in batches:
        raise_if_stopped()
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        out = model(xb)
        with torch.no_grad():
            teacher_out = teacher(xb) if teacher is not None else None
        loss = loss_fn(out, yb, cfg, teacher_out)
        if damped:
            loss = loss + dampening * sum(layer.oscillation_penalty() for layer in damped)
        if not math.isfinite(loss.item()):   # stop before the weights become NaN too
            raise Diverged(f"the loss is {loss.item()} at batch {i // batch_size + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        try:
            optimizer.step()
        except RuntimeError as e:   # Adam's step no longer fits float32
            raise Diverged(f"the weights overflow ({e}) at batch {i // batch_size + 1}") from None
        if average is not None:
            average.update(model)
        loss_sum += loss.detach() * len(yb)
        correct += (out.argmax(1) == yb).sum()
    return float(loss_sum) / len(y), float(correct) / len(y)


@torch.no_grad()
def evaluate(model, x, y, device, batch_size=2000):
    """Loss and accuracy over every sample (no partial batch dropped) and the share of positive ReLU outputs."""
    model.eval()
    positive, total = [0], [0]

    def count(_module, _inputs, out):
        positive[0] += int((out > 0).sum())
        total[0] += out.numel()
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.ReLU)]
    loss, correct = 0.0, 0
    try:
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            out = model(xb)
            loss += float(F.cross_entropy(out, yb, reduction='sum'))
            correct += int((out.argmax(1) == yb).sum())
    finally:
        for h in hooks:
            h.remove()
    model.train()
    return loss / len(y), correct / len(y), positive[0] / max(total[0], 1)


def coded_layers(model):
    """The quantized layers whose weights have codes: a float ('None') layer has no clipping or codes to log."""
    return [(name, layer) for name, layer in quant_layers(model) if layer.qtype.levels is not None]


def layer_stats(model):
    """Per coded layer: clipping scalar (mean over rows for PerOutput) and entropy of the weight codes."""
    return {name: (float(layer.s.mean()), code_entropy_bits(layer.weight_levels()))
            for name, layer in coded_layers(model)}


def write_metrics_csv(history, path):
    if not history:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, buf.getvalue())


def format_epoch(m, num_epochs, layer_names):
    s = ' '.join(f"{m['s/' + n]:.3g}" for n in layer_names)
    h = ' '.join(f"{m['entropy/' + n]:.2f}" for n in layer_names)
    return (f"epoch {m['epoch']:3d}/{num_epochs}  lr {m['lr']:.2e}  "
            f"train {m['train_loss']:.4f} {100 * m['train_acc']:6.2f}%  "
            + (f"val {100 * m['val_acc']:6.2f}%  " if 'val_acc' in m else '')
            + (f"(live {100 * m['val_acc_live']:6.2f}%)  " if 'val_acc_live' in m else '') +
            f"test {m['test_loss']:.4f} {100 * m['test_acc']:6.2f}%  "
            + (f"(live {100 * m['test_acc_live']:6.2f}%)  " if 'test_acc_live' in m else '') +
            f"act>0 {100 * m['act_positive']:4.1f}%  {m['time_s']:5.1f}s"
            + (f"  | s: {s} | bits: {h}" if layer_names else ''))   # a float model has no clipping or codes


def _tensorboard(log_dir, purge_step):
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
    except Exception:  # tensorboard not installed (or broken): the CSV has everything
        return None


@dataclass
class Run:
    """What a training run carries from epoch to epoch."""
    cfg: dict
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    teacher: Optional[nn.Module]
    average: Optional[WeightAverage]
    run_dir: Path
    model_path: Path
    history: list = field(default_factory=list)

    @property
    def name(self):
        return self.model_path.stem

    @property
    def checkpoint_path(self):
        return self.run_dir / 'checkpoint.pt'

    @property
    def final_model(self):
        """What is evaluated and saved: the weight average when there is one."""
        return self.average.model if self.average else self.model

    @property
    def epochs_done(self):
        return self.history[-1]['epoch'] if self.history else 0


def start_run(cfg, resume, restart, num_classes, log, runs_dir=None, model_dir=None):
    """A fresh run, or the interrupted one of this config (resume): every epoch's checkpoint holds the
    model, optimizer, weight average and history."""
    name = run_name(cfg)
    device = pick_device(cfg)
    torch.manual_seed(cfg['seed'])
    model = build_model(cfg, num_classes)
    init_weights(model, cfg)
    model = model.to(device)
    average = WeightAverage(model, cfg['ema_decay'], cfg['ema_clipping'] == 'own') if cfg['ema_decay'] > 0 else None
    run = Run(cfg, device, model, make_optimizer(model, cfg),
              load_teacher(cfg, device, num_classes), average, (runs_dir or RUNS_DIR) / name, (model_dir or MODEL_DIR) / f'{name}.pth')
    if run.checkpoint_path.exists() and not restart:
        if not resume:
            raise ConfigError(f"{run.checkpoint_path} holds an unfinished run of this config; pass --resume to "
                              f"continue it, or --restart to start over (it will be overwritten)")
        try:   # weights_only: a planted or tampered checkpoint can hold data, never code
            state = torch.load(run.checkpoint_path, map_location=device, weights_only=True)
            model.load_state_dict(state['model'])
            run.optimizer.load_state_dict(state['optimizer'])
            if average is not None:
                average.load_state_dict(state['average'])
            run.history = list(state['history'])
        except pickle.UnpicklingError as e:
            if not str(e).startswith('Weights only load failed'):
                raise UnresumableRun(f"{run.checkpoint_path} cannot be resumed: it is not a checkpoint, or it was cut "
                                     "short; pass --restart to start over") from None
            # torch's own text advises unsafe loading: not repeated here
            raise UnresumableRun(f"{run.checkpoint_path} cannot be resumed: it holds objects other than tensors and "
                                 "numbers (a foreign or planted file; nothing in it was run); pass --restart to start "
                                 "over") from None
        except Exception as e:
            raise UnresumableRun(f"{run.checkpoint_path} cannot be resumed ({type(e).__name__}: "
                                 f"{' '.join(str(e).split())[:160]}); pass --restart to start over") from None
        if cfg['keep_best'] and run.history and not (run.run_dir / 'best.pt').exists():
            raise UnresumableRun(f"{run.run_dir / 'best.pt'} is missing: the best epoch so far (keep_best) is lost; "
                                 "pass --restart to start over, or restore the file")
        log(f"Resuming {name} after epoch {run.epochs_done}")
    elif resume:
        done = f"; this config is already trained: {run.model_path}" if run.model_path.exists() else ''
        raise ConfigError(f"nothing to resume: {run.checkpoint_path} does not exist{done}; run without --resume")
    elif run.model_path.exists():
        log(f"Note: {run.model_path} exists for this exact config and will be replaced")
    return run


def lock_run(run_dir):
    """An exclusive lock on the run folder while this process trains it (two trainings of one config would
    race on its files): an open file, released when it is closed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / 'lock', 'w')
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunBusy(f"another process is training this config now ({run_dir}); wait for it to finish, "
                              "or stop it first") from None
    return handle


def run_epoch(run, data, epoch, validation=None):
    """Train one epoch and evaluate (on the test set, and on the validation images when held out); returns
    the epoch's metrics."""
    cfg, t0 = run.cfg, time.time()
    if epoch < cfg['maxw_update_until_epoch']:
        for _, layer in quant_layers(run.model):
            layer.update_clipping()
        if run.average is not None:
            run.average.update_clipping()
    lr = lr_at(cfg, epoch)
    for group in run.optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)
    x, y = epoch_data(data, cfg, epoch)
    # The pull grows as the learning rate falls: weights move freely early and settle late.
    dampening = cfg['oscillation_dampening'] * (1 - lr / cfg['learning_rate'])
    train_loss, train_acc = train_epoch(run.model, run.optimizer, x, y, cfg, run.device, run.teacher, run.average,
                                        dampening, f"epoch {epoch + 1}/{cfg['num_epochs']}")
    test_x, test_y = normalize(data['test_x16']), data['test_y']
    test_loss, test_acc, positive = evaluate(run.final_model, test_x, test_y, run.device)
    metrics = {'epoch': epoch + 1, 'lr': lr, 'train_loss': train_loss, 'train_acc': train_acc,
               'test_loss': test_loss, 'test_acc': test_acc, 'act_positive': positive, 'time_s': time.time() - t0}
    if validation is not None:
        metrics['val_loss'], metrics['val_acc'], _ = evaluate(run.final_model, *validation, run.device)
    if run.average is not None:   # the live model beside the average, to see which is ahead
        metrics['test_acc_live'] = evaluate(run.model, test_x, test_y, run.device)[1]
        if validation is not None:
            metrics['val_acc_live'] = evaluate(run.model, *validation, run.device)[1]
    for layer, (s, bits) in layer_stats(run.final_model).items():
        metrics[f's/{layer}'], metrics[f'entropy/{layer}'] = s, bits
    return metrics


def best_epoch(history):
    """The metrics of the epoch with the best validation accuracy (the earliest of equals)."""
    return max(history, key=lambda m: (m['val_acc'], -m['epoch']))


def record_epoch(run, metrics, writer, log):
    """Keep an epoch: the resumable checkpoint, metrics.csv, TensorBoard and the log line; with keep_best, the
    model of the best validation epoch so far in runs/<name>/best.pt."""
    run.history.append(metrics)
    if run.cfg['keep_best'] and best_epoch(run.history) is metrics:
        atomic_save({'epoch': metrics['epoch'], 'state_dict': run.final_model.state_dict()}, run.run_dir / 'best.pt')
    atomic_save({'model': run.model.state_dict(), 'optimizer': run.optimizer.state_dict(),
                 'average': run.average.state_dict() if run.average else None,
                 'epoch': metrics['epoch'], 'history': run.history, 'config': run.cfg}, run.checkpoint_path)
    write_metrics_csv(run.history, run.run_dir / 'metrics.csv')
    if writer is not None:
        for key, value in metrics.items():
            if key != 'epoch':
                writer.add_scalar(key, value, metrics['epoch'])
        writer.flush()
    log(format_epoch(metrics, run.cfg['num_epochs'], [name for name, _ in coded_layers(run.model)]))


def save_model(run, num_classes, log):
    """The finished run's model file (weights, config, metrics: all later steps need): the last epoch, or with
    keep_best the best validation epoch. The resumable checkpoint is then removed."""
    state, metrics = run.final_model.state_dict(), run.history[-1]
    if run.cfg['keep_best']:
        metrics = best_epoch(run.history)
        try:
            best = torch.load(run.run_dir / 'best.pt', map_location='cpu', weights_only=True)
        except Exception as e:
            raise OutputError(f"{run.run_dir / 'best.pt'} cannot be read ({type(e).__name__}): the best epoch is "
                              f"lost; the last epoch is in {run.checkpoint_path}; train again with --restart") from None
        if best['epoch'] != metrics['epoch']:
            raise OutputError(f"{run.run_dir / 'best.pt'} holds epoch {best['epoch']}, the best validation epoch "
                              f"is {metrics['epoch']}; resume with --restart")
        state = best['state_dict']
        log(f"Keeping epoch {metrics['epoch']}: validation accuracy {100 * metrics['val_acc']:.2f}%")
    atomic_save({'format': CHECKPOINT_FORMAT, 'run_name': run.name, 'config': run.cfg, 'num_classes': num_classes,
                 'state_dict': state, 'metrics': metrics, 'history': run.history}, run.model_path)
    run.checkpoint_path.unlink()
    shown = run.model_path.relative_to(PROJECT_DIR) if run.model_path.is_relative_to(PROJECT_DIR) else run.model_path
    kind = 'float QAT model' if coded_layers(run.final_model) else 'float model'   # the integer one: exportquant
    log(f"Saved {shown}: test accuracy {100 * metrics['test_acc']:.2f}% ({kind}), "
        f"{sum(m['time_s'] for m in run.history):.0f}s training")
    return run.model_path


def train(cfg, resume=False, restart=False, data=None, log=print, on_epoch_end=None, runs_dir=None, model_dir=None):
    """Train per cfg; returns the path of the saved model. Resumable per epoch from runs/<name>/checkpoint.pt.
    on_epoch_end(metrics) is called after each epoch is kept; runs_dir and model_dir replace runs/ and
    modeldata/."""
    torch.set_num_threads(thread_count(cfg))
    data, validation = split_validation(data or load_dataset(cfg['dataset'], log=log), cfg['validation_images'])
    with lock_run((runs_dir or RUNS_DIR) / run_name(cfg)):   # held from start to end, however the run ends
        run = start_run(cfg, resume, restart, data['num_classes'], log, runs_dir, model_dir)
        return train_epochs(run, data, validation, log, on_epoch_end)


def train_epochs(run, data, validation, log, on_epoch_end):
    """The epochs still to do, each kept as it ends; then the model file."""
    cfg = run.cfg
    params = sum(p.numel() for p in run.model.parameters())
    kind = cfg['QuantType'] if coded_layers(run.model) else 'float'   # a teacher, or every type 'None'
    log(f"Run {run.name}: {cfg['model']} {kind}, {params} weights, "
        f"{len(data['train_y'])} train images{' + as many augmented' if cfg['augmentation'] else ''}"
        f"{f', {len(validation[1])} validation images' if validation else ''}, "
        f"device {run.device}, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}")
    writer = _tensorboard(run.run_dir / 'tensorboard', run.epochs_done)
    try:
        for epoch in range(run.epochs_done, cfg['num_epochs']):
            try:
                metrics = run_epoch(run, data, epoch, validation)
            except Diverged as e:
                kept = (f"the {run.epochs_done} epoch(s) before it are kept in {run.checkpoint_path}"
                        if run.epochs_done else "nothing was saved")
                raise Diverged(f"training diverged: {e} of epoch {epoch + 1} (learning rate {lr_at(cfg, epoch):.3g}); "
                               f"a smaller learning_rate usually cures it. {kept}; no model was written") from None
            record_epoch(run, metrics, writer, log)
            if on_epoch_end is not None:
                on_epoch_end(metrics)
        return save_model(run, data['num_classes'], log)
    except KeyboardInterrupt:
        log(f"\nInterrupted. {run.epochs_done} epoch(s) are saved in {run.checkpoint_path}; continue with the "
            f"same arguments plus --resume.")
        raise
    finally:
        if writer is not None:
            writer.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog='config keys (key, default, meaning):\n' + describe_config())
    parser.add_argument('--params', default=None, help='YAML config (default: trainingparameters.yaml)')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='override a config key, e.g. --set num_epochs=10 (repeatable)')
    group = parser.add_mutually_exclusive_group()
    group.add_argument('--resume', action='store_true', help='continue the interrupted run of this config')
    group.add_argument('--restart', action='store_true', help='discard an unfinished run of this config')
    parser.add_argument('--skip-existing', action='store_true',
                        help='do nothing when the model of this exact config is already trained')
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.params, parse_overrides(args.set))
        ignored = ignored_keys(cfg)
        if ignored:
            one = len(ignored) == 1
            readers = [name for name, m in MODELS.items() if set(ignored) & set(m.model_keys)]
            print(f"note: {', '.join(f'{k}={cfg[k]!r}' for k in ignored)} only affect{'s' if one else ''} "
                  f"{' or '.join(readers)} models; {cfg['model']} ignores {'it' if one else 'them'}")
        done = MODEL_DIR / f'{run_name(cfg)}.pth'
        if args.skip_existing and done.exists():
            print(f"{done} is already trained for this config; skipping (delete it to retrain)")
            return 0
        train(cfg, resume=args.resume, restart=args.restart)
    except (ConfigError, DataError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == '__main__':
    stop_on_signals()
    sys.exit(main())
