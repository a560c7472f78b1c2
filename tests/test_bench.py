"""The scripts in bench/: study variants and tables, the throughput table and step profile, the stream-gap
diagnosis (no training here; the scripts' runs are measurements)."""
import argparse
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import engine
import utils
from utils import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / 'bench'))
import compare_studies  # noqa: E402
import curve_lag  # noqa: E402
import finetune_flags_study  # noqa: E402
import pretext_study  # noqa: E402
import step_ops  # noqa: E402
import state_save  # noqa: E402
import step_profile  # noqa: E402
import study_tools  # noqa: E402
import stream_gap  # noqa: E402
import test as mmgl_test  # noqa: E402
import throughput  # noqa: E402
import train as mmgl_train  # noqa: E402
import data_loader  # noqa: E402
from data_manager import read_split_ids  # noqa: E402
from model import MMGLNet, sinkhorn  # noqa: E402


def parsed(flags):
    return mmgl_train.get_args_parser().parse_args(flags)


def test_study_variants_are_the_papers_command_with_their_changes():
    paper = parsed(pretext_study.variant_flags('paper'))
    assert (paper.stream, paper.lr, paper.optim, paper.pcc, paper.part) == ('two', 0.1, 'sgd', True, True)
    assert (paper.perm_input, paper.pcc_grad, paper.perm_loss, paper.pcc_form) == ('gap', 'backbone', 'mse', 'cycle')
    without_pcc = parsed(pretext_study.variant_flags('paper+nopcc'))
    assert not without_pcc.pcc and not without_pcc.part and without_pcc.perm_input == 'gap'
    # the 'default' variant is train.py's defaults with the paper's command
    default = parsed(pretext_study.variant_flags('default'))
    assert vars(default) == vars(parsed(['--stream', 'two', '--lr', '0.1', '--pcc', '--part']))
    for name in pretext_study.VARIANTS:
        parsed(pretext_study.variant_flags(name))  # every variant is a valid train.py command


def test_study_variants_with_a_larger_global_batch_keep_the_images_of_an_epoch(tmp_path, sysu_preprocessed):
    """--batch_scale K: K times the batch in this process; --nproc_per_node N: N processes under torchrun,
    figures read back from the log; both with K (N) times fewer steps an epoch, judged by test.py."""
    assert study_tools.split_launch_options(pretext_study.VARIANTS['default+torchrun2']) == (
        ['--perm_input', 'parts', '--pcc_grad', 'heads', '--lr', '0.2'], {'--nproc_per_node': 2})
    assert pretext_study.variant_flags('default+batch2x') == pretext_study.variant_flags('default') + ['--lr', '0.2']
    args = pretext_study.get_args_parser().parse_args(
        ['--out', str(tmp_path), '--data_path', str(sysu_preprocessed), '--arch', 'resnet18', '--img_h', '48',
         '--img_w', '24', '--batch-size', '2', '--epochs', '1', '--steps_per_epoch', '2', '--threads', '2'])
    threads = torch.get_num_threads()
    try:
        results = {name: pretext_study.run_variant(name, args) for name in ('default+batch2x', 'default+torchrun2')}
    finally:
        torch.set_num_threads(threads)  # the worker's setting, not this process's
    for name, result in results.items():
        assert 'error' not in result, result['error']
        assert [(epoch['epoch'], epoch['steps']) for epoch in result['history']] == [(0, 1)]
        assert result['history'][0]['perm_stripe'] > 0 and 0 <= result['test']['perm_exact'] <= 1
        json.dumps(result)
    run = 'synthetic_mmgl_two_resnet18_s6_pcc_part_lr_0.2_seed_0'
    in_one_process = (tmp_path / 'default+batch2x' / f'{run}.log').read_text()
    assert "'batch_size': 4," in in_one_process and "'steps_per_epoch': 1," in in_one_process
    under_torchrun = (tmp_path / 'default+torchrun2' / f'{run}.log').read_text()
    assert "'batch_size': 2," in under_torchrun and 'x 2 processes' in under_torchrun
    assert 'the 2 processes end with the same weights' in under_torchrun
    args.steps_per_epoch = 3
    assert 'not a multiple of the 2' in pretext_study.run_variant('default+torchrun2', args)['error']


def test_paired_difference_gives_the_t_tests_p_with_seeds_minus_one_degrees_of_freedom():
    # the H200's held-out exact, fp32 minus the five speed flags on seeds 0-3: t = 2.74 with 3 degrees of
    # freedom, whose two-sided tail is 0.0714 (a t table: 2.353 gives 0.10 and 3.182 gives 0.05)
    mean, error, p = study_tools.paired_difference([0.9, 24.1, 13.0, 26.9])
    assert (round(mean, 3), round(error, 2), round(p, 4)) == (16.225, 5.92, 0.0714)
    assert study_tools.paired_difference([1.0, -1.0, 0.0])[2] == 1.0  # no difference on average
    assert study_tools.paired_difference([1.0, 1.0])[2] is None and study_tools.paired_difference([2.0])[2] is None
    assert study_tools.format_difference([0.9, 24.1, 13.0, 26.9], 1) == '+16.2 ± 5.9, p 0.071'


def test_curve_lag_gives_the_epochs_by_which_a_curve_reaches_each_level_later_seed_by_seed(tmp_path):
    def run(name, curve):
        return {'name': name, 'history': [{'perm_exact': value} for value in curve]}
    for seed, second_epoch in ((0, 0.0), (1, 0.1)):
        (tmp_path / f'seed{seed}').mkdir()
        (tmp_path / f'seed{seed}' / 'results.json').write_text(json.dumps([
            run('early', [0.0, 0.1, 0.3, 0.5]), run('late', [0.0, second_epoch, 0.1, 0.3]),
            {'name': 'broken', 'error': 'RuntimeError: boom'}]))
    # early reaches 0.1 after 2 epochs and 0.2 after 2.5; late after 3 and 3.5 on seed 0, 2 and 3.5 on seed 1
    lines = curve_lag.main(['--study', str(tmp_path), '--pairs', 'early:late,early:broken', '--levels', '0.1,0.2',
                            '--out', str(tmp_path / 'lag.md')])
    assert '| late minus early | 0.1 | +1.00 / +0.00 | +0.50 ± 0.50, p 0.5 | 1 of 2 |' in lines  # t = 1, one dof
    assert '| late minus early | 0.2 | +1.00 / +1.00 | +1.00 ± 0.00 | 2 of 2 |' in lines
    assert '| broken minus early | 0.1 | - / - | - | - |' in lines
    assert (tmp_path / 'lag.md').read_text().splitlines() == lines
    assert curve_lag.crossing_epoch([0.4, 0.5], 0.3) == 1.0 and curve_lag.crossing_epoch([0.1, 0.2], 0.3) is None
    with pytest.raises(utils.UserError, match="--pairs: no variant 'lately' in .*seed0/results.json"):
        curve_lag.main(['--study', str(tmp_path), '--pairs', 'early:lately'])
    with pytest.raises(utils.UserError, match='no seed<N>/results.json'):
        curve_lag.main(['--study', str(tmp_path / 'seed0'), '--pairs', 'early:late'])


def test_study_table_keeps_failed_variants(tmp_path):
    epoch = {'epoch': 0, 'steps': 40, 'perm_exact': 0.25, 'perm_stripe': 0.5, 'pcc_loss': 1.0, 'perm_loss': 0.1}
    results = [{'name': 'default', 'flags': pretext_study.variant_flags('default'), 'history': [epoch, epoch],
                'test': {'perm_exact': 0.3, 'perm_stripe': 0.6, 'rank1': 0.1, 'mAP': 0.2}, 'seconds': 60},
               {'name': 'paper', 'flags': pretext_study.variant_flags('paper'), 'error': 'RuntimeError: boom'}]
    pretext_study.write_table(results, tmp_path / 'table.md', 'a setting')
    table = (tmp_path / 'table.md').read_text()
    assert '| default |' in table and '**30.0%**' in table
    assert '| paper |' in table and 'failed: RuntimeError: boom' in table
    pretext_study.plot_curves(results, tmp_path / 'curves.png')
    assert (tmp_path / 'curves.png').stat().st_size > 0


def recorded_run(name, args):  # at module level, for the spawned workers to import
    return {'name': name, 'seed': args.seed, 'pid': os.getpid()}


def test_run_variants_runs_what_every_seed_lacks_in_one_pool_and_keeps_what_it_has(tmp_path):
    seed_runs = study_tools.over_seeds(argparse.Namespace(seeds='0,1', seed=0, out=str(tmp_path), jobs=2))
    (tmp_path / 'seed0').mkdir()
    (tmp_path / 'seed0' / 'results.json').write_text(json.dumps([{'name': 'a', 'kept': True},
                                                                  {'name': 'b', 'error': 'RuntimeError: boom'}]))
    by_seed = study_tools.run_variants(recorded_run, ['a', 'b'], seed_runs, ['b', 'a'], lambda result: 'ran')
    assert by_seed[0][0] == {'name': 'a', 'kept': True}  # kept; the failed run is run again
    new = [by_seed[0][1], *by_seed[1]]
    assert [(result['name'], result['seed']) for result in new] == [('b', 0), ('a', 1), ('b', 1)]
    assert len({result['pid'] for result in new}) <= 2  # one pool of 2 workers for both seeds
    for seed in (0, 1):  # each seed's file in the study's order
        assert [result['name'] for result in json.loads((tmp_path / f'seed{seed}' / 'results.json').read_text())] == ['b', 'a']


def test_seed_study_runs_each_seed_apart_and_tabulates_the_spread_and_the_paired_differences(tmp_path, monkeypatch):
    test_exact = {('default', 0): 0.30, ('default', 1): 0.40, ('default+amp', 0): 0.20, ('default+amp', 1): 0.40,
                  ('default+device_augment', 0): 0.35}
    calls = []

    def fake_run_variants(run, names, seed_runs, order, summary):  # what the workers would return, without training
        by_seed = {}
        for seed, args in seed_runs:
            calls.append((args.seed, args.out))
            Path(args.out).mkdir(parents=True)
            by_seed[seed] = []
            for name in names:
                if (name, seed) not in test_exact:
                    by_seed[seed].append({'name': name, 'flags': pretext_study.variant_flags(name),
                                          'error': 'RuntimeError: boom'})
                    continue
                epoch = {'epoch': 0, 'steps': 40, 'perm_exact': test_exact[name, seed] + 0.1, 'perm_stripe': 0.5,
                         'pcc_loss': 1.0}
                by_seed[seed].append({'name': name, 'flags': pretext_study.variant_flags(name), 'history': [epoch],
                                      'test': {'perm_exact': test_exact[name, seed], 'perm_stripe': 0.6, 'rank1': 0.1,
                                               'mAP': 0.2}, 'seconds': 60})
        return by_seed

    monkeypatch.setattr(pretext_study, 'run_variants', fake_run_variants)
    monkeypatch.setattr(data_loader, 'prepare_dataset', lambda *arguments, **options: None)  # no data needed
    pretext_study.main(['--out', str(tmp_path), '--seeds', '0,1', '--variants', 'default,default+amp,default+device_augment'])
    assert calls == [(0, str(tmp_path / 'seed0')), (1, str(tmp_path / 'seed1'))]
    assert (tmp_path / 'seed0' / 'table.md').is_file() and (tmp_path / 'seed1' / 'curves.png').is_file()
    table = (tmp_path / 'seeds.md').read_text()
    assert '| default | 30.0 / 40.0 | 35.0 ± 7.1 | 60.0 ± 0.0 | 45.0 ± 7.1 |' in table
    # amp: 10 points lower on seed 0, equal on seed 1: mean -5.0, standard error 7.07 / sqrt(2), t = -1 with one
    # degree of freedom (p 0.5); the per-stripe figures are equal on both seeds, so they have no p
    assert ('| default+amp | 20.0 / 40.0 | 30.0 ± 14.1 (-5.0 ± 5.0, p 0.5) | 60.0 ± 0.0 (+0.0 ± 0.0) | '
            '40.0 ± 14.1 (-5.0 ± 5.0, p 0.5) |') in table
    assert '| default+device_augment | 35.0 / failed | 35.0 ± 0.0 (n=1) (+5.0 ± 0.0) |' in table
    assert 'default+device_augment, seed 1 failed: RuntimeError: boom' in table
    assert (tmp_path / 'seeds.png').stat().st_size > 0
    with pytest.raises(SystemExit, match='--seeds'):
        pretext_study.main(['--out', str(tmp_path), '--seeds', '0,one'])


def test_compare_studies_puts_one_variant_of_several_studies_side_by_side_on_their_common_seeds(tmp_path):
    def study(folder, test_exact):  # {seed: test exact} of the default variant, with another variant beside
        for seed, exact in test_exact.items():
            runs = [{'name': name, 'flags': [], 'history': [{'epoch': 0, 'perm_exact': exact + 0.1}],
                     'test': {'perm_exact': exact + shift, 'perm_stripe': 0.5}}
                    for name, shift in (('default+amp', 0.5), ('default', 0.0))]
            (tmp_path / folder / f'seed{seed}').mkdir(parents=True)
            (tmp_path / folder / f'seed{seed}' / 'results.json').write_text(json.dumps(runs))
        return f'{folder}={tmp_path / folder}'

    before, after = study('before', {0: 0.30, 1: 0.40, 2: 0.50}), study('after', {0: 0.20, 1: 0.40})
    compare_studies.main(['--out', str(tmp_path / 'compared'), before, after])
    table = (tmp_path / 'compared' / 'compared.md').read_text()
    assert 'seeds 0, 1:' in table  # seed 2 is the first study's alone
    assert '| before | 30.0 / 40.0 | 35.0 ± 7.1 |' in table
    assert '| after | 20.0 / 40.0 | 30.0 ± 14.1 (-5.0 ± 5.0, p 0.5) |' in table
    assert (tmp_path / 'compared' / 'compared.png').stat().st_size > 0
    with pytest.raises(utils.UserError, match='no run of the variant default[+]fast'):
        compare_studies.main(['--out', str(tmp_path / 'compared'), '--variant', 'default+fast', before, after])
    with pytest.raises(utils.UserError, match='holds no seed'):
        compare_studies.main(['--out', str(tmp_path / 'compared'), before, f'empty={tmp_path}'])


def test_finetune_flags_study_runs_a_larger_global_batch_in_one_process_and_under_torchrun(tmp_path, sysu_preprocessed):
    args = finetune_flags_study.get_args_parser().parse_args(
        ['--method', 'agw', '--out', str(tmp_path), '--data_path', str(sysu_preprocessed), '--img_h', '48',
         '--img_w', '24', '--batch-size', '2', '--epochs', '1', '--threads', '2'])
    args.seen_path = str(finetune_flags_study.training_ids_view(sysu_preprocessed, tmp_path / 'training_ids'))
    threads = torch.get_num_threads()
    try:
        results = {name: finetune_flags_study.run_variant(name, args) for name in ('batch2x', 'torchrun2')}
    finally:
        torch.set_num_threads(threads)
    for name, result in results.items():
        assert 'error' not in result, result['error']
        assert result['flags'] == ['--method', 'agw', '--lr', '0.2']
        assert len(result['history']) == 1 and result['history'][0]['loss'] > 0 and 0 < result['test']['mAP'] <= 1
    in_one_process, = (tmp_path / 'batch2x').glob('*.log')
    assert "'batch_size': 4," in in_one_process.read_text()
    under_torchrun = next((tmp_path / 'torchrun2').glob('*.log')).read_text()
    assert "'batch_size': 2," in under_torchrun and 'the 2 processes end with the same weights' in under_torchrun


@pytest.mark.parametrize('method', ['agw', 'ddag'])
def test_finetune_flags_study_runs_a_variant_and_judges_its_last_weights(tmp_path, sysu_preprocessed, method):
    args = finetune_flags_study.get_args_parser().parse_args(
        ['--method', method, '--out', str(tmp_path), '--data_path', str(sysu_preprocessed), '--img_h', '48',
         '--img_w', '24', '--batch-size', '2', '--epochs', '1'])
    view = finetune_flags_study.training_ids_view(sysu_preprocessed, tmp_path / 'training_ids')
    trained = read_split_ids(sysu_preprocessed, 'train') + read_split_ids(sysu_preprocessed, 'val')
    assert read_split_ids(view, 'test') == sorted(trained)
    assert read_split_ids(view, 'train') == read_split_ids(sysu_preprocessed, 'train')
    assert (view / 'cam1').resolve() == (sysu_preprocessed / 'cam1').resolve()
    args.seen_path = str(view)
    threads = torch.get_num_threads()
    try:
        result = finetune_flags_study.run_variant('channels_last', args)
    finally:
        torch.set_num_threads(threads)  # the worker's setting, not this process's
    assert 'error' not in result, result.get('error')
    assert result['flags'] == [*finetune_flags_study.METHODS[method], '--channels_last']
    assert len(result['history']) == 1 and result['history'][0]['loss'] > 0
    json.dumps(result)  # results.json can hold it
    # the figures are the averages the test script printed for the selected feature of the last weights,
    # on the held-out identities and on the training ones
    feature = finetune_flags_study.SELECTED[method].upper()
    for key in ('test', 'seen'):
        judged = (tmp_path / 'logs' / f'channels_last.{key}.txt').read_text()
        assert '_epoch_0.t' in judged and judged.count(f'{feature}:') == 11  # 10 gallery draws and their average
        average = [line for line in judged.splitlines() if f'{feature}:' in line][-1]
        assert f'mAP: {100 * result[key]["mAP"]:.2f}%' in average
        assert f'Rank-1: {100 * result[key]["rank1"]:.2f}%' in average
    assert result['seen'] != result['test']

    # --rejudge: the figures of the runs in results.json judged again, without training
    (tmp_path / 'results.json').write_text(json.dumps([{**result, 'test': None, 'seen': None},
                                                       {'name': 'fast', 'error': 'RuntimeError: boom'}]))
    finetune_flags_study.rejudge(args)
    rejudged, failed = json.loads((tmp_path / 'results.json').read_text())
    assert rejudged == json.loads(json.dumps(result)) and failed['error'] == 'RuntimeError: boom'
    with pytest.raises(SystemExit, match='unknown variant'):
        finetune_flags_study.main(['--method', method, '--out', str(tmp_path), '--variants', 'defaults,fastest'])


def test_chance_retrieval_is_the_share_of_true_matches_among_the_gallery_a_query_may_see(sysu_preprocessed):
    import numpy as np
    from data_manager import process_gallery_sysu, process_query_sysu
    _, query_ids, query_cameras = map(np.asarray, process_query_sysu(sysu_preprocessed))
    expected = []
    for trial in range(10):
        _, gallery_ids, gallery_cameras = map(np.asarray, process_gallery_sysu(sysu_preprocessed, trial=trial))
        seen = ~((query_cameras[:, None] == 3) & (gallery_cameras[None, :] == 2))  # the SYSU-MM01 camera rule
        matches = (query_ids[:, None] == gallery_ids[None, :]) & seen
        counted = matches.any(axis=1)  # queries without a visible match are left out of the CMC
        expected.append((matches.sum(axis=1)[counted] / seen.sum(axis=1)[counted]).mean())
    rank1, mAP = finetune_flags_study.chance_retrieval(sysu_preprocessed, draws=200)
    assert abs(rank1 - np.mean(expected)) < 0.02
    assert rank1 <= mAP < 1  # a random ranking finds some true match below the top


def test_throughput_times_each_method_at_each_batch_and_refuses_unknown_methods(tmp_path, sysu_preprocessed):
    table_file = tmp_path / 'throughput.md'
    throughput.main(['--arch', 'resnet18', '--img_h', '48', '--img_w', '24', '--batch', '2,3', '--warmup', '1',
                     '--steps', '1', '--epoch_steps', '1', '--workers', '0', '--methods', 'mmgl',
                     '--precisions', 'fp32', '--epoch_flags=--augment device', '--data_path', str(sysu_preprocessed),
                     '--out', str(table_file)])
    lines = table_file.read_text().splitlines()
    rows = [line for line in lines if line.startswith('| MMGL')]
    assert [row.split(' | ')[1] for row in rows] == ['2+2', '3+3']
    assert all(float(row.split(' | ')[3]) > 0 for row in rows)  # ms/step
    assert all(float(row.split(' | ')[5]) > 0 for row in rows)  # TFLOP/s
    epoch_rows = [line.split(' | ') for line in lines if line.startswith('| --augment device')]
    assert [row[1] for row in epoch_rows] == ['2+2', '3+3'] and all(float(row[2][:-2]) > 0 for row in epoch_rows)
    loader_rows = [line.split(' | ') for line in lines if line.startswith('| the loader alone')]
    assert [(row[0].split(', ')[1], row[1]) for row in loader_rows] == [
        (flags, batch) for batch in ('2+2', '3+3')
        for flags in ('--augment loader', '--augment device', '--augment device --data_on_device')]
    for row in loader_rows:  # images/s (main process: ms of CPU a batch)
        images_per_second, host_milliseconds = re.fullmatch(r'(\d+) \(main process: ([\d.]+) ms of CPU a batch\) \|',
                                                            row[2]).groups()
        assert int(images_per_second) > 0 and float(host_milliseconds) >= 0
    with pytest.raises(utils.UserError, match='--methods: unknown agv'):
        throughput.main(['--methods', 'mmgl,agv'])


def test_throughput_times_train_py_under_torchrun_with_one_process_and_with_several(tmp_path, sysu_preprocessed):
    table_file = tmp_path / 'throughput.md'
    throughput.main(['--arch', 'resnet18', '--img_h', '48', '--img_w', '24', '--batch', '2', '--warmup', '1',
                     '--steps', '1', '--epoch_steps', '2', '--workers', '0', '--methods', 'mmgl', '--precisions', 'fp32',
                     '--epoch_flags=', '--nproc_per_node', '2', '--data_path', str(sysu_preprocessed),
                     '--out', str(table_file)])
    rows = {row.split(' | ')[0]: row.split(' | ')[2] for row in table_file.read_text().splitlines()
            if row.startswith('| defaults')}
    assert list(rows) == ['| defaults, torchrun, 1 process', '| defaults, torchrun, 2 processes']
    one, two = (float(cell.split()[0]) for cell in rows.values())
    assert one > 0 and two > 0
    speed_up, share = re.search(r'\((\S+)x one process, (\d+)% of linear\)', rows['| defaults, torchrun, 2 processes']).groups()
    assert float(speed_up) == pytest.approx(two / one, rel=0.1)  # the cells' figures are rounded
    assert int(share) == pytest.approx(50 * float(speed_up), abs=1)
    with pytest.raises(utils.UserError, match='--nproc_per_node 0: give a number from 1'):
        throughput.main(['--nproc_per_node', '0'])


@pytest.mark.parametrize('precision, step_compiled', [('amp + channels_last + compile reduce-overhead', False),
                                                       ('amp + channels_last + compile step reduce-overhead', True)])
def test_throughputs_compile_rows_compile_the_network_or_the_whole_step(precision, step_compiled):
    """The `compile` rows time the step with the compiled network, as --compile trains; the `compile
    step` row compiles the step function itself, so its losses are traced too (torch.compile traces
    a function once, and torch.compiler.is_compiling() says when)."""
    traced = {'network': [], 'step': []}

    class Network(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 3)

        def forward(self, visible, thermal):
            traced['network'].append(torch.compiler.is_compiling())
            return self.conv(torch.cat((visible, thermal))).mean(dim=(1, 2, 3))

    def step(network, visible, thermal, labels, epoch):
        traced['step'].append(torch.compiler.is_compiling())
        return (network(visible, thermal) - labels).square().mean(), {}

    args = throughput.get_args_parser().parse_args(['--img_h', '8', '--img_w', '4', '--warmup', '2'])
    options = throughput.PRECISIONS[precision]
    cpu = torch.device('cpu')
    throughput.step_runner(Network, step, engine.Precision(None, cpu), options, 2, args, cpu)()  # float32: any CPU
    assert all(traced['network'])  # the network is traced in both, its Python never runs eagerly
    assert all(traced['step']) if step_compiled else not any(traced['step'])


def test_flops_per_image_count_the_backward_pass_and_not_the_batch():
    args = throughput.get_args_parser().parse_args(['--arch', 'resnet18', '--img_h', '48', '--img_w', '24'])
    (build, step), = throughput.networks_and_steps(args, ['mmgl']).values()
    per_image = [throughput.gflop_per_image(build, step, batch, args, torch.device('cpu')) for batch in (2, 3)]
    assert per_image[0] == pytest.approx(per_image[1], rel=0.01)
    network = build().eval()
    with FlopCounterMode(display=False) as forward:
        network.feature_map(torch.randn(1, 3, 48, 24), torch.randn(1, 3, 48, 24))
    backbone_forward = forward.get_total_flops() / 2 / 1e9
    assert 2.5 * backbone_forward < per_image[0] < 3.5 * backbone_forward  # backward about twice the forward


def test_step_ops_counts_the_kernels_inside_an_operator_and_none_for_a_view():
    matrices, tensors = torch.randn(4, 6, 6), [torch.zeros(3) for _ in range(5)]
    _, count = step_ops.profiled(lambda: torch.logsumexp(matrices, dim=2).view(-1))
    assert (count.operators, count.kernels) == (2, 9) and set(count.by_caller) == {'logsumexp'}
    _, count = step_ops.profiled(lambda: torch._foreach_add_(tensors, 1.0))  # one multi-tensor kernel on a GPU
    assert (count.operators, count.kernels) == (1, 1)
    convolution, batch_norm = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)  # their own outputs allocated
    _, count = step_ops.profiled(lambda: batch_norm(convolution(torch.ones(2, 3, 8, 8))))
    assert count.by_caller == {'ones': 1, 'conv2d': 1, 'add_': 1, 'batch_norm': 1}  # add_: the batches tracked
    scores = torch.randn(4, 6, 6, requires_grad=True)
    matrices, count = step_ops.profiled(lambda: sinkhorn(scores, num_iter=3))
    assert count.kernels == 1 + 2 * 3 + 1  # the temperature, two normalisations an iteration, the exponential
    _, count = step_ops.profiled(lambda: matrices.sum().backward())
    assert count.by_caller['_log_softmax_backward_data'] == 6



def test_step_ops_counts_the_loop_around_the_step_by_where_the_batches_come_from(tmp_path, sysu_preprocessed, capsys):
    """--loop: train.py's epoch loop, inside engine.train_step and outside it. Device augmentation moves
    work into the step, PIL's is the loop's; images held on the device are four gathers a batch in the
    loop; and the marks and patches are gone afterwards."""
    step_ops.main(['--loop', '--arch', 'resnet18', '--loop_steps', '2', '--data_path', str(sysu_preprocessed)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| --augment')]
    rows = {line.split(' | ')[0].strip('| '): [cell.split(' / ') for cell in line.split(' | ')[1:3]] for line in lines}
    assert list(rows) == list(step_ops.LOOP_ROWS)
    kernels = {name: (int(inside[1]), int(outside[1])) for name, (inside, outside) in rows.items()}
    loader, device, held = (kernels[name] for name in step_ops.LOOP_ROWS)
    assert device[0] > loader[0] > 0 and held[0] == device[0]      # the augmentation, inside the step
    assert loader[1] > max(device[1], held[1]) > 0                  # the PIL path's work, in the loop
    assert 'index_select 4.0' in lines[2] and 'index_select' not in lines[1]
    assert engine.train_step.__name__ == 'train_step' and utils.make_optimizer.__name__ == 'make_optimizer'

def test_stream_gap_reestimates_each_stem_on_its_own_modality(tmp_path, sysu_preprocessed):
    """bench/stream_gap.py on a one-stream checkpoint: the saved stems are one (no statistics gap); after
    the re-estimation each stem's batch norm holds the mean of its own modality's conv1 outputs, and the
    rest of the network is untouched."""
    torch.manual_seed(0)
    checkpoint = tmp_path / 'one_stream.t'
    torch.save(MMGLNet('resnet18', stream='one', part=True, perm_input='parts').state_dict(), checkpoint)
    flags = ['--dataset', 'sysu', '--data_path', str(sysu_preprocessed), '--img_h', '48', '--img_w', '24',
             '--workers', '0', '--train_images', '6', '--resume', str(checkpoint)]
    results = stream_gap.main([*flags, '--out', str(tmp_path / 'gap.md')])
    assert results['statistics gap'][0] == 0 and results['statistics gap'][1] > 0
    assert set(results['as saved']) == {(split, modality) for split in ('training', 'held-out')
                                        for modality in ('visible', 'infrared')}
    assert all(0 <= rate <= 1 for rate in results['stems per modality'].values())
    assert len([line for line in (tmp_path / 'gap.md').read_text().splitlines() if line.startswith('| as saved')]) == 1

    args = stream_gap.get_args_parser().parse_args(flags)
    model = mmgl_test.load_model(args, torch.device('cpu'))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    images = stream_gap.training_images(args, sysu_preprocessed, data_loader.test_transform(48, 24))
    stream_gap.reestimate_stem_statistics(model, images, args, torch.device('cpu'))
    for modal, stem in ((1, model.visible_module.visible), (2, model.thermal_module.thermal)):
        batches = stream_gap.shuffled_batches(images[modal], 6, args.test_batch, args.seed + 1, torch.device('cpu'))
        with torch.no_grad():
            conv_outputs = torch.cat([stem.conv1(shuffled) for shuffled, _ in batches])
        assert torch.allclose(stem.bn1.running_mean, conv_outputs.mean(dim=(0, 2, 3)), atol=1e-5)
    changed = {key for key, value in model.state_dict().items() if not torch.equal(value, before[key])}
    assert changed and all(key.split('.')[2] == 'bn1' for key in changed)

    # every batch norm: a shared stage's holds the mean of its conv over both modalities' batches at once
    shared_conv = model.base_resnet.base.layer1[0].conv1
    seen = []
    hook = shared_conv.register_forward_hook(lambda module, inputs, output: seen.append(output))
    stream_gap.reestimate_all_statistics(model, images, args, torch.device('cpu'))
    hook.remove()
    assert len(seen) == 1 and len(seen[0]) == 2 * 6
    assert torch.allclose(model.base_resnet.base.layer1[0].bn1.running_mean, seen[0].mean(dim=(0, 2, 3)), atol=1e-5)
    assert all(not module.training for module in model.modules())
    changed = {key for key, value in model.state_dict().items() if not torch.equal(value, before[key])}
    assert any(key.startswith('base_resnet.') for key in changed)
    assert not any(key.startswith('local_conv_list.') for key in changed)  # the part embeddings' are left
    assert len(results['every batch norm']) == 4 and len(results['statistics gap']) == 3
    with pytest.raises(utils.UserError, match='--train_images'):
        stream_gap.main([*flags, '--train_images', '0'])


def test_step_profile_reports_each_row_and_its_busiest_operators(tmp_path):
    report_file = tmp_path / 'profile.md'
    step_profile.main(['--arch', 'resnet18', '--img_h', '48', '--img_w', '24', '--batch', '2', '--warmup', '1',
                       '--steps', '1', '--methods', 'mmgl', '--precisions', 'fp32,amp bf16', '--top', '3',
                       '--out', str(report_file)])
    report = report_file.read_text()
    rows = [line.split(' | ') for line in report.splitlines() if line.startswith('| MMGL')]
    assert [row[1].split(' (')[0] for row in rows] == ['fp32', 'amp bf16'] and all(float(row[2]) > 0 for row in rows)
    assert report.count('the 3 operators with the most self_cpu_time_total') == 2 and 'aten::' in report
    with pytest.raises(utils.UserError, match="--precisions: unknown 'bf16'"):
        step_profile.main(['--precisions', 'bf16'])


def test_state_save_times_the_state_file_in_the_main_thread_and_in_the_background(capsys):
    state_save.main(['--arch', 'resnet18', '--repeats', '1'])
    lines = capsys.readouterr().out.splitlines()
    size, = re.fullmatch(r'resnet18 MMGL state \(--pcc --part, SGD momentum\): (\d+) MB', lines[0]).groups()
    assert 50 < int(size) < 500  # 11 M parameters and as many momentum values, in float32
    assert re.fullmatch(r'torch\.save in the main thread: [\d.]+ s \(median of 1: [\d.]+\)', lines[1])
    alone, during = re.fullmatch(r'the main thread, small operators a second: ([\d,]+) alone, ([\d,]+) '
                                  r'\(\d+%\) during the [\d.]+ s of a background write', lines[2]).groups()
    assert int(alone.replace(',', '')) > 0 and int(during.replace(',', '')) > 0
