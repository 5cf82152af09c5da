"""Run and measure the BitNetMCU firmware: emulated runs, memory fit, multiplier-free check.

    python firmware.py sim   --elf E --blob B --target CH32V003      # QEMU, all images in the blob
    python firmware.py size  --elf FLASH_ELF --sim-elf E --blob B    # flash/RAM use and peak stack
    python firmware.py nomul --elf E                                 # no mul/div, no libgcc multiply

Called by mcu/Makefile (make sim / size / nomul). measure_model() is the whole chain for one checkpoint
(export -> C vs Python on the test set -> firmware built and run on every chip), shared by
bench/mcu_cycles.py, docs/make_results.py and the tests.
"""
import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

MCU_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(MCU_DIR.parent))
import chipsim  # noqa: E402
from testdata import StaleDataError, header_fingerprint, read_blob, write_blob  # noqa: E402

CROSS = 'riscv64-unknown-elf-'
TESTSET_ADDR = 0x80400000
QEMU_BLOB_ROOM = 0x88000000 - TESTSET_ADDR   # QEMU virt's 128 MB of RAM end at 0x88000000
CHIPS = {   # flash bytes, RAM bytes, QEMU cpu (no multiplier on the CH32V003)
    'CH32V003': (16 * 1024, 2 * 1024, 'rv32,m=false,a=false,f=false,d=false'),
    'CH32V002': (16 * 1024, 4 * 1024, 'rv32,a=false,f=false,d=false'),
}
REPORT = re.compile(r'images (\d+) correct (\d+) mismatches (\d+)\n(\w+) per inference: total (\d+) min (\d+) '
                    r'max (\d+)\npeak stack of one inference: (\d+) bytes')


class FirmwareError(RuntimeError):
    pass


def run_qemu(elf, blob, target, timeout=600, model_header=None):
    """Run the emulator build on the images of blob; returns the parsed report (dict). A missing, foreign or
    truncated blob, or one made for another model header than model_header, is named here."""
    read_blob(blob, limit=0, model_header=model_header)
    chipsim.check_elf(elf)
    if Path(blob).stat().st_size > QEMU_BLOB_ROOM:
        raise FirmwareError(f"{blob} holds {Path(blob).stat().st_size:,} bytes; the emulator's RAM has room for "
                            f"{QEMU_BLOB_ROOM:,} from {TESTSET_ADDR:#x}: write a blob of fewer images")
    cmd = ['qemu-system-riscv32', '-M', 'virt', '-bios', 'none', '-cpu', CHIPS[target][2], '-icount', 'shift=0',
           '-nographic', '-kernel', str(elf), '-device', f'loader,file={blob},addr={TESTSET_ADDR:#x},force-raw=on']
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FirmwareError(f"QEMU did not finish within {timeout}s") from None
    match = REPORT.search(out.stdout)
    if match is None:
        raise FirmwareError(f"no report from the firmware (exit {out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-1000:]}")
    images, correct, mismatches, _, total, least, most, stack = match.groups()
    images = int(images)
    return {'images': images, 'correct': int(correct), 'mismatches': int(mismatches), 'total': int(total),
            'mean': int(total) / max(images, 1), 'min': int(least), 'max': int(most), 'stack': int(stack),
            'status': out.returncode, 'output': out.stdout}


SRAM_BASE = 0x20000000


def section_sizes(elf):
    """(flash bytes, static RAM bytes) of a chip build from its section headers: flash holds every section
    below SRAM plus the initial values of .data; RAM holds every section at SRAM (.data, .bss)."""
    chipsim.check_elf(elf)
    out = subprocess.run([CROSS + 'size', '-A', str(elf)], capture_output=True, text=True, check=True).stdout
    flash = ram = 0
    for name, size, address in re.findall(r'^(\.[\w.]+)\s+(\d+)\s+(\d+)', out, re.M):
        if name.startswith(('.debug', '.comment', '.riscv', '.note')):
            continue
        if int(address) >= SRAM_BASE:
            ram += int(size)
            flash += int(size) if name == '.data' else 0
        else:
            flash += int(size)
    return flash, ram


def peak_stack(sim_elf, blob, target, timeout=600):
    """Peak stack of one inference: the emulator build run on the blob's first 3 images."""
    with tempfile.TemporaryDirectory() as tmp:
        three = Path(tmp) / 'three.bin'
        write_blob(three, **read_blob(blob, limit=3))
        return run_qemu(sim_elf, three, target, timeout)['stack']


def fit_problem(target, flash, ram, stack):
    """None when the image fits the chip, else what is over and by how much."""
    flash_max, ram_max, _ = CHIPS[target]
    over = []
    if flash > flash_max:
        over.append(f"flash {flash - flash_max} bytes over its {flash_max}")
    if ram + stack > ram_max:
        over.append(f"RAM (static + stack) {ram + stack - ram_max} bytes over its {ram_max}")
    return '; '.join(over) or None


MULTIPLY = r'\t(mul|mulh|mulhu|mulhsu)\s|<__mul\w*>'
DIVIDE = r'\t(div|divu|rem|remu)\s|<__(div|udiv|mod|umod)\w*>'


def multiply_uses(elf, pattern=MULTIPLY + '|' + DIVIDE):
    """Lines of the disassembly that multiply or divide (instructions, calls into libgcc's helpers)."""
    chipsim.check_elf(elf)
    dump = subprocess.run([CROSS + 'objdump', '-d', str(elf)], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in dump.splitlines() if re.search(pattern, line)]


def forbidden_arithmetic(elf, target):
    """What the chip cannot run fast or at all: any multiply or divide on the CH32V003 (no multiplier:
    libgcc's loops), any divide on the CH32V002 (a multiplier, no divider)."""
    return multiply_uses(elf, MULTIPLY + '|' + DIVIDE if target == 'CH32V003' else DIVIDE)


def make(target, header, blob, build, *goals, timeout=900):
    """mcu/Makefile for one chip, model header and test blob, building into `build`."""
    return subprocess.run(['make', '-C', str(MCU_DIR), *goals, f'TARGET_MCU={target}', f'MODEL_HEADER={header}',
                           f'TEST_BLOB={blob}', f'BUILD={build}', f'PY={sys.executable}'],
                          capture_output=True, text=True, timeout=timeout)


def measure_firmware(header, blob, target, build):
    """Build the firmware for one chip, run it on every image of the blob and link it for the chip.
    Returns the emulator's report ('sim'), flash and static RAM of the chip build (None when it does not
    link), whether it fits (flash, and RAM with the peak stack) and whether it is multiplier-free."""
    out = make(target, header, blob, build, str(Path(build) / 'sim.elf'))
    if out.returncode:
        raise FirmwareError(f"firmware build for {target} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    sim = run_qemu(Path(build) / 'sim.elf', blob, target, model_header=header)
    links = make(target, header, blob, build, str(Path(build) / 'flash.elf')).returncode == 0
    flash, ram = section_sizes(Path(build) / 'flash.elf') if links else (None, None)
    return {'sim': sim, 'flash': flash, 'ram': ram, 'fits': links and not fit_problem(target, flash, ram, sim['stack']),
            'nomul': not multiply_uses(Path(build) / 'sim.elf')}


IMAGE_LINE = re.compile(r'image \S+: flash (\d+) of \d+ bytes .*RAM (\d+) static \+ (\d+) stack')


def flashed_image(header, blob, target, build, ch32fun):
    """`make firmware` for one chip with the ch32fun SDK: the image's flash, static RAM and stack when it
    builds, fits and passes the chip's arithmetic check; else the one line that says why not."""
    out = make(target, header, blob, build, 'firmware', f'CH32FUN={ch32fun}')
    match = IMAGE_LINE.search(out.stdout)
    if out.returncode == 0 and match:
        flash, ram, stack = map(int, match.groups())
        return {'fits': True, 'flash': flash, 'ram': ram + stack, 'why': '', 'soft_mul': 'in software' in out.stdout}
    text = out.stderr + out.stdout
    arithmetic = re.search(r'(\d+) (multiply/divide|divide) uses the', text)
    too_big = re.search(r'the image does not fit: (.*)', text)
    errors = [line[len('error: '):] for line in text.splitlines() if line.startswith('error: ')]
    why = (f"{arithmetic.group(1)} {arithmetic.group(2)} uses, which the {target} cannot run" if arithmetic else
           too_big.group(1) if too_big else errors[0] if errors else 'make firmware failed')
    return {'fits': False, 'flash': None, 'ram': None, 'why': why, 'soft_mul': False}


def measure_model(checkpoint, work, data, layout='input-major', targets=tuple(CHIPS), header=None, images=None):
    """The whole chain for one checkpoint: export the header (to `header`, default work/model.h) in
    `layout`, prove C == Python on the test set (or its first `images`), write the test blob, and measure
    the firmware on every target (mismatches on the emulated chip are an error too).
    Returns {'verify': test_inference.verify's result, 'int_model', 'packed': its packed layers,
    target: measure_firmware's result}."""
    import exportquant
    import test_inference
    from checkpoint import load_checkpoint
    from fileio import atomic_write
    from intmodel import pack_model, to_int_model
    work = Path(work)
    header = Path(header) if header else work / 'model.h'
    blob = work / 'test.bin'
    model, _, _ = load_checkpoint(checkpoint)
    int_model = to_int_model(model)
    atomic_write(header, exportquant.header_text(int_model, Path(checkpoint).name, layout))
    if images is not None:
        data = {**data, 'test_x16': data['test_x16'][:images], 'test_y': data['test_y'][:images]}
    r = test_inference.verify(model, int_model, header, data, log=lambda *a: None)
    if r['mismatches']:
        raise FirmwareError(f"{checkpoint}: C and Python disagree on {r['mismatches']} images")
    write_blob(blob, r['images'], r['labels'], r['predictions'], header_fingerprint(header))
    row = {'verify': r, 'int_model': int_model, 'packed': pack_model(int_model, layout)}
    for target in targets:
        row[target] = measure_firmware(header, blob, target, work / target)
        if row[target]['sim']['mismatches']:
            raise FirmwareError(f"{checkpoint} on {target}: {row[target]['sim']['mismatches']} mismatches")
    return row


def report_image(args):
    """The flashable image against the chip: flash and static RAM (and with --elf the stack the demo needs,
    measured by running it on the emulated chip); one line and exit status 1 when it does not fit."""
    flash_max, ram_max, _ = CHIPS[args.target]
    flash, ram = section_sizes(args.probe_elf or args.elf)
    stack = 0
    if args.elf:
        chip = chipsim.Chip(args.elf, args.target)
        chip.run()
        stack = chip.stack_bytes
    problem = fit_problem(args.target, flash, ram, stack)
    if problem:
        print(f"{args.target}: the image does not fit: {problem}", file=sys.stderr)
        return 1
    if args.elf:
        print(f"{args.target} image {args.elf}: flash {flash} of {flash_max} bytes ({flash_max - flash} free), "
              f"RAM {ram} static + {stack} stack (measured on the emulated chip) = {ram + stack} of {ram_max} bytes")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('command', choices=['sim', 'size', 'nomul', 'image'])
    parser.add_argument('--elf', help='firmware ELF (emulator build for sim, chip build otherwise)')
    parser.add_argument('--sim-elf', help='size: the emulator build, run once to measure the stack')
    parser.add_argument('--blob', help='test-data blob written by test_inference.py')
    parser.add_argument('--header', help='the model header the firmware was built with (the blob must belong to it)')
    parser.add_argument('--probe-elf', help='the chip build linked without limits: sim notes and image says how far '
                                            'it is over the chip')
    parser.add_argument('--target', default='CH32V003', choices=list(CHIPS))
    parser.add_argument('--note-only', action='store_true',
                        help='nomul: print a note instead of failing (multiplies the chip does in software)')
    parser.add_argument('--timeout', type=int, default=600)
    args = parser.parse_args(argv)
    needs = {'sim': ['elf', 'blob'], 'size': ['elf', 'sim_elf', 'blob'], 'nomul': ['elf'],
             'image': []}[args.command]
    missing = [f"--{name.replace('_', '-')}" for name in needs if getattr(args, name) is None]
    if args.command == 'image' and not (args.elf or args.probe_elf):
        missing.append('--elf or --probe-elf')
    if missing:
        print(f"error: firmware.py {args.command} needs {' and '.join(missing)} (see --help)", file=sys.stderr)
        return 2
    try:
        if args.command == 'sim':
            r = run_qemu(args.elf, args.blob, args.target, args.timeout, args.header)
            print(f"{args.target} (emulated, {Path(args.elf).name}): {r['images']} images, "
                  f"accuracy {100 * r['correct'] / r['images']:.2f}%, {r['mismatches']} mismatches against the host")
            print(f"instructions per inference: mean {r['mean']:.0f}, min {r['min']}, max {r['max']}; "
                  f"peak stack {r['stack']} bytes")
            if args.probe_elf:
                problem = fit_problem(args.target, *section_sizes(args.probe_elf), r['stack'])
                if problem:
                    print(f"note: this model does not fit the {args.target}: {problem} (make size)")
            if r['mismatches'] or r['status'] != 0:
                return 1
        elif args.command == 'size':
            flash_max, ram_max, _ = CHIPS[args.target]
            flash, ram = section_sizes(args.elf)
            stack = peak_stack(args.sim_elf, args.blob, args.target, args.timeout)
            problem = fit_problem(args.target, flash, ram, stack)
            print(f"{args.target}: flash {flash} of {flash_max} bytes, RAM {ram} static + {stack} peak stack "
                  f"= {ram + stack} of {ram_max} bytes: " + (f"DOES NOT FIT: {problem}" if problem else 'fits'))
            if problem:
                return 1
        elif args.command == 'nomul':
            uses = forbidden_arithmetic(args.elf, args.target)
            what = 'multiply/divide' if args.target == 'CH32V003' else 'divide'
            if uses and args.note_only:
                print(f"note: {len(uses)} {what} uses: this model multiplies in software on the {args.target} "
                      "(libgcc; correct, but slow)")
            elif uses:
                print(f"{args.elf}: {len(uses)} {what} uses the {args.target} cannot run:\n  " + '\n  '.join(uses[:20]))
                return 1
            print(f"{args.elf}: no mul/div instruction, no libgcc multiply or divide" if args.target == 'CH32V003'
                  else f"{args.elf}: no div/rem instruction, no libgcc divide ({len(multiply_uses(args.elf, MULTIPLY))} "
                       "hardware multiplies)")
        else:
            return report_image(args)
    except (FirmwareError, StaleDataError, chipsim.ChipError, subprocess.CalledProcessError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
