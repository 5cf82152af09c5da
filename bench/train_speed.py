"""Training speed: seconds per epoch (60k clean + 60k augmented MNIST images) on this machine.

    python bench/train_speed.py [--epochs N] [--threads T] [--models fc,cnn,cnn_v003]
    python bench/train_speed.py --quick      # seconds: one FC epoch on 6,000 images
    python bench/train_speed.py --models fc --side-by-side 2 --threads 1   # two trainings at once

Reports the median over N epochs, each timed from epoch data generation to the last optimizer step
(the test-set evaluation is left out, as in the reference figures below). Reference: the original
BitNetMCU on this 2-core machine needs 38.9 s per FC epoch (median of 5) and 88 s per CNN epoch.
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from BitNetMCU import build_model  # noqa: E402
from config import load_config  # noqa: E402
from dataset import load_dataset  # noqa: E402
from training import epoch_data, make_optimizer, pick_device, thread_count, train_epoch  # noqa: E402

CASES = {   # key: (title, config overrides, the original's s/epoch, our target s/epoch)
    'fc': ('FC 4bitsym 64/64/64', dict(model='FCMNIST', network_width3=64), 38.9, 3.5),
    'cnn': ('CNN 64 wide, 96/64', dict(model='CNNMNIST', cnn_width=64, network_width1=96,
                                       network_width2=64, network_width3=0), 88.0, 30.0),
    # the CH32V003 zoo CNN's layers (configs/cnn_v003.yaml); the original has no int8-activation CNN
    'cnn_v003': ('CNN 64 wide, int8 planes, FP130 convs', dict(model='CNNMNIST', cnn_width=64, conv_activations='int8',
                 conv_QuantType='FP130', network_width1=96, network_width2=64, network_width3=0), None, 30.0),
}


def time_epochs(overrides, epochs, data, threads):
    cfg = load_config(overrides=overrides)
    device = pick_device(cfg)
    torch.set_num_threads(threads or thread_count(cfg))
    torch.manual_seed(0)
    model = build_model(cfg, data['num_classes']).to(device)
    optimizer = make_optimizer(model, cfg)
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        x, y = epoch_data(data, cfg, epoch)
        train_epoch(model, optimizer, x, y, cfg, device, desc=f'epoch {epoch + 1}')
        times.append(time.perf_counter() - start)
    return times


def side_by_side(n):
    """n copies of this command (without --side-by-side) started together; their tables, one after another."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith('--side-by-side'):
            skip = arg == '--side-by-side'
            continue
        argv.append(arg)
    procs = [subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True) for _ in range(n)]
    for i, proc in enumerate(procs, 1):
        out = proc.communicate()[0]
        print(f"process {i} of {n} side by side:\n{out}", end='')
        if proc.returncode:
            sys.exit(f"error: process {i} failed (exit {proc.returncode})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--epochs', type=int, default=3, help='epochs timed per model (median reported)')
    parser.add_argument('--models', default='fc,cnn,cnn_v003', help='comma-separated: ' + ', '.join(CASES))
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: as training.py picks, config key '
                                                               'threads)')
    parser.add_argument('--side-by-side', type=int, default=1, metavar='N',
                        help='run N of these benchmarks at once, as separate processes (a sweep, a test run beside '
                             'a training), and print each one\'s table')
    parser.add_argument('--quick', action='store_true', help='seconds: one FC epoch on the first 6,000 images '
                                                             '(not comparable with the reference)')
    args = parser.parse_args()
    if args.side_by_side > 1:
        return side_by_side(args.side_by_side)
    unknown = [key for key in args.models.split(',') if key not in CASES]
    if unknown:
        sys.exit(f"error: unknown models {unknown}; valid: {', '.join(CASES)}")
    data = load_dataset('MNIST')
    models, epochs = args.models.split(','), args.epochs
    if args.quick:
        models, epochs = ['fc'], 1
        data = {**data, **{key: data[key][:6000] for key in ('train_x28', 'train_x16', 'train_y')}}
    print(f"{'model':40s} {'median s/epoch':>14s} {'all runs':>24s} {'original':>9s} {'speed-up':>9s} {'target':>7s}")
    for key in models:
        title, overrides, original, target = CASES[key]
        times = time_epochs(overrides, epochs, data, args.threads)
        med = statistics.median(times)
        runs = ' '.join(f'{t:.2f}' for t in times)
        if args.quick:   # a tenth of an epoch: no comparison with the full-epoch figures
            print(f"{title:40s} {med:14.2f} {runs:>24s}   (quick: 6,000 images, not comparable)")
            continue
        verdict = 'met' if med <= target else 'MISSED'
        versus = f"{original:9.1f} {original / med:8.1f}x" if original else f"{'-':>9s} {'-':>9s}"
        print(f"{title:40s} {med:14.2f} {runs:>24s} {versus} {target:5.1f} {verdict}")


if __name__ == '__main__':
    main()
