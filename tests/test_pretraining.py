"""End to end: pre-training with train.py and judging the checkpoint with test.py, on generated data."""
import subprocess
import sys

import pytest
import torch

import test as mmgl_test
import train as mmgl_train
from loss import cycle_contrastive_loss, figure_contrastive_loss
from model import MMGLNet, mmgl_config
from tests.helpers import run_args
from utils import REPO_ROOT, UserError

sys.path.insert(0, str(REPO_ROOT / 'bench'))
import runs_table  # noqa: E402
import study_tools  # noqa: E402


def train_args(tmp_path, data_path, *extra):
    return run_args(tmp_path, data_path, '--arch', 'resnet18', *extra)


def test_the_papers_command_learns_permutation_recovery_on_held_out_identities(tmp_path, synthetic_demo, capsys):
    """The paper's optimiser and losses (SGD at lr 0.1, --pcc --part, the warm-up) at toy size: 200 steps
    of ResNet-18 at 96x48 recover the stripe order of unseen people far above chance, and PCC trains.
    bench/study_tools.py and bench/runs_table.py read the same figures back from the log and test.py's output."""
    history = mmgl_train.main(train_args(tmp_path, synthetic_demo, '--img_h', '96', '--img_w', '48', '--batch-size', '8',
                                       '--lr', '0.1', '--pcc', '--part', '--epochs', '10', '--steps_per_epoch', '20'))
    chance_exact, chance_stripe = 1 / 720, 1 / 6
    assert history[-1]['pcc_loss'] < 0.8 * history[0]['pcc_loss']

    name = 'synthetic_mmgl_two_resnet18_s6_pcc_part_lr_0.1_seed_0'
    weights = tmp_path / 'save_model' / f'{name}_epoch_10.t'
    assert weights.is_file() and (tmp_path / 'save_model' / f'{name}_state.t').is_file()
    assert 'perm_exact' in (tmp_path / 'log' / f'{name}.log').read_text()
    assert list((tmp_path / 'log' / 'vis' / name).glob('events.out.tfevents.*'))
    state = torch.load(weights, weights_only=True)
    assert all(torch.is_tensor(value) for value in state.values())

    capsys.readouterr()
    results = mmgl_test.main(['--dataset', 'synthetic', '--data_path', str(synthetic_demo), '--resume', str(weights),
                              '--img_h', '96', '--img_w', '48', '--workers', '0'])
    (tmp_path / 'test_output.txt').write_text(capsys.readouterr().out)
    logged = study_tools.read_history(tmp_path / 'log' / f'{name}.log')
    assert [epoch['steps'] for epoch in logged] == [epoch['steps'] for epoch in history]
    for key in ('perm_exact', 'perm_stripe', 'pcc_loss'):
        assert [epoch[key] for epoch in logged] == pytest.approx([epoch[key] for epoch in history], abs=6e-5)
    assert runs_table.read_test(tmp_path / 'test_output.txt') == pytest.approx(
        {'perm_exact': results['perm_exact'], 'perm_stripe': results['perm_stripe'],
         'rank1': float(results['cmc'][0]), 'mAP': float(results['mAP'])}, abs=6e-5)
    # runs named VARIANT.seedN are also tabulated over the seeds (here one run stands for three)
    run = f"{tmp_path / 'log' / f'{name}.log'},{tmp_path / 'test_output.txt'}"
    runs_table.main(['--out', str(tmp_path / 'table'), '--setting', 'toy', f'default.seed0={run}',
                     f'default.seed1={run}', f'default+fast.seed0={run}'])
    exact = f"{100 * results['perm_exact']:.1f}"
    seeds = (tmp_path / 'table' / 'seeds.md').read_text()
    assert f'| default | {exact} / {exact} | {exact} ± 0.0 |' in seeds
    assert f'| default+fast | {exact} / failed | {exact} ± 0.0 (n=1) (+0.0 ± 0.0) |' in seeds
    assert '- default+fast, seed 1 failed: no run given' in seeds
    assert '| default.seed1 | `--perm_input parts --pcc_grad heads` |' in (tmp_path / 'table' / 'table.md').read_text()
    with pytest.raises(SystemExit, match='for every run'):  # seeds for some runs only
        runs_table.main(['--out', str(tmp_path / 'table'), '--setting', 'toy', f'default={run}', f'default.seed1={run}'])
    print(f"held-out identities: exact {results['perm_exact']:.4f}, per stripe {results['perm_stripe']:.4f}")
    assert results['perm_stripe'] > 1.5 * chance_stripe
    assert results['perm_exact'] > 5 * chance_exact
    assert 0 < results['cmc'][0] <= 1 and 0 < results['mAP'] <= 1


def test_every_new_pretraining_flag_reaches_the_run(tmp_path, sysu_preprocessed):
    history = mmgl_train.main(train_args(tmp_path, sysu_preprocessed, '--batch-size', '4', '--epochs', '2',
                                       '--steps_per_epoch', '3', '--pcc', '--part', '--pcc_form', 'figure',
                                       '--cl_warmup', '2', '--cl_weight', '0.4', '--pcc_grad', 'heads',
                                       '--perm_input', 'parts', '--perm_bn', '--perm_loss', 'ce',
                                       '--sinkhorn_tau', '0.5', '--save_epoch', '1'))
    assert [epoch['steps'] for epoch in history] == [3, 6]          # --steps_per_epoch
    assert [epoch['cl_weight'] for epoch in history] == pytest.approx([0.0, 0.2])  # --cl_warmup ramps to --cl_weight
    assert history[0]['perm_loss'] > 0.5                              # --perm_loss ce: about log 6 at the start
    name = 'synthetic_mmgl_two_resnet18_s6_pcc_part_figure_ce_lr_0.1_seed_0'
    state = torch.load(tmp_path / 'save_model' / f'{name}_epoch_1.t', weights_only=True)
    assert mmgl_config(state) == {'arch': 'resnet18', 'num_stripe': 6, 'part': True, 'perm_input': 'parts',
                                  'perm_bn': True}
    logged = (tmp_path / 'log' / f'{name}.log').read_text()
    assert "'sinkhorn_tau': 0.5" in logged and "'pcc_grad': 'heads'" in logged and "'pcc_form': 'figure'" in logged

    # --pcc_form picks the loss
    embeddings = torch.nn.functional.normalize(torch.randn(4, 6, 8), dim=2)
    visible, thermal = embeddings[:2].flatten(0, 1), embeddings[2:].flatten(0, 1)
    for form, expected in (('figure', figure_contrastive_loss(visible, thermal, 6, 0.07)),
                           ('cycle', cycle_contrastive_loss(visible, thermal, 0.07))):
        args = mmgl_train.get_args_parser().parse_args(['--pcc', '--part', '--pcc_form', form])
        assert torch.allclose(mmgl_train.pcc_loss_of(embeddings, 2, args), expected)


def test_the_flags_that_let_pcc_shape_the_backbone_reach_the_network():
    """--pcc_grad_scale and --pcc_start set the share of the PCC gradient the backbone gets, epoch by
    epoch; --pcc_views plain puts the unshuffled images through the same forward pass and takes the
    PCC embeddings from them, the permutations from the shuffled ones."""
    args = mmgl_train.get_args_parser().parse_args(['--pcc', '--part', '--pcc_grad', 'backbone', '--pcc_grad_scale',
                                                    '0.1', '--pcc_start', '2', '--pcc_views', 'plain'])
    assert mmgl_train.run_name(args) == 'sysu_mmgl_two_resnet50_s6_pcc_part_pccbackbone0.1_from2_plain_lr_0.1_seed_0'
    model = MMGLNet('resnet18', 'two', num_stripe=6, part=True, perm_input='parts').eval()
    calls = []

    def spy(visible, thermal, embedding_grad_scale):
        calls.append((visible, thermal, embedding_grad_scale))
        return model(visible, thermal, embedding_grad_scale=embedding_grad_scale)

    generator = torch.Generator().manual_seed(3)
    visible, thermal = torch.randn(2, 3, 48, 24, generator=generator), torch.randn(2, 3, 48, 24, generator=generator)
    step = mmgl_train.make_step(args)
    _, values = step(spy, visible, thermal, None, epoch=1)
    _, later = step(spy, visible, thermal, None, epoch=2)
    assert [scale for _, _, scale in calls] == [0.0, 0.1]
    seen_visible, seen_thermal, _ = calls[0]
    assert torch.equal(seen_visible[2:], visible) and torch.equal(seen_thermal[2:], thermal)
    assert not torch.equal(seen_visible[:2], visible)  # the shuffled copies come first
    with torch.no_grad():  # eval mode: the plain images' embeddings do not depend on the shuffled ones
        plain = model(visible, thermal)['embeddings']
    assert torch.allclose(values['pcc_loss'], mmgl_train.pcc_loss_of(plain, 2, args), atol=1e-5)
    assert torch.allclose(later['pcc_loss'], values['pcc_loss'], atol=1e-5)


def test_resume_continues_exactly_where_the_run_stopped(tmp_path, sysu_preprocessed):
    common = ('--batch-size', '8', '--lr', '0.01', '--save_epoch', '1')
    straight = tmp_path / 'straight'
    mmgl_train.main(train_args(straight, sysu_preprocessed, *common, '--epochs', '2'))

    interrupted = tmp_path / 'interrupted'
    mmgl_train.main(train_args(interrupted, sysu_preprocessed, *common, '--epochs', '1'))
    name = 'synthetic_mmgl_two_resnet18_s6_lr_0.01_seed_0'
    history = mmgl_train.main(train_args(interrupted, sysu_preprocessed, *common, '--epochs', '2',
                                       '--resume', f'{name}_state.t'))
    assert len(history) == 1  # only the second epoch ran
    assert 'resumed' in (interrupted / 'log' / f'{name}.log').read_text()
    resumed = torch.load(interrupted / 'save_model' / f'{name}_epoch_2.t', weights_only=True)
    reference = torch.load(straight / 'save_model' / f'{name}_epoch_2.t', weights_only=True)
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(resumed[key].float(), reference[key].float(), atol=1e-5), key


def test_resume_rejects_a_weights_file_and_other_flags(tmp_path, sysu_preprocessed):
    mmgl_train.main(train_args(tmp_path, sysu_preprocessed, '--batch-size', '8', '--epochs', '1'))
    name = 'synthetic_mmgl_two_resnet18_s6_lr_0.1_seed_0'
    with pytest.raises(UserError, match='not a training-state file'):
        mmgl_train.main(train_args(tmp_path, sysu_preprocessed, '--batch-size', '8', '--epochs', '2',
                                 '--resume', f'{name}_epoch_1.t'))
    with pytest.raises(UserError, match='resume with the same flags'):
        mmgl_train.main(train_args(tmp_path, sysu_preprocessed, '--batch-size', '8', '--epochs', '2', '--pcc',
                                 '--part', '--resume', f'{name}_state.t'))


@pytest.mark.parametrize('flags, message', [
    (('--data_path', '/nonexistent/SYSU-MM01', '--dataset', 'sysu'), 'SYSU-MM01 not found'),
    (('--img_h', '50'), 'not divisible by --num_stripe'),
    (('--part',), 'add --pcc'),
    (('--steps_per_epoch', '-1'), '--steps_per_epoch must be 0 or more'),
    (('--pcc', '--pcc_grad_scale', '0.1'), 'add --pcc --pcc_grad backbone'),
    (('--pcc_views', 'plain'), 'the images the PCC loss sees: add --pcc'),
    (('--pcc', '--pcc_grad', 'backbone', '--pcc_start', '-1'), '--pcc_start must be 0 or more'),
    (('--pcc', '--pcc_form', 'figure', '--batch-size', '1'), 'other images'),
    (('--resume', 'missing_state.t'), 'no checkpoint file'),
])
def test_train_bad_input_is_one_clear_error(tmp_path, sysu_preprocessed, flags, message):
    with pytest.raises(UserError, match=message):
        mmgl_train.main(train_args(tmp_path, sysu_preprocessed, '--epochs', '1', *flags))


def test_train_needs_the_preprocessed_arrays(tmp_path, sysu_tree):
    with pytest.raises(UserError, match='pre_process_sysu.py'):
        mmgl_train.main(train_args(tmp_path, sysu_tree, '--dataset', 'sysu', '--epochs', '1'))


def test_test_script_rejects_missing_and_foreign_checkpoints(tmp_path, sysu_preprocessed):
    args = ['--dataset', 'synthetic', '--data_path', str(sysu_preprocessed), '--workers', '0',
            '--model_path', str(tmp_path)]
    with pytest.raises(UserError, match='no checkpoint file'):
        mmgl_test.main(args + ['--resume', 'nothing_here.t'])
    torch.save({'net': {'classifier.weight': torch.zeros(3, 4)}, 'epoch': 3}, tmp_path / 'agw_best.t')
    with pytest.raises(UserError, match='not an MMGL pre-training checkpoint'):
        mmgl_test.main(args + ['--resume', 'agw_best.t'])
    (tmp_path / 'garbage.t').write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match='not a readable PyTorch checkpoint'):
        mmgl_test.main(args + ['--resume', 'garbage.t'])


def test_command_line_errors_are_one_sentence_and_exit_non_zero(tmp_path):
    script = str(REPO_ROOT / 'train.py')
    completed = subprocess.run([sys.executable, script, '--dataset', 'regdb', '--data_path', str(tmp_path / 'no'),
                                '--log_path', str(tmp_path / 'log'), '--vis_log_path', str(tmp_path / 'vis')],
                               capture_output=True, text=True, cwd=tmp_path)
    assert completed.returncode == 2
    assert completed.stderr.strip().startswith('error: RegDB not found')
    assert 'Traceback' not in completed.stderr


def test_pretraining_and_judging_on_regdb(tmp_path, regdb_tree):
    args = ['--dataset', 'regdb', '--data_path', str(regdb_tree), '--trial', '2',
            '--img_h', '48', '--img_w', '24', '--workers', '0', '--model_path', str(tmp_path)]
    history = mmgl_train.main(args + ['--arch', 'resnet18', '--batch-size', '4', '--epochs', '1', '--pcc',
                                      '--log_path', str(tmp_path), '--vis_log_path', str(tmp_path / 'vis')])
    assert len(history) == 1
    name = 'regdb_mmgl_two_resnet18_s6_pcc_lr_0.1_seed_0_trial_2_epoch_1.t'
    results = mmgl_test.main(args + ['--resume', name])
    assert 0 <= results['perm_exact'] <= 1 and 0 < results['mAP'] <= 1
