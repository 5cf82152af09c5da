"""Prove the C engine computes exactly what the Python integer reference computes, on every test image.

    python test_inference.py                     # model of trainingparameters.yaml, header BitNetMCU_model.h
    python test_inference.py --checkpoint modeldata/x.pth --header mcu/models/x.h

Builds BitNetMCU_inference.c + the header into a Python extension (cffi; cached in build/cffi/, rebuilt
when a source changes), runs all test images through C in one call and through the Python reference,
compares every logit, prints the accuracies and the mismatch count (exit status 1 on any mismatch),
and writes BitNetMCU_MNIST_test_data.h for the host test program and the firmware.
"""
import argparse
import sys
from pathlib import Path

from config import ConfigError
from dataset import DataError, load_dataset
from exportquant import DEFAULT_OUTPUT, add_model_arguments, load_model_from_args
from fileio import PROJECT_DIR, OutputError, refuse_overwriting_inputs
from intmodel import ExportError, to_int_model
from modelheader import header_layout, header_text
from pipeline import verify
from testdata import StaleDataError, header_fingerprint, model_header_text, write_blob, write_data_header

TEST_DATA = PROJECT_DIR / 'BitNetMCU_MNIST_test_data.h'
TEST_BLOB = PROJECT_DIR / 'build' / 'BitNetMCU_MNIST_test_data.bin'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument('--header', default=str(DEFAULT_OUTPUT), help='exported header (default: %(default)s)')
    parser.add_argument('--test-data', default=str(TEST_DATA), help='test-data header to write (default: %(default)s)')
    parser.add_argument('--test-blob', default=str(TEST_BLOB),
                        help='all test images for the emulated firmware (default: %(default)s)')
    parser.add_argument('--test-images', type=int, default=1000,
                        help='images in the test-data header (default: %(default)s)')
    args = parser.parse_args(argv)
    try:
        if args.test_images < 1:
            raise ConfigError(f"--test-images {args.test_images}: give 1 or more (the C test program needs an image)")
        model, cfg, _, path = load_model_from_args(args)
        refuse_overwriting_inputs({'--test-data': args.test_data, '--test-blob': args.test_blob},
                                  {'--checkpoint': path, '--header': args.header, '--params': args.params})
        int_model = to_int_model(model)
        header = Path(args.header)
        text = model_header_text(header)
        model_fingerprint = header_fingerprint(header)
        if text != header_text(int_model, path.name, header_layout(text, header)):
            raise ExportError(f"{header} was not exported from {path} (or is out of date); "
                              f"run python exportquant.py with the same arguments")
        r = verify(model, int_model, header, load_dataset(cfg['dataset']), dataset=cfg['dataset'])
        print(f"Test accuracy on {r['n']} images: float model {100 * r['float_acc']:.2f}%, "
              f"Python integer {100 * r['python_acc']:.2f}%, C {100 * r['c_acc']:.2f}%")
        print(f"C vs Python: {r['mismatches']} mismatching images (every logit compared); "
              f"C {r['c_time']:.3f}s, Python {r['python_time']:.3f}s for {r['n']} images")
        n = max(0, min(args.test_images, r['n']))
        write_data_header(args.test_data, r['images'][:n], r['labels'][:n], r['predictions'][:n], model_fingerprint)
        print(f"Wrote {args.test_data} ({n} images)")
        write_blob(args.test_blob, r['images'], r['labels'], r['predictions'], model_fingerprint)
        print(f"Wrote {args.test_blob} ({r['n']} images)")
    except (ConfigError, ExportError, DataError, OutputError, StaleDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if r['mismatches'] else 0


if __name__ == '__main__':
    sys.exit(main())
