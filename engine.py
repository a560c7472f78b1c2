"""The training engine every training script runs on (train.py, AGW/train.py, DDAG/train_ddag.py).

A script brings its network, its losses (as a `step`), its flags and what it does after an epoch;
the engine does the rest:

    start_run(args, name, title, state_file)    files named by flags, device, seed, data, logger, tensorboardX
    training_set(run)                           the training images with their augmentation
    fit(run, model, optimizer, step, make_loader, milestones, ...)
                                                the epoch loop: learning-rate schedule, train_one_epoch,
                                                end_of_epoch, the log line, <run>_state.t, resume
    train_one_epoch(run, model, optimizer, step, loader, epoch)
                                                one pass with progress (images/s, ETA) and tensorboardX
    save_state(path, epoch, args, **objects), restart_from_checkpoint(path, args, shape_flags, **objects)
                                                the state file: every object's state_dict under its name
    RunValues                                   plain values a run carries across epochs, with a state_dict

A step is step(visible, thermal, labels, epoch) -> (loss, {name: value}): visible and thermal are
the (B, 3, H, W) batches on the device, labels their identity labels, visible then thermal (2B,),
epoch the epoch it belongs to (for the step's own schedules).
The engine back-propagates the loss, steps the optimiser and logs the values.

<run>_state.t (written after every epoch) holds {name: state_dict for each object ('model',
'optimizer' and the script's own), 'epoch' (the next to run), 'rng' (every generator), 'args'}.
"""
import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tensorboardX import SummaryWriter
from tqdm import tqdm

import utils
from data_loader import RegDBData, SYSUData, prepare_dataset, train_transform

STATE_KEYS = ('model', 'optimizer', 'epoch', 'rng', 'args')


@dataclass
class Run:
    """What start_run sets up for one training run."""
    args: argparse.Namespace
    name: str
    device: torch.device
    data_path: Path
    logger: object
    writer: SummaryWriter
    state_file: Path = None       # the state file to continue from, found
    pretrained_file: Path = None  # the checkpoint whose weights start the run, found

    @property
    def model_path(self):
        return Path(self.args.model_path)


def start_run(args, name, title, state_file='', pretrained_file=''):
    """Check the counting flags, find state_file (a run to continue) and pretrained_file (weights to
    start from), each a path or a name in --model_path or '', before anything else happens; pick the
    device, seed every generator, check the dataset, open <log_path>/<name>.log and the tensorboardX
    writer <vis_log_path>/<name>."""
    for flag, option in (('epochs', '--epochs'), ('batch_size', '--batch-size'), ('save_epoch', '--save_epoch')):
        if getattr(args, flag) < 1:
            raise utils.UserError(f'{option} must be at least 1, got {getattr(args, flag)}.')
    state_file = utils.find_checkpoint(state_file, args.model_path) if state_file else None
    pretrained_file = utils.find_checkpoint(pretrained_file, args.model_path) if pretrained_file else None
    device = utils.select_device(args.gpu)
    utils.set_seed(args.seed)
    data_path = prepare_dataset(args.dataset, args.data_path, need_train_arrays=args.dataset != 'regdb')
    logger = utils.make_logger(Path(args.log_path) / f'{name}.log')
    writer = SummaryWriter(str(Path(args.vis_log_path) / name))
    logger.info(f'{title} {name} on {device}\n{vars(args)}')
    return Run(args, name, device, data_path, logger, writer, state_file, pretrained_file)


def training_set(run):
    """The training images with the training augmentation: SYSU-MM01 (or synthetic) from its
    pre-processed arrays, or RegDB split --trial loaded at --img_w x --img_h. Logs their counts."""
    args = run.args
    transform = train_transform(args.img_h, args.img_w)
    if args.dataset == 'regdb':
        trainset = RegDBData(run.data_path, args.trial, transform, img_size=(args.img_w, args.img_h))
    else:
        trainset = SYSUData(run.data_path, transform)
    for modality, labels in (('visible', trainset.visible_labels), ('thermal', trainset.thermal_labels)):
        run.logger.info(f'  {modality:8s} | {len(np.unique(labels)):5d} ids | {len(labels):8d} images')
    return trainset


class RunValues(dict):
    """Plain values a run carries from epoch to epoch (the best score so far, DDAG's graph-loss
    weight), saved in the state file like any object with a state_dict."""

    def state_dict(self):
        return dict(self)

    def load_state_dict(self, state):
        self.update(state)


def save_state(path, epoch, args, **objects):
    """<run>_state.t: each object's state_dict under its name, the next epoch, every RNG, the flags."""
    state = {name: value.state_dict() for name, value in objects.items()}
    state.update(epoch=epoch, rng=utils.rng_state(), args=vars(args))
    utils.save_checkpoint(state, path)


def restart_from_checkpoint(path, args, shape_flags, **objects):
    """Load every object of a state file written by save_state and restore every random generator;
    returns the epoch to run next. The flags in shape_flags must be those of the run that wrote it."""
    state = utils.load_checkpoint(path)
    if not isinstance(state, dict) or not set(STATE_KEYS) | set(objects) <= set(state):
        raise utils.UserError(f'{path} is not a training-state file of this script: it continues a run from its '
                              f'<run>_state.t file in --model_path.')
    saved = {flag: state['args'].get(flag) for flag in shape_flags}
    if saved != {flag: getattr(args, flag) for flag in shape_flags}:
        given = ' '.join(f'--{flag} {value}' for flag, value in saved.items())
        raise utils.UserError(f'{path} was written by a run with {given}: resume with the same flags.')
    for name, value in objects.items():
        try:
            value.load_state_dict(state[name])
        except (RuntimeError, ValueError, KeyError) as error:
            raise utils.UserError(f'{path} does not fit this run ({name}): {error}')
    utils.set_rng_state(state['rng'])
    return state['epoch']


def train_one_epoch(run, model, optimizer, step, loader, epoch):
    """One pass over a loader of (visible, thermal, visible labels, thermal labels) batches with
    step (see the module docstring). Returns the epoch means of 'loss' and of step's values
    (weighted by images) and 'images_per_second'."""
    model.train()
    meters = {'loss': utils.AverageMeter()}
    throughput = utils.Throughput(len(loader) * loader.batch_size * 2)
    progress = tqdm(loader, desc=f'epoch {epoch}', unit='step', leave=False, dynamic_ncols=True, mininterval=1.0)
    for index, (visible, thermal, visible_labels, thermal_labels) in enumerate(progress):
        visible = visible.to(run.device, non_blocking=True)
        thermal = thermal.to(run.device, non_blocking=True)
        labels = torch.cat((visible_labels, thermal_labels)).to(run.device, non_blocking=True)
        loss, values = step(visible, thermal, labels, epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        values = {'loss': loss.item(), **values}
        global_step = epoch * len(loader) + index
        for name, value in values.items():
            meters.setdefault(name, utils.AverageMeter()).update(value, len(labels))
            run.writer.add_scalar(f'train/{name}', value, global_step)
        throughput.update(len(labels))
        shown = ' '.join(f'{name} {meter.avg:.4f}' for name, meter in meters.items())
        progress.set_postfix_str(f'{shown} lr {optimizer.param_groups[-1]["lr"]:.4g} {throughput}')
    stats = {name: meter.avg for name, meter in meters.items()}
    stats['images_per_second'] = throughput.done / max(time.time() - throughput.start, 1e-9)
    return stats


def fit(run, model, optimizer, step, make_loader, milestones, shape_flags=(), end_of_epoch=None, **objects):
    """Train for epochs [start, --epochs) and return the statistics of the epochs run now.

    Each epoch: the learning rate of utils.warmup_step_lr (each parameter group at its 'lr_scale'),
    loader = make_loader(epoch), train_one_epoch and its log line, end_of_epoch(epoch, stats) (the
    script's evaluation and weight files; it may add to stats), the epoch's tensorboardX scalars, then
    <run>_state.t with model, optimizer and `objects`. With run.state_file the run continues from it;
    shape_flags are the flags it must share.
    """
    args, logger, writer = run.args, run.logger, run.writer
    objects = {'model': model, 'optimizer': optimizer, **objects}
    start_epoch = 0
    if run.state_file:
        start_epoch = restart_from_checkpoint(run.state_file, args, shape_flags, **objects)
        carried = ''.join(f', {name} {value.state_dict()}' for name, value in objects.items()
                          if name not in ('model', 'optimizer'))
        logger.info(f'==> resumed {run.state_file} at epoch {start_epoch}{carried}')
    if start_epoch >= args.epochs:
        logger.info(f'nothing to do: the run already has {start_epoch} epochs (--epochs {args.epochs})')
    history = []
    for epoch in range(start_epoch, args.epochs):
        lr = utils.warmup_step_lr(epoch, args.lr, milestones)
        utils.set_lr(optimizer, lr)
        start = time.time()
        loader = make_loader(epoch)
        stats = train_one_epoch(run, model, optimizer, step, loader, epoch)
        stats.update(epoch=epoch, lr=lr, steps=(epoch + 1) * len(loader))
        shown = ' '.join(f'{name} {value:.4f}' for name, value in stats.items()
                         if name not in ('epoch', 'lr', 'steps', 'images_per_second'))
        logger.info(f'epoch {epoch} lr {lr:.4g} {shown} ({len(loader)} steps, {stats["images_per_second"]:.1f} img/s, '
                    f'{utils.format_seconds(time.time() - start)})')
        if end_of_epoch is not None:
            end_of_epoch(epoch, stats)
        for name, value in stats.items():
            if name not in ('epoch', 'steps') and isinstance(value, (int, float)):
                writer.add_scalar(f'epoch/{name}', value, epoch)
        save_state(run.model_path / f'{run.name}_state.t', epoch + 1, args, **objects)
        history.append(stats)
    writer.close()
    return history
