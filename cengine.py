"""The C engine as a Python extension (cffi): BitNetMCU_inference.c, and a model header when given, compiled once
per distinct input and cached in build/cffi/.

    ffi, lib = build_engine('BitNetMCU_model.h')      # lib.bitnetmcu_run_batch and every engine kernel
    logits, classes = run_c(ffi, lib, images, 10)

Used by test_inference.py (C against the Python reference), pipeline.py, the kernel tests and bench/.
"""
import hashlib
import importlib.machinery
import importlib.util
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from fileio import PROJECT_DIR, atomic_write
from intmodel import ExportError

ENGINE_SOURCES = [PROJECT_DIR / 'BitNetMCU_inference.c', PROJECT_DIR / 'BitNetMCU_inference.h']
BUILD_DIR = PROJECT_DIR / 'build' / 'cffi'
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
