"""Training: models build for every type, a short real run learns, resume is exact, output is complete."""
import copy
import math
import re

import pytest
import torch

import training
from conftest import ROOT
from BitNetMCU import QUANT_TYPES, MaxPool2, build_model, quant_layers
from checkpoint import load_checkpoint
from config import ConfigError, ignored_keys, load_config, run_name
from intmodel import ExportError, to_int_model


def config(**overrides):
    base = dict(model='FCMNIST', num_epochs=3, augmentation=True, batch_size=64, network_width1=32, network_width2=32,
                network_width3=0, learning_rate=0.003, runtag='test')
    return load_config(overrides={**base, **overrides})


@pytest.mark.parametrize('qtype', list(QUANT_TYPES))
@pytest.mark.parametrize('model', ['FCMNIST', 'CNNMNIST'])
def test_every_model_and_type_runs_forward_and_backward(model, qtype):
    cfg = config(model=model, QuantType=qtype, cnn_width=4, network_width3=8, exportable=False)
    net = build_model(cfg, 10)
    out = net(torch.randn(5, 1, 16, 16))
    assert out.shape == (5, 10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    kinds = [layer.qtype.name for _, layer in quant_layers(net)]
    if model == 'FCMNIST':
        assert kinds == [qtype] * 4
    else:
        assert kinds == ['8bit'] * 3 + ['2bitsym'] + [qtype] * 3


@pytest.mark.parametrize('size', [12, 4, 7])
def test_max_pool2_is_max_pool2d_bit_for_bit(size):
    """The CNN's pooling: max_pool2d's outputs and gradients, ties (integer planes are full of them), signed
    zeros and NaN gradients included; an odd size takes max_pool2d itself."""
    g = torch.Generator().manual_seed(size)
    x = torch.randint(0, 4, (8, 5, size, size), generator=g).float()
    upstream = torch.randn(8, 5, size // 2, size // 2, generator=g)
    upstream[0, 0, 0, :2] = torch.tensor([-0.0, float('nan')])
    results = []
    for pool in (MaxPool2(), torch.nn.MaxPool2d(2)):
        leaf = x.clone().requires_grad_()
        out = pool(leaf)
        out.backward(upstream)
        results.append((out.detach(), leaf.grad.view(torch.int32)))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize('norm', ['RMS', 'Lin', 'BatchNorm', 'LayerNorm'])
def test_every_norm_type(norm):
    net = build_model(config(NormType=norm, exportable=False), 10)
    assert net(torch.randn(4, 256)).shape == (4, 10)


def test_model_shapes_follow_config():
    fc = build_model(config(network_width1=20, network_width2=12, network_width3=0), 26)
    assert [tuple(m.weight.shape) for _, m in quant_layers(fc)] == [(20, 256), (12, 20), (26, 12)]
    cnn = build_model(config(model='CNNMNIST', cnn_width=6, network_width3=0), 10)
    assert [tuple(m.weight.shape) for _, m in quant_layers(cnn)] == \
        [(6, 1, 3, 3), (6, 1, 3, 3), (6, 1, 3, 3), (32, 24), (32, 32), (10, 32)]


def test_learning_rate_schedules():
    cfg = config(num_epochs=10, learning_rate=1.0)
    assert [training.lr_at({**cfg, 'scheduler': 'StepLR', 'step_size': 3, 'lr_decay': 0.5}, e)
            for e in (0, 2, 3, 7)] == [1.0, 1.0, 0.5, 0.25]
    assert training.lr_at({**cfg, 'scheduler': 'Cosine'}, 5) == pytest.approx(0.5)
    warm = {**cfg, 'scheduler': 'CosineWarmRestarts', 'T_0': 2, 'T_mult': 2}
    assert [round(training.lr_at(warm, e), 6) for e in range(6)] == [1.0, 0.5, 1.0, round(0.5 + 0.5 * math.cos(math.pi / 4), 6), 0.5,
                                                                     round(0.5 - 0.5 * math.cos(math.pi / 4), 6)]
    assert training.lr_at({**cfg, 'scheduler': 'StepLR', 'halve_lr_epoch': 4}, 4) == 0.5


def test_epoch_data_is_clean_plus_augmented_and_deterministic(small_mnist):
    cfg = config()
    x, y = training.epoch_data(small_mnist, cfg, 0)
    assert x.shape == (6000, 16, 16) and torch.equal(y.bincount(), small_mnist['train_y'].bincount() * 2)
    assert torch.equal(x, training.epoch_data(small_mnist, cfg, 0)[0])
    assert not torch.equal(x, training.epoch_data(small_mnist, cfg, 1)[0])
    assert training.epoch_data(small_mnist, config(augmentation=False), 0)[0].shape == (3000, 16, 16)


def test_short_real_training_run_learns_and_saves_everything(small_mnist, run_dirs):
    cfg = config()
    path = training.train(cfg, data=small_mnist, log=lambda *a: None)
    saved = torch.load(path, weights_only=False)
    assert path.name == run_name(cfg) + '.pth'
    assert saved['config'] == cfg and saved['num_classes'] == 10 and saved['format'] == training.CHECKPOINT_FORMAT
    losses = [m['train_loss'] for m in saved['history']]
    assert losses[0] > losses[1] > losses[2]
    assert saved['metrics']['test_acc'] > 0.85            # 3 small epochs on 3k images; chance is 0.10
    net = build_model(saved['config'], saved['num_classes'])
    net.load_state_dict(saved['state_dict'])              # the checkpoint alone rebuilds the model
    lines = (run_dirs / 'runs' / run_name(cfg) / 'metrics.csv').read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith('epoch,lr,train_loss,train_acc,test_loss,test_acc')
    assert not (run_dirs / 'runs' / run_name(cfg) / 'checkpoint.pt').exists()
    # Test metrics cover every test image: evaluate over an odd count agrees with a manual loop.
    x, y = training.normalize(small_mnist['test_x16'][:999]), small_mnist['test_y'][:999]
    _, acc, _ = training.evaluate(net, x, y, torch.device('cpu'), batch_size=100)
    assert acc == pytest.approx(float((net.eval()(x).argmax(1) == y).float().mean()))


@pytest.fixture
def teacher(small_mnist, run_dirs):
    """A one-epoch model to distill from (any checkpoint can teach)."""
    path = training.train(config(num_epochs=1, runtag='teacher'), data=small_mnist, log=lambda *a: None)
    return str(path.rename(run_dirs / 'teacher.pth'))


@pytest.mark.parametrize('levers', [{}, {'ema_decay': 0.9, 'label_smoothing': 0.1, 'teacher': True,
                                          'oscillation_dampening': 1.0}, {'optimizer': 'muon'}])
@pytest.mark.slow
def test_interrupted_run_resumes_exactly(small_mnist, run_dirs, request, levers):
    if levers.get('teacher'):
        levers = {**levers, 'teacher': request.getfixturevalue('teacher')}
    cfg = config(num_epochs=2, **levers)
    reference = torch.load(training.train(cfg, data=small_mnist, log=lambda *a: None), weights_only=False)
    (run_dirs / 'modeldata').rename(run_dirs / 'first')

    def interrupt(metrics):
        assert metrics['epoch'] == 1
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, data=small_mnist, log=lambda *a: None, on_epoch_end=interrupt)
    ckpt = run_dirs / 'runs' / run_name(cfg) / 'checkpoint.pt'
    assert ckpt.exists() and not (run_dirs / 'modeldata' / f'{run_name(cfg)}.pth').exists()
    ckpt.with_name('first.pt').write_bytes(ckpt.read_bytes())
    with pytest.raises(ConfigError, match='--resume'):
        training.train(cfg, data=small_mnist, log=lambda *a: None)    # never silently starts over
    resumed = torch.load(training.train(cfg, resume=True, data=small_mnist, log=lambda *a: None),
                         weights_only=False)
    for key, value in reference['state_dict'].items():
        assert torch.equal(value, resumed['state_dict'][key]), key
    assert [m['test_loss'] for m in resumed['history']] == [m['test_loss'] for m in reference['history']]
    if levers.get('ema_decay'):   # the average is what is saved; it is not the live model
        state = torch.load(ckpt.with_name('first.pt'), weights_only=False)
        assert not torch.equal(state['model']['layers.0.weight'], state['average']['model']['layers.0.weight'])
        assert 'test_acc_live' in reference['metrics']


def test_muon_takes_the_hidden_matrices_and_adam_the_rest(small_mnist, run_dirs):
    cfg = config(optimizer='muon', muon_learning_rate=0.02, num_epochs=1)
    model = build_model(cfg, 10)
    optimizer = training.make_optimizer(model, cfg)
    linear = [m for _, m in quant_layers(model) if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 3
    muon = optimizer.muon.param_groups[0]['params']
    assert [id(p) for p in muon] == [id(m.weight) for m in linear[:-1]]     # the classifier stays with Adam
    adam = [id(p) for group in optimizer.adam.param_groups for p in group['params']]
    assert id(linear[-1].weight) in adam and not set(adam) & {id(p) for p in muon}
    assert len(muon) + len(adam) == len(list(model.parameters()))
    assert optimizer.muon.param_groups[0]['lr_scale'] == pytest.approx(0.02 / cfg['learning_rate'])   # one schedule
    assert training.load_checkpoint(training.train(cfg, data=small_mnist, log=lambda *a: None))[2]['test_acc'] > 0.5


def test_muon_takes_a_shared_window_stem_and_adam_the_per_window_ones():
    for shared in (True, False):
        cfg = config(optimizer='muon', model='WindowFCMNIST', window_stem=[16, 8], window_shared=shared)
        model = build_model(cfg, 10)
        muon = {id(p) for p in training.make_optimizer(model, cfg).muon.param_groups[0]['params']}
        stems = [m.weight for _, m in quant_layers(model) if m.weight.dim() == (2 if shared else 3)][:2]
        assert all((id(w) in muon) == shared for w in stems)
        assert len(muon) == 2 + 2 * shared   # the head's hidden layers, and the stem's when shared


def test_loss_label_smoothing_and_distillation():
    torch.manual_seed(0)
    out, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    plain = config()
    assert training.loss_fn(out, y, plain) == pytest.approx(float(torch.nn.functional.cross_entropy(out, y)))
    smooth = config(label_smoothing=0.2)
    target = torch.full((8, 10), 0.02).scatter(1, y[:, None], 0.82)
    manual = -(target * out.log_softmax(1)).sum(1).mean()
    assert training.loss_fn(out, y, smooth) == pytest.approx(float(manual), rel=1e-5)
    only_teacher = config(distill_weight=1.0, distill_temperature=3.0)
    assert training.loss_fn(out, y, only_teacher, teacher_out=out) == pytest.approx(0.0, abs=1e-6)
    assert training.loss_fn(out, y, only_teacher, teacher_out=-out) > 0.1
    half = config(distill_weight=0.5)
    assert training.loss_fn(out, y, half, teacher_out=out) == pytest.approx(0.5 * float(training.loss_fn(out, y, plain)))


@pytest.mark.parametrize('qtype', ['2bitsym', '4bitsym', '4bit', '8bit'])
def test_oscillation_penalty_measures_distance_to_the_levels_in_steps(qtype):
    layer = build_model(config(QuantType=qtype), 10).layers[0]
    with torch.no_grad():
        levels = layer.quantized_weight().detach()
        layer.weight.copy_(levels)
    assert float(layer.oscillation_penalty().detach()) == pytest.approx(0.0, abs=1e-10)
    _, step = layer.qtype.quantize(layer.weight, layer._s_view())
    inside = levels.abs() < levels.abs().max()     # clipped weights add nothing: leave them out
    with torch.no_grad():
        layer.weight.copy_(levels + 0.25 * step * inside)
    expected = 0.0625 * float(inside.float().mean())
    assert float(layer.oscillation_penalty().detach()) == pytest.approx(expected, rel=1e-4)
    layer.oscillation_penalty().backward()        # the gradient pulls every weight back to its level
    moved = layer.weight.grad[inside]
    assert (moved > 0).all() and float(layer.oscillation_penalty().detach()) > 0


def test_oscillation_penalty_is_zero_for_float_weights():
    layer = build_model(config(QuantType='None', exportable=False), 10).layers[0]
    assert float(layer.oscillation_penalty().detach()) == 0.0


def test_weight_average_follows_the_live_weights():
    net = build_model(config(), 10)
    average = training.WeightAverage(net, decay=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    average.update(net)   # first step: short memory, decay min(0.5, 2/11)
    for avg, live in zip(average.model.parameters(), net.parameters()):
        assert torch.allclose(avg, live - 2 / 11)


@pytest.mark.parametrize('clipping', ['own', 'live'])
def test_weight_average_clipping_is_its_own_or_the_live_models(small_mnist, run_dirs, clipping):
    run = training.start_run(config(num_epochs=2, ema_decay=0.9, ema_clipping=clipping), False, False, 10,
                             lambda *a: None)
    training.run_epoch(run, small_mnist, 0)
    before = copy.deepcopy(run.average.model)   # the averaged weights as the last epoch starts
    training.run_epoch(run, small_mnist, 1)
    pairs = list(zip(quant_layers(run.average.model), quant_layers(run.model), quant_layers(before)))
    if clipping == 'live':
        assert all(torch.equal(avg.s, live.s) for (_, avg), (_, live), _ in pairs)
    else:   # re-estimated from its own weights as the epoch started, so not the live model's
        for (_, avg), _, (_, own) in pairs:
            own.update_clipping()
            assert torch.equal(avg.s, own.s)
        assert not all(torch.equal(avg.s, live.s) for (_, avg), (_, live), _ in pairs)


@pytest.mark.slow
def test_a_dense_cnn_teaches_and_is_refused_for_export(small_mnist, run_dirs):
    with pytest.raises(ConfigError, match="'DenseCNN' is a float teacher.*exportable"):
        config(model='DenseCNN')
    dense = config(model='DenseCNN', cnn_width=4, network_width1=16, num_epochs=1, exportable=False, runtag='dense')
    assert quant_layers(build_model(dense, 10)) == []   # all float: nothing to quantize or export
    assert run_name(dense).startswith('dense_MNIST_Dense4_16_ep1_')
    assert ignored_keys({**dense, 'conv_QuantType': 'FP130'}) == ['conv_QuantType']   # cnn_width is its own
    assert load_config(ROOT / 'configs' / 'teachers' / 'dense.yaml')['model'] == 'DenseCNN'   # the shipped teacher
    path = training.train(dense, data=small_mnist, log=lambda *a: None)
    with pytest.raises(ExportError, match='Conv2d has no integer kernel'):
        to_int_model(load_checkpoint(path)[0])
    student = torch.load(training.train(config(model='CNNMNIST', cnn_width=4, num_epochs=1, teacher=str(path)),
                                        data=small_mnist, log=lambda *a: None), weights_only=False)
    assert student['metrics']['test_acc'] > 0.5


@pytest.mark.slow
def test_a_float_run_logs_no_clipping_or_codes(small_mnist, run_dirs):
    lines = []
    cfg = config(model='CNNMNIST', cnn_width=4, num_epochs=1, QuantType='None', fc1_QuantType='None',
                 conv_QuantType='None', exportable=False)
    path = training.train(cfg, data=small_mnist, log=lines.append)
    run_line, = [line for line in lines if line.startswith('Run ')]
    epoch_line, = [line for line in lines if line.startswith('epoch ')]
    assert 'CNNMNIST float' in run_line and '| s:' not in epoch_line and 'bits' not in epoch_line
    assert [line for line in lines if line.startswith('Saved ')][0].count('(float model)') == 1
    assert not [key for key in torch.load(path, weights_only=False)['metrics'] if key.startswith(('s/', 'entropy/'))]
    lines.clear()
    training.train(config(model='CNNMNIST', cnn_width=4, num_epochs=1, fc1_QuantType='None', exportable=False),
                   data=small_mnist, log=lines.append)   # one float layer among coded ones: the others are shown
    epoch_line, = [line for line in lines if line.startswith('epoch ')]
    assert epoch_line.split('| s: ')[1].split(' |')[0].count(' ') == 4   # 3 convolutions and 2 of 3 linear layers


def test_missing_or_unreadable_teacher_is_a_config_error(small_mnist, run_dirs):
    with pytest.raises(ConfigError, match="'teacher'.*nope.pth.*does not exist"):
        training.train(config(teacher='nope.pth'), data=small_mnist, log=lambda *a: None)
    garbage = run_dirs / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint')
    with pytest.raises(ConfigError, match="'init_from'.*garbage.pth cannot be read"):
        training.train(config(init_from=str(garbage)), data=small_mnist, log=lambda *a: None)
    assert garbage.read_bytes() == b'not a checkpoint'


def test_resume_without_checkpoint_and_corrupt_checkpoint(small_mnist, run_dirs):
    cfg = config(num_epochs=1)
    with pytest.raises(ConfigError, match='nothing to resume'):
        training.train(cfg, resume=True, data=small_mnist, log=lambda *a: None)
    ckpt = run_dirs / 'runs' / run_name(cfg) / 'checkpoint.pt'
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b'garbage')
    with pytest.raises(ConfigError, match='cannot be resumed.*--restart'):
        training.train(cfg, resume=True, data=small_mnist, log=lambda *a: None)
    assert ckpt.read_bytes() == b'garbage'                 # the user's file is left alone
    assert training.train(cfg, restart=True, data=small_mnist, log=lambda *a: None).exists()


def test_cuda_request_without_cuda_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(ConfigError, match="'cuda' was asked for"):
        training.pick_device(config(device='cuda'))


def test_skip_existing_does_not_retrain(run_dirs, capsys):
    cfg = load_config(overrides={'runtag': 'skip'})
    done = run_dirs / 'modeldata' / f'{run_name(cfg)}.pth'
    done.parent.mkdir(parents=True)
    done.write_bytes(b'trained')
    assert training.main(['--set', 'runtag=skip', '--skip-existing']) == 0
    assert 'already trained' in capsys.readouterr().out and done.read_bytes() == b'trained'
    assert training.main(['--set', 'runtag=skip', '--resume']) == 2
    assert 'already trained' in capsys.readouterr().err


def test_init_from_starts_from_another_runs_weights(teacher):
    cfg = config(QuantType='2bitsym', init_from=teacher)
    model = build_model(cfg, 10)
    training.init_weights(model, cfg)
    source = torch.load(teacher, weights_only=True)['state_dict']
    assert torch.equal(model.state_dict()['layers.0.weight'], source['layers.0.weight'])
    assert not torch.equal(model.state_dict()['layers.0.s'], source['layers.0.s'])   # re-estimated for 2bitsym
    with pytest.raises(ConfigError, match="'init_from'.*other layer shapes"):
        training.init_weights(build_model(config(network_width1=16, init_from=teacher), 10),
                              config(network_width1=16, init_from=teacher))


def test_validation_images_are_a_fixed_held_out_split(small_mnist):
    train, (val_x, val_y) = training.split_validation(small_mnist, 500)
    again, (val_x2, _) = training.split_validation(small_mnist, 500)
    assert len(train['train_y']) == 2500 == len(train['train_x28']) and len(val_y) == 500
    assert torch.equal(val_x, val_x2) and torch.equal(train['train_x16'], again['train_x16'])   # fixed
    rows = lambda x: {bytes(row.numpy()) for row in x}   # noqa: E731
    kept, held, every = rows(training.normalize(train['train_x16'])), rows(val_x), rows(training.normalize(small_mnist['train_x16']))
    assert not kept & held and kept | held == every                                            # disjoint, complete
    assert torch.equal(train['train_y'].bincount(minlength=10) + val_y.bincount(minlength=10),
                       small_mnist['train_y'].bincount(minlength=10))
    assert training.split_validation(small_mnist, 0) == (small_mnist, None)
    with pytest.raises(ConfigError, match="'validation_images': 3000 leaves no training images"):
        training.split_validation(small_mnist, 3000)


def test_training_logs_validation_accuracy(small_mnist, run_dirs):
    cfg = config(num_epochs=1, validation_images=400)
    saved = torch.load(training.train(cfg, data=small_mnist, log=lambda *a: None), weights_only=False)
    assert 0.5 < saved['metrics']['val_acc'] <= 1 and saved['metrics']['val_loss'] > 0
    header = (run_dirs / 'runs' / run_name(cfg) / 'metrics.csv').read_text().splitlines()[0]
    assert 'val_loss,val_acc' in header


def test_training_logs_the_live_models_validation_accuracy_beside_the_average(small_mnist, run_dirs):
    cfg = config(num_epochs=2, validation_images=400, ema_decay=0.9)
    kept = []

    def stop(metrics):
        kept.append(metrics)
        raise KeyboardInterrupt   # keeps the checkpoint, which holds the live model
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, data=small_mnist, log=lambda *a: None, on_epoch_end=stop)
    state = torch.load(run_dirs / 'runs' / run_name(cfg) / 'checkpoint.pt', weights_only=False)
    val = training.split_validation(small_mnist, 400)[1]
    for weights, key in ((state['model'], 'val_acc_live'), (state['average']['model'], 'val_acc')):
        model = build_model(cfg, 10)
        model.load_state_dict(weights)
        assert training.evaluate(model, *val, 'cpu')[1] == kept[0][key]
    assert 'val_acc_live' in (run_dirs / 'runs' / run_name(cfg) / 'metrics.csv').read_text().splitlines()[0]


def test_keep_best_saves_the_best_validation_epoch(small_mnist, run_dirs):
    cfg = config(num_epochs=3, validation_images=400, keep_best=True, augmentation=False, learning_rate=0.01)
    saved = torch.load(training.train(cfg, data=small_mnist, log=lambda *a: None), weights_only=False)
    best = max(saved['history'], key=lambda m: (m['val_acc'], -m['epoch']))
    assert saved['metrics'] == best and len(saved['history']) == 3
    model = build_model(cfg, 10)
    model.load_state_dict(saved['state_dict'])
    val_x, val_y = training.split_validation(small_mnist, 400)[1]
    assert training.evaluate(model, val_x, val_y, 'cpu')[1] == best['val_acc']   # the weights of that epoch
    with pytest.raises(ConfigError, match="'keep_best': true needs a validation set.*validation_images"):
        config(keep_best=True)


def test_int8_activation_convolutions_choose_and_freeze_their_shift():
    """act_shift brings the running quantile of the sums into 0..127; it moves only with update_clipping."""
    model = build_model(config(model='CNNMNIST', cnn_width=4, conv_activations='int8', conv_QuantType='FP130'), 10)
    conv = model.layers[1]
    x = torch.randn(32, 1, 16, 16)
    out = model.layers[:2](x)
    assert out.min() >= 0 and out.max() <= 127 and torch.equal(out, out.round())
    peak, shift = float(conv.act_peak), int(conv.act_shift)
    assert peak > 0 and (shift == 0 or peak / 2 ** (shift - 1) > 127.5 >= peak / 2 ** shift)
    conv.act_peak.fill_(peak * 64)
    model.layers[:2](x)
    assert int(conv.act_shift) == shift                # not within an epoch
    conv.update_clipping()
    assert int(conv.act_shift) > shift                 # at the next clipping update


def _write_metrics(run_dir, val, test):
    run_dir.mkdir(parents=True)
    lines = ['epoch,test_acc,val_acc'] + [f'{i + 1},{t},{v}' for i, (v, t) in enumerate(zip(val, test))]
    (run_dir / 'metrics.csv').write_text('\n'.join(lines) + '\n')


def test_compare_runs_ranks_by_validation_alone(tmp_path, capsys):
    from docs import compare_runs
    # b has the best test accuracy, a the best validation accuracy: a ranks first.
    _write_metrics(tmp_path / 'a', [0.98, 0.991, 0.990], [0.97, 0.980, 0.990])
    _write_metrics(tmp_path / 'b', [0.98, 0.989, 0.989], [0.99, 0.995, 0.996])
    plot = tmp_path / 'curves.png'
    assert compare_runs.main([str(tmp_path / 'b'), str(tmp_path / 'a'), '--plot', str(plot), '--last', '2']) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| a') or line.startswith('| b')]
    assert rows == ['| a | 3 | 2 | 99.10 % | 99.05 % | 98.00 % |', '| b | 3 | 2 | 98.90 % | 98.90 % | 99.50 % |']
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_compare_runs_groups_the_seeds_of_a_variant(tmp_path, capsys):
    from docs import compare_runs
    _write_metrics(tmp_path / 'xs1', [0.990, 0.992], [0.991, 0.993])   # kept 99.2 %, test there 99.3 %
    _write_metrics(tmp_path / 'xs2', [0.990, 0.988], [0.995, 0.990])   # kept 99.0 %, test there 99.5 %
    _write_metrics(tmp_path / 'ys1', [0.993, 0.993], [0.992, 0.999])   # equal: the earliest, test 99.2 %
    _write_metrics(tmp_path / 'other', [0.999, 0.999], [0.999, 0.999])   # matched by no group: left out
    runs = [str(tmp_path / name) for name in ('xs1', 'xs2', 'ys1', 'other')]
    assert compare_runs.main(runs + ['--group', '^([xy])s', '--last', '2']) == 0
    out = capsys.readouterr().out
    assert out.split('| variant |')[1].splitlines()[2:] == [
        '| y | 1 | 99.30 % | 99.30 – 99.30 % | 99.30 % | 99.20 – 99.20 % |',
        '| x | 2 | 99.10 % | 99.00 – 99.20 % | 99.00 % | 99.30 – 99.50 % |']
    histories = {name: compare_runs.read_history(tmp_path / name) for name in ('xs1', 'xs2', 'ys1', 'other')}
    curves = compare_runs.group_curves(histories, re.compile('^([xy])s'))
    assert {name: [[round(v, 6) for v in c] for c in curve] for name, curve in curves.items()} == {
        'x (2 runs)': [[1, 2], [99.0, 99.0], [99.0, 98.8], [99.0, 99.2]],
        'y (1 run)': [[1, 2], [99.3, 99.3], [99.3, 99.3], [99.3, 99.3]]}
    plot = tmp_path / 'variants.png'
    assert compare_runs.main(runs + ['--group', '^([xy])s', '--plot', str(plot)]) == 0
    assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert compare_runs.main(runs + ['--group', 'zzz']) == 2
    assert "--group 'zzz' matches none of the run names" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_runs.main(runs + ['--group', '('])
    assert "--group '(' is not a regular expression" in capsys.readouterr().err


def test_compare_runs_refuses_a_run_without_validation(tmp_path, capsys):
    from docs import compare_runs
    (tmp_path / 'r').mkdir()
    (tmp_path / 'r' / 'metrics.csv').write_text('epoch,test_acc\n1,0.9\n')
    assert compare_runs.main([str(tmp_path / 'r')]) == 2
    assert 'no val_acc column' in capsys.readouterr().err
    assert compare_runs.main([str(tmp_path / 'missing')]) == 2
    assert 'does not exist' in capsys.readouterr().err
