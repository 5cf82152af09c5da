"""What the Python side and the C side must agree on, each defined once: every C function a generated header calls
exists in the engine, for every layer kind and weight type; the test blob's magic and version; the firmware's report;
the struct the assembly reads; and no code outside a layer kind's definition asks which kind an op is."""
import re
import subprocess
import sys

import numpy as np
import pytest

from BitNetMCU import EXPORTABLE_TYPES, LAYOUTS, QUANT_TYPES
from cengine import engine_cdef
from chips import CHIPS, parse_report
from conftest import ROOT
from intmodel import CONV, FC, INT8_CONV, MAXPOOL, REQUANTIZE8, IntModel, IntOp
from modelheader import header_text
from testdata import BLOB_MAGIC, BLOB_VERSION

ENGINE_FUNCTIONS = set(re.findall(r'\b(BitNetMCU_\w+)\s*\(', engine_cdef()))


def calls(text):
    """The engine functions a header's infer function calls."""
    infer = text[text.index('BitNetMCU_model_infer('):]
    return set(re.findall(r'\b(BitNetMCU_\w+)\s*\(', infer)) - {'BitNetMCU_model_infer'}


def weights_of(qtype, shape, rng):
    """Random integer weights on the type's grid (any value its encoding takes)."""
    return rng.choice(qtype.int_levels, shape).astype(np.int64)


def every_kind_model(conv_kind, conv_type, fc_type):
    """A small model with every kind in it: convolutions of conv_kind, pooling, requantization, fully connected."""
    rng = np.random.default_rng(0)
    shift = 4
    conv = lambda name: IntOp(conv_kind, QUANT_TYPES[conv_type], weights_of(QUANT_TYPES[conv_type], (4, 9), rng),  # noqa: E731
                              shift, name)
    ops = [conv('c0'), conv('c1'), IntOp(MAXPOOL, name='p0'), conv('c2'), IntOp(MAXPOOL, name='p1')]
    features = 4 * 2 * 2
    if conv_kind is CONV:
        ops.append(IntOp(REQUANTIZE8, name='n0'))
    ops += [IntOp(FC, QUANT_TYPES[fc_type], weights_of(QUANT_TYPES[fc_type], (8, features), rng), name='f0'),
            IntOp(REQUANTIZE8, name='n1'),
            IntOp(FC, QUANT_TYPES[fc_type], weights_of(QUANT_TYPES[fc_type], (10, 8), rng), name='f1')]
    return IntModel(ops, num_classes=10)


FC_TYPES = [name for name in EXPORTABLE_TYPES]
CONV_TYPES = [name for name in EXPORTABLE_TYPES if QUANT_TYPES[name].int32_conv]


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('fc_type', FC_TYPES)
def test_every_function_a_header_calls_is_in_the_engine(fc_type, layout):
    """For every layer kind, weight type and layout: the generated infer function calls only what
    BitNetMCU_inference.h declares."""
    models = [every_kind_model(INT8_CONV, conv_type, fc_type) for conv_type in EXPORTABLE_TYPES]
    models += [every_kind_model(CONV, conv_type, fc_type) for conv_type in CONV_TYPES]
    for model in models:
        called = calls(header_text(model, 'contract', layout))
        assert called and called <= ENGINE_FUNCTIONS, called - ENGINE_FUNCTIONS


def test_the_generated_calls_name_their_arguments():
    """No trailing unnamed literals: null pointers and mode flags are the engine's named constants."""
    infer = ''.join(text[text.index('BitNetMCU_model_infer('):] for text in (
        header_text(every_kind_model(INT8_CONV, 'FP130', '4bitsym'), 'contract'),
        header_text(every_kind_model(CONV, '8bit', '4bitsym'), 'contract')))
    assert not re.search(r'\(const \w+ \*\)0', infer)
    for call in re.findall(r'BitNetMCU_\w+\(([^;]*)\);', infer):   # sizes, counts and shifts are numbers; no flag is
        assert not any(re.fullmatch(r'[01]u?', arg.strip()) for arg in call.split(',')), call
    for name in set(re.findall(r'\bBITNETMCU_[A-Z_]+\b', infer)):
        assert re.search(rf'#define {name}\b', (ROOT / 'BitNetMCU_inference.h').read_text()), name


def python_sources():
    return (list(ROOT.glob('*.py')) + list((ROOT / 'mcu').glob('*.py')) + list((ROOT / 'bench').glob('*.py'))
            + list((ROOT / 'docs').glob('*.py')))


def test_no_code_asks_which_kind_an_op_is():
    """A layer kind is one definition: nothing compares an op's kind or its name; code asks the kind instead."""
    assert {kind.name for kind in (FC, REQUANTIZE8, MAXPOOL, CONV, INT8_CONV)} == {'fc', 'requantize8', 'maxpool',
                                                                                     'conv', 'qconv'}
    test = re.compile(r"\.kind(\.name)?\s*(==|!=|\bin\b|\bis\b)|isinstance\([^)]*\b(FullyConnected|Requantize8|MaxPool|"
                      r"Conv3x3|Int8Conv3x3)\b")
    found = [f"{p.name}:{n}: {line.strip()}" for p in python_sources()
             for n, line in enumerate(p.read_text().splitlines(), 1) if test.search(line)]
    assert not found, found


def test_the_blob_format_is_the_one_the_firmware_reads():
    """testdata.py defines the blob's magic and version; the firmware's copies must match."""
    demo = (ROOT / 'mcu' / 'BitNetMCUdemo.c').read_text()
    magic = int(re.search(r'#define TESTSET_MAGIC (0x[0-9A-Fa-f]+)u', demo).group(1), 16)
    version = int(re.search(r'#define TESTSET_VERSION (\d+)\b', demo).group(1))
    assert magic.to_bytes(4, 'little') == BLOB_MAGIC and version == BLOB_VERSION


def test_the_report_the_firmware_prints_is_the_one_parsed():
    """The summary's words in BitNetMCUdemo.c are the ones chips.parse_report reads (one format for QEMU and the
    emulated chip)."""
    demo = (ROOT / 'mcu' / 'BitNetMCUdemo.c').read_text()
    printed = ''.join(re.findall(r'print\("([^"]*)"\)', demo[demo.index('print("images ")'):]))
    for word in ('images ', ' correct ', ' mismatches ', ' per inference: total ', ' min ', ' max ',
                 'peak stack of one inference: ', ' bytes'):
        assert word in printed.replace('\\n', '\n'), word
    report = parse_report("images 3 correct 2 mismatches 0\ninstructions per inference: total 30 min 9 max 11\n"
                          "peak stack of one inference: 392 bytes\n")
    assert report['mean'] == 10 and report['stack'] == 392 and report['counter'] == 'instructions'
    assert parse_report("images 3 correct 2 mismatches 1\ncycles per inference: total 30 min 9 max 11\n")['stack'] is None
    assert parse_report("no summary") is None


def test_the_chip_table_is_defined_once():
    defined = [p.name for p in python_sources() if re.search(r"'CH32V00\d': *\(|\d+ \* 1024|rv32,m=false", p.read_text())]
    assert defined == ['chips.py']
    assert CHIPS['CH32V003'].ram == 2048 and not CHIPS['CH32V003'].multiplier and CHIPS['CH32V002'].multiplier


def test_the_lane_struct_offsets_are_checked_when_the_engine_compiles(tmp_path):
    """The assembly reads struct lanes by BitNetMCU_lanes.h's offsets; a struct that moves a field stops the build."""
    lanes = (ROOT / 'BitNetMCU_lanes.h').read_text()
    moved = lanes.replace('    uint32_t size, lane, shift;', '    uint32_t lane, size, shift;')
    assert moved != lanes
    for name in ('BitNetMCU_inference.c', 'BitNetMCU_inference.h'):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    for text, ok in ((lanes, True), (moved, False)):
        (tmp_path / 'BitNetMCU_lanes.h').write_text(text)
        out = subprocess.run(['cc', '-std=c99', '-Wall', '-Wextra', '-Wpedantic', '-Werror', '-c',
                              str(tmp_path / 'BitNetMCU_inference.c'), '-o', str(tmp_path / 'engine.o')],
                             capture_output=True, text=True)
        assert (out.returncode == 0) == ok, out.stderr
        if not ok:
            assert 'bitnetmcu_lanes_size_at_LANES_SIZE' in out.stderr


def test_a_new_kind_is_one_definition():
    """A kind the rest of the code has never heard of: its class alone puts its step into the reference, the RAM
    and the generated function (its C kernel would be the other half of the change)."""
    from intmodel import LayerKind, reference_logits
    from modelheader import activation_ram

    class HalveSums(LayerKind):
        name = 'halve'

        def reference(self, op, x):
            return x >> 1

        def call(self, op, layer, name, acts):
            return [f"    BitNetMCU_halve({acts.source}, {acts.count}u);"]

    rng = np.random.default_rng(1)
    fc1 = IntOp(FC, QUANT_TYPES['4bitsym'], weights_of(QUANT_TYPES['4bitsym'], (10, 256), rng), name='f0')
    plain, halved = IntModel([fc1], 10), IntModel([fc1, IntOp(HalveSums(), name='h0')], 10)
    images = rng.integers(-128, 128, (20, 256))
    assert np.array_equal(reference_logits(halved, images), reference_logits(plain, images) >> 1)
    text = header_text(halved, 'contract')
    assert 'BitNetMCU_halve(sums, 10u);\n    for (uint32_t i = 0; i < 10u; i++)' in text
    assert activation_ram(halved, [FC.pack(fc1, 'input-major', True)]) == 4 * 16   # the sums, to whole words


def test_the_firmware_commands_start_without_torch():
    """make runs mcu/firmware.py for every build and check: it and the chip module load no torch (seconds each)."""
    out = subprocess.run([sys.executable, '-c',
                          "import sys; sys.argv = ['firmware.py', '--help']; sys.path.insert(0, 'mcu'); import chips;"
                          " from mcu import chipsim, firmware; print('torch' in sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == 'False', out.stderr
