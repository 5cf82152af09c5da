"""The test data the C programs check themselves against: MNIST test images as the MCU sees them (int8),
their labels, and the predictions the host computed (C engine == Python reference) for one model header.
Written by test_inference.py in two forms, both read and written only here. Both carry the fingerprint
of the model header they were made for; every reader refuses data made for another header, naming the
command that refreshes it.

Model header fingerprint: BITNETMCU_MODEL_FINGERPRINT in the header exportquant.py writes, the first 32
bits of the SHA-256 of the header's text without that line. A header edited after export no longer
matches its own fingerprint.

Blob (build/BitNetMCU_MNIST_test_data.bin; the emulated firmware gets all 10,000 images loaded into RAM):
    offset  0   char     magic[4]        "BNMT"
    offset  4   uint32   version         BLOB_VERSION
    offset  8   uint32   count           number of images
    offset 12   uint32   inputs          bytes per image (BITNETMCU_MODEL_INPUTS: 256)
    offset 16   uint32   fingerprint     BITNETMCU_MODEL_FINGERPRINT of the model header
    offset 20   int8     images[count][inputs]
                uint8    labels[count]
                uint8    predictions[count]
    All integers little endian. The C reader is mcu/BitNetMCUdemo.c (TESTSET_* macros); it checks the
    magic, the version, the image size and the fingerprint before it reads anything else.

Header (BitNetMCU_MNIST_test_data.h; a few images in flash for `make ctest` and the chip):
    #define BITNETMCU_TEST_IMAGES n, BITNETMCU_TEST_MODEL_FINGERPRINT, the images run-length coded in
    uint8 BitNetMCU_test_images[] (most pixels are background: a third of the bytes), int8
    BitNetMCU_test_labels[n] and BitNetMCU_test_predictions[n], and the decoder the C programs call,
    BitNetMCU_unpack_test_image(). The C programs stop at compile time (#error) when its fingerprint is
    not their model header's.
    Image code: the background pixel (int8), then segments until all pixels are filled: uint8 count of
    background pixels, uint8 count n of other pixels, their n int8 values.
"""
import hashlib
import re
from pathlib import Path

import numpy as np

from fileio import OutputError, atomic_write, c_array, read_or_explain, refuse_overwriting_inputs

BLOB_MAGIC = b'BNMT'
BLOB_VERSION = 2
BLOB_HEADER_BYTES = 20
MAX_BLOB_BYTES = 256 << 20     # 10,000 MNIST images take 2.6 MB; a device or a huge file is refused
MAX_HEADER_BYTES = 64 << 20
REFRESH = "run test_inference.py (with the arguments of the export) to refresh it"
_FINGERPRINT_LINE = re.compile(r'^#define BITNETMCU_MODEL_FINGERPRINT 0x([0-9a-f]{8})u\n', re.M)
_DATA_FINGERPRINT = re.compile(r'^#define BITNETMCU_TEST_MODEL_FINGERPRINT 0x([0-9a-f]{8})u\b', re.M)


class StaleDataError(ValueError):
    """Test data or a model header is missing, of another format, cut short, edited, or made for another
    model; the message says which and the command that remakes it."""


def fingerprint(text):
    """The fingerprint of a model header's text (its own BITNETMCU_MODEL_FINGERPRINT line left out)."""
    return int(hashlib.sha256(_FINGERPRINT_LINE.sub('', text).encode()).hexdigest()[:8], 16)


def fingerprint_line(text):
    return f"#define BITNETMCU_MODEL_FINGERPRINT 0x{fingerprint(text):08x}u\n"


def _read(path, limit, what, missing):
    """A file's bytes, bounded; every way it can be unreadable is a StaleDataError naming the cure."""
    return read_or_explain(path, limit, what, StaleDataError, missing)


def _read_text(path, limit, what, missing):
    try:
        return _read(path, limit, what, missing).decode('utf-8')
    except UnicodeDecodeError:
        raise StaleDataError(f"{path} is not a {what} (not UTF-8 text): {missing}") from None


def model_header_text(path):
    """The text of a model header file, bounded; missing, a directory or not text is named."""
    return _read_text(Path(path), MAX_HEADER_BYTES, 'model header', 'run exportquant.py first')


def header_fingerprint(path):
    """The fingerprint a model header states, checked against its text."""
    path = Path(path)
    text = model_header_text(path)
    match = _FINGERPRINT_LINE.search(text)
    if match is None:
        raise StaleDataError(f"{path} is not a model header of this exportquant.py (no BITNETMCU_MODEL_FINGERPRINT "
                             "line): export one with exportquant.py")
    if int(match.group(1), 16) != fingerprint(text):
        raise StaleDataError(f"{path} was edited after export (its text no longer matches its fingerprint); "
                             "export it again with exportquant.py")
    return int(match.group(1), 16)


def check_matches(model_header, data_fingerprint, data_path):
    """Refuse test data made for another model header than `model_header`."""
    if data_fingerprint != header_fingerprint(model_header):
        raise StaleDataError(f"{data_path} was made for another model header than {model_header} (fingerprint "
                             f"0x{data_fingerprint:08x}, the header's is 0x{header_fingerprint(model_header):08x}); "
                             + REFRESH)


def blob_bytes(images, labels, predictions, model_fingerprint):
    images = np.ascontiguousarray(images, dtype=np.int8)
    count, inputs = images.shape
    fields = np.array([BLOB_VERSION, count, inputs, model_fingerprint], dtype='<u4').tobytes()
    return (BLOB_MAGIC + fields + images.tobytes() + np.asarray(labels, np.uint8).tobytes()
            + np.asarray(predictions, np.uint8).tobytes())


def write_blob(path, images, labels, predictions, model_fingerprint):
    atomic_write(path, blob_bytes(images, labels, predictions, model_fingerprint))


def read_blob(path, limit=None, model_header=None):
    """-> dict(images (count, inputs) int8, labels, predictions, model_fingerprint), the first `limit` images
    when given; with model_header, data made for another header is refused."""
    path = Path(path)
    data = _read(path, MAX_BLOB_BYTES, 'test-data blob', 'run test_inference.py to write it')
    if data[:4] != BLOB_MAGIC or len(data) < BLOB_HEADER_BYTES:
        raise StaleDataError(f"{path} is not a BitNetMCU test-data blob: " + REFRESH)
    version = int(np.frombuffer(data, '<u4', 1, 4)[0])
    if version != BLOB_VERSION:
        raise StaleDataError(f"{path} has format version {version}, this code reads {BLOB_VERSION}: " + REFRESH)
    count, inputs, model_fingerprint = np.frombuffer(data, '<u4', 3, 8).tolist()
    if len(data) != BLOB_HEADER_BYTES + count * (inputs + 2):
        raise StaleDataError(f"{path} holds {len(data)} bytes, {count} images of {inputs} need "
                             f"{BLOB_HEADER_BYTES + count * (inputs + 2)} (cut short?): " + REFRESH)
    if count == 0:
        raise StaleDataError(f"{path} holds no images: " + REFRESH)
    if model_header is not None:
        check_matches(model_header, model_fingerprint, path)
    n = count if limit is None else min(limit, count)
    images_end = BLOB_HEADER_BYTES + count * inputs
    return {'images': np.frombuffer(data, np.int8, n * inputs, BLOB_HEADER_BYTES).reshape(n, inputs),
            'labels': np.frombuffer(data, np.uint8, n, images_end),
            'predictions': np.frombuffer(data, np.uint8, n, images_end + count), 'model_fingerprint': model_fingerprint}


def run_length_code(image):
    """One int8 image -> its code (see the module docstring): background, then (skip, n, n pixels)..."""
    image = np.asarray(image, dtype=np.int8)
    background, code, i = image[0], [int(image[0]) & 0xFF], 0
    while i < len(image):
        skip = 0
        while i < len(image) and image[i] == background and skip < 255:
            i, skip = i + 1, skip + 1
        literal = []
        while i < len(image) and image[i] != background and len(literal) < 255:
            literal.append(int(image[i]) & 0xFF)
            i += 1
        code += [skip, len(literal)] + literal
    return code


UNPACK_C = """
/* Expands the run-length code of one image (testdata.py) into pixels[inputs]; returns the next image's code. */
static inline const uint8_t *BitNetMCU_unpack_test_image(const uint8_t *code, int8_t *pixels, uint32_t inputs)
{
    int8_t background = (int8_t)*code++;
    for (uint32_t i = 0; i < inputs;) {
        uint32_t skip = *code++, n = *code++;
        for (; skip; skip--) pixels[i++] = background;
        for (; n; n--) pixels[i++] = (int8_t)*code++;
    }
    return code;
}
"""


def data_header_text(images, labels, predictions, model_fingerprint):
    """BitNetMCU_MNIST_test_data.h for these images."""
    code = np.array([byte for image in images for byte in run_length_code(image)], dtype=np.uint8)
    return ("/* BitNetMCU_MNIST_test_data.h: generated by test_inference.py. Do not edit.\n"
            " * MNIST test images encoded as the MCU sees them (run-length coded), their labels, and the expected\n"
            " * predictions. Format: testdata.py. */\n"
            "#ifndef BITNETMCU_MNIST_TEST_DATA_H\n#define BITNETMCU_MNIST_TEST_DATA_H\n\n#include <stdint.h>\n\n"
            f"#define BITNETMCU_TEST_IMAGES {len(images)}\n"
            f"#define BITNETMCU_TEST_MODEL_FINGERPRINT 0x{model_fingerprint:08x}u   /* of the model header */\n\n"
            + c_array('BitNetMCU_test_images', code)
            + c_array('BitNetMCU_test_labels', np.asarray(labels, dtype=np.int8))
            + c_array('BitNetMCU_test_predictions', np.asarray(predictions, dtype=np.int8))
            + UNPACK_C + "\n#endif\n")


def write_data_header(path, images, labels, predictions, model_fingerprint, keep_unchanged=False):
    """keep_unchanged: a file that already holds this text is not rewritten (it keeps its date: make rebuilds
    nothing)."""
    text = data_header_text(images, labels, predictions, model_fingerprint)
    try:
        if keep_unchanged and Path(path).read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write(path, text)


def _positive(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        import argparse
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return n


def data_header_fingerprint(path):
    path = Path(path)
    match = _DATA_FINGERPRINT.search(_read_text(path, MAX_HEADER_BYTES, 'test-data header',
                                                'run test_inference.py to write it'))
    if match is None:
        raise StaleDataError(f"{path} names no model header (BITNETMCU_TEST_MODEL_FINGERPRINT): it was written by "
                             "an older test_inference.py; " + REFRESH)
    return int(match.group(1), 16)


def main(argv=None):
    """The command line mcu/Makefile and the top-level Makefile use."""
    import argparse
    import sys
    parser = argparse.ArgumentParser(description='Test data for the C programs: check it belongs to a model '
                                                 'header, or cut a header of N images from a blob.')
    sub = parser.add_subparsers(dest='command', required=True)
    check = sub.add_parser('check', help='refuse test data (blob or header) made for another model header')
    check.add_argument('model_header')
    check.add_argument('data', help='a test-data blob (.bin) or header (.h)')
    cut = sub.add_parser('header', help='the first N images of a blob as a test-data header (the flash images)')
    cut.add_argument('blob')
    cut.add_argument('n', type=_positive)
    cut.add_argument('output')
    cut.add_argument('--model-header', required=True, help='the model header the blob must belong to')
    model = sub.add_parser('model-header', help='refuse a file that is not a model header exportquant.py wrote')
    model.add_argument('model_header')
    args = parser.parse_args(argv)
    try:
        if args.command == 'model-header':
            header_fingerprint(args.model_header)
        elif args.command == 'check':
            if str(args.data).endswith('.h'):
                check_matches(args.model_header, data_header_fingerprint(args.data), args.data)
            else:
                read_blob(args.data, limit=0, model_header=args.model_header)
        else:
            refuse_overwriting_inputs({'output': args.output}, {'blob': args.blob, '--model-header': args.model_header})
            write_data_header(args.output, **read_blob(args.blob, limit=args.n, model_header=args.model_header),
                              keep_unchanged=True)
    except (StaleDataError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
