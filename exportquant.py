"""Export a trained model to BitNetMCU_model.h for the C engine.

    python exportquant.py                                 # model of trainingparameters.yaml
    python exportquant.py --checkpoint modeldata/x.pth --output mcu/models/x.h --plots plots/
    python exportquant.py --checkpoint original.pth --set QuantType=4bitsym   # original BitNetMCU file

Prints a summary (per layer: type, shape, bits, bytes; the RAM the C engine needs), weight statistics,
and the accuracy of the float model and of the integer model on the MNIST test set.
"""
import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from BitNetMCU import LAYOUTS, code_entropy_bits
from checkpoint import load_checkpoint
from config import ConfigError, load_config, parse_overrides, run_name
from dataset import DataError, load_dataset, normalize
from fileio import PROJECT_DIR, OutputError, atomic_write, c_array, refuse_overwriting_inputs
from intmodel import ExportError, encode_input, pack_model, reference_logits, to_int_model
from testdata import fingerprint_line

DEFAULT_OUTPUT = PROJECT_DIR / 'BitNetMCU_model.h'
HEADER_FORMAT = 2   # BITNETMCU_ENGINE_FORMAT of the engine that reads these headers (2: FP130 set-up at export)


def add_model_arguments(parser):
    """The arguments exportquant.py and test_inference.py share to find a model."""
    parser.add_argument('--params', default=None, help='YAML config (default: trainingparameters.yaml)')
    parser.add_argument('--checkpoint', default=None,
                        help='model file (default: modeldata/<run name of --params>.pth)')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='config override; for checkpoints without a config (the original project\'s)')


def load_model_from_args(args):
    """(model, config, metrics, checkpoint path) from --params/--checkpoint/--set."""
    overrides = parse_overrides(args.set)
    path = args.checkpoint
    if path is None:
        path = PROJECT_DIR / 'modeldata' / f'{run_name(load_config(args.params, overrides))}.pth'
        if not path.exists():
            raise ConfigError(f"{path} does not exist: train it first (python training.py"
                              f"{' --params ' + args.params if args.params else ''}), or pass --checkpoint")
    # --params names the config of an original checkpoint (given by --checkpoint) or finds ours
    model, cfg, metrics = load_checkpoint(path, args.params if args.checkpoint else None, overrides)
    return model, cfg, metrics, Path(path)


# ------------------------------------------------------------------------------------------------
# Statistics and summary
# ------------------------------------------------------------------------------------------------

def weight_stats(op):
    codes, counts = np.unique(op.weights, return_counts=True)
    entropy = code_entropy_bits(torch.from_numpy(op.weights))
    return {'min': int(op.weights.min()), 'max': int(op.weights.max()), 'mean': float(op.weights.mean()),
            'std': float(op.weights.std()), 'codes': dict(zip(codes.tolist(), counts.tolist())),
            'entropy': entropy, 'capacity': entropy / op.qtype.bits}


def layer_table(packed):
    """Rows of (name, kind, shape, type, bits/weight, flash bytes), one per packed layer."""
    rows = []
    for layer in packed:
        op = layer.op
        if op.kind == 'fc':
            shape, bits = f"{op.weights.shape[1]} -> {op.weights.shape[0]}", op.qtype.bits
        else:
            shape, bits = f"3x3 x {op.weights.shape[0]} ch", op.qtype.bits if op.kind == 'qconv' else 8
        rows.append((op.name, op.kind, shape, op.qtype.name, bits, layer.nbytes))
    return rows


def activation_ram(int_model, packed):
    """Bytes of the buffers BitNetMCU_model_infer() puts on the stack (see infer_function)."""
    plan = buffer_plan(int_model, packed)
    if plan['int8_planes']:
        return max(plan['image'] + plan['plane'], 4 * plan['scratch']) + plan['features'] + sum(plan['extents'])
    return 4 * (plan['scratch'] + plan['features']) + plan['act']


def print_summary(int_model, packed, log=print):
    rows = layer_table(packed)
    log(f"{'layer':12s} {'kind':5s} {'shape':>16s} {'type':>8s} {'bits':>5s} {'bytes':>7s}")
    for name, kind, shape, qtype, bits, nbytes in rows:
        log(f"{name:12s} {kind:5s} {shape:>16s} {qtype:>8s} {bits:>5} {nbytes:7d}")
    log(f"{'total':12s} {'':5s} {'':>16s} {'':>8s} {'':>5s} {sum(r[5] for r in rows):7d}"
        f"   weights; activation buffers (RAM): {activation_ram(int_model, packed)} bytes")
    for op in int_model.weight_ops():
        st = weight_stats(op)
        log(f"  {op.name:12s} {op.qtype.name:8s} min {st['min']:4d} max {st['max']:4d} mean {st['mean']:6.2f} "
            f"std {st['std']:6.2f} entropy {st['entropy']:.2f} bits ({100 * st['capacity']:.0f}% of capacity)")


# ------------------------------------------------------------------------------------------------
# Header
# ------------------------------------------------------------------------------------------------

def array_name(index, part='weights'):
    return f"BitNetMCU_layer{index}_{part}"


def split_ops(int_model):
    """(the per-channel conv/maxpool stack, the rest: ShiftNorms and fully connected layers)."""
    ops = list(int_model.ops)
    n = next((i for i, op in enumerate(ops) if op.kind not in ('conv', 'qconv', 'maxpool')), len(ops))
    return ops[:n], ops[n:]


def buffer_plan(int_model, packed):
    """Sizes (in elements) of the buffers the generated function needs."""
    stack, rest = split_ops(int_model)
    fcs = [op for op in rest if op.kind == 'fc']
    size, biggest = int_model.input_size, 0
    for op in stack:
        size = size - 2 if op.kind in ('conv', 'qconv') else size // 2
        biggest = max(biggest, size * size)
    fed_by_act = fcs if stack else fcs[1:]
    sums = max(layer.outputs for layer in packed if layer.op.kind == 'fc')
    act = max((op.weights.shape[1] for op in fed_by_act), default=0)
    features = stack[0].weights.shape[0] * size * size if stack else 0
    if stack and stack[0].kind == 'qconv':
        # int8 planes: the image and one channel's plane, then (in the same bytes) the fully connected sums;
        # the ShiftNorm outputs reuse the features once the first fully connected layer has read them.
        first = int_model.input_size - 2
        extents = [2 * (int_model.input_size - 2 * (k + 1)) for k in range(leading_convs(stack))]
        return {'int8_planes': True, 'image': int_model.input_size ** 2, 'plane': first * first, 'scratch': sums,
                'features': max(features, act), 'final_size': size, 'extents': extents}
    # The convolution maps and, after them, the fully connected sums share one int32 buffer.
    return {'int8_planes': False, 'scratch': max(biggest, sums), 'features': features, 'final_size': size,
            'act': act}


def channel_calls(size, stack, convs, src, scratch, last, pool, first_offset=None, extents=0):
    """The kernel calls that run channel c through the conv/pool stack, in place in `scratch`, into `last`.
    first_offset: the planes are int8 and every conv kernel takes its plane's offset (the first the image's)
    and does the max pooling that follows it; the first `extents` convs skip what lies outside extent<k>
    and pass on their fill value."""
    lines, k, i = [], 0, 0
    while i < len(stack):
        op = stack[i]
        pooled = first_offset is not None and i + 1 < len(stack) and stack[i + 1].kind == 'maxpool'
        i += 2 if pooled else 1
        dst = last if i == len(stack) else scratch
        if op.kind == 'maxpool':
            lines.append(f"        {pool}({src}, {size}u, {dst});")
            size //= 2
        elif first_offset is None:
            lines.append(f"        {convs[k][1].kernel}({src}, {size}u, w{k}, {op.shift}u, {dst});")
            size, k = size - 2, k + 1
        else:
            offset = first_offset if k == 0 else '0'
            call = f"{convs[k][1].kernel}({src}, {offset}, {size}u, w{k}, {op.shift}u, {dst}, "
            if k < extents:
                call = (('uint32_t fill = ' if k == 0 else 'fill = ') + call
                        + f"extent{k}, {'0u' if k == 0 else 'fill'}, {int(pooled)}u);")
            else:
                call += f"(const uint8_t *)0, 0u, {int(pooled)}u);"
            lines.append(f"        {call}")
            size, k = (size - 2) // (2 if pooled else 1), k + 1
        src = dst
    return lines


def leading_convs(stack):
    """How many convolutions come before the first pooling: the ones whose constant region an extent tracks."""
    return next((i for i, op in enumerate(stack) if op.kind == 'maxpool'), len(stack))


def int8_stack_lines(int_model, plan, stack, convs):
    """Buffers and the int8-plane stack: every channel in turn runs through all of it, so one channel's
    plane is all the RAM the convolutions need. The image's background is the same for every channel: the
    extent of each leading convolution's output (where it can differ from one value) is found once."""
    size = int_model.input_size
    ctype = {np.uint32: 'uint32_t', np.uint16: 'uint16_t'}
    lines = [f"    union {{ struct {{ uint8_t image[{plan['image']}], plane[{plan['plane']}]; }} conv; "
             f"int32_t sums[{plan['scratch']}]; }} ram;",
             f"    int8_t features[{plan['features']}], *act = features;"]
    lines += [f"    uint8_t extent{k}[{n}];" for k, n in enumerate(plan['extents'])]
    lines += ["    int32_t *sums = ram.sums;",
              f"    int32_t offset = BitNetMCU_unsigned_image(input, ram.conv.image, {size * size}u);",
              f"    BitNetMCU_plane_extent(ram.conv.image, {size}u, ram.conv.plane);   /* the plane is free yet */"]
    for k in range(len(plan['extents'])):
        lines.append(f"    BitNetMCU_conv_extent({'ram.conv.plane' if k == 0 else f'extent{k - 1}'}, {size - 2 * k}u, "
                     f"extent{k});")
    lines += [f"    const {ctype[layer.words.dtype.type]} *w{k} = {array_name(index)};" for k, (index, layer) in enumerate(convs)]
    lines.append(f"    for (uint32_t c = 0; c < {convs[0][1].op.weights.shape[0]}u; c++"
                 + ''.join(f", w{k} += {layer.words.shape[1]}" for k, (_, layer) in enumerate(convs)) + ") {")
    lines += channel_calls(size, stack, convs, 'ram.conv.image', 'ram.conv.plane',
                           f"(uint8_t *)features + {plan['final_size'] ** 2}u * c", 'BitNetMCU_maxpool2_u8',
                           first_offset='offset', extents=len(plan['extents']))
    return lines + ["    }"]


def int32_stack_lines(int_model, plan, stack, convs):
    """Buffers and, with convolutions, the int32-plane stack; returns (lines, source of the first fully
    connected layer, its length)."""
    if not stack:
        lines = [f"    int32_t sums[{plan['scratch']}];"] + ([f"    int8_t act[{plan['act']}];"] if plan['act'] else [])
        return lines, 'input', None
    lines = [f"    int32_t scratch[{plan['scratch']}], *sums = scratch;"]
    if plan['act']:
        lines.append(f"    int8_t act[{plan['act']}];")
    # Depthwise after the first conv: each channel runs through the whole stack on its own, in
    # place in `scratch`, so only one channel's map is ever in RAM.
    channels = convs[0][1].op.weights.shape[0]
    lines += [f"    int32_t features[{plan['features']}], *feature = features;",
              "    const int8_t " + ', '.join(f"*w{k} = {array_name(index)}" for k, (index, _) in enumerate(convs)) + ';',
              f"    for (uint32_t c = 0; c < {channels}u; c++, "
              + ''.join(f"w{k} += 9, " for k in range(len(convs)))
              + f"feature += {plan['final_size'] ** 2}) {{"]
    lines += channel_calls(int_model.input_size, stack, convs, 'input', 'scratch', 'feature', 'BitNetMCU_maxpool2')
    return lines + ["    }"], 'features', plan['features']


def infer_function(int_model, packed):
    """C source of BitNetMCU_model_infer(): the kernels in the order of int_model.ops."""
    plan = buffer_plan(int_model, packed)
    stack, rest = split_ops(int_model)
    convs = [(index, layer) for index, layer in enumerate(packed) if layer.op.kind in ('conv', 'qconv')]
    fcs = iter([(index, layer) for index, layer in enumerate(packed) if layer.op.kind == 'fc'])
    if plan['int8_planes']:
        lines, source, count = int8_stack_lines(int_model, plan, stack, convs), 'features', plan['features']
    else:
        lines, source, count = int32_stack_lines(int_model, plan, stack, convs)
    for op in rest:
        if op.kind == 'shiftnorm':
            lines.append(f"    BitNetMCU_shiftnorm_relu({source}, act, {count}u);")
            source = 'act'
        elif op.kind == 'fc':
            index, layer = next(fcs)
            n_out, n_in = op.weights.shape
            args = f"{source}, {n_in}u, {array_name(index)}, sums, {n_out}u"
            if layer.layout == 'input-major':   # skip the background (first layer) or ReLU zeros
                args += f", input[0], {array_name(index, 'rowsums')}" if layer.rowsums is not None else \
                    ", 0, (const int16_t *)0"
            lines.append(f"    {layer.kernel}({args});")
            source, count = 'sums', n_out
        else:
            raise ExportError(f"{op.name}: a {op.kind} after the fully connected layers has no kernel")
    lines += [f"    for (uint32_t i = 0; i < {int_model.num_classes}u; i++)",
              "        logits[i] = sums[i];",
              f"    return BitNetMCU_argmax(logits, {int_model.num_classes}u);"]
    return ("/* Runs the network on one int8 image (row-major 16x16); fills logits, returns the class. */\n"
            "static inline uint32_t BitNetMCU_model_infer(const int8_t *input, int32_t *logits)\n{\n"
            + '\n'.join(lines) + "\n}\n")


def header_text(int_model, source_name, layout=LAYOUTS[0]):
    """BitNetMCU_model.h: every layer's arrays, then BitNetMCU_model_infer(). The fully connected layers
    are packed in `layout` (written into the header as BITNETMCU_MODEL_LAYOUT)."""
    packed = pack_model(int_model, layout)
    parts = []
    for index, layer in enumerate(packed):
        op = layer.op
        if op.kind == 'fc':
            desc = f"fully connected {op.weights.shape[1]} -> {op.weights.shape[0]}, {op.qtype.name}, for {layer.kernel}()"
            if layer.rowsums is not None:
                parts.append(f"/* {op.name}: sum of each output's weights, for skipping the image background */\n"
                             + c_array(array_name(index, 'rowsums'), layer.rowsums))
        elif op.kind == 'qconv':
            desc = (f"3x3 conv, {op.weights.shape[0]} channels, {op.qtype.name} codes "
                    f"({layer.words.shape[1]} word{'s' * (layer.words.shape[1] > 1)} each), int8 activations, shift {op.shift}")
        else:
            desc = f"3x3 conv, {op.weights.shape[0]} channels, {op.qtype.name} as int8, shift {op.shift}"
        parts.append(f"/* {op.name}: {desc} */\n" + c_array(array_name(index), layer.words))
    fcs = [op for op in int_model.ops if op.kind == 'fc']
    layout_line = f"#define BITNETMCU_MODEL_LAYOUT \"{layout}\"   /* exportquant.py --layout */\n"
    text = (f"/* BitNetMCU_model.h: generated by exportquant.py from {source_name}. Do not edit.\n"
            f" * Weights: {sum(layer.nbytes for layer in packed)} bytes; activation buffers on the stack: "
            f"{activation_ram(int_model, packed)} bytes. */\n"
            "#ifndef BITNETMCU_MODEL_H\n#define BITNETMCU_MODEL_H\n\n"
            "#include <stdint.h>\n#include \"BitNetMCU_inference.h\"\n\n"
            f"#define BITNETMCU_MODEL_FORMAT {HEADER_FORMAT}\n"
            "#if BITNETMCU_ENGINE_FORMAT != BITNETMCU_MODEL_FORMAT\n"
            f"#error \"this model header is format {HEADER_FORMAT}, BitNetMCU_inference.h reads another: "
            "export the model again with the exportquant.py of this engine\"\n#endif\n"
            + layout_line +
            f"#define BITNETMCU_MODEL_INPUT_SIZE {int_model.input_size}\n"
            f"#define BITNETMCU_MODEL_INPUTS {int_model.input_size ** 2}\n"
            f"#define BITNETMCU_MODEL_CLASSES {int_model.num_classes}\n"
            f"#define BITNETMCU_MODEL_LAYERS {len(int_model.weight_ops())}\n"
            f"#define BITNETMCU_MODEL_FIRST_FC_INPUTS {fcs[0].weights.shape[1]}\n\n"
            + '\n'.join(parts) + '\n' + infer_function(int_model, packed) + "\n#endif\n")
    # The test data made for this header carries its fingerprint (testdata.py).
    return text.replace(layout_line, layout_line + fingerprint_line(text))


def header_layout(text, path='the header'):
    """The weight layout a header was exported with (its BITNETMCU_MODEL_LAYOUT)."""
    match = re.search(r'^#define BITNETMCU_MODEL_LAYOUT "([a-z-]+)"', text, re.M)
    if match is None or match.group(1) not in LAYOUTS:
        raise ExportError(f"{path} names no weight layout (BITNETMCU_MODEL_LAYOUT): it was not written by "
                          "this exportquant.py; export it again")
    return match.group(1)


# ------------------------------------------------------------------------------------------------
# Accuracy and plots
# ------------------------------------------------------------------------------------------------

MAX_DISAGREEMENT = 0.03   # share of test images where float and integer model may differ before export refuses


def test_set_predictions(model, int_model, data, dataset='the dataset'):
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


def write_plots(int_model, directory, log=print):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ops = int_model.weight_ops()
    fig, axes = plt.subplots(1, len(ops), figsize=(3 * len(ops), 2.6), squeeze=False)
    for ax, op in zip(axes[0], ops):
        codes, counts = np.unique(op.weights, return_counts=True)
        ax.bar(codes, counts, width=0.8 * (np.diff(codes).min() if len(codes) > 1 else 1))
        ax.set_title(f"{op.name}\n{op.qtype.name}, {weight_stats(op)['entropy']:.2f} bits", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(directory / 'weight_histograms.png', dpi=120)
    plt.close(fig)
    first = ops[0]
    if first.kind == 'fc' and first.weights.shape[1] == 256:
        n = first.weights.shape[0]
        cols = int(np.ceil(np.sqrt(n)))
        fig, axes = plt.subplots(int(np.ceil(n / cols)), cols, figsize=(cols, np.ceil(n / cols)), squeeze=False)
        limit = np.abs(first.weights).max()
        for i, ax in enumerate(axes.flat):
            ax.axis('off')
            if i < n:
                ax.imshow(first.weights[i].reshape(16, 16), cmap='RdBu_r', vmin=-limit, vmax=limit)
        fig.suptitle(f"{first.name}: weights of each output as 16x16 tiles", fontsize=9)
        fig.savefig(directory / 'first_layer_tiles.png', dpi=120)
        plt.close(fig)
    log(f"Plots written to {directory}/")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument('--output', default=str(DEFAULT_OUTPUT), help='header to write (default: %(default)s)')
    parser.add_argument('--layout', default=LAYOUTS[0], choices=LAYOUTS,
                        help='weight layout: input-major (fast, default) or output-major (the original '
                             'BitNetMCU layout, interchangeable weight arrays)')
    parser.add_argument('--plots', default=None, metavar='DIR', help='write weight histograms and tiles (PNG)')
    parser.add_argument('--no-eval', action='store_true',
                        help='skip the test-set accuracy report and the float-vs-integer check')
    parser.add_argument('--force', action='store_true',
                        help=f'write the header even when float and integer model disagree on more than '
                             f'{100 * MAX_DISAGREEMENT:.0f}%% of the test images')
    args = parser.parse_args(argv)
    try:
        model, cfg, metrics, path = load_model_from_args(args)
        refuse_overwriting_inputs({'--output': args.output}, {'--checkpoint': path, '--params': args.params})
        if args.plots and Path(args.plots).exists() and not Path(args.plots).is_dir():
            raise OutputError(f"--plots {args.plots} is a file; give a folder for the plots (it is created)")
        int_model = to_int_model(model)
        print(f"Model {path.name}: {cfg['model']}, {cfg['QuantType']}")
        print_summary(int_model, pack_model(int_model, args.layout))
        if not args.no_eval:   # before anything is written: a broken export never replaces a good header
            p = test_set_predictions(model, int_model, load_dataset(cfg['dataset']), cfg['dataset'])
            y, float_pred, int_pred = p['labels'], p['float_pred'], p['logits'].argmax(1)
            disagree = float((float_pred != int_pred).mean())
            print(f"Test accuracy on {len(y)} images: float model {100 * (float_pred == y).mean():.2f}%, "
                  f"integer model {100 * (int_pred == y).mean():.2f}%; "
                  f"they disagree on {int((float_pred != int_pred).sum())} images")
            if disagree > MAX_DISAGREEMENT and not args.force:
                raise ExportError(f"the float and the integer model disagree on {100 * disagree:.1f}% of the test "
                                  f"images (more than {100 * MAX_DISAGREEMENT:.0f}%): the integer model is not the "
                                  f"trained one (wrong QuantType or clipping for this checkpoint?); nothing was "
                                  f"written. --force writes it anyway")
        atomic_write(args.output, header_text(int_model, path.name, args.layout))
        print(f"Wrote {args.output}")
        if args.plots:
            try:
                write_plots(int_model, args.plots)
            except OSError as e:
                raise OutputError(f"--plots {args.plots}: {e.strerror}; give a writable folder (the header is "
                                  f"written: {args.output})") from None
    except (ConfigError, ExportError, DataError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
