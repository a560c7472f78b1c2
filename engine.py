"""The training engine every training script runs on (train.py, AGW/train.py, DDAG/train_ddag.py).

A script brings its network, its losses (as a `step`), its flags and what it does after an epoch;
the engine does the rest, written once for the three:

    start_run(args, name, title, state_file, pretrained_file)
                                    files named by flags, torchrun's process group, device, seed, data,
                                    logger, tensorboardX (process 0 alone logs and writes files)
    training_set(run)               the training images, augmented in the loader or on the device
                                    (--data_on_device: held there)
    make_loader(run, dataset, sampler, batch_size)
                                    a DataLoader over this process's share of the sampler's draw
                                    (a DeviceLoader over images held on the device)
    fit(run, model, optimizer, step, make_loader, milestones, ...)
                                    the epoch loop: learning-rate schedule, train_one_epoch,
                                    end_of_epoch, the log line, <run>_state.t, resume, DDP (one draw
                                    of images shared out, each process its own augmentation)
    train_one_epoch(run, model, optimizer, step, loader, epoch)
                                    one pass with progress (images/s, ETA) and tensorboardX
    train_step(run, model, optimizer, step, batch, epoch, accumulated)
                                    one batch of it, with no wait for the GPU: an optimiser step
                                    every --accum_iter batches
    Precision                       --amp: autocast and the gradient scaler
    training_state(epoch, args, **objects), restart_from_checkpoint(path, args, shape_flags, **objects)
                                    the state file: every object's state_dict under its name
    RunValues                       plain values a run carries across epochs, with a state_dict

A step is step(model, visible, thermal, labels, epoch) -> (loss, {name: value}): model is the
network to call (wrapped for DDP under torchrun), visible and thermal the augmented (B, 3, H, W)
batches on the device, labels their identity labels, visible then thermal (2B,), epoch the epoch
it belongs to (for the step's own schedules). The step runs under --amp's autocast and computes its
losses in float32 (utils.full_precision); its values are numbers or 0-dim tensors, which stay on
the device until a log step (every --log_every batches), so the host never waits for the GPU between.
The engine back-propagates the loss, steps the optimiser and logs the values.

<run>_state.t (written after every epoch, by a thread while the next one trains; complete when fit
returns) holds {name: state_dict for each object ('model',
'optimizer', 'grad_scaler' and the script's own), 'epoch' (the next to run), 'rng' (every
generator), 'args'}.
"""
import argparse
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tensorboardX import SummaryWriter
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import utils
from augment import random_augment
from data_loader import (DeviceArrays, DeviceLoader, RankShare, RegDBData, SYSUData, as_uint8_tensor, prepare_dataset,
                         train_transform)

STATE_KEYS = ('model', 'optimizer', 'epoch', 'rng', 'args')


AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def native_bfloat16(device):
    """Whether device computes in bfloat16 natively: NVIDIA GPUs from Ampere (compute capability 8) on,
    ROCm GPUs, and CPUs on which oneDNN runs bfloat16 (AVX-512 on x86; the test PyTorch's compiler
    makes). torch.cuda.is_bf16_supported() would not do: it also says yes for GPUs that only emulate
    bfloat16 (the paper's 2080Ti), where float16 runs on the tensor cores and bfloat16 does not."""
    if device.type == 'cuda':
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast_dtype(amp, device):
    """The autocast dtype of --amp on device: None without --amp (float32); with --amp alone
    ('auto') bfloat16 where the device computes it natively, else float16 on a GPU; a CPU without
    bfloat16 has no float16 arithmetic either, and there --amp alone is refused (each step would be
    many times slower than in float32). --amp bf16 or --amp fp16 name the dtype (on a CPU, whatever
    its arithmetic)."""
    if amp is None:
        return None
    native_bf16 = native_bfloat16(device)
    if amp == 'auto':
        if device.type != 'cuda' and not native_bf16:
            raise utils.UserError('--amp: this CPU has no bfloat16 arithmetic (nor float16), so mixed precision '
                                  'would make each training step many times slower than float32 (15 to 21 times '
                                  'on an AVX2 AMD EPYC): leave --amp out, or name the dtype (--amp bf16) to run it '
                                  'anyway.')
        amp = 'bf16' if native_bf16 else 'fp16'
    elif amp == 'bf16' and not native_bf16 and device.type == 'cuda':
        raise utils.UserError(f'--amp bf16: {torch.cuda.get_device_name(device)} does not compute in bfloat16 '
                              f'natively; use --amp (float16 with gradient scaling on this GPU).')
    return AMP_DTYPES[amp]


class Precision:
    """--amp: the forward pass under autocast in autocast_dtype, with a gradient scaler for float16
    (whose small range would otherwise lose small gradients). Without --amp everything runs in
    float32 and the scaler does nothing. Its state_dict is the scaler's."""

    def __init__(self, amp, device):
        self.device_type, self.dtype = device.type, autocast_dtype(amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    def __str__(self):
        if self.dtype is None:
            return 'float32'
        return f'{str(self.dtype).replace("torch.", "")} autocast' + (
            ' with gradient scaling' if self.scaler.is_enabled() else '')

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss):
        """Add the loss's gradients (scaled for float16) to those accumulated so far."""
        self.scaler.scale(loss).backward()

    def step(self, optimizer):
        """The optimiser step on the accumulated gradients (unscaled first; skipped by the scaler when
        a float16 gradient overflowed)."""
        self.scaler.step(optimizer)
        self.scaler.update()

    def backward_and_step(self, loss, optimizer):
        """One optimiser step on the gradients of one loss."""
        optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.step(optimizer)

    def state_dict(self):
        return self.scaler.state_dict()

    def load_state_dict(self, state):
        self.scaler.load_state_dict(state)


class NullWriter:
    """The tensorboardX writer of the processes other than 0 under torchrun: writes nothing."""

    def add_scalar(self, *args, **kwargs):
        pass

    def close(self):
        pass


def init_distributed():
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK in the environment):
    NCCL on GPUs, gloo on CPUs. Returns (rank, world size, local rank or None without torchrun)."""
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return 0, 1, None
    if not dist.is_initialized():
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', '0'))


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
    precision: Precision = None
    augment_on_device: bool = False
    rank: int = 0                 # this process and the number of processes under torchrun
    world_size: int = 1

    @property
    def model_path(self):
        return Path(self.args.model_path)

    @property
    def is_main(self):
        """Process 0: the one that logs, evaluates and writes files."""
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def batch_to_device(self, images):
        """A batch from the loader -> (B, 3, H, W) float on the device: augmented here when the
        loader gives uint8 (B, H, W, 3) arrays, channels-last with --channels_last."""
        images = images.to(self.device, non_blocking=True)
        if self.augment_on_device:
            images = random_augment(images, self.args.img_h, self.args.img_w)
        if self.args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images


def start_run(args, name, title, state_file='', pretrained_file=''):
    """Check the counting flags, find state_file (a run to continue) and pretrained_file (weights to
    start from), each a path or a name in --model_path or '', before anything else happens; join
    torchrun's process group, pick the device, seed every generator, check the dataset (process 0
    generates the synthetic set while the others wait), open <log_path>/<name>.log and the
    tensorboardX writer <vis_log_path>/<name> (process 0 only)."""
    for flag, option in (('epochs', '--epochs'), ('batch_size', '--batch-size'), ('save_epoch', '--save_epoch'),
                         ('log_every', '--log_every'), ('accum_iter', '--accum_iter')):
        if getattr(args, flag) < 1:
            raise utils.UserError(f'{option} must be at least 1, got {getattr(args, flag)}.')
    if args.data_on_device and args.augment != 'device':
        raise utils.UserError('--data_on_device holds the training images on the device as uint8 arrays, which the '
                              'device augments: add --augment device.')
    state_file = utils.find_checkpoint(state_file, args.model_path) if state_file else None
    pretrained_file = utils.find_checkpoint(pretrained_file, args.model_path) if pretrained_file else None
    rank, world_size, local_rank = init_distributed()
    device = utils.select_device(args.gpu, local_rank)
    if args.sync_bn and world_size > 1 and device.type != 'cuda':
        raise utils.UserError('--sync_bn needs GPUs (SyncBatchNorm has no CPU implementation): drop it on the CPU.')
    if args.ghost_bn < 1 or (args.ghost_bn > 1 and args.sync_bn):
        raise utils.UserError(f'--ghost_bn must be at least 1 and cannot go with --sync_bn, got --ghost_bn {args.ghost_bn}'
                              f'{" --sync_bn" if args.sync_bn else ""}.')
    utils.set_seed(args.seed)
    if rank != 0:
        dist.barrier()  # process 0 prepares the data first (it may generate the synthetic set)
    data_path = prepare_dataset(args.dataset, args.data_path, need_train_arrays=args.dataset != 'regdb')
    if rank == 0 and world_size > 1:
        dist.barrier()
    if rank == 0:
        logger = utils.make_logger(Path(args.log_path) / f'{name}.log')
        writer = SummaryWriter(str(Path(args.vis_log_path) / name))
    else:
        logger, writer = logging.getLogger(f'{name}.rank{rank}'), NullWriter()
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
    precision = Precision(args.amp, device)
    augment_on_device = args.augment == 'device'
    processes = f' x {world_size} processes' if world_size > 1 else ''
    logger.info(f'{title} {name} on {device}{processes}, {precision}, augmentation in the '
                f'{"device" if augment_on_device else "loader"}\n{vars(args)}')
    return Run(args, name, device, data_path, logger, writer, state_file, pretrained_file, precision,
               augment_on_device, rank, world_size)


def training_set(run):
    """The training images: SYSU-MM01 (or synthetic) from its pre-processed arrays, or RegDB split
    --trial loaded at --img_w x --img_h; with the training augmentation, or as uint8 arrays when it
    runs on the device (run.batch_to_device), and with --data_on_device held there (DeviceArrays).
    Logs their counts."""
    args = run.args
    transform = as_uint8_tensor if run.augment_on_device else train_transform(args.img_h, args.img_w)
    if args.dataset == 'regdb':
        trainset = RegDBData(run.data_path, args.trial, transform, img_size=(args.img_w, args.img_h))
    else:
        trainset = SYSUData(run.data_path, transform)
    for modality, labels in (('visible', trainset.visible_labels), ('thermal', trainset.thermal_labels)):
        run.logger.info(f'  {modality:8s} | {len(np.unique(labels)):5d} ids | {len(labels):8d} images')
    if args.data_on_device:
        trainset = DeviceArrays(trainset, run.device)
        run.logger.info(f'  held on {run.device}: {trainset.nbytes / 2 ** 20:,.1f} MiB')
    return trainset


def make_loader(run, dataset, sampler, batch_size):
    """A DataLoader of batch_size items over this process's share of the sampler's draw (RankShare), in
    whole optimiser steps of --accum_iter batches; over a training set held on the device
    (DeviceArrays), a DeviceLoader of the same batches."""
    share = RankShare(sampler, batch_size, run.rank, run.world_size, run.args.accum_iter)
    if isinstance(dataset, DeviceArrays):
        return DeviceLoader(dataset, share, batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=share, num_workers=run.args.workers, drop_last=True,
                      pin_memory=run.device.type == 'cuda')


class RunValues(dict):
    """Plain values a run carries from epoch to epoch (the best score so far, DDAG's graph-loss
    weight), saved in the state file like any object with a state_dict."""

    def state_dict(self):
        return dict(self)

    def load_state_dict(self, state):
        self.update(state)


def training_state(epoch, args, **objects):
    """What <run>_state.t holds: each object's state_dict under its name, the next epoch, every RNG,
    the flags."""
    state = {name: value.state_dict() for name, value in objects.items()}
    state.update(epoch=epoch, rng=utils.rng_state(), args=vars(args))
    return state


def restart_from_checkpoint(path, args, shape_flags, **objects):
    """Load every object of a state file of training_state and restore every random generator;
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


class GhostBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm whose batch statistics are those of `groups` interleaved groups of the batch (image
    i in group i % groups, so each group holds 1/groups of each modality of a concatenated batch): the
    statistics `groups` processes without --sync_bn would each compute over their share (Hoffer et al.,
    2017, "ghost batch norm"). It shares the parameters and buffers of the batch norm it replaces, so
    the state dict keeps its keys; the running statistics move towards the mean of the groups'; in
    evaluation it is that batch norm. Input (N, C, ...), N a multiple of groups while training."""

    def __init__(self, batch_norm, groups):
        super().__init__(batch_norm.num_features, batch_norm.eps, batch_norm.momentum, batch_norm.affine,
                         batch_norm.track_running_stats)
        self.groups = groups
        self.weight, self.bias = batch_norm.weight, batch_norm.bias
        self.running_mean, self.running_var = batch_norm.running_mean, batch_norm.running_var
        self.num_batches_tracked = batch_norm.num_batches_tracked

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f'expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}')

    def forward(self, x):
        if not self.training and self.running_mean is not None:
            return super().forward(x)
        batch = x.shape[0]
        if batch % self.groups:
            raise utils.UserError(f'--ghost_bn {self.groups}: a batch norm got {batch} images, which do not split into '
                                  f'{self.groups} equal groups; choose a number that divides the images of each '
                                  'modality in a batch.')
        tracking = self.training and self.running_mean is not None
        momentum = 0.0
        if tracking:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

        def per_group(tensor):
            return None if tensor is None else tensor.repeat(self.groups)
        running_mean, running_var = per_group(self.running_mean), per_group(self.running_var)
        # Image i = j * groups + g: (N / groups, groups * C, ...) makes each (group, channel) a channel.
        grouped = x.reshape(batch // self.groups, self.groups * self.num_features, *x.shape[2:])
        normalised = torch.nn.functional.batch_norm(grouped, running_mean, running_var, per_group(self.weight),
                                                    per_group(self.bias), True, momentum, self.eps)
        if tracking:  # the update is linear in the statistics: the mean of the groups' updates
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(self.groups, -1).mean(0))
                self.running_var.copy_(running_var.view(self.groups, -1).mean(0))
        normalised = normalised.reshape(x.shape)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            normalised = normalised.contiguous(memory_format=torch.channels_last)
        return normalised


def ghost_batchnorm(module, groups):
    """module with every batch norm in it replaced, in place, by a GhostBatchNorm of `groups` groups."""
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        return GhostBatchNorm(module, groups)
    for name, child in module.named_children():
        module.add_module(name, ghost_batchnorm(child, groups))
    return module


def compile_network(network, mode):
    """network through torch.compile in --compile's mode ('default': torch's default)."""
    return torch.compile(network, mode=None if mode == 'default' else mode)


def train_step(run, model, optimizer, step, batch, epoch, accumulated=0):
    """One training step on a loader's batch (visible, thermal, visible labels, thermal labels): the
    batch to the device (augmented there with --augment device), step under autocast, backward and
    the optimiser step. With --accum_iter K the gradients of K batches add up before the optimiser
    steps: `accumulated` says how many batches of this optimiser step came before this one (0 to
    K - 1); each batch's loss counts 1/K, so the step is that of the mean of the K losses, what K
    processes of one batch each compute (under torchrun the processes exchange gradients after the
    K-th batch only). Returns {'loss': ..., **step's values}, tensors left on the device: nothing
    here makes the host wait for the GPU (a copy from host memory that is not non-blocking would)."""
    visible_images, thermal_images, visible_labels, thermal_labels = batch
    visible, thermal = run.batch_to_device(visible_images), run.batch_to_device(thermal_images)
    labels = torch.cat((visible_labels, thermal_labels)).to(run.device, non_blocking=True)
    accum_iter = run.args.accum_iter
    last = accumulated + 1 == accum_iter
    if accumulated == 0:
        optimizer.zero_grad(set_to_none=True)
    if run.args.compile:  # a new iteration: CUDA graphs (--compile reduce-overhead) may reuse their buffers
        torch.compiler.cudagraph_mark_step_begin()
    # under DDP the processes exchange gradients in the backward pass of a step's last batch only
    with contextlib.nullcontext() if last or not run.distributed else model.no_sync():
        with run.precision.autocast():
            loss, values = step(model, visible, thermal, labels, epoch)
        run.precision.backward(loss / accum_iter)
    if last:
        run.precision.step(optimizer)
    return {'loss': loss.detach(), **values}


def epoch_images(run, loader):
    """The images an epoch of loader trains on, both modalities, over every process."""
    return len(loader) * loader.batch_size * 2 * run.world_size


def train_one_epoch(run, model, optimizer, step, loader, epoch):
    """One pass over a loader of (visible, thermal, visible labels, thermal labels) batches with
    step (see the module docstring). Returns the epoch means of 'loss' and of step's values
    (weighted by images, over every process) and 'images_per_second' (of all processes)."""
    model.train()
    totals, images = {}, 0  # image-weighted sums of the values, kept on the device between log steps
    throughput = utils.Throughput(epoch_images(run, loader))
    progress = tqdm(loader, desc=f'epoch {epoch}', unit='batch', leave=False, dynamic_ncols=True, mininterval=1.0,
                    disable=not run.is_main)
    for index, batch in enumerate(progress):
        values = train_step(run, model, optimizer, step, batch, epoch, accumulated=index % run.args.accum_iter)
        batch_images = len(batch[2]) + len(batch[3])
        for name, value in values.items():
            # A tensor value is added up on the device, a number on the host: neither waits for the GPU.
            weighted = (value.detach().double() if torch.is_tensor(value) else float(value)) * batch_images
            totals[name] = totals[name] + weighted if name in totals else weighted
        images += batch_images
        throughput.update(batch_images * run.world_size)
        if (index + 1) % run.args.log_every == 0 or index + 1 == len(loader):
            global_step = epoch * len(loader) + index
            for name, value in values.items():
                run.writer.add_scalar(f'train/{name}', float(value), global_step)
            shown = ' '.join(f'{name} {float(total) / images:.4f}' for name, total in totals.items())
            progress.set_postfix_str(f'{shown} lr {optimizer.param_groups[-1]["lr"]:.4g} {throughput}', refresh=False)
    if run.distributed:  # the means over every process's images
        names = list(totals)
        summed = torch.tensor([float(totals[name]) for name in names] + [images], dtype=torch.float64,
                              device=run.device)
        dist.all_reduce(summed)
        totals, images = dict(zip(names, summed[:-1])), float(summed[-1])
    stats = {name: float(total) / images for name, total in totals.items()}
    stats['images_per_second'] = throughput.done / max(time.time() - throughput.start, 1e-9)
    return stats


def epoch_loader(run, make_loader, epoch):
    """make_loader(epoch), and under torchrun the generators of each process for the epoch: the
    loader's draw of images is made with every process seeded alike (so that their shares are
    disjoint), then each process is seeded apart, so that augmentation, stripe shuffles and loader
    workers differ between processes. The seeds depend on --seed, the epoch and the rank only, so
    a resumed run draws what the uninterrupted one drew. One process: make_loader(epoch) alone."""
    if not run.distributed:
        return make_loader(epoch)

    def seed(*keys):
        utils.set_seed(int(np.random.SeedSequence([run.args.seed, epoch, *keys]).generate_state(1)[0]))

    seed()
    loader = make_loader(epoch)
    seed(run.rank + 1)
    return loader


def check_replicas_agree(run, model):
    """Under torchrun: stop unless every process ends with the same weights (a float64 checksum of
    the parameters); returns the checksum."""
    checksum = torch.stack([parameter.detach().double().sum() for parameter in model.parameters()]).sum()
    gathered = [torch.zeros_like(checksum) for _ in range(run.world_size)]
    dist.all_gather(gathered, checksum)
    if any(not torch.equal(other, checksum) for other in gathered):
        raise RuntimeError(f'the {run.world_size} processes ended with different weights: {gathered}')
    return float(checksum)


def fit(run, model, optimizer, step, make_loader, milestones, shape_flags=(), end_of_epoch=None,
        unused_parameters=False, **objects):
    """Train for epochs [start, --epochs) and return the statistics of the epochs run now.

    Each epoch: the learning rate of utils.warmup_step_lr (each parameter group at its 'lr_scale'),
    loader = make_loader(epoch), train_one_epoch and its log line, end_of_epoch(epoch, stats) (the
    script's evaluation and weight files, which it writes on process 0 only; it may add to stats),
    the epoch's tensorboardX scalars, then <run>_state.t with model, optimizer, the gradient scaler
    and `objects`. With run.state_file the run continues from it; shape_flags are the flags it must
    share. With --channels_last the weights are kept channels-last; with --ghost_bn K every batch norm
    trains on the statistics of K groups of the batch (GhostBatchNorm); under torchrun the step gets the
    model wrapped in DistributedDataParallel (with --sync_bn, synchronised batch norm first; say
    unused_parameters when some parameters take no part in the loss), and the processes must end
    with equal weights. With --compile the step gets the network through torch.compile. The log ends
    with the images/s of the whole run, start-up, evaluations and files included.
    """
    args, logger, writer = run.args, run.logger, run.writer
    objects = {'model': model, 'optimizer': optimizer, 'grad_scaler': run.precision, **objects}
    start_epoch = 0
    if run.state_file:
        start_epoch = restart_from_checkpoint(run.state_file, args, shape_flags, **objects)
        carried = ''.join(f', {name} {value.state_dict()}' for name, value in objects.items()
                          if name not in ('model', 'optimizer', 'grad_scaler'))
        logger.info(f'==> resumed {run.state_file} at epoch {start_epoch}{carried}')
    if start_epoch >= args.epochs:
        logger.info(f'nothing to do: the run already has {start_epoch} epochs (--epochs {args.epochs})')
    if args.channels_last:
        model.to(memory_format=torch.channels_last)  # in place: the optimiser keeps its parameters
    if args.ghost_bn > 1:
        ghost_batchnorm(model, args.ghost_bn)  # in place, the same parameters and buffers
    trained = model
    if run.distributed:
        if args.sync_bn:
            trained = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # shares the parameters
        trained = DistributedDataParallel(trained, device_ids=[run.device] if run.device.type == 'cuda' else None,
                                          find_unused_parameters=unused_parameters)
    if args.compile:  # the step gets the compiled network; evaluation and the files use the plain one
        trained = compile_network(trained, args.compile)

    history, run_start, run_images = [], time.time(), 0
    with utils.BackgroundWriter() as state_files:  # <run>_state.t is written while the next epoch trains
        for epoch in range(start_epoch, args.epochs):
            lr = utils.warmup_step_lr(epoch, args.lr, milestones)
            utils.set_lr(optimizer, lr)
            start = time.time()
            loader = epoch_loader(run, make_loader, epoch)
            stats = train_one_epoch(run, trained, optimizer, step, loader, epoch)
            run_images += epoch_images(run, loader)
            steps = len(loader) // args.accum_iter  # optimiser steps
            of_batches = f' of {args.accum_iter} batches' if args.accum_iter > 1 else ''
            stats.update(epoch=epoch, lr=lr, steps=(epoch + 1) * steps)
            shown = ' '.join(f'{name} {value:.4f}' for name, value in stats.items()
                             if name not in ('epoch', 'lr', 'steps', 'images_per_second'))
            logger.info(f'epoch {epoch} lr {lr:.4g} {shown} ({steps} steps{of_batches}, '
                        f'{stats["images_per_second"]:.1f} img/s, '
                        f'{utils.format_seconds(time.time() - start)})')
            if end_of_epoch is not None:
                end_of_epoch(epoch, stats)
            for name, value in stats.items():
                if name not in ('epoch', 'steps') and isinstance(value, (int, float)):
                    writer.add_scalar(f'epoch/{name}', value, epoch)
            if run.is_main:
                state_files.write(training_state(epoch + 1, args, **objects), run.model_path / f'{run.name}_state.t')
            if run.distributed:
                dist.barrier()  # nobody runs ahead of process 0's evaluation and files
            history.append(stats)
    if history:  # the figure a user waits for: every epoch's files, evaluations and start-up included
        elapsed = time.time() - run_start
        epochs = f'{len(history)} epoch{"s" if len(history) > 1 else ""}'
        logger.info(f'{epochs} in {utils.format_seconds(elapsed)}: {run_images / elapsed:.1f} img/s over the run, its '
                    f'evaluations and files included')
    if run.distributed:
        checksum = check_replicas_agree(run, model)
        logger.info(f'the {run.world_size} processes end with the same weights (checksum {checksum:.6f})')
    writer.close()
    return history
