"""sweep.py: the sweep file's errors, one trial's outcomes (done, infeasible, pruned) and the results they
give, and workers sharing one study, on the embedded SQLite storage and on a real PostgreSQL server,
one of them killed mid-trial."""
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

import optuna  # noqa: E402
import sweep  # noqa: E402
from config import load_config  # noqa: E402

TINY = {   # trials of a few seconds: a small FC on 3,000 training images
    'set': {'model': 'FCMNIST', 'network_width2': 16, 'network_width3': 0, 'augmentation': False,
            'validation_images': 500, 'batch_size': 64},
    'space': {'network_width1': {'int': [8, 64], 'step': 8}, 'learning_rate': {'float': [0.00001, 0.01], 'log': True}},
    'chip': 'CH32V003', 'budget': {'weight_bytes': 12608}, 'epochs': 2, 'train_images': 3000,
}


def write_sweep(path, **keys):
    path.write_text(yaml.safe_dump({**TINY, 'trials': 4, **keys}))
    return path


@pytest.mark.parametrize('keys, message', [
    ({'spaec': {}}, r"unknown key 'spaec'"),
    ({'space': {'network_widht1': {'int': [8, 16]}}}, r"'network_widht1' is not a config key"),
    ({'space': {'network_width1': {'int': [16, 8]}}}, r"space.network_width1.int.*low < high"),
    ({'space': {'QuantType': {'choices': ['4bitsym', '3bit']}}}, r"space.QuantType.*'3bit'.*Ternary"),
    ({'space': {'network_width1': {'int': [8, 16], 'steps': 8}}}, r"unknown steps"),
    ({'budget': {'flash': 100}}, r"'flash' is not a budget \(valid: weight_bytes, ram_bytes"),
    ({'chip': 'CH32V006'}, r"'CH32V006' is not one of CH32V003, CH32V002"),
    ({'objectives': ['weight_bytes']}, r"\[accuracy\] or \[accuracy, X\]"),
    ({'epochs': 0}, r"'epochs': 0 must be a whole number >= 1"),
    ({'set': {**TINY['set'], 'validation_images': 0}}, r"validation_images"),
    ({'set': {'QuantType': 'None'}}, r"base and set: .*QuantType"),
    ({'pruning': {'warmup': 1}}, r"'pruning'.*warmup_epochs"),
    ({'pruning': {'percentile': 80}}, r"'pruning.percentile': 80 must be 1 to 50"),
])
def test_sweep_file_errors_name_the_key(tmp_path, keys, message):
    with pytest.raises(sweep.SweepError, match=message):
        sweep.load_sweep(write_sweep(tmp_path / 's.yaml', **keys))
    assert not (tmp_path / 'out').exists()


def test_a_bad_sweep_file_exits_2_with_the_message(tmp_path, capsys):
    assert sweep.main([str(write_sweep(tmp_path / 's.yaml', trials=0)), '--dir', str(tmp_path / 'out')]) == 2
    assert "'trials': 0 must be a whole number >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_trials_done_infeasible_and_pruned_and_what_they_write(tmp_path):
    """Four trials with fixed parameters: a good one, one that multiplies (the CH32V003 has no multiplier),
    one over the weight budget (both refused before training), and one whose learning rate is hopeless
    (pruned after its first epoch against the first trial's curve)."""
    space = {'QuantType': {'choices': ['4bitsym', '8bit']}, 'network_width1': {'int': [8, 512], 'step': 8},
             'learning_rate': {'float': [1e-7, 0.01], 'log': True}}
    spec = sweep.load_sweep(write_sweep(tmp_path / 's.yaml', space=space,
                                        pruning={"warmup_epochs": 0, "startup_trials": 1, "percentile": 50}), tmp_path / 'out')
    url = sweep.embedded_storage_url(spec)
    study = sweep.open_study(spec, url, 's')
    trials = [{'QuantType': '4bitsym', 'network_width1': 32, 'learning_rate': 0.005},
              {'QuantType': '8bit', 'network_width1': 32, 'learning_rate': 0.005},
              {'QuantType': '4bitsym', 'network_width1': 512, 'learning_rate': 0.005},
              {'QuantType': '4bitsym', 'network_width1': 32, 'learning_rate': 1e-7}]
    for params in trials:
        study.enqueue_trial(params)
    lines = []
    study = sweep.work(spec, url, 's', 0, sweep.load_data(spec), log=lines.append)
    done = {t.number: t for t in study.get_trials()}
    assert [t.state.name for t in done.values()] == ['COMPLETE', 'COMPLETE', 'COMPLETE', 'PRUNED']
    good, multiplies, big, hopeless = done.values()
    assert good.user_attrs['infeasible'] == '' and good.user_attrs['accuracy'] > 0.6
    # 4 bits a weight (the 10 outputs padded to a word of 8), and the first layer's int16 row sums
    assert good.user_attrs['weight_bytes'] == (256 * 32 + 32 * 16 + 16 * 16) // 2 + 2 * 32
    assert 'multiplier' in multiplies.user_attrs['infeasible'] and multiplies.user_attrs['accuracy'] is None
    assert big.user_attrs['infeasible'] == 'weight_bytes 70784 > 12608' and big.user_attrs['accuracy'] is None
    assert good.constraints == {'weight_bytes': good.user_attrs['weight_bytes'] - 12608, 'multiplier': 0,
                                'fits': 0, 'config': 0}
    assert multiplies.constraints['multiplier'] > 0 and big.constraints['weight_bytes'] > 0
    assert list(hopeless.intermediate_values) == [1]
    runs = sorted(p.name for p in (tmp_path / 'out' / 'runs').iterdir())
    assert len(runs) == 2   # the refused trials never trained
    assert 'done 1 · pruned 1 · infeasible 2' in lines[-1]

    written = sweep.write_results(study, spec, log=lines.append)
    assert [p.name for p in written] == ['trial0.yaml']   # the only feasible trial
    assert load_config(written[0]) == load_config(spec['base'], {**sweep.fixed_keys(spec), **trials[0]})
    csv = (tmp_path / 'out' / 'results.csv').read_text().splitlines()
    assert csv[0].startswith('trial,state,accuracy,weight_bytes') and len(csv) == 5
    assert [row.split(',')[1] for row in csv[1:]] == ['complete', 'infeasible', 'infeasible', 'pruned']
    assert (tmp_path / 'out' / 'pareto.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# ------------------------------------------------------------------------------------------------
# Workers sharing one study
# ------------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def postgres():
    """A PostgreSQL server of its own: a cluster in a temporary folder on a free local port, run as an
    unprivileged user when the tests run as root (the server refuses root). Outside CI a machine without
    the server skips; in CI that is a failure."""
    bins = sorted(glob.glob('/usr/lib/postgresql/*/bin/initdb'))
    problem = None if bins else 'the PostgreSQL server (Debian package postgresql) is not installed'
    folder = Path(tempfile.mkdtemp(prefix='bitnetmcu-pg-'))
    as_user = ['runuser', '-u', 'nobody', '--'] if os.geteuid() == 0 else []
    port = free_port()
    if not problem:
        if as_user:
            shutil.chown(folder, 'nobody')
        bindir = Path(bins[-1]).parent
        steps = [[str(bindir / 'initdb'), '-D', str(folder / 'data'), '-U', 'postgres', '--auth=trust', '-E', 'UTF8'],
                 [str(bindir / 'pg_ctl'), '-D', str(folder / 'data'), '-l', str(folder / 'log'), '-w', '-o',
                  f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", 'start']]
        for step in steps:
            out = subprocess.run(as_user + step, capture_output=True, text=True)
            if out.returncode:
                problem = f"{Path(step[0]).name} failed: {out.stderr[-500:]}"
                break
    if problem:
        shutil.rmtree(folder, ignore_errors=True)
        if os.environ.get('CI'):
            pytest.fail(f"CI needs a PostgreSQL server: {problem}")
        pytest.skip(problem)
    yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    subprocess.run(as_user + [str(bindir / 'pg_ctl'), '-D', str(folder / 'data'), '-m', 'immediate', 'stop'],
                   capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def training_trial(proc, url, timeout=240):
    """The first trial of study 'shared' seen training (its worker's pid recorded) while proc runs, or None."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
        try:
            running = optuna.load_study(study_name='shared', storage=url).get_trials(
                states=(optuna.trial.TrialState.RUNNING,))
        except Exception:   # the study is not created yet
            continue
        for t in running:
            if 'pid' in t.user_attrs:
                return t
    return None


def sweep_command(spec_file, out, storage, workers):
    cmd = [sys.executable, str(ROOT / 'sweep.py'), str(spec_file), '--dir', str(out), '--workers', str(workers),
           '--study', 'shared']
    return cmd + (['--storage', storage] if storage else [])


@pytest.mark.slow
@pytest.mark.parametrize('backend', ['embedded', 'postgresql'])
def test_two_workers_share_a_study_and_a_killed_trial_is_retried(tmp_path, request, backend):
    """Two workers on one study, one killed in the middle of a trial: the other goes on and retries the
    killed trial's parameters once its heartbeat is stale; the same command run again completes the study.
    Every trial is recorded once: each worker logs the trials it finished, and those are the study's."""
    storage = request.getfixturevalue('postgres') if backend == 'postgresql' else None
    spec_file = write_sweep(tmp_path / 's.yaml', trials=5, epochs=3, heartbeat_seconds=1, pruning=False)
    out = tmp_path / 'out'
    url = storage or f"sqlite:///{out / 'study.db'}"
    first = subprocess.Popen(sweep_command(spec_file, out, storage, 2), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    killed = training_trial(first, url)
    if killed is not None:
        os.kill(killed.user_attrs['pid'], signal.SIGKILL)
    log = first.communicate(timeout=600)[0]
    assert killed is not None, f"no trial was seen running:\n{log[-3000:]}"
    assert first.returncode == 1 and 'worker exit statuses' in log   # the parent says a worker died
    again = subprocess.run(sweep_command(spec_file, out, storage, 1), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    log += again.stdout

    study = optuna.load_study(study_name='shared', storage=url)
    states = [t.state.name for t in study.get_trials()]
    failed = [t for t in study.get_trials() if t.state.name == 'FAIL']
    assert [t.number for t in failed] == [killed.number], states
    assert 'RUNNING' not in states and 'WAITING' not in states
    retries = [t for t in study.get_trials() if t.system_attrs.get('failed_trial') == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params and retries[0].state.name == 'COMPLETE'
    finished = sorted(t.number for t in study.get_trials() if t.state.name in ('COMPLETE', 'PRUNED'))
    assert 5 <= len(finished) <= 6   # two workers may each start the last trial at the same moment
    logged = [int(n) for n in re.findall(r'^trial (\d+) \{', log, re.M)]
    assert sorted(logged) == finished   # each finished trial logged by exactly one worker, none twice
    assert 'Wrote' in again.stdout and (out / 'best').is_dir()


@pytest.mark.slow
def test_the_smoke_sweep_runs_as_committed(tmp_path):
    """sweeps/smoke.yaml, the example CI runs: both trials trained and scored, the results written."""
    out = subprocess.run([sys.executable, str(ROOT / 'sweep.py'), str(ROOT / 'sweeps' / 'smoke.yaml'), '--dir',
                          str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert '2 finished: done 2 · pruned 0 · infeasible 0' in out.stdout
    assert len(list((tmp_path / 'best').glob('trial*.yaml'))) == 2 and (tmp_path / 'pareto.png').exists()


@pytest.mark.slow
def test_a_stopped_sweep_queues_its_trial_again(tmp_path):
    """`kill` (SIGTERM) or Ctrl-C in the middle of a trial: the sweep exits 130, the trial is failed and its
    parameters wait for the next run, which trains them first."""
    spec_file = write_sweep(tmp_path / 's.yaml', trials=2, epochs=40, pruning=False)   # seconds of training to stop in
    out = tmp_path / 'out'
    url = f"sqlite:///{out / 'study.db'}"
    proc = subprocess.Popen(sweep_command(spec_file, out, None, 1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    stopped = training_trial(proc, url)
    if stopped is not None:
        proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert stopped is not None and proc.returncode == 130, log[-2000:]
    study = optuna.load_study(study_name='shared', storage=url)
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.system_attrs['fixed_params'] for t in waiting] == [stopped.params]   # params it will take
    again = subprocess.run(sweep_command(spec_file, out, None, 1), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    trials = optuna.load_study(study_name='shared', storage=url).get_trials()
    assert [t.state.name for t in trials].count('COMPLETE') == 2
    assert any(t.params == stopped.params and t.state.name == 'COMPLETE' for t in trials)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_pruning_takes_only_the_bottom_percentile(tmp_path):
    """pruning.percentile 25: a trial is pruned when its validation accuracy after an epoch is in the bottom
    quarter of the earlier trials' at that epoch, and kept otherwise (Optuna's own percentile counts what
    is kept)."""
    spec = sweep.load_sweep(write_sweep(tmp_path / 's.yaml', pruning={'warmup_epochs': 0, 'startup_trials': 4,
                                                                       'percentile': 25}), tmp_path / 'out')
    study = sweep.open_study(spec, sweep.embedded_storage_url(spec), 's')
    for _ in range(4):   # infeasible trials finish without training: they are no evidence
        study.tell(study.ask(), 0.0)
    for accuracy in (0.90, 0.85, 0.80):
        trial = study.ask()
        trial.report(accuracy, 1)
        study.tell(trial, accuracy)
    trial = study.ask()
    trial.report(0.5, 1)
    assert not trial.should_prune()   # three trained trials so far, startup_trials is 4
    study.tell(trial, 0.5)
    for accuracy in (0.75, 0.70):
        trial = study.ask()
        trial.report(accuracy, 1)
        study.tell(trial, accuracy)
    verdicts = {}
    for accuracy in (0.78, 0.68):   # the 25th percentile of the six trained trials: 0.71
        trial = study.ask()
        trial.report(accuracy, 1)
        verdicts[accuracy] = trial.should_prune()
        study.tell(trial, accuracy)
    assert verdicts == {0.78: False, 0.68: True}


@pytest.mark.slow
def test_firmware_budgets_are_measured_on_the_emulated_chip(tmp_path):
    """instructions as a budget and second objective: the trial's firmware is built and run on the emulated
    CH32V003 over validation images; its exact instruction count (and flash) makes it infeasible here."""
    spec = sweep.load_sweep(write_sweep(tmp_path / 's.yaml', trials=1, epochs=1, objectives=['accuracy', 'instructions'],
                                        budget={'instructions': 1000}, firmware_images=20), tmp_path / 'out')
    assert spec['firmware']
    url = sweep.embedded_storage_url(spec)
    study = sweep.open_study(spec, url, 's')
    study.enqueue_trial({'network_width1': 16, 'learning_rate': 0.005})
    study = sweep.work(spec, url, 's', 0, sweep.load_data(spec), log=lambda *a: None)
    (trial,) = study.get_trials()
    a = trial.user_attrs
    assert 5_000 < a['instructions'] < 100_000 and 1_000 < a['flash_bytes'] < 16_384
    assert a['fits'] and not a['why_not_fits']
    assert a['infeasible'] == f"instructions {a['instructions']} > 1000" and a['accuracy'] > 0.3
    assert trial.values == [0.0, a['instructions']] and trial.constraints['instructions'] == a['instructions'] - 1000
    assert not a['multiplies']   # 4bitsym: the firmware has no multiply instruction


def test_a_firmware_that_does_not_fit_says_why():
    values, over = sweep.budget_problems({'budget': {}, 'chip': 'CH32V003'},
                                         {'fits': False, 'why_not_fits': 'flash 12 bytes over its 16384'})
    assert values['fits'] == 1.0 and over == ['the firmware does not fit the CH32V003: flash 12 bytes over its 16384']
