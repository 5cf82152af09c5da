"""Every benchmark still runs: each in its --quick mode (seconds), as `make bench-quick` runs them."""
import subprocess
import sys

import pytest

from conftest import ROOT, original_checkpoint

BENCHES = sorted((ROOT / 'bench').glob('*.py'))


def test_every_bench_is_covered():
    assert {b.stem for b in BENCHES} == {'mcu_cycles', 'mcu_layers', 'train_speed', 'verify_speed'}


@pytest.mark.slow
@pytest.mark.parametrize('bench', BENCHES, ids=lambda p: p.stem)
def test_bench_runs_in_quick_mode(bench):
    original_checkpoint('fc_4bitsym_64_64_64_v02.pth')   # verify_speed and mcu_cycles measure it
    out = subprocess.run([sys.executable, str(bench), '--quick'], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    expected = {'train_speed': 'FC 4bitsym 64/64/64', 'verify_speed': '0 mismatches',
                'mcu_cycles': 'original 4bitsym v0.2, input-major', 'mcu_layers': 'all kernels'}[bench.stem]
    assert expected in out.stdout, out.stdout[-2000:]
