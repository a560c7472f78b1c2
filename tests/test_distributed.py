"""The three training scripts under torchrun: 2 processes on the CPU (gloo), a few steps each."""
import argparse
import os
import subprocess
import sys

import numpy as np
import torch

import engine
import utils
from AGW.agw_model import embed_net as agw_net
from DDAG.ddag_model import embed_net as ddag_net
from data_loader import IdentitySampler, RankShare, UnpairedSampler
from model import MMGLNet
from tests.helpers import run_args
from utils import REPO_ROOT

MMGL_RUN = 'synthetic_mmgl_two_resnet18_s6_pcc_part_lr_0.1_seed_0'


def torchrun(script, *flags, processes=2, check=True):
    """Run `script` under torchrun on the CPU; returns the completed process (output captured), which
    must have succeeded unless check=False."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(processes),
               '--standalone', str(REPO_ROOT / script), *flags]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 or not check, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def log_of(folder, name):
    return (folder / 'log' / f'{name}.log').read_text()


def test_rank_shares_are_disjoint_equal_and_cover_the_draw():
    torch.manual_seed(3)
    draw = list(UnpairedSampler(50, 30))
    shares = []
    for rank in range(3):
        torch.manual_seed(3)
        shares.append(list(RankShare(UnpairedSampler(50, 30), 4, rank, 3)))
    assert all(len(share) == len(shares[0]) == 16 for share in shares)  # 12 whole batches, 4 a process
    batches = [share[i:i + 4] for share in shares for i in range(0, len(share), 4)]
    assert sorted(map(tuple, batches)) == sorted(tuple(draw[i:i + 4]) for i in range(0, 48, 4))
    torch.manual_seed(3)
    assert list(RankShare(UnpairedSampler(50, 30), 4)) == draw[:48]  # one process: the draw itself

    # --accum_iter: whole optimiser steps only (50 items: 2 steps of 2 rounds of 3 batches of 4; 1 step of 5 batches)
    for rank in range(3):
        torch.manual_seed(3)
        share = RankShare(UnpairedSampler(50, 30), 4, rank, 3, accum_iter=2)
        assert list(share) == shares[rank][:16] and len(share) == 16
    torch.manual_seed(3)
    share = RankShare(UnpairedSampler(50, 30), 10, accum_iter=3)
    assert list(share) == draw[:30] and len(share) == 30

    # identity batches stay whole: every share's batches hold batch_size identities x num_pos
    labels = np.arange(40) % 10
    np.random.seed(0)
    sampler = IdentitySampler(labels, labels, num_pos=2, batch_size=3)
    share = list(RankShare(sampler, 6, 1, 2))
    assert len(share) == len(sampler) // 12 * 6
    for start in range(0, len(share), 6):
        assert len({int(labels[v]) for v, _ in share[start:start + 6]}) == 3


def test_under_torchrun_processes_share_one_draw_of_images_and_augment_apart():
    """engine.epoch_loader: the processes' shares of the epoch's draw are disjoint, each process's
    generators then differ from the others' (augmentation, stripe shuffles), and both are the same
    whatever ran before (a resumed run draws as the uninterrupted one)."""
    def epoch_of(rank, epoch, noise_before):
        torch.manual_seed(noise_before)  # what earlier epochs, or process 0's evaluation, left behind
        run = engine.Run(argparse.Namespace(seed=0), 'x', torch.device('cpu'), None, None, None, rank=rank, world_size=2)
        loader = engine.epoch_loader(run, lambda epoch: RankShare(UnpairedSampler(40, 30), 4, rank, 2), epoch)
        return list(loader), torch.rand(3)

    (share_0, random_0), (share_1, random_1) = epoch_of(0, 5, noise_before=1), epoch_of(1, 5, noise_before=2)
    assert len(share_0) == len(share_1) == 20 and not set(share_0) & set(share_1)
    assert not torch.equal(random_0, random_1)
    again, random_again = epoch_of(0, 5, noise_before=3)
    assert again == share_0 and torch.equal(random_again, random_0)
    assert epoch_of(0, 6, noise_before=1)[0] != share_0  # a new draw every epoch


def test_pretraining_under_torchrun_stays_in_sync_writes_once_and_resumes_exactly(tmp_path, sysu_preprocessed):
    common = ['--arch', 'resnet18', '--batch-size', '4', '--steps_per_epoch', '2', '--pcc', '--part']
    straight, interrupted = tmp_path / 'straight', tmp_path / 'interrupted'
    torchrun('train.py', *run_args(straight, sysu_preprocessed, *common, '--epochs', '2'))
    log = log_of(straight, MMGL_RUN)
    assert 'x 2 processes' in log and 'the 2 processes end with the same weights' in log
    assert log.count('\nepoch ') == 2 and '(2 steps,' in log  # one log, 2 steps a process
    weights = utils.load_checkpoint(straight / 'save_model' / f'{MMGL_RUN}_epoch_2.t')
    MMGLNet('resnet18', num_stripe=6, part=True, perm_input='parts').load_state_dict(weights)
    assert not any(key.startswith('module.') for key in weights)

    torchrun('train.py', *run_args(interrupted, sysu_preprocessed, *common, '--epochs', '1'))
    torchrun('train.py', *run_args(interrupted, sysu_preprocessed, *common, '--epochs', '2',
                                   '--resume', f'{MMGL_RUN}_state.t'))
    resumed = utils.load_checkpoint(interrupted / 'save_model' / f'{MMGL_RUN}_epoch_2.t')
    for key, value in weights.items():
        assert torch.equal(resumed[key], value), key


def test_agw_and_ddag_under_torchrun(tmp_path, sysu_preprocessed):
    flags = ['--arch', 'resnet18', '--batch-size', '2', '--num_pos', '2', '--epochs', '1']
    torchrun('AGW/train.py', *run_args(tmp_path / 'agw', sysu_preprocessed, *flags))
    name = 'synthetic_agw_p2_n2_lr_0.1_seed_0'
    log = log_of(tmp_path / 'agw', name)
    assert 'x 2 processes' in log and 'the 2 processes end with the same weights' in log and 'FC:' in log
    best = utils.load_checkpoint(tmp_path / 'agw' / 'save_model' / f'{name}_best.t')
    agw_net(7, arch='resnet18').load_state_dict(best['net'])

    # with --accum_iter 2, the processes exchange gradients after every second batch only (DDP's no_sync);
    # each holds the images on its device
    torchrun('DDAG/train_ddag.py', *run_args(tmp_path / 'ddag', sysu_preprocessed, *flags, '--wpa', '--graph',
                                             '--low-dim', '16', '--nheads', '2', '--accum_iter', '2',
                                             '--augment', 'device', '--data_on_device'))
    name = 'synthetic_G_P_3_drop_0.2_2_2_lr_0.1_seed_0'
    log = log_of(tmp_path / 'ddag', name)
    assert 'the 2 processes end with the same weights' in log and 'ATT:' in log and 'wG' in log
    assert 'held on cpu' in log
    assert ' of 2 batches,' in log
    state = utils.load_checkpoint(tmp_path / 'ddag' / 'save_model' / f'{name}_state.t')
    ddag_net(16, 7, nheads=2, arch='resnet18', wpa=True).load_state_dict(state['model'])
    assert state['ddag_loss']['wG'] > 0


def test_sync_bn_on_the_cpu_is_a_clear_error(tmp_path, sysu_preprocessed):
    result = torchrun('train.py', *run_args(tmp_path, sysu_preprocessed, '--arch', 'resnet18', '--sync_bn'),
                      check=False)
    # a process says it in one line and exits with status 2 (torchrun then stops the other and reports)
    assert result.returncode != 0 and 'error: --sync_bn needs GPUs (SyncBatchNorm has no CPU' in result.stderr
    assert 'exitcode  : 2' in result.stderr
