"""Config loading: defaults, overrides, and errors that name the key and the valid choices."""
import subprocess
import sys

import pytest
import yaml

from BitNetMCU import build_model, quant_layers
from config import CONFIG_SCHEMA, ConfigError, load_config, parse_overrides, run_name
from conftest import ROOT


def write(tmp_path, text):
    path = tmp_path / 'params.yaml'
    path.write_text(text)
    return path


def test_shipped_default_config_is_valid_and_complete():
    cfg = load_config()
    assert set(cfg) == set(CONFIG_SCHEMA)
    assert (cfg['model'], cfg['QuantType'], cfg['num_epochs']) == ('WindowFCMNIST', '4bitsym', 60)
    assert raw_keys_of_shipped_file() == set(CONFIG_SCHEMA)


def test_schema_defaults_are_the_shipped_defaults(tmp_path):
    # A config that leaves a key out gets the same value the shipped file spells out.
    assert load_config(write(tmp_path, '{}\n')) == load_config()


def raw_keys_of_shipped_file():
    return set(yaml.safe_load((ROOT / 'trainingparameters.yaml').read_text()))


def test_overrides_are_parsed_as_yaml():
    assert parse_overrides(['num_epochs=5', 'augmentation=false', 'fc1_QuantType=null', 'runtag=x=y']) == \
        {'num_epochs': 5, 'augmentation': False, 'fc1_QuantType': None, 'runtag': 'x=y'}
    cfg = load_config(overrides={'QuantType': '2bitsym', 'learning_rate': 1})
    assert cfg['QuantType'] == '2bitsym' and cfg['learning_rate'] == 1


@pytest.mark.parametrize('text,fragments', [
    ('QuantType: 3bit\n', ["'QuantType'", "'3bit'", "'4bitsym'", "'FP130'", "'NF4'"]),
    ('num_epoch: 3\n', ["unknown config key 'num_epoch'", "did you mean 'num_epochs'"]),
    ('num_epochs: ten\n', ["'num_epochs'", "'ten' is a str, expected int"]),
    ('num_epochs: 2.5\n', ["'num_epochs'", "expected int"]),
    ('augmentation: 1\n', ["'augmentation'", "expected bool"]),
    ('batch_size: 0\n', ["'batch_size'", ">= 1"]),
    ('elastictransformprobability: 1.5\n', ["'elastictransformprobability'", "between 0 and 1"]),
    ('model: ResNet\n', ["'model'", "'FCMNIST'", "'CNNMNIST'"]),
    ('dataset: CIFAR\n', ["'dataset'", "'MNIST'", "'EMNIST_LETTERS'"]),
    ('scheduler: OneCycle\n', ["'scheduler'", "'StepLR'", "'Cosine'", "'CosineWarmRestarts'"]),
    ('- a list\n', ['must be a mapping']),
    ('model: [unclosed\n', ['not valid YAML']),
    ('window_stem: [32, 16, 8, 4]\n', ["'window_stem'", "list of 1 to 3 widths"]),
    ('window_size: 12\nwindow_stride: 8\n', ["'window_stride': 8 does not step 12-pixel windows", "[2, 4]"]),
    ('QuantType: Ternary\n', ["'Ternary' has no kernel that reads a window", "4bitsym", "NF4"]),
    ('activation_bits: 4\nQuantType: 2bitsym\n', ["'2bitsym' has no product table", "4bitsym, 4bit, FP130, NF4"]),
])
def test_bad_config_names_key_and_valid_values(tmp_path, text, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    for fragment in fragments:
        assert fragment in str(err.value)


def test_missing_file_and_bad_set_syntax(tmp_path):
    with pytest.raises(ConfigError, match='does not exist'):
        load_config(tmp_path / 'nope.yaml')
    with pytest.raises(ConfigError, match='KEY=VALUE'):
        parse_overrides(['num_epochs'])


def test_keys_of_the_other_model_are_accepted_and_change_nothing(tmp_path):
    cfg = load_config(write(tmp_path, 'model: FCMNIST\ncnn_width: 48\nconv_QuantType: 4bit\n'))
    plain = load_config(write(tmp_path, 'model: FCMNIST\n'))
    shapes = [[(name, tuple(layer.weight.shape), layer.qtype.name) for name, layer in quant_layers(build_model(c, 10))]
              for c in (cfg, plain)]
    assert shapes[0] == shapes[1]


def test_run_name_changes_with_any_setting():
    base = load_config()
    names = {run_name(base)}
    for key, value in [('seed', 1), ('rotation2', 7), ('learning_rate', 0.002), ('batch_size', 64),
                       ('elastictransformprobability', 0.1), ('halve_lr_epoch', 30)]:
        names.add(run_name({**base, key: value}))
    assert len(names) == 7
    assert run_name({**base, 'device': 'cpu'}) == run_name(base)   # where it runs does not change the result


@pytest.mark.slow
def test_cli_reports_config_error_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / 'training.py'), '--set', 'QuantType=int3'],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert "error: config key 'QuantType': 'int3' must be one of" in out.stderr
    assert 'Traceback' not in out.stderr


@pytest.mark.slow
def test_cli_help():
    out = subprocess.run([sys.executable, str(ROOT / 'training.py'), '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and '--resume' in out.stdout and '--set' in out.stdout


@pytest.mark.slow
def test_every_script_answers_help_without_doing_its_work():
    scripts = [path for pattern in ('*.py', 'bench/*.py', 'docs/*.py', 'mcu/*.py') for path in sorted(ROOT.glob(pattern))
               if "if __name__ == '__main__':" in path.read_text()]
    assert len(scripts) >= 10 and ROOT / 'docs' / 'make_results.py' in scripts
    runs = {path: subprocess.Popen([sys.executable, str(path), '--help'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, cwd=ROOT) for path in scripts}   # all at once: each imports torch
    for path, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0 and out.startswith('usage:'), f"{path.relative_to(ROOT)} --help: {err[-500:]}"
