"""The FP130 lane convolution's RV32E assembly (BitNetMCU_inference.c) against the Python reference, on an emulated
RV32EC core (Unicorn): every mode the kernel has (pooling or not, in place or not, with an extent or without, lanes
or the per-weight path) at the plane sizes it has lane loops for, and at one it has not. The models exercise only
some of these modes; the firmware tests run the rest of the engine."""
import struct
import subprocess

import numpy as np
import pytest
import torch

from BitNetMCU import QUANT_TYPES
from conftest import ROOT
from cengine import build_engine
from intmodel import maxpool2, pack_qconv, qconv3x3

RAM, CODE = 0x20000000, 0x0
INPUT, OUTPUT, WEIGHTS, EXTENT = RAM + 0x100, RAM + 0x400, RAM + 0x700, RAM + 0x780


class Core:
    """The engine built for RV32EC, run one kernel call at a time."""

    def __init__(self, elf):
        from elftools.elf.elffile import ELFFile
        from unicorn import UC_ARCH_RISCV, UC_HOOK_CODE, UC_MODE_RISCV32, Uc
        self.uc = Uc(UC_ARCH_RISCV, UC_MODE_RISCV32)
        self.uc.mem_map(CODE, 0x10000)
        self.uc.mem_map(RAM, 0x10000)
        with open(elf, 'rb') as f:
            e = ELFFile(f)
            self.entry = e.header['e_entry']
            for segment in e.iter_segments():
                if segment['p_type'] == 'PT_LOAD' and segment['p_filesz']:
                    self.uc.mem_write(segment['p_paddr'], segment.data())
            symbols = {s.name: s['st_value'] for s in e.get_section_by_name('.symtab').iter_symbols()}
        self.done, self.driver = symbols['done'], symbols['bitnetmcu_fp130_lanes']
        self.driver_calls = 0
        self.uc.hook_add(UC_HOOK_CODE, self._on_driver, begin=self.driver, end=self.driver)

    def _on_driver(self, *_):
        self.driver_calls += 1

    def qconv(self, plane, offset, words, shift, extent, fill, pool, in_place):
        size = plane.shape[0]
        output = INPUT if in_place else OUTPUT
        self.uc.mem_write(INPUT, plane.tobytes())
        self.uc.mem_write(OUTPUT, bytes(0x300))
        self.uc.mem_write(WEIGHTS, np.asarray(words, '<u4').tobytes())
        if extent is not None:
            self.uc.mem_write(EXTENT, extent.tobytes())
        block = (INPUT, offset & 0xFFFFFFFF, size, WEIGHTS, shift, output, 0 if extent is None else EXTENT, fill, pool,
                 0)
        self.uc.mem_write(RAM, struct.pack('<10I', *block))
        self.uc.emu_start(self.entry, self.done)
        n = ((size - 2) // 2) ** 2 if pool else (size - 2) ** 2
        out = np.frombuffer(bytes(self.uc.mem_read(output, n)), np.uint8)
        return out, struct.unpack('<I', bytes(self.uc.mem_read(RAM + 36, 4)))[0]


@pytest.fixture(scope='module')
def engine():
    return build_engine(log=lambda *a: None)


@pytest.fixture(scope='module')
def core(tmp_path_factory):
    elf = tmp_path_factory.mktemp('rv32') / 'qconv.elf'
    subprocess.run(['riscv64-unknown-elf-gcc', '-march=rv32ec', '-mabi=ilp32e', '-Os', '-std=c99', '-ffreestanding',
                    '-nostdlib', '-nostartfiles', '-ffunction-sections', '-Wl,--gc-sections', '-Wl,-Ttext=0',
                    '-Wl,--no-warn-rwx-segments', '-Wall', '-Wextra', '-Wpedantic', '-Werror', f'-I{ROOT}',
                    str(ROOT / 'tests' / 'rv32_qconv.c'), str(ROOT / 'BitNetMCU_inference.c'),
                    str(ROOT / 'BitNetMCU_lanes_rv32e.S'), '-lgcc', '-o', str(elf)],
                   check=True)
    return Core(elf)


def row_extents(plane, background):
    """Per row, the columns [lo, hi) from its first to its last pixel other than `background` ([0, 0): none):
    BitNetMCU_plane_extent's, for a background that need not be 0."""
    out = []
    for row in plane:
        columns = np.flatnonzero(row != background)
        out += [columns[0], columns[-1] + 1] if len(columns) else [0, 0]
    return np.array(out, np.uint8)


@pytest.mark.parametrize('size', [16, 14, 6, 8])
def test_lane_assembly_matches_python_in_every_mode(core, engine, size):
    """16, 14 and 6 have assembly lane loops; 8 takes the per-weight path on RV32E. The planes are `fill` outside a
    random blob, so the extents skip rows and columns and leave whole rows (and pairs of rows) empty."""
    rng = np.random.default_rng(size)
    levels = QUANT_TYPES['FP130'].int_levels
    modes = [(pool, in_place, with_extent) for pool in (0, 1) for in_place in (False, True) for with_extent in (0, 1)
             if not (pool and size % 2)]
    calls_before = core.driver_calls
    for trial in range(12):
        w = rng.choice(levels, 9) if trial % 4 else rng.choice([-2, -1, 1, 2], 9)   # narrow lanes, then any
        offset = int(rng.choice([0, -19, -128]))
        fill = 0 if offset else int(rng.integers(0, 128))
        top = 127 - offset
        plane = np.full((size, size), fill, np.uint8)
        y0, x0 = rng.integers(0, size, 2)
        y1, x1 = y0 + rng.integers(0, size - y0 + 1), x0 + rng.integers(0, size - x0 + 1)
        blob = rng.integers(0, top + 1, (y1 - y0, x1 - x0))
        plane[y0:y1, x0:x1] = np.where(rng.random(blob.shape) < 0.7, blob, fill)
        shift = int(rng.integers(0, 9))
        _, expected = qconv3x3(torch.from_numpy((plane.astype(np.float32) + offset)[None, None]), w[None], shift)
        expected = expected.numpy().astype(np.int64)[0, 0]
        words = pack_qconv(QUANT_TYPES['FP130'], w[None], shift)[0]
        extent = np.zeros(2 * (size - 2), np.uint8)   # the output columns whose window touches the input's extent
        ffi, lib = engine
        lib.BitNetMCU_conv_extent(ffi.from_buffer(row_extents(plane, fill)), size, ffi.from_buffer(extent))
        for pool, in_place, with_extent in modes:
            want = (maxpool2(expected[None, None])[0, 0] if pool else expected).flatten()
            out, returned = core.qconv(plane, offset, words, shift, extent if with_extent else None, fill, pool,
                                       in_place)
            assert np.array_equal(out, want), (trial, w, offset, shift, pool, in_place, with_extent)
            window = qconv3x3(torch.full((1, 1, 3, 3), float(fill + offset)), w[None], shift)[1]
            assert returned == int(window), (trial, pool, in_place, with_extent)
    if size != 8:
        assert core.driver_calls > calls_before   # the assembly ran, not only the per-weight path
    else:
        assert core.driver_calls == calls_before


@pytest.mark.parametrize('signs', [(1, 1, -1, 1, -1, 1, -1, 1, -1), (-1, -1, 1, -1, 1, -1, 1, -1, 1)])
def test_lanes_hold_inputs_up_to_their_packed_limit(core, signs):
    """Weights of 1 and 128 need lanes too wide for every input up to 255: the exporter packs the largest input
    the lanes hold (max_input, word 1 bits 20-27). The kernel takes the lanes for a plane up to that value
    (127 - offset) and the per-weight path above it; at both sides of the limit, a plane of the largest value
    fills both lanes to the top, and the outputs are exact."""
    w = np.array(signs) * np.array([1, 128, 128, 128, 128, 128, 128, 128, 128])
    shift = 8
    words = pack_qconv(QUANT_TYPES['FP130'], w[None], shift)[0]
    max_input = int(words[1]) >> 20 & 255
    assert 127 <= max_input < 255
    for top, lanes in ((max_input, True), (max_input + 1, False)):
        offset = 127 - top
        plane = np.full((16, 16), top, np.uint8)
        plane[5:9, 3:12] = np.arange(36).reshape(4, 9) % (top + 1)
        _, expected = qconv3x3(torch.from_numpy((plane.astype(np.float32) + offset)[None, None]), w[None], shift)
        calls_before = core.driver_calls
        out, _ = core.qconv(plane, offset, words, shift, None, 0, 0, False)
        assert np.array_equal(out, expected.numpy().astype(np.uint8).flatten()), top
        assert (core.driver_calls > calls_before) == lanes, top
