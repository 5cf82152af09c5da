"""Regenerate docs/results.md, its plots and the zoo headers from the committed zoo checkpoints.

    python docs/make_results.py

For every configs/<name>.yaml whose checkpoint modeldata/<run name>.pth exists: export
mcu/models/<name>.h, verify C against Python on all 10,000 test images (0 mismatches or it stops),
run the firmware on emulated CH32V003 and CH32V002 cores (instructions per inference), link it for
the chip (flash, stack), and write one table beside the original BitNetMCU's published figures.
The flashable image of every model is built for both chips with the ch32fun SDK (../shared/ch32fun/ch32fun, or
CH32FUN=<clone>/ch32fun) and checked on the emulated chip. Plots: accuracy against weight bytes
(docs/accuracy_vs_size.png), against instructions per inference on each model's target chip
(docs/accuracy_vs_instructions.png), and the training curves of each zoo model (docs/training_curves.png).

Each model's measurements are kept in build/make_results/, keyed by everything they depend on (its checkpoint
and seeds, the engine, firmware and Python sources, the ch32fun SDK, the compiler, QEMU and torch): a zoo
update re-measures the models that changed, minutes instead of the half hour of all of them. --fresh
measures every model again.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import chips  # noqa: E402
import pipeline  # noqa: E402
from chips import CHIPS  # noqa: E402
from config import load_config, run_name  # noqa: E402
from dataset import load_dataset, sha256  # noqa: E402
from fileio import atomic_write  # noqa: E402
from checkpoint import load_checkpoint  # noqa: E402
from intmodel import pack_model, to_int_model  # noqa: E402
from modelheader import header_text  # noqa: E402

CH32FUN = ROOT.parent / 'shared' / 'ch32fun' / 'ch32fun'   # or a clone: CH32FUN=... in the environment
CONFIGS = ROOT / 'configs'
MODELS = ROOT / 'mcu' / 'models'
DOCS = ROOT / 'docs'
# config name: (what, original accuracy %, original weight size in KB as published, our target)
ORIGINAL = {
    'fc_4bitsym_64x3': ('FC 4bitsym 64/64/64, multiplier-free', 99.02, 12.3, '>= 99.15 % at <= 12.3 KB'),
    'fc_fp130_64x3': ('FC FP130 64/64/64, shifts only', 98.86, 12.3, '>= 99.0 %'),
    'fc_2bitsym_16x2': ('FC 2bitsym 16/16, tiny', 94.22, 1.1, '>= 95.0 % at <= 1.1 KB'),
    'fc_ternary_128x128x64': ('FC Ternary 128/128/64, multiplier-free', None, None, '>= 99.0 % at <= 12.3 KB'),
    'fc_nf4_64x3': ('FC NF4 64/64/64, Muon, multiplier-free', 99.07, round(12608 / 1024, 2),
                    '>= 99.15 % at <= 12,608 B'),
    'cnn64_2bit_96x64': ('CNN 64 wide, 2-bit fc1 (needs multiply)', 99.55, 11.0, '>= 99.55 % at <= 11.0 KB'),
    'cnn16_small': ('CNN 16 wide, small', 98.92, 3.2, '>= 99.0 % at <= 3.2 KB'),
    'cnn_v003': ('CNN 64 wide, FP130 convs, int8 planes, multiplier-free', None, None,
                 '>= 99.50 % on CH32V003, <= 1 M instr.'),
    # The original's 2026 windowed FC figures: NF4 weights, 4-bit activations, Muon; PyTorch and a numpy
    # emulation only, its times estimated (ours: 4bitsym, 8-bit activations, Muon; C, counted on the emulated chip).
    'window9_4bitsym': ('Windowed FC, 9 windows (stride 4), shared stem 32/16, head 64/64, 4bitsym', 99.25,
                        round(8256 / 1024, 2), '>= 99.30 % at <= 8,256 B'),
    'window25_4bitsym': ('Windowed FC, 25 windows (stride 2), shared stem 32/8, head 64/64, 4bitsym', 99.37,
                         round(9920 / 1024, 2), '>= 99.40 % at <= 9,920 B, <= 400,000 instr.'),
}
# The chip each model is made for: the CH32V003 (no multiplier, 2 KB RAM) unless it multiplies or needs
# more RAM; then the CH32V002 (a multiplier, 4 KB RAM).
TARGET = {name: 'CH32V002' if name in ('cnn64_2bit_96x64', 'cnn16_small') else 'CH32V003' for name in ORIGINAL}
# The original's published 2026 figures (windowed designs, dense NF4 FC): accuracy %, its spread, weight bytes.
ORIGINAL_2026 = {'window9_4bitsym': (99.25, 0.04, 8256), 'window25_4bitsym': (99.37, 0.03, 9920),
                 'fc_nf4_64x3': (99.07, 0.04, 12608)}
SEEDS = ROOT / 'modeldata' / 'seeds'   # <name>_s<seed>.pth: every seed of a zoo config (the zoo keeps one)
CACHE = ROOT / 'build' / 'make_results'   # <name>.json: a row and the key it was measured under
# The best model for each chip: configs/<name>.yaml and mcu/models/<name>.h are links to the zoo model chosen on
# validation (docs/guide.md, "The best model for each chip"); its chip and the accuracy it should reach.
BEST = {'best_ch32v003': ('CH32V003', 99.50), 'best_ch32v002': ('CH32V002', 99.60)}


def best_model(name, configs=CONFIGS, models=MODELS):
    """The zoo config a best_<chip> link names, checked against its header link: both link to one zoo model's
    files, which are no links themselves."""
    config, header = configs / f'{name}.yaml', models / f'{name}.h'
    chosen = config.resolve()
    if not (config.is_symlink() and header.is_symlink() and chosen.parent == configs.resolve()
            and not chosen.is_symlink() and header.resolve() == models.resolve() / f'{chosen.stem}.h'):
        sys.exit(f"error: {config} and {header} must link to one zoo model (configs/<zoo>.yaml, mcu/models/<zoo>.h)")
    return chosen.stem


def file_digest(path):
    return sha256(Path(path).read_bytes())


def tool_version(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return 'missing'


def environment_digest():
    """A digest of what every row is measured with: the sources of the engine, the firmware, the Python pipeline
    and this script, the ch32fun SDK's top folder, and the tools' versions (computed once a run)."""
    import torch
    generated = {'BitNetMCU_model.h', 'BitNetMCU_MNIST_test_data.h'}
    sources = [p for pattern in ('*.py', '*.c', '*.h', '*.S', 'Makefile') for p in ROOT.glob(pattern)
               if p.name not in generated] + [p for p in (ROOT / 'mcu').iterdir() if p.is_file()] + [Path(__file__)]
    sdk = [p for p in ch32fun_path().iterdir() if p.is_file()]
    parts = [f'{p.name} {file_digest(p)}' for p in sorted([*sources, *sdk])]
    parts += [tool_version(chips.CROSS + 'gcc', '--version'), tool_version('qemu-system-riscv32', '--version'),
              torch.__version__]
    return sha256('\n'.join(parts).encode())


def measurement_key(checkpoint, seeds, environment):
    """A digest of everything a row is measured from: the checkpoint, its seeds and the environment's digest."""
    return sha256('\n'.join([environment, *(file_digest(p) for p in [checkpoint, *seeds])]).encode())


def measure(name, data, work, environment, fresh=False):
    """A zoo model's row: from the cache when nothing it depends on changed (and its header is the one written
    then), else measured and cached. A cache file that cannot be read is measured again, never trusted."""
    cfg = load_config(CONFIGS / f'{name}.yaml')
    checkpoint = ROOT / 'modeldata' / f'{run_name(cfg)}.pth'
    if not checkpoint.exists():
        return None
    key = measurement_key(checkpoint, seed_files(name), environment)
    header, cached = MODELS / f'{name}.h', CACHE / f'{name}.json'
    if not fresh and cached.exists() and header.exists():
        try:
            entry = json.loads(cached.read_text())
            if entry['key'] == key and entry['header'] == file_digest(header):
                return entry['row']
        except (ValueError, KeyError, TypeError):
            pass
    row = measure_row(name, cfg, checkpoint, data, work)
    atomic_write(cached, json.dumps({'key': key, 'header': file_digest(header), 'row': row}))
    return row


def measure_row(name, cfg, checkpoint, data, work):
    # an hour a run: the 64-wide int32 CNN takes 17.5 M instructions an image in software multiplies on the
    # CH32V003, over ten minutes for the test set on a busy machine
    m = pipeline.measure_model(checkpoint, work / name, data, header=MODELS / f'{name}.h', timeout=3600)
    r = m['verify']
    row = {'name': name, 'float': r['float_acc'], 'python': r['python_acc'], 'c': r['c_acc'],
           'mismatches': r['mismatches'], 'history': training_history(checkpoint), 'epochs': cfg['num_epochs'],
           'seeds': seed_accuracies(name, data, work / name), 'macs': multiply_accumulates(m['int_model']),
           # weights alone in the original layout: what the original project's sizes count
           'weights': sum(layer.nbytes for layer in pack_model(m['int_model'], 'output-major'))}
    for target in CHIPS:
        t = m[target]
        row[target] = {'mean': t['sim']['mean'], 'accuracy': t['sim']['correct'] / t['sim']['images'],
                       'flash': t['flash'], 'stack': t['sim']['stack'], 'fits': t['fits'], 'why': t['why'],
                       'image': chips.flashed_image(MODELS / f'{name}.h', work / name / 'test.bin', target,
                                                       work / name / f'{target}-ch32fun', ch32fun_path())}
    return row


def seed_file_names(path):
    """(zoo config, seed) a file in SEEDS stands for: <config>_s<seed>.pth."""
    name, seed = path.stem.rsplit('_s', 1)
    return name, int(seed)


def seed_files(name):
    return sorted(SEEDS.glob(f'{name}_s*.pth'))


def seed_accuracies(name, data, work):
    """The integer accuracy (C engine, every test image, 0 mismatches) of each seed of a zoo config in SEEDS."""
    out = {}
    for path in seed_files(name):
        model, _, _ = load_checkpoint(path)
        int_model = to_int_model(model)
        header = work / f'{path.stem}.h'
        atomic_write(header, header_text(int_model, path.name))
        r = pipeline.verify(model, int_model, header, data, log=lambda *a: None)
        if r['mismatches']:
            raise SystemExit(f"{path}: C and Python disagree on {r['mismatches']} images")
        out[str(seed_file_names(path)[1])] = r['c_acc']
    return out


def multiply_accumulates(int_model):
    """Weights times the times each is used per inference, for the fully connected and window layers (a window
    stem's weights once per window)."""
    total, windows = 0, 1
    for op in int_model.weight_ops():
        if op.window:
            windows = ((int_model.input_size - op.window[0]) // op.window[1] + 1) ** 2
        if op.weights.ndim == 3:   # a window stem: (stems, out, in), run on every window
            total += windows * op.weights.shape[1] * op.weights.shape[2]
        elif not op.kind.per_channel:   # fully connected (a convolution's weights count per pixel: not here)
            total += op.weights.size
    return total


def seeds_cell(seeds):
    """mean ± half the range of the seeds' integer accuracies, their count."""
    if len(seeds) < 2:
        return '-'
    acc = [100 * a for a in seeds.values()]
    return f"{sum(acc) / len(acc):.2f} ± {(max(acc) - min(acc)) / 2:.2f} % ({len(acc)} seeds)"


def ch32fun_path():
    import os
    path = Path(os.environ.get('CH32FUN', CH32FUN))
    if not (path / 'ch32fun.mk').exists():
        sys.exit(f"error: the ch32fun SDK is not at {path}: clone https://github.com/cnlohr/ch32fun and set "
                 "CH32FUN=<clone>/ch32fun")
    return path


def training_history(path):
    import torch
    return torch.load(path, map_location='cpu', weights_only=True)['history']


def place_labels(fig, ax, labels):
    """Annotate (x, y, text) points: right of the point, or left of it where the axes end, and moved down in
    10-point steps until the label overlaps no label placed before it (points close together, like the three
    64/64/64 FC models, stay readable)."""
    fig.canvas.draw()
    renderer, placed = fig.canvas.get_renderer(), []
    for x, y, text in sorted(labels, key=lambda label: -label[1]):
        for step in range(12):
            note = ax.annotate(text, (x, y), fontsize=7, xytext=(4, 3 - 10 * step), textcoords='offset points')
            if note.get_window_extent(renderer).x1 > ax.bbox.x1:
                note.remove()
                note = ax.annotate(text, (x, y), fontsize=7, xytext=(-4, 3 - 10 * step), textcoords='offset points',
                                   ha='right')
            box = note.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            note.remove()
        placed.append(box)


def save_accuracy_plot(fig, ax, xlabel, name, labels):
    """Test accuracy against a cost on a log scale, its points labelled, written to docs/<name>."""
    import matplotlib.pyplot as plt
    ax.set_xscale('log')
    ax.set_xlabel(xlabel)
    ax.set_ylabel('MNIST test accuracy (%)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    place_labels(fig, ax, labels)
    fig.savefig(DOCS / name, dpi=120)
    plt.close(fig)


def plots(rows):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        _, acc, size, _ = ORIGINAL[row['name']]
        ax.scatter(row['weights'] / 1024, 100 * row['c'], color='tab:blue')
        if acc is not None:
            ax.scatter(size, acc, color='tab:orange', marker='s')
    ax.scatter([], [], color='tab:blue', label='this project (integer model, C engine)')
    ax.scatter([], [], color='tab:orange', marker='s', label='original BitNetMCU (published)')
    save_accuracy_plot(fig, ax, 'weight size (KB)', 'accuracy_vs_size.png',
                       [(row['weights'] / 1024, 100 * row['c'], row['name']) for row in rows])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for chip, marker in (('CH32V003', 'o'), ('CH32V002', '^')):
        mine = [row for row in rows if TARGET[row['name']] == chip]
        ax.scatter([row[chip]['mean'] for row in mine], [100 * row['c'] for row in mine], marker=marker,
                   label=f"made for the {chip} (instructions there)")
    save_accuracy_plot(fig, ax, 'instructions per inference on the emulated target chip (mean over the test set)',
                       'accuracy_vs_instructions.png',
                       [(row[TARGET[row['name']]]['mean'], 100 * row['c'], row['name']) for row in rows])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for row in rows:
        history = row['history']
        epochs = [m['epoch'] for m in history]
        axes[0].plot(epochs, [100 * (1 - m['test_acc']) for m in history], label=row['name'])
        axes[1].plot(epochs, [m['train_loss'] for m in history], label=row['name'])
    axes[0].set_yscale('log')
    axes[0].set_ylabel('test error, float QAT model (%)')
    axes[1].set_yscale('log')
    axes[1].set_ylabel('training loss (clean + augmented)')
    for ax in axes:
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(DOCS / 'training_curves.png', dpi=120)
    plt.close(fig)


def image_cell(image):
    if image['fits']:
        return f"{image['flash']:,} B flash, {image['ram']:,} B RAM" + (' (software multiply)' if image['soft_mul'] else '')
    return 'no: ' + image['why'].replace('|', '/')


def markdown(rows):
    lines = ["# Results: the model zoo", "",
             "Generated by `python docs/make_results.py` from the checkpoints in `modeldata/` (configs in",
             "`configs/`, headers in `mcu/models/`). Accuracy: MNIST test set, all 10,000 images, 16x16 input.",
             "Float: the QAT model in PyTorch; integer: the exported model in the Python reference and in C",
             "(identical by test); MCU: the firmware on an emulated core (exact instruction counts).",
             "Weight bytes count the weights alone, as the original project's figures do (its sizes are",
             "the KB figures it published). Zoo models were trained with OMP_NUM_THREADS=1:",
             "`OMP_NUM_THREADS=1 python training.py --params configs/<name>.yaml` reproduces them.", "",
             "Seeds: the integer accuracy over every seed trained of the config (`modeldata/seeds/`), mean ± half",
             "the range; the zoo checkpoint is the seed of the best validation accuracy.", "",
             "| model | target chip: fits, RAM, instr./inference | epochs | float | integer (C) | seeds | "
             "C vs Python mismatches | weight bytes | original | target | V003 instr./inference | "
             "V002 instr./inference | V003 flash | stack | flashed image, CH32V003 | flashed image, CH32V002 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        what, acc, size, target = ORIGINAL[row['name']]
        original = f"{acc:.2f} % at {size} KB" if acc is not None else '-'
        v3, v2 = row['CH32V003'], row['CH32V002']
        flash = f"{v3['flash']}" if v3['fits'] else ('does not fit; fits V002' if v2['fits'] else
                                                     f"fits neither: {v3['why']}")
        chip = TARGET[row['name']]
        image = row[chip]['image']
        on_target = (f"{chip}: fits, {image['ram']:,} B RAM, {row[chip]['mean']:,.0f}" if image['fits'] else
                     f"{chip}: does not fit")
        lines.append(f"| {what} | {on_target} | {row['epochs']} | {100 * row['float']:.2f} % | {100 * row['c']:.2f} % | "
                     f"{seeds_cell(row['seeds'])} | "
                     f"{row['mismatches']} | {row['weights']} | {original} | {target} | {v3['mean']:,.0f} | "
                     f"{v2['mean']:,.0f} | {flash} | {v3['stack']} | {image_cell(v3['image'])} | "
                     f"{image_cell(v2['image'])} |")
    designs_2026 = [row for row in rows if row['name'] in ORIGINAL_2026]
    if designs_2026:
        lines += ["", "## The original's 2026 designs beside ours", "",
                  "The original BitNetMCU's windowed and dense FC figures (September 2026) come from PyTorch and a numpy "
                  "emulation,",
                  "two runs each (mean ± spread), NF4 weights with 4-bit activations and Muon; its times are estimates "
                  "from",
                  "its 2024 speed of about 21 cycles per multiply-accumulate at 48 MHz (marked: emulated, time "
                  "estimated).",
                  "Ours: the exported integer model in C, every figure counted on the emulated CH32V003.", "",
                  "| design | original: accuracy | weights | time (emulated, time estimated) | this project: integer "
                  "accuracy | seeds | weights | CH32V003 instructions / inference (counted) |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in designs_2026:
            acc, spread, weights = ORIGINAL_2026[row['name']]
            estimate = row['macs'] * 21 / 48e3
            lines.append(f"| {ORIGINAL[row['name']][0]} | {acc:.2f} ± {spread:.2f} % | {weights:,} B | "
                         f"{row['macs']:,} multiply-accumulates: ~{estimate:.0f} ms | {100 * row['c']:.2f} % | "
                         f"{seeds_cell(row['seeds'])} | {row['weights']:,} B | {row['CH32V003']['mean']:,.0f} |")
    lines += ["", "## The best model for each chip", "",
              "`configs/best_<chip>.yaml` and `mcu/models/best_<chip>.h` link to the zoo model chosen for the chip on "
              "validation",
              "(docs/guide.md, \"The best model for each chip\"): `make -C mcu firmware MODEL_HEADER=models/best_ch32v003.h`.",
              "", "| chip | model | integer (C) | seeds | instr./inference there | flashed image | target |",
              "|---|---|---|---|---|---|---|"]
    by_name = {row['name']: row for row in rows}
    for link, (chip, target) in BEST.items():
        row = by_name[best_model(link)]
        seeds = list(row['seeds'].values()) if len(row['seeds']) >= 2 else [row['c']]   # the mean over seeds if any
        met = 'met' if 100 * sum(seeds) / len(seeds) >= target else 'not met'
        lines.append(f"| {chip} | `{link}` = `{row['name']}` | {100 * row['c']:.2f} % | {seeds_cell(row['seeds'])} | "
                     f"{row[chip]['mean']:,.0f} | {image_cell(row[chip]['image'])} | >= {target:.2f} % ({met}) |")
    lines += ["", "The flashed image (`make -C mcu firmware`, built with ch32fun, three test images): flash bytes and RAM "
              "(static + the stack measured on the emulated chip), or why it cannot go on that chip."]
    lines += ["", "![accuracy vs weight size](accuracy_vs_size.png)", "",
              "![accuracy vs instructions](accuracy_vs_instructions.png)", "",
              "![training curves](training_curves.png)", ""]
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--fresh', action='store_true', help='measure every model again, ignoring build/make_results/')
    args = parser.parse_args(argv)
    data = load_dataset('MNIST', log=lambda *a: None)
    rows, environment = [], environment_digest()
    with tempfile.TemporaryDirectory() as tmp:
        for name in ORIGINAL:
            row = measure(name, data, Path(tmp), environment, args.fresh)
            if row is None:
                print(f"{name}: no checkpoint yet (python training.py --params configs/{name}.yaml)")
                continue
            print(f"{name}: float {100 * row['float']:.2f} %, integer {100 * row['c']:.2f} %, "
                  f"{row['weights']} weight bytes, V003 {row['CH32V003']['mean']:,.0f} instructions; flashed image "
                  f"V003 {image_cell(row['CH32V003']['image'])}, V002 {image_cell(row['CH32V002']['image'])}")
            rows.append(row)
    if rows:
        plots(rows)
        atomic_write(DOCS / 'results.md', markdown(rows))
        print(f"Wrote {DOCS / 'results.md'}")


if __name__ == '__main__':
    main()
