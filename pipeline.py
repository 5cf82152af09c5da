"""The chain from a checkpoint to the chip, for one model: export -> C against Python on the test set -> test blob
-> firmware built, run on an emulated core (QEMU: every image, exact instruction counts) and sized for each chip
(chips.py builds and runs the firmware).

    row = measure_model('modeldata/x.pth', 'build/work', load_dataset('MNIST'))   # everything, for every chip

bench/, docs/, tests/, sweep.py and the command-line tools (test_inference.py, mcu/firmware.py) use it.
"""
import time
from pathlib import Path

import torch

from cengine import build_engine, run_c
from checkpoint import load_checkpoint
from chips import CHIPS, FirmwareError, measure_firmware
from dataset import normalize
from fileio import atomic_write
from intmodel import ExportError, encode_input, pack_model, reference_logits, to_int_model
from modelheader import header_text
from testdata import header_fingerprint, write_blob


# ------------------------------------------------------------------------------------------------
# C against Python on the test set
# ------------------------------------------------------------------------------------------------

def predict_test_set(model, int_model, data, dataset='the dataset'):
    """The test images as the MCU sees them (int8), their labels, the float model's predicted classes and
    the integer reference's logits (with the seconds the reference took)."""
    if data['num_classes'] != int_model.num_classes:
        raise ExportError(f"the model has {int_model.num_classes} outputs, {dataset} has {data['num_classes']} "
                          "classes: pass --set dataset=<the dataset it was trained on>")
    x, y = normalize(data['test_x16']), data['test_y'].numpy()
    images = encode_input(x)
    with torch.no_grad():
        float_pred = model.eval()(x).argmax(1).numpy()
    start = time.perf_counter()
    logits = reference_logits(int_model, images)
    return {'images': images, 'labels': y, 'float_pred': float_pred, 'logits': logits,
            'python_time': time.perf_counter() - start}


def verify(model, int_model, header, data, log=print, dataset='the dataset'):
    """Compare C and Python on every test image. Returns a dict of accuracies, mismatches and timings."""
    p = predict_test_set(model, int_model, data, dataset)
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


def measure_model(checkpoint, work, data, layout='input-major', targets=tuple(CHIPS), header=None, images=None,
                  timeout=600):
    """The whole chain for one checkpoint: export the header (to `header`, default work/model.h) in
    `layout`, prove C == Python on the test set (or its first `images`), write the test blob, and measure
    the firmware on every target, each run within `timeout` seconds (mismatches on the emulated chip are an
    error too).
    Returns {'verify': verify()'s result, 'int_model', 'packed': its packed layers,
    target: measure_firmware's result}."""
    work = Path(work)
    header = Path(header) if header else work / 'model.h'
    blob = work / 'test.bin'
    model, _, _ = load_checkpoint(checkpoint)
    int_model = to_int_model(model)
    atomic_write(header, header_text(int_model, Path(checkpoint).name, layout))
    if images is not None:
        data = {**data, 'test_x16': data['test_x16'][:images], 'test_y': data['test_y'][:images]}
    r = verify(model, int_model, header, data, log=lambda *a: None)
    if r['mismatches']:
        raise FirmwareError(f"{checkpoint}: C and Python disagree on {r['mismatches']} images")
    write_blob(blob, r['images'], r['labels'], r['predictions'], header_fingerprint(header))
    row = {'verify': r, 'int_model': int_model, 'packed': pack_model(int_model, layout)}
    for target in targets:
        row[target] = measure_firmware(header, blob, target, work / target, timeout)
        if row[target]['sim']['mismatches']:
            raise FirmwareError(f"{checkpoint} on {target}: {row[target]['sim']['mismatches']} mismatches")
    return row
