"""Verification speed: seconds to run all 10,000 MNIST test images through the C engine (one cffi call)
and through the Python integer reference, and to compare every logit, after the one-time build.

    python bench/verify_speed.py [--checkpoint PATH] [--repeats N]
    python bench/verify_speed.py --quick     # one repetition

Default model: the original project's 4bitsym 64/64/64 checkpoint from ../shared (or --checkpoint).
Reference: the original BitNetMCU's per-image verification loop takes ~15 s here for 10,000 images.
Target: <= 1 s.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import load_checkpoint  # noqa: E402
from dataset import load_dataset, normalize  # noqa: E402
from fileio import PROJECT_DIR  # noqa: E402
from intmodel import encode_input, reference_logits, to_int_model  # noqa: E402
from cengine import build_engine, run_c  # noqa: E402
from modelheader import header_text  # noqa: E402

DEFAULT = PROJECT_DIR.parent / 'shared' / 'original-checkpoints' / 'fc_4bitsym_64_64_64_v02.pth'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', default=str(DEFAULT), help='model to verify (default: %(default)s)')
    parser.add_argument('--repeats', type=int, default=5, help='timed repetitions (median reported)')
    parser.add_argument('--quick', action='store_true', help='one repetition')
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    model, _, _ = load_checkpoint(args.checkpoint)
    int_model = to_int_model(model)
    data = load_dataset('MNIST')
    images = encode_input(normalize(data['test_x16']))
    with tempfile.TemporaryDirectory() as tmp:
        header = Path(tmp) / 'model.h'
        header.write_text(header_text(int_model, Path(args.checkpoint).name))
        start = time.perf_counter()
        ffi, lib = build_engine(header, log=lambda *a: None)
        build = time.perf_counter() - start
    times = {'C engine': [], 'Python reference': [], 'total (both + compare)': []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        c_logits, _ = run_c(ffi, lib, images, int_model.num_classes)
        t1 = time.perf_counter()
        py_logits = reference_logits(int_model, images)
        t2 = time.perf_counter()
        mismatches = int((c_logits != py_logits).any(axis=1).sum())
        t3 = time.perf_counter()
        times['C engine'].append(t1 - t0)
        times['Python reference'].append(t2 - t1)
        times['total (both + compare)'].append(t3 - t0)
    print(f"{len(images)} images, model {Path(args.checkpoint).name}, build (or cache load) {build:.2f}s, "
          f"{mismatches} mismatches")
    for name, values in times.items():
        print(f"  {name:24s} median {statistics.median(values):.3f}s  (runs: {' '.join(f'{v:.3f}' for v in values)})")
    total = statistics.median(times['total (both + compare)'])
    print(f"  vs the original's ~15 s per-image loop: {15 / total:.0f}x faster; target <= 1 s: "
          f"{'met' if total <= 1 else 'MISSED'}")
    return 1 if mismatches else 0


if __name__ == '__main__':
    sys.exit(main())
