"""The model header the C engine builds with: BitNetMCU_model.h, written from an IntModel.

    text = header_text(to_int_model(model), 'x.pth')          # what exportquant.py writes

The header holds every layer's arrays (each kind says which, intmodel.py) and BitNetMCU_model_infer(): the
buffers on the stack, then the per-channel convolutions in one loop over the channels (one channel's plane is
all the RAM they need), then the other steps in order; every call is the one its kind writes.
"""
import re
from dataclasses import dataclass, field

from BitNetMCU import LAYOUTS
from fileio import c_array
from intmodel import ExportError, pack_model
from testdata import fingerprint_line

C_TYPES = {'uint32': 'uint32_t', 'uint16': 'uint16_t'}   # packed weight arrays' element types
HEADER_FORMAT = 3   # BITNETMCU_ENGINE_FORMAT of the engine that reads these headers (2: FP130 set-up at export;
#                     3: BitNetMCU_requantize8, exact, in place of the ShiftNorm's shift)


def array_name(index):
    """The prefix of the header's arrays of weight layer `index`."""
    return f"BitNetMCU_layer{index}"


def steps(int_model, packed):
    """(op, its packed layer or None, its arrays' prefix or None) for every op, in order."""
    layers = iter(enumerate(packed))
    out = []
    for op in int_model.ops:
        index, layer = next(layers) if op.kind.weighted else (None, None)
        out.append((op, layer, None if layer is None else array_name(index)))
    return out


def split_steps(int_model, packed):
    """(the per-channel steps the channel loop runs, the rest)."""
    all_steps = steps(int_model, packed)
    n = next((i for i, (op, _, _) in enumerate(all_steps) if not op.kind.per_channel), len(all_steps))
    return all_steps[:n], all_steps[n:]


@dataclass
class Activations:
    """Where the activations are while the steps after the channel loop write their calls."""
    source: str          # the C expression of the current activations
    count: int           # how many there are
    act: int = 0         # int8 elements the requantizations write into `act`


def later_steps(rest, source, count):
    """The calls of the steps after the channel loop: (their C lines, the elements of `act` they need)."""
    acts = Activations(source, count)
    lines = []
    for op, layer, name in rest:
        lines += op.kind.call(op, layer, name, acts)
    return lines, acts.act


# ------------------------------------------------------------------------------------------------
# The channel loop: int32 or int8 planes, as its first convolution's kind says
# ------------------------------------------------------------------------------------------------

@dataclass
class ChannelLoop:
    """Channel c's trip through the per-channel steps, in place in `scratch`, into `last`."""
    planes: str             # 'int32' or 'int8'
    src: str
    scratch: str
    last: str
    size: int
    offset: str = '0'       # int8 planes: the C expression of the first convolution's input offset
    extents: int = 0        # int8 planes: the leading convolutions that skip what lies outside extent<k>
    conv: int = 0           # the weight pointer w<conv> of the next convolution
    dst: str = ''


def channel_calls(stack, loop):
    """The kernel calls that run channel c through the stack."""
    lines, i = [], 0
    while i < len(stack):
        op, layer, _ = stack[i]
        # an int8-plane convolution pools in the same pass
        pooled = loop.planes == 'int8' and op.kind.weighted and i + 1 < len(stack) and stack[i + 1][0].kind.pools
        i += 2 if pooled else 1
        loop.dst = loop.last if i == len(stack) else loop.scratch
        lines.append(f"        {op.kind.channel_call(op, layer, loop, pooled)}")
        loop.size = op.kind.out_size(loop.size)
        if pooled:
            loop.size = stack[i - 1][0].kind.out_size(loop.size)
        loop.conv += op.kind.weighted
        loop.src = loop.dst
    return lines


def plane_sizes(int_model, stack):
    """The plane size after each per-channel step."""
    sizes, size = [], int_model.input_size
    for op, _, _ in stack:
        size = op.kind.out_size(size)
        sizes.append(size)
    return sizes


def leading_convs(stack):
    """How many convolutions come before the first pooling: the ones whose constant region an extent tracks."""
    return next((i for i, (op, _, _) in enumerate(stack) if op.kind.pools), len(stack))


def int8_planes(int_model, stack, sums, rest):
    """Buffers and the int8-plane loop: every channel in turn runs through all of it. The image's background is the
    same for every channel: the extent of each leading convolution's output (where it can differ from one value) is
    found once. Returns (lines, RAM bytes)."""
    size = int_model.input_size
    convs = [(layer, name) for _, layer, name in stack if layer is not None]
    final = plane_sizes(int_model, stack)[-1]
    features = convs[0][0].op.weights.shape[0] * final * final
    body, act = later_steps(rest, 'features', features)
    features = max(features, act)   # the requantized activations reuse the features once the first layer has read them
    image, plane = size * size, (size - 2) ** 2
    extents = [2 * (size - 2 * (k + 1)) for k in range(leading_convs(stack))]
    lines = [f"    union {{ struct {{ uint8_t image[{image}], plane[{plane}]; }} conv; int32_t sums[{sums}]; }} ram;",
             f"    int8_t features[{features}], *act = features;"]
    lines += [f"    uint8_t extent{k}[{n}];" for k, n in enumerate(extents)]
    lines += ["    int32_t *sums = ram.sums;",
              f"    int32_t offset = BitNetMCU_unsigned_image(input, ram.conv.image, {size * size}u);",
              f"    BitNetMCU_plane_extent(ram.conv.image, {size}u, ram.conv.plane);   /* the plane is free yet */"]
    for k in range(len(extents)):
        lines.append(f"    BitNetMCU_conv_extent({'ram.conv.plane' if k == 0 else f'extent{k - 1}'}, {size - 2 * k}u, "
                     f"extent{k});")
    lines += [f"    const {C_TYPES[layer.words.dtype.name]} *w{k} = {name}_weights;" for k, (layer, name) in enumerate(convs)]
    lines.append(f"    for (uint32_t c = 0; c < {convs[0][0].op.weights.shape[0]}u; c++"
                 + ''.join(f", w{k} += {layer.words.shape[1]}" for k, (layer, _) in enumerate(convs)) + ") {")
    lines += channel_calls(stack, ChannelLoop('int8', 'ram.conv.image', 'ram.conv.plane',
                                              f"(uint8_t *)features + {final * final}u * c", size,
                                              offset='offset', extents=len(extents)))
    ram = max(image + plane, 4 * sums) + features + sum(extents)
    return lines + ["    }"] + body, ram


def int32_planes(int_model, stack, sums, rest):
    """Buffers and the int32-plane loop: each channel runs through the whole stack on its own, in place in
    `scratch`, so only one channel's map is ever in RAM. Returns (lines, RAM bytes)."""
    convs = [(layer, name) for _, layer, name in stack if layer is not None]
    sizes = plane_sizes(int_model, stack)
    features = convs[0][0].op.weights.shape[0] * sizes[-1] ** 2
    scratch = max(max(size * size for size in sizes), sums)   # the maps, then the fully connected sums
    body, act = later_steps(rest, 'features', features)
    lines = [f"    int32_t scratch[{scratch}], *sums = scratch;"] + ([f"    int8_t act[{act}];"] if act else [])
    lines += [f"    int32_t features[{features}], *feature = features;",
              "    const int8_t " + ', '.join(f"*w{k} = {name}_weights" for k, (_, name) in enumerate(convs)) + ';',
              f"    for (uint32_t c = 0; c < {convs[0][0].op.weights.shape[0]}u; c++, "
              + ''.join(f"w{k} += 9, " for k in range(len(convs))) + f"feature += {sizes[-1] ** 2}) {{"]
    lines += channel_calls(stack, ChannelLoop('int32', 'input', 'scratch', 'feature', int_model.input_size))
    return lines + ["    }"] + body, 4 * (scratch + features) + act


# ------------------------------------------------------------------------------------------------
# The window loop: every window of the image through the stem layers, into its slot of `features`
# ------------------------------------------------------------------------------------------------

@dataclass
class WindowLoop:
    """A window's trip through the stem layers: where each layer reads and writes, and its weights."""
    side: int               # the image's row length: the stride of a window's rows
    prefixes: dict          # id(packed layer) -> the prefix of its arrays
    pointers: dict          # a per-window stem's prefix -> (its weight pointer, its row sums pointer)
    src: str = ''
    dst: str = ''
    before: list = field(default_factory=list)   # lines a layer needs once before the loop

    def weights(self, layer):
        """The C expressions of a layer's weights and row sums for the current window."""
        prefix = self.prefixes[id(layer)]
        return self.pointers.get(prefix) or (
            f"{prefix}_weights", f"{prefix}_rowsums" if layer.rowsums is not None else 'BITNETMCU_NO_ROWSUMS')


def window_stems(int_model, stack, sums, rest):
    """Buffers and the window loop: each window in turn runs through every stem layer (one window's activations
    are all the RAM the stem needs) and leaves its outputs in `features`, which the head reads. Returns (lines, RAM
    bytes)."""
    side = int_model.input_size
    size, stride = stack[0][0].window
    widths = [op.weights.shape[1] for op, _, _ in stack]
    features = ((side - size) // stride + 1) ** 2 * widths[-1]
    body, act = later_steps(rest, 'features', features)
    lines = [f"    int32_t sums[{sums}];",
             f"    int8_t features[{max(features, act)}];"
             + ("  /* the requantized activations reuse it */" if act else '')]
    lines += ["    int8_t *act = features;"] if act else []
    codes = max(widths[:-1], default=0)
    lines += [f"    int8_t codes[{codes}];"] if codes else []
    loop = WindowLoop(side, {id(layer): name for _, layer, name in stack}, {})
    steps_ = []
    for k, (op, layer, name) in enumerate(stack):
        stems = op.weights.shape[0]
        if stems > 1:   # one stem per window: pointers that move on a stem each window
            weights = f"w{k}"
            lines.append(f"    const {C_TYPES[layer.words.dtype.name]} *w{k} = {name}_weights;")
            steps_.append(f"w{k} += {layer.words.size // stems}")
            rowsums = 'BITNETMCU_NO_ROWSUMS'
            if layer.rowsums is not None:
                rowsums = f"r{k}"
                lines.append(f"    const int16_t *r{k} = {name}_rowsums;")
                steps_.append(f"r{k} += {op.weights.shape[1]}")
            loop.pointers[name] = (weights, rowsums)
    last = side - size
    loop.src, calls = f"input + {side}u * y + x", []
    for k, (op, layer, name) in enumerate(stack):
        loop.dst = f"features + {widths[-1]}u * window" if k == len(stack) - 1 else 'codes'
        calls.append(f"            {op.kind.channel_call(op, layer, loop, False)}")
        loop.src = 'codes'
    background = stack[0][0].weights.shape[1]   # the first layer's outputs: their background share
    lines += [f"    int32_t background[{background}];"] + loop.before
    lines += [f"    for (uint32_t y = 0, window = 0; y <= {last}u; y += {stride}u)",
              f"        for (uint32_t x = 0; x <= {last}u; x += {stride}u, window++"
              + ''.join(', ' + step for step in steps_) + ") {"] + calls
    ram = 4 * (sums + background) + max(features, act) + codes
    return lines + ["        }"] + body, ram


PLANES = {'int32': int32_planes, 'int8': int8_planes, 'windows': window_stems}


def no_planes(int_model, stack, sums, rest):
    """A model without convolutions: the sums and the requantized activations. Returns (lines, RAM bytes)."""
    body, act = later_steps(rest, 'input', int_model.input_size ** 2)
    return [f"    int32_t sums[{sums}];"] + ([f"    int8_t act[{act}];"] if act else []) + body, 4 * sums + act


def function_body(int_model, packed):
    """(the lines of BitNetMCU_model_infer() up to its logits, the bytes of its buffers on the stack)."""
    stack, rest = split_steps(int_model, packed)
    sums = max(layer.outputs for layer in packed)   # int32 sums of the widest fully connected layer
    write = PLANES[stack[0][0].kind.planes] if stack else no_planes
    return write(int_model, stack, sums, rest)


def activation_ram(int_model, packed):
    """Bytes of the buffers BitNetMCU_model_infer() puts on the stack."""
    return function_body(int_model, packed)[1]


def infer_function(int_model, body):
    """C source of BitNetMCU_model_infer() from function_body()'s lines: the kernels in the order of int_model.ops."""
    lines = body + [f"    for (uint32_t i = 0; i < {int_model.num_classes}u; i++)",
              "        logits[i] = sums[i];",
              f"    return BitNetMCU_argmax(logits, {int_model.num_classes}u);"]
    return ("/* Runs the network on one int8 image (row-major 16x16); fills logits, returns the class. */\n"
            "static inline uint32_t BitNetMCU_model_infer(const int8_t *input, int32_t *logits)\n{\n"
            + '\n'.join(lines) + "\n}\n")


def header_text(int_model, source_name, layout=LAYOUTS[0]):
    """BitNetMCU_model.h: every layer's arrays, then BitNetMCU_model_infer(). The fully connected layers
    are packed in `layout` (written into the header as BITNETMCU_MODEL_LAYOUT)."""
    packed = pack_model(int_model, layout)
    body, ram = function_body(int_model, packed)
    arrays = {}   # by name: an array several layers share (a product table) is written once
    for op, layer, prefix in steps(int_model, packed):
        for comment, name, array in op.kind.arrays(layer, prefix) if layer is not None else ():
            arrays.setdefault(name, f"/* {comment} */\n" + c_array(name, array))
    parts = list(arrays.values())
    first_fc = next(layer for layer in packed if layer.outputs)
    layout_line = f"#define BITNETMCU_MODEL_LAYOUT \"{layout}\"   /* exportquant.py --layout */\n"
    text = (f"/* BitNetMCU_model.h: generated by exportquant.py from {source_name}. Do not edit.\n"
            f" * Weights: {sum(layer.nbytes for layer in packed)} bytes; activation buffers on the stack: "
            f"{ram} bytes. */\n"
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
            f"#define BITNETMCU_MODEL_LAYERS {len(packed)}\n"
            f"#define BITNETMCU_MODEL_FIRST_FC_INPUTS {first_fc.op.weights.shape[-1]}\n\n"
            + '\n'.join(parts) + '\n' + infer_function(int_model, body) + "\n#endif\n")
    # The test data made for this header carries its fingerprint (testdata.py).
    return text.replace(layout_line, layout_line + fingerprint_line(text))


def header_layout(text, path='the header'):
    """The weight layout a header was exported with (its BITNETMCU_MODEL_LAYOUT)."""
    match = re.search(r'^#define BITNETMCU_MODEL_LAYOUT "([a-z-]+)"', text, re.M)
    if match is None or match.group(1) not in LAYOUTS:
        raise ExportError(f"{path} names no weight layout (BITNETMCU_MODEL_LAYOUT): it was not written by "
                          "this exportquant.py; export it again")
    return match.group(1)
