"""Run and measure the BitNetMCU firmware: emulated runs, memory fit, multiplier-free check.

    python firmware.py sim   --elf E --blob B --target CH32V003      # QEMU, all images in the blob
    python firmware.py size  --elf FLASH_ELF --sim-elf E --blob B    # flash/RAM use and peak stack
    python firmware.py nomul --elf E                                 # no mul/div, no libgcc multiply

Called by mcu/Makefile (make sim / size / nomul) and by bench/mcu_cycles.py.
"""
import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CROSS = 'riscv64-unknown-elf-'
TESTSET_ADDR = 0x80400000
CHIPS = {   # flash bytes, RAM bytes, QEMU cpu (no multiplier on the CH32V003)
    'CH32V003': (16 * 1024, 2 * 1024, 'rv32,m=false,a=false,f=false,d=false'),
    'CH32V002': (16 * 1024, 4 * 1024, 'rv32,a=false,f=false,d=false'),
}
REPORT = re.compile(r'images (\d+) correct (\d+) mismatches (\d+)\n(\w+) per inference: total (\d+) min (\d+) '
                    r'max (\d+)\npeak stack of one inference: (\d+) bytes')


class FirmwareError(RuntimeError):
    pass


def run_qemu(elf, blob, target, timeout=600):
    """Run the emulator build on the images of blob; returns the parsed report (dict)."""
    if not Path(blob).exists():
        raise FirmwareError(f"{blob} is missing: run test_inference.py first (it writes the test images)")
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


def section_sizes(elf):
    """(flash bytes, static RAM bytes) from the section headers: flash = text + data, RAM = data + bss."""
    out = subprocess.run([CROSS + 'size', '-A', str(elf)], capture_output=True, text=True, check=True).stdout
    sizes = {m.group(1): int(m.group(2)) for m in re.finditer(r'^(\.\w+)\s+(\d+)\s+\d+', out, re.M)}
    return sizes.get('.text', 0) + sizes.get('.data', 0), sizes.get('.data', 0) + sizes.get('.bss', 0)


def first_images(blob, n, path):
    data = Path(blob).read_bytes()
    count = int.from_bytes(data[4:8], 'little')
    n = min(n, count)
    part = (data[:4] + n.to_bytes(4, 'little') + data[8:8 + 256 * n] + data[8 + 256 * count:8 + 256 * count + n]
            + data[8 + 257 * count:8 + 257 * count + n])
    Path(path).write_bytes(part)


def multiply_uses(elf):
    """mul/div/rem instructions and calls into libgcc's multiply/divide helpers in an ELF."""
    dump = subprocess.run([CROSS + 'objdump', '-d', str(elf)], capture_output=True, text=True, check=True).stdout
    found = [line.strip() for line in dump.splitlines()
             if re.search(r'\t(mul|mulh|mulhu|mulhsu|div|divu|rem|remu)\s', line) or re.search(r'<__(mul|div|udiv|mod|umod)\w*>', line)]
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('command', choices=['sim', 'size', 'nomul'])
    parser.add_argument('--elf', required=True, help='firmware ELF (emulator build for sim, chip build otherwise)')
    parser.add_argument('--sim-elf', help='size: the emulator build, run once to measure the stack')
    parser.add_argument('--blob', help='test-data blob written by test_inference.py')
    parser.add_argument('--target', default='CH32V003', choices=list(CHIPS))
    parser.add_argument('--timeout', type=int, default=600)
    args = parser.parse_args(argv)
    try:
        if args.command == 'sim':
            r = run_qemu(args.elf, args.blob, args.target, args.timeout)
            print(f"{args.target} (emulated, {Path(args.elf).name}): {r['images']} images, "
                  f"accuracy {100 * r['correct'] / r['images']:.2f}%, {r['mismatches']} mismatches against the host")
            print(f"instructions per inference: mean {r['mean']:.0f}, min {r['min']}, max {r['max']}; "
                  f"peak stack {r['stack']} bytes")
            if r['mismatches'] or r['status'] != 0:
                return 1
        elif args.command == 'size':
            flash_max, ram_max, _ = CHIPS[args.target]
            flash, ram = section_sizes(args.elf)
            with tempfile.TemporaryDirectory() as tmp:
                first_images(args.blob, 3, Path(tmp) / 'three.bin')
                stack = run_qemu(args.sim_elf, Path(tmp) / 'three.bin', args.target, args.timeout)['stack']
            fits = flash <= flash_max and ram + stack <= ram_max
            print(f"{args.target}: flash {flash} of {flash_max} bytes, RAM {ram} static + {stack} peak stack "
                  f"= {ram + stack} of {ram_max} bytes: {'fits' if fits else 'DOES NOT FIT'}")
            if not fits:
                return 1
        else:
            uses = multiply_uses(args.elf)
            if uses:
                print(f"{args.elf}: {len(uses)} multiply/divide uses:\n  " + '\n  '.join(uses[:20]))
                return 1
            print(f"{args.elf}: no mul/div instruction, no libgcc multiply or divide")
    except (FirmwareError, subprocess.CalledProcessError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
