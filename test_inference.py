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
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from config import ConfigError
from dataset import DataError, load_dataset
from exportquant import DEFAULT_OUTPUT, add_model_arguments, header_layout, header_text, load_model_from_args, \
    test_set_predictions
from fileio import PROJECT_DIR, OutputError, atomic_write, refuse_overwriting_inputs
from intmodel import ExportError, to_int_model
from testdata import StaleDataError, header_fingerprint, model_header_text, write_blob, write_data_header

ENGINE_SOURCES = [PROJECT_DIR / 'BitNetMCU_inference.c', PROJECT_DIR / 'BitNetMCU_inference.h']
BUILD_DIR = PROJECT_DIR / 'build' / 'cffi'
TEST_DATA = PROJECT_DIR / 'BitNetMCU_MNIST_test_data.h'
TEST_BLOB = PROJECT_DIR / 'build' / 'BitNetMCU_MNIST_test_data.bin'
SANITIZE_FLAGS = ['-fsanitize=address,undefined', '-fno-sanitize-recover=all', '-fno-omit-frame-pointer']

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


def engine_cdef():
    """The engine's declarations for cffi, taken from BitNetMCU_inference.h itself: run through the C
    preprocessor (its kernel macros expanded) with an empty <stdint.h> (cffi knows the stdint types)."""
    cc = os.environ.get('CC', 'cc')
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / 'stdint.h').write_text('')
        try:
            out = subprocess.run([cc, '-E', '-P', '-nostdinc', '-I', tmp, str(ENGINE_SOURCES[1])],
                                 capture_output=True, text=True)
        except FileNotFoundError:
            raise ExportError(f"no C compiler {cc!r}: install gcc (Debian: apt-get install gcc) or set CC") from None
    if out.returncode:
        raise ExportError(f"{cc} -E {ENGINE_SOURCES[1].name} failed: {out.stderr[-500:]}")
    return out.stdout


def intact(library):
    """Whether a cached engine library is whole: its bytes match the SHA-256 written beside it after it was
    complete (a file cut short by a full disk or a kill would crash the process that loads it)."""
    digest = library.with_name(library.name + '.sha256')
    try:
        return hashlib.sha256(library.read_bytes()).hexdigest() == digest.read_text().strip()
    except OSError:
        return False


def compile_engine(name, library, model_text, flags, sanitize, log):
    """Compile the engine (with the model wrapper when model_text is given) into `library`: in a private
    folder, then moved into place with its checksum, so processes building it at once never see half a file."""
    import cffi
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD_DIR, prefix='.build-') as tmp:
        source, cdef = '#include "BitNetMCU_inference.h"\n', engine_cdef()
        if model_text:
            (Path(tmp) / f'{name}_model.h').write_text(model_text)   # the exact text that was hashed
            source += MODEL_WRAPPER.format(header=f'{name}_model.h')
            cdef += MODEL_CDEF
        ffi = cffi.FFI()
        ffi.cdef(cdef)
        ffi.set_source(name, source, sources=[str(ENGINE_SOURCES[0])], include_dirs=[str(PROJECT_DIR), tmp],
                       extra_compile_args=flags, extra_link_args=flags if sanitize else [])
        start = time.time()
        try:
            compiled = Path(ffi.compile(tmpdir=tmp, verbose=False))
        except Exception as e:   # cffi's VerificationError, the compiler's CompileError
            raise ExportError(f"the C engine did not compile ({type(e).__name__}: {str(e)[-300:]})") from None
        data = compiled.read_bytes()
    atomic_write(library, data)
    atomic_write(library.with_name(library.name + '.sha256'), hashlib.sha256(data).hexdigest() + '\n')
    log(f"Built C engine extension {library.name} in {time.time() - start:.1f}s")


def build_engine(model_header=None, sanitize=False, log=print):
    """Compile the C engine (and a model header, if given) into a Python extension; returns (ffi, lib).
    Cached by a hash of every input, so a changed source or header is always rebuilt."""
    flags = ['-O2', '-std=c99'] + (SANITIZE_FLAGS if sanitize else [])
    header_text_ = Path(model_header).read_text() if model_header else ''
    digest = hashlib.sha256()
    for part in [p.read_bytes() for p in ENGINE_SOURCES] + [header_text_.encode(), ' '.join(flags).encode(),
                                                             MODEL_WRAPPER.encode()]:
        digest.update(part)
    name = f"_bitnetmcu_{digest.hexdigest()[:16]}"
    built = BUILD_DIR / f'{name}.so'
    if not intact(built):
        compile_engine(name, built, model_header and header_text_, flags, sanitize, log)
    spec = importlib.util.spec_from_file_location(name, built,
                                                  loader=importlib.machinery.ExtensionFileLoader(name, str(built)))
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


def verify(model, int_model, header, data, log=print, dataset='the dataset'):
    """Compare C and Python on every test image. Returns a dict of accuracies, mismatches and timings."""
    p = test_set_predictions(model, int_model, data, dataset)
    ffi, lib = build_engine(header, log=log)
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
