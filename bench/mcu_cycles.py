"""Instructions per inference on the emulated CH32V003 (RV32EC) and CH32V002 (RV32EC + Zmmul), flash
and stack, per quantization type, for the FC 64/64/64 architecture.

    python bench/mcu_cycles.py [--epochs N] [--types 4bitsym,FP130,...]

Each type is trained briefly here (N epochs, default 2, seed 0; accuracy is not the point, though the
share of zero activations the kernels skip depends a little on training), exported, verified against
the Python reference and run on all 10,000 test images in QEMU with -icount (exact, repeatable counts).
The original BitNetMCU's 4bitsym checkpoint from ../shared is measured too, in both weight layouts.
Reference: the original engine on its 12k 4bitsym model needs 436,796 instructions per inference
(min 426,700, max 447,593), about 304,000 on its FP130 model; its firmware 14,008 bytes of flash and
404 bytes of stack. Target for a 12k 4bitsym model: <= 218,000, <= 13,500 bytes, <= 400 bytes.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'mcu'))
import exportquant  # noqa: E402
import firmware  # noqa: E402
import test_inference  # noqa: E402
import training  # noqa: E402
from BitNetMCU import load_checkpoint, load_config, to_int_model  # noqa: E402
from dataset import load_dataset  # noqa: E402

TYPES = ['Binary', 'Ternary', '2bitsym', '4bitsym', '4bit', '8bit', 'FP130', 'NF4']
ORIGINAL = ROOT.parent / 'shared' / 'original-checkpoints' / 'fc_4bitsym_64_64_64_v02.pth'


def measure(checkpoint, layout, work, data, targets=('CH32V003', 'CH32V002')):
    """Export, verify, build and run one model; returns a row of the table."""
    header, blob = work / 'model.h', work / 'test.bin'
    model, cfg, _ = load_checkpoint(checkpoint)
    int_model = to_int_model(model)
    int_model.layout = layout
    header.write_text(exportquant.header_text(int_model, Path(checkpoint).name))
    r = test_inference.verify(model, int_model, header, data, log=lambda *a: None)
    if r['mismatches']:
        raise SystemExit(f"{checkpoint}: C and Python disagree on {r['mismatches']} images")
    blob.write_bytes(test_inference.test_data_blob(r['images'], r['labels'], r['predictions']))
    row = {'accuracy': r['c_acc'], 'weights': exportquant.layer_table(int_model)[0]}
    for target in targets:
        build = work / target

        def make(goal):
            return subprocess.run(['make', '-C', str(ROOT / 'mcu'), f'TARGET_MCU={target}', f'MODEL_HEADER={header}',
                                   f'TEST_BLOB={blob}', f'BUILD={build}', f'PY={sys.executable}', str(build / goal)],
                                  capture_output=True, text=True)
        out = make('sim.elf')
        if out.returncode:
            raise SystemExit(out.stdout[-2000:] + out.stderr[-2000:])
        sim = firmware.run_qemu(build / 'sim.elf', blob, target)
        if sim['mismatches']:
            raise SystemExit(f"{checkpoint} on {target}: {sim['mismatches']} mismatches")
        row[target] = sim
        fits = make('flash.elf').returncode == 0     # 8bit 64/64/64 (25 KB of weights) cannot fit 16 KB
        row[target + ' flash'] = firmware.section_sizes(build / 'flash.elf')[0] if fits else None
        row[target + ' nomul'] = not firmware.multiply_uses(build / 'sim.elf')
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--types', default=','.join(TYPES))
    args = parser.parse_args()
    data = load_dataset('MNIST', log=lambda *a: None)
    print(f"{'model':34s} {'acc':>6s} {'weights':>7s} {'V003 mean':>9s} {'min':>7s} {'max':>7s} {'vs orig':>7s} "
          f"{'V002 mean':>9s} {'flash':>6s} {'stack':>5s} {'no mul':>6s}")

    def report(name, row):
        v3, v2 = row['CH32V003'], row['CH32V002']
        print(f"{name:34s} {100 * row['accuracy']:5.2f}% {sum(w[5] for w in row['weights']):7d} {v3['mean']:9.0f} "
              f"{v3['min']:7d} {v3['max']:7d} {v3['mean'] / 436796:6.2f}x {v2['mean']:9.0f} "
              f"{row['CH32V003 flash'] or '>16K':>6} {v3['stack']:5d} {'yes' if row['CH32V003 nomul'] else 'no':>6s}",
              flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if ORIGINAL.exists():
            for layout in ('input-major', 'output-major'):
                report(f"original 4bitsym v0.2, {layout}", measure(ORIGINAL, layout, work, data))
        training.MODEL_DIR, training.RUNS_DIR = work / 'modeldata', work / 'runs'
        for qtype in args.types.split(','):
            cfg = load_config(overrides=dict(QuantType=qtype, num_epochs=args.epochs, runtag='bench'))
            path = training.train(cfg, data=data, log=lambda *a: None)
            report(f"FC 64/64/64 {qtype}, {args.epochs} epochs", measure(path, 'input-major', work, data))


if __name__ == '__main__':
    main()
