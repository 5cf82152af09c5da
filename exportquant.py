"""Export a trained model to BitNetMCU_model.h for the C engine.

    python exportquant.py                                 # model of trainingparameters.yaml
    python exportquant.py --checkpoint modeldata/x.pth --output mcu/models/x.h --plots plots/
    python exportquant.py --checkpoint original.pth --set QuantType=4bitsym   # original BitNetMCU file

Prints a summary (per layer: type, shape, bits, bytes; the RAM the C engine needs), weight statistics,
and the accuracy of the float model and of the integer model on the MNIST test set.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from BitNetMCU import LAYOUTS, code_entropy_bits
from checkpoint import load_checkpoint
from config import ConfigError, load_config, parse_overrides, run_name
from dataset import DataError, load_dataset
from fileio import PROJECT_DIR, OutputError, atomic_write, refuse_overwriting_inputs
from intmodel import ExportError, pack_model, to_int_model
from modelheader import activation_ram, header_text
from pipeline import predict_test_set

DEFAULT_OUTPUT = PROJECT_DIR / 'BitNetMCU_model.h'
MAX_DISAGREEMENT = 0.03   # share of test images where float and integer model may differ before export refuses


def add_model_arguments(parser):
    """The arguments exportquant.py and test_inference.py share to find a model."""
    parser.add_argument('--params', default=None, help='YAML config (default: trainingparameters.yaml)')
    parser.add_argument('--checkpoint', default=None,
                        help='model file (default: modeldata/<run name of --params>.pth)')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='config override; for checkpoints without a config (the original project\'s)')


def load_model_from_args(args):
    """(model, config, metrics, checkpoint path) from --params/--checkpoint/--set."""
    overrides = parse_overrides(args.set)
    path = args.checkpoint
    if path is None:
        path = PROJECT_DIR / 'modeldata' / f'{run_name(load_config(args.params, overrides))}.pth'
        if not path.exists():
            raise ConfigError(f"{path} does not exist: train it first (python training.py"
                              f"{' --params ' + args.params if args.params else ''}), or pass --checkpoint")
    # --params names the config of an original checkpoint (given by --checkpoint) or finds ours
    model, cfg, metrics = load_checkpoint(path, args.params if args.checkpoint else None, overrides)
    return model, cfg, metrics, Path(path)


# ------------------------------------------------------------------------------------------------
# Statistics and summary
# ------------------------------------------------------------------------------------------------

def weight_stats(op):
    codes, counts = np.unique(op.weights, return_counts=True)
    entropy = code_entropy_bits(torch.from_numpy(op.weights))
    return {'min': int(op.weights.min()), 'max': int(op.weights.max()), 'mean': float(op.weights.mean()),
            'std': float(op.weights.std()), 'codes': dict(zip(codes.tolist(), counts.tolist())),
            'entropy': entropy, 'capacity': entropy / op.qtype.bits}


def layer_table(packed):
    """Rows of (name, kind, shape, type, bits/weight, flash bytes), one per packed layer."""
    return [(layer.op.name, layer.op.kind.name, *layer.op.kind.summary(layer), layer.op.qtype.name, layer.nbytes)
            for layer in packed]


def print_summary(int_model, packed, log=print):
    rows = layer_table(packed)
    log(f"{'layer':12s} {'kind':5s} {'shape':>16s} {'type':>8s} {'bits':>5s} {'bytes':>7s}")
    for name, kind, shape, bits, qtype, nbytes in rows:
        log(f"{name:12s} {kind:5s} {shape:>16s} {qtype:>8s} {bits:>5} {nbytes:7d}")
    log(f"{'total':12s} {'':5s} {'':>16s} {'':>8s} {'':>5s} {sum(r[5] for r in rows):7d}"
        f"   weights; activation buffers (RAM): {activation_ram(int_model, packed)} bytes")
    for op in int_model.weight_ops():
        st = weight_stats(op)
        log(f"  {op.name:12s} {op.qtype.name:8s} min {st['min']:4d} max {st['max']:4d} mean {st['mean']:6.2f} "
            f"std {st['std']:6.2f} entropy {st['entropy']:.2f} bits ({100 * st['capacity']:.0f}% of capacity)")


# ------------------------------------------------------------------------------------------------
# Accuracy and plots
# ------------------------------------------------------------------------------------------------

def write_plots(int_model, directory, log=print):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ops = int_model.weight_ops()
    fig, axes = plt.subplots(1, len(ops), figsize=(3 * len(ops), 2.6), squeeze=False)
    for ax, op in zip(axes[0], ops):
        codes, counts = np.unique(op.weights, return_counts=True)
        ax.bar(codes, counts, width=0.8 * (np.diff(codes).min() if len(codes) > 1 else 1))
        ax.set_title(f"{op.name}\n{op.qtype.name}, {weight_stats(op)['entropy']:.2f} bits", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(directory / 'weight_histograms.png', dpi=120)
    plt.close(fig)
    first = ops[0]
    if first.weights.shape[1:] == (256,):   # a fully connected layer reading the image
        n = first.weights.shape[0]
        cols = int(np.ceil(np.sqrt(n)))
        fig, axes = plt.subplots(int(np.ceil(n / cols)), cols, figsize=(cols, np.ceil(n / cols)), squeeze=False)
        limit = np.abs(first.weights).max()
        for i, ax in enumerate(axes.flat):
            ax.axis('off')
            if i < n:
                ax.imshow(first.weights[i].reshape(16, 16), cmap='RdBu_r', vmin=-limit, vmax=limit)
        fig.suptitle(f"{first.name}: weights of each output as 16x16 tiles", fontsize=9)
        fig.savefig(directory / 'first_layer_tiles.png', dpi=120)
        plt.close(fig)
    log(f"Plots written to {directory}/")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument('--output', default=str(DEFAULT_OUTPUT), help='header to write (default: %(default)s)')
    parser.add_argument('--layout', default=LAYOUTS[0], choices=LAYOUTS,
                        help='weight layout: input-major (fast, default) or output-major (the original '
                             'BitNetMCU layout, interchangeable weight arrays)')
    parser.add_argument('--plots', default=None, metavar='DIR', help='write weight histograms and tiles (PNG)')
    parser.add_argument('--no-eval', action='store_true',
                        help='skip the test-set accuracy report and the float-vs-integer check')
    parser.add_argument('--force', action='store_true',
                        help=f'write the header even when float and integer model disagree on more than '
                             f'{100 * MAX_DISAGREEMENT:.0f}%% of the test images')
    args = parser.parse_args(argv)
    try:
        model, cfg, metrics, path = load_model_from_args(args)
        refuse_overwriting_inputs({'--output': args.output}, {'--checkpoint': path, '--params': args.params})
        if args.plots and Path(args.plots).exists() and not Path(args.plots).is_dir():
            raise OutputError(f"--plots {args.plots} is a file; give a folder for the plots (it is created)")
        int_model = to_int_model(model)
        print(f"Model {path.name}: {cfg['model']}, {cfg['QuantType']}")
        print_summary(int_model, pack_model(int_model, args.layout))
        if not args.no_eval:   # before anything is written: a broken export never replaces a good header
            p = predict_test_set(model, int_model, load_dataset(cfg['dataset']), cfg['dataset'])
            y, float_pred, int_pred = p['labels'], p['float_pred'], p['logits'].argmax(1)
            disagree = float((float_pred != int_pred).mean())
            print(f"Test accuracy on {len(y)} images: float model {100 * (float_pred == y).mean():.2f}%, "
                  f"integer model {100 * (int_pred == y).mean():.2f}%; "
                  f"they disagree on {int((float_pred != int_pred).sum())} images")
            if disagree > MAX_DISAGREEMENT and not args.force:
                raise ExportError(f"the float and the integer model disagree on {100 * disagree:.1f}% of the test "
                                  f"images (more than {100 * MAX_DISAGREEMENT:.0f}%): the integer model is not the "
                                  f"trained one (wrong QuantType or clipping for this checkpoint?); nothing was "
                                  f"written. --force writes it anyway")
        atomic_write(args.output, header_text(int_model, path.name, args.layout))
        print(f"Wrote {args.output}")
        if args.plots:
            try:
                write_plots(int_model, args.plots)
            except OSError as e:
                raise OutputError(f"--plots {args.plots}: {e.strerror}; give a writable folder (the header is "
                                  f"written: {args.output})") from None
    except (ConfigError, ExportError, DataError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
