"""Helpers shared by every script of the project (pre-training, AGW, DDAG).

Nothing here parses arguments or touches the file system at import time.
"""
import concurrent.futures
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent
DATA_ROOT = REPO_ROOT / 'data'
DEFAULT_DATA_PATHS = {
    'sysu': DATA_ROOT / 'SYSU-MM01',
    'regdb': DATA_ROOT / 'RegDB',
    'synthetic': DATA_ROOT / 'synthetic',
}


class UserError(Exception):
    """Bad input from the user: reported as one sentence and a non-zero exit, no traceback."""


def run_main(main):
    """Call `main()`; turn a UserError into one line on stderr and exit status 2. Under torchrun, leave
    the process group before the interpreter exits: a gloo group torn down at exit can abort the
    process after a run that ended well ('terminate called without an active exception')."""
    try:
        main()
    except UserError as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- devices and seeds

def select_device(gpu, local_rank=None):
    """Honour `--gpu` the way the public scripts do (CUDA_VISIBLE_DEVICES), fall back to CPU.

    local_rank: this process's GPU under torchrun, which leaves CUDA_VISIBLE_DEVICES alone (one
    --gpu for every process would put them all on one card). Must run before anything initialises CUDA.
    """
    if local_rank is None and gpu is not None and gpu != '':
        os.environ['CUDA_VISIBLE_DEVICES'] = str(gpu)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        if local_rank is None:
            return torch.device('cuda')
        torch.cuda.set_device(local_rank)
        return torch.device('cuda', local_rank)
    print('CUDA is not available: running on the CPU.', flush=True)
    return torch.device('cpu')


def full_precision(device):
    """A region where autocast is off, so that the losses, Sinkhorn, the embeddings' normalisation and
    the metrics run in float32 (on float32 inputs) whatever --amp does to the network around them."""
    return torch.autocast(torch.device(device).type, enabled=False)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every random number generator a training run draws from, for an exact resume."""
    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# ----------------------------------------------------------------------------- files

def atomic_write(path, write):
    """Call `write(temporary_path)` and move the result onto `path` only once it is complete,
    so an interrupted run never leaves a half-written checkpoint or array behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_checkpoint(obj, path):
    atomic_write(path, lambda temporary: torch.save(obj, temporary))


def host_copy(obj):
    """obj with every tensor in it (in dicts, lists and tuples, at any depth) copied to host memory."""
    if torch.is_tensor(obj):
        return obj.detach().to('cpu', copy=True)
    if isinstance(obj, dict):
        return {key: host_copy(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(value) for value in obj)
    return obj


class BackgroundWriter:
    """Checkpoint files written by a thread while training goes on. write(obj, path) copies obj's
    tensors to host memory (so that training may change the originals), hands the file to the thread
    and returns; the file appears atomically once written (save_checkpoint). One file at a time: the
    next write, and close() (or leaving a `with` block), wait for the one before and raise its error,
    if any. torch.save leaves the GIL free for much of its time, so the training loop keeps most of
    its pace meanwhile (bench/state_save.py)."""

    def __init__(self):
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='checkpoint')
        self.pending = None

    def write(self, obj, path):
        self.wait()
        self.pending = self.executor.submit(save_checkpoint, host_copy(obj), path)

    def wait(self):
        """Until the file being written is complete."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self):
        try:
            self.wait()
        finally:
            self.executor.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.close()


def save_array(array, path):
    def write(temporary):
        with open(temporary, 'wb') as handle:
            np.save(handle, array)
    atomic_write(path, write)


def save_arrays(arrays, path):
    """{name: array} into one .npz file at exactly `path` (np.savez given a file name would add .npz)."""
    def write(temporary):
        with open(temporary, 'wb') as handle:
            np.savez(handle, **arrays)
    atomic_write(path, write)


def data_path_for(dataset, data_path=None):
    """The dataset folder: `--data_path` when given, else the default under data/ at the repo root."""
    if data_path:
        return Path(data_path).expanduser()
    if dataset not in DEFAULT_DATA_PATHS:
        raise UserError(f'--dataset {dataset!r} is not known: use one of {", ".join(DEFAULT_DATA_PATHS)}.')
    return DEFAULT_DATA_PATHS[dataset]


def find_checkpoint(resume, model_path):
    """`--resume` is a path, or a file name inside `--model_path`."""
    candidates = [Path(resume).expanduser(), Path(model_path).expanduser() / resume]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f'--resume: no checkpoint file {resume!r} (looked at {candidates[0]} and {candidates[1]}).')


def load_checkpoint(path):
    """Load a checkpoint onto the CPU; a file that is not one is a UserError naming it."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:
        if 'weights_only' not in str(error) and 'Unsupported global' not in str(error):
            raise UserError(f'{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error}).')
    # Files of the public AGW/DDAG code hold numpy scores next to the weights.
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as error:
        raise UserError(f'{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error}).')


def strip_data_parallel(state):
    """nn.DataParallel and DistributedDataParallel save every key under 'module.': drop that prefix."""
    if state and all(isinstance(key, str) and key.startswith('module.') for key in state):
        return {key[len('module.'):]: value for key, value in state.items()}
    return state


def finetune_run_name(args, middle, trial=None):
    """The public file-name stem of a fine-tuning run: '<dataset>_<middle>', then '_<optim>' unless
    SGD, '_stream_one' for a one-stem network and '_trial_<trial>' on RegDB (trial: default
    args.trial; '{trial}' for a pattern). Whether the backbone came from MMGL is not in the name."""
    name = f'{args.dataset}_{middle}'
    if args.optim != 'sgd':
        name += f'_{args.optim}'
    if getattr(args, 'stream', 'two') == 'one':
        name += '_stream_one'
    if args.dataset == 'regdb':
        name += f'_trial_{args.trial if trial is None else trial}'
    return name


# ----------------------------------------------------------------------------- optimisation

def warmup_step_lr(epoch, base_lr, milestones, warmup_epochs=10):
    """The public AGW schedule: linear warm-up, then x0.1 at each milestone."""
    if epoch < warmup_epochs:
        return base_lr * (epoch + 1) / warmup_epochs
    return base_lr * 0.1 ** sum(epoch >= milestone for milestone in milestones)


def set_lr(optimizer, lr):
    """Give every parameter group `lr` times its 'lr_scale' (the backbone trains at 0.1 x lr in AGW)."""
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)


def make_optimizer(param_groups, lr, optim='sgd'):
    """--optim sgd: momentum 0.9, Nesterov, weight decay 5e-4, as in the public scripts; adam: Adam with
    the same weight decay."""
    if optim == 'sgd':
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    if optim == 'adam':
        return torch.optim.Adam(param_groups, lr=lr, weight_decay=5e-4)
    raise UserError(f'--optim {optim!r} is not known: use sgd or adam.')


class Throughput:
    """Images per second and time left, for progress lines."""

    def __init__(self, total_images):
        self.total, self.done, self.start = total_images, 0, time.time()

    def update(self, images):
        self.done += images

    def __str__(self):
        elapsed = max(time.time() - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float('nan')
        return f'{rate:.1f} img/s, ETA {format_seconds(left)}'


def format_seconds(seconds):
    if seconds != seconds:  # NaN
        return '?'
    seconds = int(seconds)
    return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


# ----------------------------------------------------------------------------- logging

def make_logger(log_file):
    """A logger writing to stdout and to `log_file`."""
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(str(log_file))
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    logger.propagate = False
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(log_file)):
        handler.setFormatter(logging.Formatter('%(message)s'))
        logger.addHandler(handler)
    return logger


# ----------------------------------------------------------------------------- inference

@torch.no_grad()
def extract_features(forward, loader, device):
    """Run `forward(images)` over a loader of (images, labels) batches.

    forward returns a (B, D) tensor or a tuple of them; the result is a tuple of (N, D) float32
    numpy arrays, one per output, in loader order.
    """
    outputs = []
    for images, _ in loader:
        batch_outputs = forward(images.to(device, non_blocking=True))
        if torch.is_tensor(batch_outputs):
            batch_outputs = (batch_outputs,)
        outputs.append([output.float().cpu() for output in batch_outputs])
    return tuple(torch.cat(column).numpy() for column in zip(*outputs))
