"""End to end: AGW fine-tuning (AGW/train.py) and testing (AGW/test.py) on generated data, the shared
plumbing of finetune.py, and the identity sampler."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader

import AGW.test as agw_test
import AGW.train as agw_train
import finetune
import utils
from AGW.agw_model import embed_net
import data_loader
from data_loader import CrossModalityData, IdentitySampler
from data_manager import read_split_ids
from evaluator import load_finetuned
from model import MMGLNet
from tests.helpers import assert_results_equal_eval_metrics, backbone_keys, eval_args, randomised, run_args
from utils import REPO_ROOT, UserError


def train_args(tmp_path, data_path, *extra, dataset='synthetic'):
    return run_args(tmp_path, data_path, '--arch', 'resnet18', *extra, dataset=dataset)


@pytest.fixture(scope='module')
def finetuned(tmp_path_factory, seen_ids_tree):
    """One short AGW run from random weights: (folder, run name, history)."""
    folder = tmp_path_factory.mktemp('finetuned')
    history = agw_train.main(train_args(folder, seen_ids_tree, '--epochs', '10', '--batch-size', '6',
                                        '--num_pos', '4', '--lr', '0.1'))
    return folder, 'synthetic_agw_p4_n6_lr_0.1_seed_0', history


# ----------------------------------------------------------------------------- identity sampler

def test_identity_sampler_batches_hold_identities_times_positives_with_matching_labels():
    rng = np.random.default_rng(0)
    visible_labels = rng.integers(0, 9, 60)            # identity 9 only in thermal, 0..8 in both
    thermal_labels = np.concatenate([rng.integers(0, 9, 35), [9, 9, 9]])
    batch_size, num_pos = 4, 3
    np.random.seed(5)
    sampler = IdentitySampler(visible_labels, thermal_labels, num_pos, batch_size)
    pairs = list(sampler)
    assert len(pairs) == len(sampler) == (int(60 / (batch_size * num_pos)) + 1) * batch_size * num_pos
    for start in range(0, len(pairs), batch_size * num_pos):
        batch = pairs[start:start + batch_size * num_pos]
        visible = visible_labels[[v for v, _ in batch]]
        thermal = thermal_labels[[t for _, t in batch]]
        assert (visible == thermal).all()
        assert len(set(visible.tolist())) == batch_size and 9 not in visible
        assert (visible.reshape(batch_size, num_pos) == visible[::num_pos, None]).all()  # num_pos in a row
    np.random.seed(5)
    assert list(IdentitySampler(visible_labels, thermal_labels, num_pos, batch_size)) == pairs

    # through a loader of batch_size * num_pos, as the training scripts use it
    dataset = CrossModalityData(np.zeros((60, 8, 4, 3), np.uint8), visible_labels,
                                np.zeros((38, 8, 4, 3), np.uint8), thermal_labels, data_loader.test_transform(8, 4))
    loader = DataLoader(dataset, batch_size=batch_size * num_pos, sampler=sampler)
    for visible, thermal, labels_v, labels_t in loader:
        assert visible.shape == thermal.shape == (batch_size * num_pos, 3, 8, 4)
        assert torch.equal(labels_v, labels_t) and len(labels_v.unique()) == batch_size
    with pytest.raises(UserError, match='lower --batch-size'):
        IdentitySampler(visible_labels, thermal_labels, num_pos, 10)


# ----------------------------------------------------------------------------- pre-trained checkpoints

@pytest.mark.parametrize('stream', ['two', 'one'])
def test_pretraining_checkpoints_fill_the_backbone_and_report_counts(tmp_path, stream):
    pretrained = randomised(MMGLNet('resnet18', stream).state_dict())
    files = {'plain.t': pretrained,
             'state.t': {'model': pretrained, 'optimizer': {}, 'epoch': 3},
             'agw.t': {'net': {**pretrained, 'classifier.weight': torch.zeros(5, 512)}, 'epoch': 4},
             'parallel.t': {f'module.{key}': value for key, value in pretrained.items()}}
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    for name in files:
        for net_stream in ('two', 'one'):
            if stream == 'two' and net_stream == 'one':
                continue  # two different stems do not fit one
            net = embed_net(7, arch='resnet18', stream=net_stream)
            messages = []
            report = finetune.load_pretrained(net, tmp_path / name, messages.append)
            expected = backbone_keys(net)
            assert report.loaded == expected and report.missing == [] and report.ignored == []
            assert f'loaded {len(expected)} of {len(expected)} backbone tensors' in messages[0]
            state = net.state_dict()
            for key in expected:
                source = key
                if stream == 'one' and key.startswith('thermal_module.'):
                    source = 'visible_module.visible' + key[len('thermal_module.thermal'):]
                assert torch.equal(state[key], pretrained[source]), (name, key)


def test_public_checkpoint_with_whole_resnets_loads_with_the_extra_tensors_ignored(tmp_path):
    pretrained = randomised(MMGLNet('resnet18').state_dict())
    resnet = torchvision.models.resnet18().state_dict()
    extra = {}
    for prefix, unused in (('visible_module.visible.', ('layer', 'fc.')), ('thermal_module.thermal.', ('layer', 'fc.')),
                           ('base_resnet.base.', ('conv1.', 'bn1.', 'fc.'))):
        extra.update({prefix + key: value for key, value in resnet.items() if key.startswith(unused)})
    torch.save({**pretrained, **extra}, tmp_path / 'public.t')
    net = embed_net(7, arch='resnet18')
    messages = []
    report = finetune.load_pretrained(net, tmp_path / 'public.t', messages.append)
    assert report.loaded == backbone_keys(net) and report.missing == []
    assert len(report.ignored) == len(extra) > 100
    assert f'ignored {len(extra)} backbone-named tensors' in messages[0]

    # a partial checkpoint loads what it has and names what it lacks
    del pretrained['base_resnet.base.layer4.1.bn2.weight']
    torch.save(pretrained, tmp_path / 'partial.t')
    messages = []
    report = finetune.load_pretrained(embed_net(7, arch='resnet18'), tmp_path / 'partial.t', messages.append)
    assert report.missing == ['base_resnet.base.layer4.1.bn2.weight']
    assert 'WARNING: 1 backbone tensors' in messages[1] and 'layer4.1.bn2.weight' in messages[1]


def test_foreign_or_missing_checkpoints_are_user_errors(tmp_path, sysu_preprocessed):
    net = embed_net(7, arch='resnet18')
    torch.save({'encoder.weight': torch.zeros(4, 4), 'head.bias': torch.zeros(4)}, tmp_path / 'foreign.t')
    torch.save([1, 2, 3], tmp_path / 'list.t')
    torch.save(MMGLNet('resnet50').state_dict(), tmp_path / 'resnet50.t')
    (tmp_path / 'garbage.t').write_bytes(b'not a checkpoint')
    for name, message in (('foreign.t', 'fills none'), ('list.t', 'not a state dict'),
                          ('resnet50.t', 'other shapes'), ('garbage.t', 'not a readable PyTorch checkpoint')):
        with pytest.raises(UserError, match=message):
            finetune.load_pretrained(net, tmp_path / name)

    # the training script stops, never fine-tunes from random weights instead
    with pytest.raises(UserError, match='no checkpoint file'):
        agw_train.main(train_args(tmp_path, sysu_preprocessed, '--resume', 'missing.t'))
    with pytest.raises(UserError, match='cannot initialise the resnet18 backbone'):
        agw_train.main(train_args(tmp_path, sysu_preprocessed, '--resume', str(tmp_path / 'foreign.t')))
    assert not (tmp_path / 'save_model').exists() or not list((tmp_path / 'save_model').iterdir())


def test_one_stream_finetuning_from_an_mmgl_checkpoint_logs_what_it_loaded_and_tests(tmp_path, sysu_preprocessed):
    torch.save(MMGLNet('resnet18', 'one').state_dict(), tmp_path / 'mmgl_one.t')
    history = agw_train.main(train_args(tmp_path, sysu_preprocessed, '--epochs', '1', '--batch-size', '4',
                                        '--num_pos', '2', '--stream', 'one', '--resume', 'mmgl_one.t',
                                        '--model_path', str(tmp_path)))
    assert len(history) == 1 and 'scores' in history[0]  # the last epoch is always evaluated
    name = 'synthetic_agw_p2_n4_lr_0.1_seed_0_stream_one'
    log = (tmp_path / 'log' / f'{name}.log').read_text()
    expected = len(backbone_keys(embed_net(7, arch='resnet18', stream='one')))
    assert f'loaded {expected} of {expected} backbone tensors' in log and 'mmgl_one.t' in log

    # its checkpoint, found by the naming flags, is tested by a two-stem network with equal stems
    results = agw_test.main(eval_args(sysu_preprocessed, '--model_path', str(tmp_path), '--stream', 'one',
                                      '--batch-size', '4', '--num_pos', '2'))
    assert results['fc']['cmc'][0] == pytest.approx(np.mean([cmc[0] for cmc, _, _ in results['fc']['trials']]))


def test_load_finetuned_takes_public_checkpoints_and_refuses_other_networks(tmp_path):
    trained = randomised(embed_net(9, arch='resnet18').state_dict())
    public = {**trained, 'visible_module.visible.fc.weight': torch.zeros(1000, 512),
              'base_resnet.base.conv1.weight': torch.zeros(64, 3, 7, 7)}
    torch.save({'net': public, 'cmc': np.zeros(20), 'mAP': 0.5, 'epoch': 7}, tmp_path / 'public_best.t')

    def build(class_num, arch):
        return embed_net(class_num, arch=arch)
    net, checkpoint = load_finetuned(tmp_path / 'public_best.t', build)
    assert net.classifier.out_features == 9 and net.arch == 'resnet18' and checkpoint['epoch'] == 7
    assert all(torch.equal(net.state_dict()[key], value) for key, value in trained.items())
    with pytest.raises(UserError, match='does not fit'):
        load_finetuned(tmp_path / 'public_best.t', lambda n, arch: embed_net(n, 'off', 'off', arch=arch))


# ----------------------------------------------------------------------------- fine-tuning and testing

def test_short_finetuning_learns(finetuned, seen_ids_tree):
    folder, name, history = finetuned
    chance = 1 / len(read_split_ids(seen_ids_tree, 'test'))
    assert [stats['epoch'] for stats in history] == list(range(10))
    assert history[-1]['loss'] < history[0]['loss'] and history[-1]['accuracy'] > 0.5
    evaluated = [stats for stats in history if 'scores' in stats]
    assert [stats['epoch'] for stats in evaluated] == [2, 4, 6, 8, 9]
    best_rank1 = max(stats['scores']['fc'][0][0] for stats in evaluated)
    assert best_rank1 > 3 * chance

    best = torch.load(folder / 'save_model' / f'{name}_best.t', weights_only=True)
    assert set(best) == {'net', 'cmc', 'mAP', 'mINP', 'epoch'}
    assert best['cmc'][0].item() == pytest.approx(best_rank1)
    assert utils.load_checkpoint(folder / 'save_model' / f'{name}_epoch_9.t')['epoch'] == 9
    assert (folder / 'save_model' / f'{name}_state.t').is_file()
    log = (folder / 'log' / f'{name}.log').read_text()
    assert 'starts from random initialisation' in log and 'FC:' in log and 'POOL:' in log
    assert list((folder / 'log' / 'vis' / name).glob('events.out.tfevents.*'))


def test_test_script_reports_what_eval_metrics_gives_on_the_same_features(finetuned, synthetic_demo):
    folder, name, _ = finetuned
    best = folder / 'save_model' / f'{name}_best.t'
    # one image per batch, as computed by hand below, so that both see bit-identical features
    results = agw_test.main(eval_args(synthetic_demo, '--resume', str(best), '--test-batch', '1'))

    net = embed_net(13, arch='resnet18')
    net.load_state_dict(torch.load(best, weights_only=True)['net'])
    net.eval()
    assert_results_equal_eval_metrics(results, net, synthetic_demo, ('pool', 'fc'))


def test_test_script_refuses_missing_foreign_and_mismatched_checkpoints(tmp_path, finetuned, sysu_preprocessed):
    folder, name, _ = finetuned
    args = eval_args(sysu_preprocessed, '--model_path', str(folder / 'save_model'))
    with pytest.raises(UserError, match='no checkpoint file'):
        agw_test.main(args + ['--resume', 'nothing_here.t'])
    with pytest.raises(UserError, match='no checkpoint file'):
        agw_test.main(args)  # the default name, synthetic_agw_p4_n8_lr_0.1_seed_0_best.t, was never trained
    with pytest.raises(UserError, match='does not fit the network'):
        agw_test.main(args + ['--resume', f'{name}_best.t', '--method', 'base'])
    with pytest.raises(UserError, match='not --arch resnet50'):
        agw_test.main(args + ['--resume', f'{name}_best.t', '--arch', 'resnet50'])
    torch.save(MMGLNet('resnet18').state_dict(), tmp_path / 'mmgl.t')
    with pytest.raises(UserError, match='not a fine-tuned checkpoint'):
        agw_test.main(args + ['--resume', str(tmp_path / 'mmgl.t')])


def test_resume_state_continues_exactly_where_the_run_stopped(tmp_path, sysu_preprocessed):
    common = ('--batch-size', '4', '--num_pos', '2', '--save_epoch', '1')
    name = 'synthetic_agw_p2_n4_lr_0.1_seed_0'
    straight = tmp_path / 'straight'
    agw_train.main(train_args(straight, sysu_preprocessed, *common, '--epochs', '2'))

    interrupted = tmp_path / 'interrupted'
    agw_train.main(train_args(interrupted, sysu_preprocessed, *common, '--epochs', '1'))
    history = agw_train.main(train_args(interrupted, sysu_preprocessed, *common, '--epochs', '2',
                                        '--resume_state', f'{name}_state.t'))
    assert [stats['epoch'] for stats in history] == [1]
    assert 'resumed' in (interrupted / 'log' / f'{name}.log').read_text()
    resumed = torch.load(interrupted / 'save_model' / f'{name}_epoch_1.t', weights_only=True)['net']
    reference = torch.load(straight / 'save_model' / f'{name}_epoch_1.t', weights_only=True)['net']
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(resumed[key].float(), reference[key].float(), atol=1e-5), key
    state = torch.load(interrupted / 'save_model' / f'{name}_state.t', weights_only=False)
    assert state['epoch'] == 2

    with pytest.raises(UserError, match='not a training-state file'):
        agw_train.main(train_args(interrupted, sysu_preprocessed, *common, '--epochs', '3',
                                  '--resume_state', f'{name}_epoch_1.t'))
    with pytest.raises(UserError, match='resume with the same flags'):
        agw_train.main(train_args(interrupted, sysu_preprocessed, *common, '--epochs', '3', '--method', 'base',
                                  '--resume_state', str(interrupted / 'save_model' / f'{name}_state.t')))


def test_regdb_training_and_per_trial_testing(tmp_path, regdb_tree):
    history = agw_train.main(train_args(tmp_path, regdb_tree, '--trial', '2', '--epochs', '1', '--batch-size', '3',
                                        '--num_pos', '2', dataset='regdb'))
    assert 'scores' in history[-1]
    name = 'regdb_agw_p2_n3_lr_0.1_seed_0_trial_2'
    model_path = tmp_path / 'save_model'
    assert (model_path / f'{name}_best.t').is_file()

    # the default checkpoint name comes from the naming flags, as train.py formed it
    args = eval_args(regdb_tree, '--model_path', str(model_path), '--num_pos', '2', '--batch-size', '3',
                     dataset='regdb')
    one = agw_test.main(args + ['--trial', '2'])
    assert len(one['fc']['trials']) == 1 and one['fc']['cmc'][0] == pytest.approx(one['fc']['trials'][0][0][0])
    with pytest.raises(UserError, match='no checkpoint file'):
        agw_test.main(args + ['--trial', '3'])
    with pytest.raises(UserError, match='write "{trial}" in --resume'):
        agw_test.main(args + ['--trial', '0', '--resume', f'{name}_best.t'])

    # --trial 0: the ten splits, each with its own file ({trial} in --resume)
    for trial in range(1, 11):
        shutil.copy(model_path / f'{name}_best.t', tmp_path / f'net_trial_{trial}.t')
    pattern = str(tmp_path / 'net_trial_{trial}.t')
    every = agw_test.main(args + ['--trial', '0', '--resume', pattern])
    assert len(every['pool']['trials']) == 10
    assert every['pool']['trials'][1][1] == pytest.approx(one['pool']['mAP'])  # split 2 is the second
    assert every['pool']['mAP'] == pytest.approx(np.mean([mAP for _, mAP, _ in every['pool']['trials']]))
    reverse = agw_test.main(args + ['--trial', '2', '--tvsearch'])
    assert 0 < reverse['fc']['mAP'] <= 1


def test_command_line_errors_are_one_sentence_and_exit_non_zero(tmp_path):
    agw = REPO_ROOT / 'AGW'
    completed = subprocess.run([sys.executable, 'test.py', '--dataset', 'regdb', '--trial', '1',
                                '--resume', 'missing_{trial}.t', '--model_path', str(tmp_path)],
                               capture_output=True, text=True, cwd=agw)
    assert completed.returncode == 2
    assert completed.stderr.strip().startswith('error: --resume: no checkpoint file')
    assert 'Traceback' not in completed.stderr
    completed = subprocess.run([sys.executable, str(agw / 'train.py'), '--dataset', 'regdb',
                                '--data_path', str(tmp_path / 'no'), '--resume', 'missing.t'],
                               capture_output=True, text=True, cwd=tmp_path)
    assert completed.returncode == 2 and 'error: --resume: no checkpoint file' in completed.stderr
    assert not (tmp_path / 'log').exists()  # nothing was started
