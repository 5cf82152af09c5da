"""Prove the C engine computes exactly what the Python integer reference computes, on every test image.

    python test_inference.py                     # model of trainingparameters.yaml, header BitNetMCU_model.h
    python test_inference.py --checkpoint modeldata/x.pth --header mcu/models/x.h

Builds BitNetMCU_inference.c + the header into a Python extension (cffi; cached in build/cffi/, rebuilt
when a source changes), runs all test images through C in one call and through the Python reference,
compares every logit, prints the accuracies and the mismatch count (exit status 1 on any mismatch),
and writes BitNetMCU_MNIST_test_data.h for the host test program and the firmware.
"""
import argparse
import hashlib
import importlib.machinery
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

from BitNetMCU import LAYOUTS, PROJECT_DIR, ConfigError, ExportError, atomic_write, to_int_model
from dataset import DataError, load_dataset
from exportquant import (DEFAULT_OUTPUT, add_model_arguments, c_array, header_text, load_model_from_args,
                         test_set_predictions)

ENGINE_SOURCES = [PROJECT_DIR / 'BitNetMCU_inference.c', PROJECT_DIR / 'BitNetMCU_inference.h']
BUILD_DIR = PROJECT_DIR / 'build' / 'cffi'
TEST_DATA = PROJECT_DIR / 'BitNetMCU_MNIST_test_data.h'
TEST_BLOB = PROJECT_DIR / 'build' / 'BitNetMCU_MNIST_test_data.bin'
BLOB_MAGIC = b'BNMT'
SANITIZE_FLAGS = ['-fsanitize=address,undefined', '-fno-sanitize-recover=all', '-fno-omit-frame-pointer']

FC_TYPES = ['Binary', '2bitsym', '4bitsym', '4bit', '8bit', 'FP130', 'NF4']
KERNEL_CDEF = ''.join(
    f"void BitNetMCU_fc_{t}(const int8_t *input, uint32_t n_in, const void *weights, int32_t *sums, "
    f"uint32_t n_out, int32_t zero, const int16_t *rowsums);\n"
    f"void BitNetMCU_fc_rows_{t}(const int8_t *input, uint32_t n_in, const void *weights, int32_t *sums, "
    "uint32_t n_out);\n" for t in FC_TYPES) + """
void BitNetMCU_fc_rows_Ternary(const int8_t *input, uint32_t n_in, const void *weights, int32_t *sums,
                               uint32_t n_out);
uint32_t BitNetMCU_shiftnorm_relu(const int32_t *input, int8_t *output, uint32_t n);
void BitNetMCU_conv3x3_relu(const int32_t *input, uint32_t size, const int8_t *weights, uint32_t shift,
                            int32_t *output);
void BitNetMCU_conv3x3_relu_image(const int8_t *input, uint32_t size, const int8_t *weights, uint32_t shift,
                                  int32_t *output);
void BitNetMCU_maxpool2(const int32_t *input, uint32_t size, int32_t *output);
uint32_t BitNetMCU_argmax(const int32_t *values, uint32_t n);
"""
MODEL_CDEF = "void bitnetmcu_run_batch(const int8_t *images, uint32_t n, int32_t *logits, uint32_t *classes);"
MODEL_WRAPPER = """
#include "{header}"
/* Runs n images (BITNETMCU_MODEL_INPUTS int8 each) through the generated model. */
void bitnetmcu_run_batch(const int8_t *images, uint32_t n, int32_t *logits, uint32_t *classes)
{{
    for (uint32_t i = 0; i < n; i++, images += BITNETMCU_MODEL_INPUTS, logits += BITNETMCU_MODEL_CLASSES)
        classes[i] = BitNetMCU_model_infer(images, logits);
}}
"""


def build_engine(model_header=None, sanitize=False, log=print):
    """Compile the C engine (and a model header, if given) into a Python extension; returns (ffi, lib).
    Cached by a hash of every input, so a changed source or header is always rebuilt."""
    import cffi
    flags = ['-O2', '-std=c99'] + (SANITIZE_FLAGS if sanitize else [])
    header_text_ = Path(model_header).read_text() if model_header else ''
    digest = hashlib.sha256()
    for part in [p.read_bytes() for p in ENGINE_SOURCES] + [header_text_.encode(), ' '.join(flags).encode(),
                                                             KERNEL_CDEF.encode(), MODEL_WRAPPER.encode()]:
        digest.update(part)
    name = f"_bitnetmcu_{digest.hexdigest()[:16]}"
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    source = '#include "BitNetMCU_inference.h"\n'
    cdef = KERNEL_CDEF
    if model_header:
        copy = BUILD_DIR / f'{name}_model.h'   # the exact text that was hashed
        copy.write_text(header_text_)
        source += MODEL_WRAPPER.format(header=copy.name)
        cdef += MODEL_CDEF
    built = list(BUILD_DIR.glob(f'{name}.*.so')) + list(BUILD_DIR.glob(f'{name}.so'))
    if not built:
        ffi = cffi.FFI()
        ffi.cdef(cdef)
        ffi.set_source(name, source, sources=[str(ENGINE_SOURCES[0])], include_dirs=[str(PROJECT_DIR), str(BUILD_DIR)],
                       extra_compile_args=flags, extra_link_args=flags if sanitize else [])
        start = time.time()
        built = [Path(ffi.compile(tmpdir=str(BUILD_DIR), verbose=False))]
        log(f"Built C engine extension {built[0].name} in {time.time() - start:.1f}s")
    spec = importlib.util.spec_from_file_location(name, built[0],
                                                  loader=importlib.machinery.ExtensionFileLoader(name, str(built[0])))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ffi, module.lib


def run_c(ffi, lib, images, num_classes):
    """All images through the C model in one call: (logits, predicted classes)."""
    images = np.ascontiguousarray(images, dtype=np.int8)
    logits = np.zeros((len(images), num_classes), dtype=np.int32)
    classes = np.zeros(len(images), dtype=np.uint32)
    lib.bitnetmcu_run_batch(ffi.from_buffer('int8_t[]', images), len(images),
                            ffi.from_buffer('int32_t[]', logits), ffi.from_buffer('uint32_t[]', classes))
    return logits, classes


def test_data_header(images, labels, predictions):
    """BitNetMCU_MNIST_test_data.h: int8 images, labels and the predictions the engine must reproduce."""
    n = len(images)
    return ("/* BitNetMCU_MNIST_test_data.h: generated by test_inference.py. Do not edit.\n"
            " * MNIST test images encoded as the MCU sees them, their labels, and the expected predictions. */\n"
            "#ifndef BITNETMCU_MNIST_TEST_DATA_H\n#define BITNETMCU_MNIST_TEST_DATA_H\n\n#include <stdint.h>\n\n"
            f"#define BITNETMCU_TEST_IMAGES {n}\n\n"
            + c_array('BitNetMCU_test_images', np.asarray(images, dtype=np.int8))
            + c_array('BitNetMCU_test_labels', np.asarray(labels, dtype=np.int8))
            + c_array('BitNetMCU_test_predictions', np.asarray(predictions, dtype=np.int8))
            + "\n#endif\n")


def test_data_blob(images, labels, predictions):
    """The test set for the emulated firmware (loaded by QEMU into RAM): "BNMT", uint32 count (little
    endian), int8 images[count][256], uint8 labels[count], uint8 predictions[count]."""
    images = np.asarray(images, dtype=np.int8)
    return (BLOB_MAGIC + len(images).to_bytes(4, 'little') + images.tobytes()
            + np.asarray(labels, np.uint8).tobytes() + np.asarray(predictions, np.uint8).tobytes())


def blob_to_header(blob_path, n, header_path):
    """The first n images of a test-data blob as a test-data header (for the flash-sized firmware)."""
    data = Path(blob_path).read_bytes()
    if data[:4] != BLOB_MAGIC:
        raise ExportError(f"{blob_path} is not a BitNetMCU test-data blob; run test_inference.py")
    count = int.from_bytes(data[4:8], 'little')
    images = np.frombuffer(data, np.int8, count * 256, 8).reshape(count, 256)
    labels = np.frombuffer(data, np.uint8, count, 8 + count * 256)
    predictions = np.frombuffer(data, np.uint8, count, 8 + count * 257)
    atomic_write(header_path, test_data_header(images[:n], labels[:n], predictions[:n]))


def verify(model, int_model, header, data, log=print):
    """Compare C and Python on every test image. Returns a dict of accuracies, mismatches and timings."""
    ffi, lib = build_engine(header, log=log)
    p = test_set_predictions(model, int_model, data)
    images, y, float_pred, py_logits = p['images'], p['labels'], p['float_pred'], p['logits']
    start = time.perf_counter()
    c_logits, c_classes = run_c(ffi, lib, images, int_model.num_classes)
    c_time = time.perf_counter() - start
    logit_mismatch = int((c_logits != py_logits).any(axis=1).sum())
    class_mismatch = int((c_classes != py_logits.argmax(1)).sum())
    return {'n': len(y), 'float_acc': float((float_pred == y).mean()),
            'python_acc': float((py_logits.argmax(1) == y).mean()), 'c_acc': float((c_classes == y).mean()),
            'mismatches': max(logit_mismatch, class_mismatch), 'c_time': c_time, 'python_time': p['python_time'],
            'images': images, 'labels': y, 'predictions': c_classes}


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
        model, cfg, _, path = load_model_from_args(args)
        int_model = to_int_model(model)
        header = Path(args.header)
        if not header.exists():
            raise ConfigError(f"{header} does not exist: run python exportquant.py first")
        text = header.read_text()
        for int_model.layout in LAYOUTS:
            if text == header_text(int_model, path.name):
                break
        else:
            raise ExportError(f"{header} was not exported from {path} (or is out of date); "
                              f"run python exportquant.py with the same arguments")
        r = verify(model, int_model, header, load_dataset(cfg['dataset']))
    except (ConfigError, ExportError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Test accuracy on {r['n']} images: float model {100 * r['float_acc']:.2f}%, "
          f"Python integer {100 * r['python_acc']:.2f}%, C {100 * r['c_acc']:.2f}%")
    print(f"C vs Python: {r['mismatches']} mismatching images (every logit compared); "
          f"C {r['c_time']:.3f}s, Python {r['python_time']:.3f}s for {r['n']} images")
    n = max(0, min(args.test_images, r['n']))
    atomic_write(args.test_data, test_data_header(r['images'][:n], r['labels'][:n], r['predictions'][:n]))
    print(f"Wrote {args.test_data} ({n} images)")
    atomic_write(args.test_blob, test_data_blob(r['images'], r['labels'], r['predictions']))
    print(f"Wrote {args.test_blob} ({r['n']} images)")
    return 1 if r['mismatches'] else 0


if __name__ == '__main__':
    sys.exit(main())
