"""Instructions per inference on the emulated CH32V003 (RV32EC) and CH32V002 (RV32EC + Zmmul), flash
and stack, per quantization type, for the FC 64/64/64 architecture.

    python bench/mcu_cycles.py [--epochs N] [--types 4bitsym,FP130,...]
    python bench/mcu_cycles.py --quick       # seconds: the original checkpoint, CH32V003, 500 images

Each type is trained briefly here (N epochs, default 2, seed 0; accuracy is not the point, though the
share of zero activations the kernels skip depends a little on training), exported, verified against
the Python reference and run on all 10,000 test images in QEMU with -icount (exact, repeatable counts).
The original BitNetMCU's 4bitsym checkpoint from ../shared is measured too, in both weight layouts.
Reference: the original engine on its 12k 4bitsym model needs 436,796 instructions per inference
(min 426,700, max 447,593), about 304,000 on its FP130 model; its firmware 14,008 bytes of flash and
404 bytes of stack. Target for a 12k 4bitsym model: <= 218,000, <= 13,500 bytes, <= 400 bytes.
"""
import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import pipeline  # noqa: E402
import training  # noqa: E402
from BitNetMCU import EXPORTABLE_TYPES, LAYOUTS  # noqa: E402
from chips import CHIPS  # noqa: E402
from config import load_config  # noqa: E402
from dataset import load_dataset  # noqa: E402

ORIGINAL = ROOT.parent / 'shared' / 'original-checkpoints' / 'fc_4bitsym_64_64_64_v02.pth'
ORIGINAL_INSTRUCTIONS = 436796


def report(name, row, targets):
    v3 = row[targets[0]]
    v2 = row.get('CH32V002')
    print(f"{name:34s} {100 * row['verify']['c_acc']:5.2f}% {sum(p.nbytes for p in row['packed']):7d} "
          f"{v3['sim']['mean']:9.0f} {v3['sim']['min']:7d} {v3['sim']['max']:7d} "
          f"{v3['sim']['mean'] / ORIGINAL_INSTRUCTIONS:6.2f}x {v2['sim']['mean'] if v2 else float('nan'):9.0f} "
          f"{v3['flash'] or '>16K':>6} {v3['sim']['stack']:5d} {'yes' if v3['nomul'] else 'no':>6s}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--epochs', type=int, default=2, help='training epochs per type (default: %(default)s)')
    parser.add_argument('--types', default=','.join(EXPORTABLE_TYPES), help='comma-separated (default: all)')
    parser.add_argument('--quick', action='store_true',
                        help='seconds: only the original checkpoint (or 4bitsym without ../shared), '
                             'CH32V003, the first 500 test images')
    args = parser.parse_args()
    unknown = [t for t in args.types.split(',') if t not in EXPORTABLE_TYPES]
    if unknown:
        sys.exit(f"error: unknown or unexportable types {unknown}; valid: {', '.join(EXPORTABLE_TYPES)}")
    data = load_dataset('MNIST', log=lambda *a: None)
    targets = ('CH32V003',) if args.quick else tuple(CHIPS)
    images = 500 if args.quick else None
    print(f"{'model':34s} {'acc':>6s} {'weights':>7s} {'V003 mean':>9s} {'min':>7s} {'max':>7s} {'vs orig':>7s} "
          f"{'V002 mean':>9s} {'flash':>6s} {'stack':>5s} {'no mul':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if ORIGINAL.exists():
            for layout in LAYOUTS[:1] if args.quick else LAYOUTS:
                row = pipeline.measure_model(ORIGINAL, work, data, layout, targets, images=images)
                report(f"original 4bitsym v0.2, {layout}", row, targets)
            if args.quick:
                return
        training.MODEL_DIR, training.RUNS_DIR = work / 'modeldata', work / 'runs'
        for qtype in ['4bitsym'] if args.quick else args.types.split(','):
            overrides = dict(model='FCMNIST', network_width3=64, QuantType=qtype,
                             num_epochs=1 if args.quick else args.epochs, runtag='bench')
            train_data = data if not args.quick else {**data, 'train_x28': data['train_x28'][:3000],
                                                      'train_x16': data['train_x16'][:3000],
                                                      'train_y': data['train_y'][:3000]}
            path = training.train(load_config(overrides=overrides), data=train_data, log=lambda *a: None)
            row = pipeline.measure_model(path, work, data, LAYOUTS[0], targets, images=images)
            report(f"FC 64/64/64 {qtype}, {overrides['num_epochs']} epochs", row, targets)


if __name__ == '__main__':
    main()
