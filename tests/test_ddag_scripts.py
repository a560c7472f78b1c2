"""End to end: DDAG fine-tuning (DDAG/train_ddag.py) and testing (DDAG/test_ddag.py) on generated data.
The shared plumbing they use (finetune.py) is covered in depth by test_agw_scripts.py."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import DDAG.test_ddag as ddag_test
import DDAG.train_ddag as ddag_train
import utils
from DDAG.ddag_model import build_net, embed_net, run_name
from data_manager import read_split_ids
from evaluator import load_finetuned
from model import MMGLNet
from tests.helpers import assert_results_equal_eval_metrics, backbone_keys, eval_args, run_args
from utils import REPO_ROOT, UserError

# A small graph attention keeps the tests quick; the public sizes are --low-dim 512 --nheads 4.
SMALL = ('--arch', 'resnet18', '--low-dim', '32', '--nheads', '2')


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, two threads slow these tiny networks down many times
    as soon as another process is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_args(tmp_path, data_path, *extra, dataset='synthetic'):
    return run_args(tmp_path, data_path, *SMALL, *extra, dataset=dataset)


def ddag_eval_args(data_path, *extra, dataset='synthetic'):
    return eval_args(data_path, '--low-dim', '32', '--nheads', '2', *extra, dataset=dataset)


@pytest.fixture(scope='module')
def finetuned(tmp_path_factory, seen_ids_tree):
    """One short DDAG run with both attention branches, from random weights: (folder, run name, history)."""
    folder = tmp_path_factory.mktemp('ddag_finetuned')
    history = ddag_train.main(train_args(folder, seen_ids_tree, '--epochs', '8', '--batch-size', '6',
                                         '--num_pos', '4', '--lr', '0.05', '--wpa', '--graph'))
    return folder, 'synthetic_G_P_3_drop_0.2_4_6_lr_0.05_seed_0', history


def test_run_names_follow_the_public_script():
    parse = ddag_train.get_args_parser().parse_args
    assert run_name(parse(['--wpa', '--graph'])) == 'sysu_G_P_3_drop_0.2_4_8_lr_0.1_seed_0'
    assert run_name(parse(['--dataset', 'regdb', '--trial', '3', '--optim', 'adam'])) == \
        'regdb_drop_0.2_4_8_lr_0.1_seed_0_adam_trial_3'
    args = parse([])
    assert (args.lr, args.margin, args.lambda0, args.epochs, args.vis_log_path) == (0.1, 0.3, 1.0, 81, 'log/vis_log_ddag/')


def test_lr_steps_give_the_mmgl_or_the_ddag_schedule(tmp_path, sysu_preprocessed):
    parse = ddag_train.get_args_parser().parse_args
    assert parse([]).lr_steps == [30, 50]  # the MMGL authors' copy of train_ddag.py
    assert parse(['--lr_steps', '20', '50']).lr_steps == [20, 50]  # mangye16's DDAG

    # One real epoch, then its state file moved on to epoch 20, where the schedules differ: mangye16's
    # has dropped to 0.1 x --lr, the MMGL authors' keeps --lr until epoch 30.
    common = ('--batch-size', '2', '--num_pos', '2', '--lr', '0.1')
    name = 'synthetic_drop_0.2_2_2_lr_0.1_seed_0'
    ddag_train.main(train_args(tmp_path / 'start', sysu_preprocessed, *common, '--epochs', '1'))
    state = torch.load(tmp_path / 'start' / 'save_model' / f'{name}_state.t', weights_only=False)
    state['epoch'] = 20
    for folder, steps, expected in (('default', (), 0.1), ('ddag', ('--lr_steps', '20', '50'), 0.01)):
        state_file = tmp_path / folder / 'save_model' / f'{name}_state.t'
        state_file.parent.mkdir(parents=True)
        torch.save(state, state_file)
        history = ddag_train.main(train_args(tmp_path / folder, sysu_preprocessed, *common, *steps, '--epochs', '21',
                                             '--resume_state', str(state_file)))
        assert [stats['epoch'] for stats in history] == [20]
        assert history[0]['lr'] == pytest.approx(expected)
        groups = torch.load(state_file, weights_only=False)['optimizer']['param_groups']  # rewritten after epoch 20
        assert groups[0]['lr_scale'] == 0.1  # the backbone
        assert [group['lr'] for group in groups] == pytest.approx([group['lr_scale'] * expected for group in groups])


def assert_backbone_loaded(log, stream, checkpoint):
    expected = len(backbone_keys(embed_net(32, 7, arch='resnet18', stream=stream)))
    assert f'loaded {expected} of {expected} backbone tensors of the resnet18 {stream}-stream' in log
    assert checkpoint in log and 'WARNING' not in log


def test_missing_or_foreign_checkpoints_stop_the_run(tmp_path, sysu_preprocessed):
    torch.save({'encoder.weight': torch.zeros(4, 4)}, tmp_path / 'foreign.t')
    with pytest.raises(UserError, match='no checkpoint file'):
        ddag_train.main(train_args(tmp_path, sysu_preprocessed, '--resume', 'missing.t'))
    with pytest.raises(UserError, match='cannot initialise the resnet18 backbone'):
        ddag_train.main(train_args(tmp_path, sysu_preprocessed, '--resume', str(tmp_path / 'foreign.t')))
    assert not (tmp_path / 'save_model').exists() or not list((tmp_path / 'save_model').iterdir())
    completed = subprocess.run([sys.executable, 'train_ddag.py', '--dataset', 'regdb', '--data_path', str(tmp_path),
                                '--resume', 'missing.t', '--model_path', str(tmp_path)],
                               capture_output=True, text=True, cwd=REPO_ROOT / 'DDAG')
    assert completed.returncode == 2 and completed.stderr.strip().startswith('error: --resume: no checkpoint file')


def test_short_finetuning_with_both_attentions_learns_and_adapts_the_graph_weight(finetuned, seen_ids_tree):
    folder, name, history = finetuned
    chance = 1 / len(read_split_ids(seen_ids_tree, 'test'))
    assert [stats['epoch'] for stats in history] == list(range(8))
    assert history[-1]['loss'] < history[0]['loss'] and history[-1]['accuracy'] > 0.5
    assert {'id_loss', 'tri_loss', 'part_loss', 'graph_loss', 'graph_weight'} <= set(history[0])

    # wG: 0 in the first epoch, then 1 / (1 + the mean loss of the epoch before)
    assert history[0]['graph_weight'] == 0 and history[0]['loss'] == pytest.approx(history[0]['instance_loss'])
    assert history[0]['wG'] == pytest.approx(1 / (1 + history[0]['loss']))
    for before, after in zip(history, history[1:]):
        assert after['graph_weight'] == pytest.approx(before['wG'])
        assert before['wG'] == pytest.approx(1 / (1 + before['instance_loss']))
        assert after['loss'] == pytest.approx(after['instance_loss'] + after['graph_weight'] * after['graph_loss'],
                                              rel=1e-4)

    evaluated = [stats for stats in history if 'scores' in stats]
    assert [stats['epoch'] for stats in evaluated] == [2, 4, 6, 7]
    best_rank1 = max(stats['scores']['att'][0][0] for stats in evaluated)
    assert best_rank1 > 3 * chance
    assert max(stats['scores']['fc'][0][0] for stats in evaluated) > 3 * chance

    best = torch.load(folder / 'save_model' / f'{name}_best.t', weights_only=True)
    assert set(best) == {'net', 'cmc', 'mAP', 'mINP', 'epoch'}
    assert best['cmc'][0].item() == pytest.approx(best_rank1)  # selected on the attention feature, as public
    assert utils.load_checkpoint(folder / 'save_model' / f'{name}_epoch_7.t')['epoch'] == 7
    state = torch.load(folder / 'save_model' / f'{name}_state.t', weights_only=False)
    assert state['ddag_loss']['wG'] == pytest.approx(history[-1]['wG'])
    log = (folder / 'log' / f'{name}.log').read_text()
    assert 'graph_loss' in log and ' wG ' in log and 'FC:' in log and 'ATT:' in log
    events = b''.join(path.read_bytes() for path in (folder / 'log' / 'vis' / name).glob('events.out.tfevents.*'))
    for tag in (b'train/graph_loss', b'epoch/wG', b'epoch/graph_loss', b'test/att_rank1'):
        assert tag in events


def test_one_stream_mmgl_checkpoint_and_no_graph_branch(tmp_path, sysu_preprocessed):
    """A one-stream MMGL backbone fills a one-stem network; without --graph no graph loss is computed."""
    torch.save(MMGLNet('resnet18', 'one').state_dict(), tmp_path / 'mmgl_one.t')
    history = ddag_train.main(train_args(tmp_path, sysu_preprocessed, '--epochs', '1', '--batch-size', '4',
                                         '--num_pos', '2', '--stream', 'one', '--resume', 'mmgl_one.t',
                                         '--model_path', str(tmp_path)))
    assert_backbone_loaded((tmp_path / 'log' / 'synthetic_drop_0.2_2_4_lr_0.1_seed_0_stream_one.log').read_text(),
                           'one', 'mmgl_one.t')
    assert 'graph_loss' not in history[0] and 'part_loss' not in history[0] and history[0]['wG'] > 0
    assert history[0]['scores']['fc'][1] == history[0]['scores']['att'][1]  # no IWPA: the BNNeck feature twice


def test_test_script_reports_what_eval_metrics_gives_on_the_same_features(finetuned, seen_ids_tree, capsys):
    folder, name, _ = finetuned
    # the default checkpoint: <run>_best.t of the naming flags; one image per batch, as computed by hand below
    results = ddag_test.main(ddag_eval_args(seen_ids_tree, '--model_path', str(folder / 'save_model'), '--wpa', '--graph',
                                       '--batch-size', '6', '--lr', '0.05', '--test-batch', '1'))
    printed = capsys.readouterr().out
    assert 'FC:' in printed and 'ATT:' in printed and 'All Average (10 trials' in printed

    best = folder / 'save_model' / f'{name}_best.t'
    state = torch.load(best, weights_only=True)['net']
    net = embed_net(32, len(state['classifier.weight']), nheads=2, arch='resnet18', wpa=True)
    net.load_state_dict(state)
    net.eval()
    assert_results_equal_eval_metrics(results, net, seen_ids_tree, ('fc', 'att'))

    # a network of other flags than the checkpoint's is refused
    with pytest.raises(UserError, match='does not fit the network'):
        ddag_test.main(ddag_eval_args(seen_ids_tree, '--resume', str(best)))  # no --wpa
    with pytest.raises(UserError, match='not a fine-tuned checkpoint'):
        torch.save(MMGLNet('resnet18').state_dict(), folder / 'mmgl.t')
        ddag_test.main(ddag_eval_args(seen_ids_tree, '--resume', str(folder / 'mmgl.t'), '--wpa'))


def test_public_checkpoints_load_without_their_unused_tensors(tmp_path):
    net = embed_net(32, 9, nheads=2, arch='resnet18', wpa=True)
    public = {**net.state_dict(), 'classifier1.weight': torch.zeros(9, 512), 'classifier2.weight': torch.zeros(9, 512),
              'wpa.W.0.weight': torch.zeros(512, 512, 1, 1)}
    torch.save({'net': public, 'cmc': np.zeros(20), 'mAP': 0.5, 'epoch': 7}, tmp_path / 'public_best.t')
    args = ddag_test.get_args_parser().parse_args(['--wpa', '--low-dim', '32', '--nheads', '2'])
    loaded, checkpoint = load_finetuned(tmp_path / 'public_best.t',
                                                 lambda n, arch: build_net(n, args, arch),
                                                 unused_prefixes=ddag_test.PUBLIC_UNUSED)
    assert checkpoint['epoch'] == 7 and loaded.classifier.out_features == 9
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in net.state_dict().items())


def test_resume_state_continues_with_the_graph_weight_it_had(tmp_path, sysu_preprocessed):
    torch.save(MMGLNet('resnet18', 'two').state_dict(), tmp_path / 'mmgl_two.t')
    common = ('--batch-size', '4', '--num_pos', '2', '--save_epoch', '1', '--resume', str(tmp_path / 'mmgl_two.t'),
              '--wpa', '--graph', '--lambda0', '0.5')
    name = 'synthetic_G_P_3_drop_0.2_2_4_lr_0.1_seed_0'
    straight = tmp_path / 'straight'
    reference_history = ddag_train.main(train_args(straight, sysu_preprocessed, *common, '--epochs', '2'))
    assert_backbone_loaded((straight / 'log' / f'{name}.log').read_text(), 'two', 'mmgl_two.t')
    assert reference_history[1]['graph_weight'] == pytest.approx(0.5 * reference_history[0]['wG'])  # --lambda0

    interrupted = tmp_path / 'interrupted'
    first = ddag_train.main(train_args(interrupted, sysu_preprocessed, *common, '--epochs', '1'))
    history = ddag_train.main(train_args(interrupted, sysu_preprocessed, *common, '--epochs', '2',
                                         '--resume_state', f'{name}_state.t'))
    assert [stats['epoch'] for stats in history] == [1]
    assert history[0]['graph_weight'] == pytest.approx(0.5 * first[0]['wG']) and first[0]['wG'] > 0  # restored
    assert history[0]['loss'] == pytest.approx(reference_history[1]['loss'], rel=1e-4)
    log = (interrupted / 'log' / f'{name}.log').read_text()
    assert 'resumed' in log and f'wG {first[0]["wG"]:.4g}' in log
    resumed = torch.load(interrupted / 'save_model' / f'{name}_epoch_1.t', weights_only=True)['net']
    reference = torch.load(straight / 'save_model' / f'{name}_epoch_1.t', weights_only=True)['net']
    for key in reference:
        assert torch.allclose(resumed[key].float(), reference[key].float(), atol=1e-5), key

    with pytest.raises(UserError, match='resume with the same flags'):
        ddag_train.main(train_args(interrupted, sysu_preprocessed, *common[:-3], '--epochs', '3',
                                   '--resume_state', str(interrupted / 'save_model' / f'{name}_state.t')))


def test_regdb_training_and_testing_of_one_split(tmp_path, regdb_tree):
    history = ddag_train.main(train_args(tmp_path, regdb_tree, '--trial', '2', '--epochs', '1', '--batch-size', '3',
                                         '--num_pos', '2', '--wpa', '--graph', dataset='regdb'))
    assert 'scores' in history[-1] and history[-1]['wG'] > 0
    name = 'regdb_G_P_3_drop_0.2_2_3_lr_0.1_seed_0_trial_2'
    assert (tmp_path / 'save_model' / f'{name}_best.t').is_file()
    args = ddag_eval_args(regdb_tree, '--model_path', str(tmp_path / 'save_model'), '--num_pos', '2', '--batch-size', '3',
                     '--wpa', '--graph', '--trial', '2', dataset='regdb')
    one = ddag_test.main(args)
    assert len(one['att']['trials']) == 1 and one['att']['cmc'][0] == pytest.approx(one['att']['trials'][0][0][0])
    reverse = ddag_test.main(args + ['--tvsearch'])
    assert 0 < reverse['fc']['mAP'] <= 1
