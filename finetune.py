"""Shared plumbing of the AGW and DDAG fine-tuning scripts (AGW/train.py, AGW/test.py and DDAG's).

A fine-tuning script brings its network, its losses and its flags; this module does the rest:

    train_args_parser(description)      the flags every fine-tuning script has (public names and defaults)
    run_name(args, middle)              '<dataset>_<middle>[_<optim>][_stream_one][_trial_K]', the public suffix
    start_run(args, name, title)        checks the files named by flags, device, seed, data, logger, tensorboardX
    training_set(run)                   SYSU-MM01 / synthetic arrays or one RegDB split, with augmentation
    class_count(trainset)               identities to classify, from the labels
    identity_loader(trainset, args, device)   a loader over a fresh IdentitySampler: call it every epoch
    load_pretrained(net, path, log)     the backbone of an MMGL (or train.py state, AGW, DDAG) checkpoint
    Evaluator                           test images -> features (a RetrievalSet) -> (CMC, mAP, mINP) per named feature
    train_one_epoch(...)                one pass over a loader; the method's `step` gives the loss
    fit(run, net, optimizer, trainset, step, evaluator, ...)   the epoch loop with lr schedule,
                                        evaluation, <run>_best.t, <run>_epoch_N.t, <run>_state.t, --resume_state
    test_args_parser(description), run_test(args, build_net, feature_names, default_checkpoint)
                                        most of a test script: checkpoint(s), trials, report, averages, and
                                        the test-time tools of retrieval_tools.py (--rerank, --flip, ...)
    load_finetuned(path, build_net)     a fine-tuned network, loaded strictly

Files a fine-tuning run writes into --model_path (epochs are numbered from 0, as in the public code):
    <run>_best.t       {'net', 'cmc' (tensor), 'mAP', 'mINP', 'epoch'}: the public format, kept for the best
                       Rank-1 of the selected feature (AGW: the BNNeck feature) over the evaluations so far
    <run>_epoch_N.t    the same, every --save_epoch epochs and after the last one
    <run>_state.t      {'net', 'optimizer', 'epoch' (next to run), 'best', 'rng', 'args', 'extra'} after every
                       epoch, for --resume_state
"""
import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tensorboardX import SummaryWriter
from torch.utils.data import DataLoader
from tqdm import tqdm

import retrieval_tools
import utils
from data_loader import IdentitySampler, RegDBData, SYSUData, TestData, test_transform, train_transform
from data_manager import prepare_dataset
from eval_metrics import average_results, regdb_retrieval_set, summarize, sysu_retrieval_set
from model import ARCHS, BACKBONE_PREFIXES, backbone_state_dict, checkpoint_arch

DATASETS = ('sysu', 'regdb', 'synthetic')


# ----------------------------------------------------------------------------- flags and names

def train_args_parser(description, vis_log_path='log/vis_log/'):
    """An argparse parser with the flags shared by the fine-tuning scripts; add the method's own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--dataset', default='sysu', choices=DATASETS)
    parser.add_argument('--data_path', default=None,
                        help='dataset folder (holding cam1..cam6 and exp/, or Visible/, Thermal/ and idx/); '
                             'default: data/SYSU-MM01, data/RegDB or data/synthetic at the repo root')
    parser.add_argument('--trial', default=1, type=int, help='RegDB split to train on and evaluate (1..10)')
    parser.add_argument('--mode', default='all', choices=['all', 'indoor'], help='SYSU-MM01 search mode of evaluations')
    parser.add_argument('--arch', default='resnet50', choices=ARCHS)
    parser.add_argument('--stream', default='two', choices=['one', 'two'],
                        help='two: modality-specific stems; one: one stem for both modalities '
                             '(one-stream MMGL checkpoints load into either)')
    parser.add_argument('--resume', '-r', default='',
                        help='pre-trained checkpoint (MMGL, or train.py state, or AGW/DDAG) whose backbone '
                             'initialises the network: a path, or a file name in --model_path; '
                             'none: random initialisation')
    parser.add_argument('--resume_state', default='',
                        help='<run>_state.t of an interrupted fine-tuning run to continue (path or name in --model_path)')
    parser.add_argument('--lr', default=0.1, type=float, help='learning rate of the heads; the backbone trains at 0.1 x')
    parser.add_argument('--optim', default='sgd', choices=['sgd', 'adam'])
    parser.add_argument('--epochs', default=81, type=int, help='epochs 0 .. epochs-1 (the public code runs 81)')
    parser.add_argument('--batch-size', default=8, type=int, dest='batch_size', help='identities per batch')
    parser.add_argument('--num_pos', default=4, type=int, help='images of each identity per modality in a batch')
    parser.add_argument('--margin', default=0.3, type=float, help='margin of the batch-hard triplet loss')
    parser.add_argument('--img_h', default=288, type=int)
    parser.add_argument('--img_w', default=144, type=int)
    parser.add_argument('--test-batch', default=64, type=int, dest='test_batch')
    parser.add_argument('--workers', default=4, type=int)
    parser.add_argument('--model_path', default='save_model/', help='where checkpoints are read and written')
    parser.add_argument('--save_epoch', default=20, type=int, help='also keep the weights every N epochs')
    parser.add_argument('--log_path', default='log/')
    parser.add_argument('--vis_log_path', default=vis_log_path, help='tensorboardX logs')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--gpu', default='0', help='sets CUDA_VISIBLE_DEVICES; the CPU is used without CUDA')
    return parser


def test_args_parser(description):
    """An argparse parser with the flags shared by the test scripts. The naming flags (--lr, --optim,
    --num_pos, --batch-size, --seed, --stream, with the method's own) rebuild the training run's name,
    which gives the default checkpoint <run>_best.t when --resume is not given."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--dataset', default='sysu', choices=DATASETS)
    parser.add_argument('--data_path', default=None, help='dataset folder (default: under data/ at the repo root)')
    parser.add_argument('--resume', '-r', default='',
                        help='fine-tuned checkpoint: a path, or a file name in --model_path; for RegDB "{trial}" '
                             'in it stands for the trial number. Default: the <run>_best.t name the training '
                             'flags give')
    parser.add_argument('--model_path', default='save_model/')
    parser.add_argument('--arch', default=None, choices=ARCHS, help='default: read from the checkpoint')
    parser.add_argument('--mode', default='all', choices=['all', 'indoor'], help='SYSU-MM01 search mode')
    parser.add_argument('--shot', default='single', choices=['single', 'multi'], help='SYSU-MM01 gallery')
    parser.add_argument('--trial', default=0, type=int,
                        help='RegDB: test the checkpoint of split K (1..10), or 0: all ten, averaged '
                             '(SYSU-MM01 always averages its 10 gallery draws)')
    parser.add_argument('--tvsearch', action='store_true', help='RegDB: thermal queries, visible gallery')
    parser.add_argument('--img_h', default=288, type=int)
    parser.add_argument('--img_w', default=144, type=int)
    parser.add_argument('--test-batch', default=64, type=int, dest='test_batch')
    parser.add_argument('--workers', default=4, type=int)
    parser.add_argument('--gpu', default='0', help='sets CUDA_VISIBLE_DEVICES; the CPU is used without CUDA')
    naming = parser.add_argument_group('training flags that name the default checkpoint')
    naming.add_argument('--lr', default=0.1, type=float)
    naming.add_argument('--optim', default='sgd', choices=['sgd', 'adam'])
    naming.add_argument('--num_pos', default=4, type=int)
    naming.add_argument('--batch-size', default=8, type=int, dest='batch_size')
    naming.add_argument('--seed', default=0, type=int)
    naming.add_argument('--stream', default='two', choices=['one', 'two'])
    retrieval_tools.add_test_time_flags(parser)
    return parser


def run_name(args, middle, trial=None):
    """The public file-name suffix: '<dataset>_<middle>', then '_<optim>' unless SGD, '_stream_one' for
    a one-stem network and '_trial_<trial>' on RegDB (trial: default args.trial; '{trial}' for a pattern).
    AGW's middle is '<method>_p<num_pos>_n<batch-size>_lr_<lr>_seed_<seed>', so the default run is
    sysu_agw_p4_n8_lr_0.1_seed_0. Whether the backbone came from MMGL or not is not in the name."""
    name = f'{args.dataset}_{middle}'
    if args.optim != 'sgd':
        name += f'_{args.optim}'
    if getattr(args, 'stream', 'two') == 'one':
        name += '_stream_one'
    if args.dataset == 'regdb':
        name += f'_trial_{args.trial if trial is None else trial}'
    return name


# ----------------------------------------------------------------------------- a training run

@dataclass
class Run:
    """What start_run sets up for one fine-tuning run."""
    args: argparse.Namespace
    name: str
    device: torch.device
    data_path: Path
    logger: object
    writer: SummaryWriter
    resume_file: Path = None      # --resume, found
    state_file: Path = None       # --resume_state, found

    @property
    def model_path(self):
        return Path(self.args.model_path)


def start_run(args, name, title):
    """Find the files named by --resume/--resume_state (a missing one is a UserError before anything
    else happens), pick the device, seed every generator, check the dataset, open the log file
    <log_path>/<name>.log and the tensorboardX writer <vis_log_path>/<name>."""
    for flag, option in (('epochs', '--epochs'), ('batch_size', '--batch-size'), ('num_pos', '--num_pos'),
                         ('save_epoch', '--save_epoch'), ('test_batch', '--test-batch')):
        if getattr(args, flag) < 1:
            raise utils.UserError(f'{option} must be at least 1, got {getattr(args, flag)}.')
    resume_file = utils.find_checkpoint(args.resume, args.model_path) if args.resume else None
    state_file = utils.find_checkpoint(args.resume_state, args.model_path) if args.resume_state else None
    device = utils.select_device(args.gpu)
    utils.set_seed(args.seed)
    data_path = prepare_dataset(args.dataset, args.data_path, need_train_arrays=args.dataset != 'regdb')
    logger = utils.make_logger(Path(args.log_path) / f'{name}.log')
    writer = SummaryWriter(str(Path(args.vis_log_path) / name))
    logger.info(f'{title} {name} on {device}\n{vars(args)}')
    return Run(args, name, device, data_path, logger, writer, resume_file, state_file)


def training_set(run):
    """The training images with the training augmentation: SYSU-MM01 (or synthetic) from its
    pre-processed arrays, or RegDB split --trial loaded at --img_w x --img_h. Logs its statistics."""
    args = run.args
    transform = train_transform(args.img_h, args.img_w)
    if args.dataset == 'regdb':
        trainset = RegDBData(run.data_path, args.trial, transform, img_size=(args.img_w, args.img_h))
    else:
        trainset = SYSUData(run.data_path, transform)
    for modality, labels in (('visible', trainset.visible_labels), ('thermal', trainset.thermal_labels)):
        run.logger.info(f'  {modality:8s} | {len(np.unique(labels)):5d} ids | {len(labels):8d} images')
    return trainset


def class_count(trainset):
    """Number of identity classes: the largest training label + 1 (labels are 0..K-1)."""
    labels = np.concatenate([trainset.visible_labels, trainset.thermal_labels])
    if labels.min() < 0:
        raise utils.UserError(f'Training labels must be 0 or more, found {labels.min()}: check the training lists.')
    return int(labels.max()) + 1


def identity_loader(trainset, args, device):
    """A DataLoader of batches (visible, thermal, visible labels, thermal labels) over a new
    IdentitySampler: --batch-size identities x --num_pos images per modality. Build one per epoch."""
    sampler = IdentitySampler(trainset.visible_labels, trainset.thermal_labels, args.num_pos, args.batch_size)
    return DataLoader(trainset, batch_size=args.batch_size * args.num_pos, sampler=sampler,
                      num_workers=args.workers, drop_last=True, pin_memory=device.type == 'cuda')


# ----------------------------------------------------------------------------- checkpoints

def _strip_data_parallel(state):
    """nn.DataParallel saves every key under 'module.': drop that prefix."""
    if state and all(isinstance(key, str) and key.startswith('module.') for key in state):
        return {key[len('module.'):]: value for key, value in state.items()}
    return state


def initialise(run, net):
    """Log where the weights come from and load a pre-trained backbone for --resume:
    --resume_state (restored later by fit), --resume, or random initialisation."""
    if run.state_file:
        run.logger.info(f'==> the weights come from {run.state_file} (--resume_state)')
    elif run.resume_file:
        load_pretrained(net, run.resume_file, run.logger.info)
    else:
        run.logger.info('==> no --resume: the network starts from random initialisation')


def load_pretrained(net, path, log=print):
    """Initialise the backbone of `net` (a TwoStreamBackbone) from the checkpoint at `path`.

    Accepted: a plain state dict of MMGL pre-training (ours or the public release), a training-state
    file of train.py ({'model': ...}), an AGW/DDAG checkpoint ({'net': ...}). Heads (fc1., fc2.,
    local_conv_list, classifiers) are dropped; backbone tensors this network does not have are
    ignored (the whole-ResNet leftovers of public checkpoints); a one-stream checkpoint fills both
    stems. Logs what was loaded, missing and ignored; returns the model.BackboneReport.
    A file that is not a checkpoint, has other shapes (another --arch) or fills none of the backbone
    is a UserError.
    """
    checkpoint = utils.load_checkpoint(path)
    kind = 'pre-training state dict'
    state = checkpoint
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get('model'), dict):
        state, kind = checkpoint['model'], 'training-state file of train.py'
    elif isinstance(checkpoint, dict) and isinstance(checkpoint.get('net'), dict):
        state, kind = checkpoint['net'], 'fine-tuned AGW/DDAG checkpoint'
    if not isinstance(state, dict):
        raise utils.UserError(f'{path} holds a {type(state).__name__}, not a state dict to initialise the backbone from.')
    state = backbone_state_dict(_strip_data_parallel(state))
    try:
        report = net.load_backbone(state)
    except ValueError as error:
        raise utils.UserError(f'{path} cannot initialise the {net.arch} backbone: {error}.')
    expected = len(report.loaded) + len(report.missing)
    log(f'==> loaded {len(report.loaded)} of {expected} backbone tensors of the {net.arch} {net.stream}-stream '
        f'network from {path} ({kind}); ignored {len(report.ignored)} backbone-named tensors it does not use')
    if report.missing:
        log(f'WARNING: {len(report.missing)} backbone tensors were not in {path} and keep their random '
            f'initialisation: {", ".join(report.missing[:10])}{", ..." if len(report.missing) > 10 else ""}')
    return report


def load_finetuned(path, build_net, arch=None, unused_prefixes=()):
    """A fine-tuned network from `path` ({'net': state dict, ...} or a plain state dict), strictly.

    build_net(class_num, arch) builds the unloaded network; class_num is read from the checkpoint's
    classifier.weight, the arch from its backbone (a different `arch` asked for is a UserError).
    Besides keys starting with `unused_prefixes`, only backbone-named tensors the network has no
    place for may be left over (the whole-ResNet leftovers of public checkpoints); any other
    mismatch (e.g. another --method) is a UserError. Returns (network on the CPU, checkpoint dict).
    """
    checkpoint = utils.load_checkpoint(path)
    state = checkpoint.get('net') if isinstance(checkpoint, dict) and isinstance(checkpoint.get('net'), dict) \
        else checkpoint
    if not isinstance(state, dict) or 'classifier.weight' not in _strip_data_parallel(state):
        raise utils.UserError(f'{path} is not a fine-tuned checkpoint (it has no classifier.weight): pass the '
                              f'<run>_best.t or <run>_epoch_N.t file of a fine-tuning run, not a pre-training one.')
    state = _strip_data_parallel(state)
    found_arch = checkpoint_arch(state)
    if arch and found_arch and arch != found_arch:
        raise utils.UserError(f'{path} holds a {found_arch} network, not --arch {arch}: drop --arch or pass {found_arch}.')
    net = build_net(int(state['classifier.weight'].shape[0]), found_arch or arch or 'resnet50')
    own = net.state_dict()
    left_over = BACKBONE_PREFIXES + tuple(unused_prefixes)
    state = {key: value for key, value in state.items() if key in own or not key.startswith(left_over)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(key for key in set(own) & set(state)
                      if not torch.is_tensor(state[key]) or state[key].shape != own[key].shape)
    if missing or unexpected or reshaped:
        details = '; '.join(what.format(len(keys)) + f', e.g. {", ".join(keys[:3])}'
                            for what, keys in (('lacks {} tensors', missing), ('has {} unknown tensors', unexpected),
                                               ('has {} tensors of other shapes', reshaped)) if keys)
        raise utils.UserError(f'{path} does not fit the network built for it: it {details}. '
                              f'Check the network flags (AGW: --method; DDAG: --wpa, --part, --low-dim, '
                              f'--nheads) against the training run.')
    net.load_state_dict(state)
    return net, (checkpoint if isinstance(checkpoint, dict) and 'net' in checkpoint else {})


def checkpoint_record(net, scores, epoch):
    """The public checkpoint format: {'net', 'cmc', 'mAP', 'mINP', 'epoch'}. cmc is a float64 tensor,
    so the file loads with torch.load(weights_only=True)."""
    cmc, mAP, mINP = scores
    return {'net': net.state_dict(), 'cmc': torch.as_tensor(np.asarray(cmc, dtype=np.float64)),
            'mAP': float(mAP), 'mINP': float(mINP), 'epoch': int(epoch)}


def save_state(path, net, optimizer, next_epoch, best, args, extra):
    utils.save_checkpoint({'net': net.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': next_epoch,
                           'best': dict(best), 'rng': utils.rng_state(), 'args': vars(args), 'extra': dict(extra)},
                          path)


def restore_state(path, args, net, optimizer, shape_flags):
    """Load a <run>_state.t into net and optimizer, restore every random generator; returns
    (next epoch, best {'rank1', 'epoch'}, extra dict). The flags in shape_flags must match."""
    state = utils.load_checkpoint(path)
    if not isinstance(state, dict) or not {'net', 'optimizer', 'epoch', 'rng', 'args', 'best'} <= set(state):
        raise utils.UserError(f'{path} is not a fine-tuning state file: --resume_state continues a run from its '
                              f'<run>_state.t file in --model_path (a pre-trained checkpoint goes to --resume).')
    saved = {flag: state['args'].get(flag) for flag in shape_flags}
    if saved != {flag: getattr(args, flag) for flag in shape_flags}:
        given = ' '.join(f'--{flag} {value}' for flag, value in saved.items())
        raise utils.UserError(f'{path} was written by a run with {given}: resume with the same flags.')
    try:
        net.load_state_dict(state['net'])
        optimizer.load_state_dict(state['optimizer'])
    except (RuntimeError, ValueError) as error:
        raise utils.UserError(f'{path} does not fit this network: {error}')
    utils.set_rng_state(state['rng'])
    return state['epoch'], state['best'], state.get('extra', {})


# ----------------------------------------------------------------------------- evaluation

class Evaluator:
    """The standard test protocol around a network: SYSU-MM01 (and synthetic) infrared queries
    against visible galleries, RegDB visible queries against the thermal gallery of split `trial`
    (thermal to visible with tvsearch).

    The network's eval-mode forward `net(x, x, modal)` returns one (B, D) feature per name in
    feature_names (L2-normalised: compared by inner product). With flip, each is averaged with that
    of the mirrored image (retrieval_tools.mirror_averaged). Test images are loaded once and kept.
    """

    def __init__(self, dataset, data_path, device, feature_names, img_h=288, img_w=144, test_batch=64, workers=4,
                 mode='all', shot='single', trial=1, tvsearch=False, flip=False):
        self.dataset, self.data_path, self.device = dataset, Path(data_path), device
        self.feature_names = tuple(feature_names)
        self.img_h, self.img_w, self.test_batch, self.workers = img_h, img_w, test_batch, workers
        self.mode, self.shot, self.trial, self.tvsearch, self.flip = mode, shot, trial, tvsearch, flip
        self.transform = test_transform(img_h, img_w)
        self._images = {}

    @classmethod
    def from_args(cls, args, data_path, device, feature_names, **overrides):
        options = dict(img_h=args.img_h, img_w=args.img_w, test_batch=args.test_batch, workers=args.workers,
                       mode=args.mode, shot=getattr(args, 'shot', 'single'), trial=args.trial,
                       tvsearch=getattr(args, 'tvsearch', False), flip=getattr(args, 'flip', False))
        options.update(overrides)
        return cls(args.dataset, data_path, device, feature_names, **options)

    def images(self, paths):
        key = tuple(paths)
        if key not in self._images:
            self._images[key] = TestData(paths, np.zeros(len(paths), dtype=np.int64), self.transform,
                                         img_size=(self.img_w, self.img_h))
        return self._images[key]

    def extractor(self, net):
        """extract(paths, modal) -> {feature name: (N, D) float32 array}, what eval_metrics wants."""
        def extract(paths, modal):
            loader = DataLoader(self.images(paths), batch_size=self.test_batch, shuffle=False,
                                num_workers=self.workers, pin_memory=self.device.type == 'cuda')
            def features_of(images):
                return net(images, images, modal)
            forward = retrieval_tools.mirror_averaged(features_of) if self.flip else features_of
            features = utils.extract_features(forward, loader, self.device)
            if len(features) != len(self.feature_names):
                raise ValueError(f'the network gives {len(features)} features, expected {self.feature_names}')
            return dict(zip(self.feature_names, features))
        return extract

    def retrieval_set(self, net, gallery_trials=(0,)):
        """The test images' features and labels (eval_metrics.RetrievalSet): SYSU-MM01 one trial per
        gallery draw in gallery_trials, RegDB one (split self.trial). Leaves the network's train/eval
        mode and every random generator as they were, so evaluating never changes a training run."""
        was_training, rng = net.training, utils.rng_state()
        net.eval()
        try:
            extract = self.extractor(net)
            if self.dataset == 'regdb':
                return regdb_retrieval_set(extract, self.data_path, self.trial, self.tvsearch)
            return sysu_retrieval_set(extract, self.data_path, self.mode, self.shot, trials=gallery_trials)
        finally:
            utils.set_rng_state(rng)
            net.train(was_training)

    def evaluate(self, net, gallery_trials=(0,)):
        """{feature name: [(cmc, mAP, mINP) per trial]} of retrieval_set, ranked by -q.g."""
        return self.retrieval_set(net, gallery_trials).evaluate()


def score_lines(scores, width=None):
    """'NAME: Rank-1 ...' lines for {feature name: (cmc, mAP, mINP)}."""
    width = width or max(len(name) for name in scores) + 1
    return [f'{(name.upper() + ":"):{width + 1}s} {summarize(*result)}' for name, result in scores.items()]


# ----------------------------------------------------------------------------- training

def train_one_epoch(net, loader, optimizer, step, device, epoch, writer):
    """One pass over `loader`. step(visible, thermal, labels) -> (loss tensor, {name: float}) runs the
    network and the method's losses on a batch (on `device`; labels = visible then thermal labels);
    this function does the optimisation, the progress bar and the per-step tensorboardX scalars.
    Returns the epoch means of 'loss' and of step's values, and 'images_per_second'."""
    net.train()
    meters = {'loss': utils.AverageMeter()}
    images_per_step = loader.batch_size * 2
    throughput = utils.Throughput(len(loader) * images_per_step)
    progress = tqdm(loader, desc=f'epoch {epoch}', unit='step', leave=False, dynamic_ncols=True, mininterval=1.0)
    for index, (visible, thermal, visible_labels, thermal_labels) in enumerate(progress):
        visible = visible.to(device, non_blocking=True)
        thermal = thermal.to(device, non_blocking=True)
        labels = torch.cat((visible_labels, thermal_labels)).to(device, non_blocking=True)
        loss, values = step(visible, thermal, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        values = {'loss': loss.item(), **values}
        global_step = epoch * len(loader) + index
        for name, value in values.items():
            meters.setdefault(name, utils.AverageMeter()).update(value, len(labels))
            writer.add_scalar(f'train/{name}', value, global_step)
        throughput.update(len(labels))
        shown = ' '.join(f'{name} {meter.avg:.4f}' for name, meter in meters.items())
        progress.set_postfix_str(f'{shown} lr {optimizer.param_groups[-1]["lr"]:.4g} {throughput}')
    stats = {name: meter.avg for name, meter in meters.items()}
    stats['images_per_second'] = throughput.done / max(time.time() - throughput.start, 1e-9)
    return stats


def should_evaluate(epoch, args):
    """Every 2 epochs from epoch 2 (the public schedule), at every saving epoch and after the last one."""
    return (epoch > 0 and epoch % 2 == 0) or should_save(epoch, args)


def should_save(epoch, args):
    return (epoch > 0 and epoch % args.save_epoch == 0) or epoch == args.epochs - 1


def fit(run, net, optimizer, trainset, step, evaluator, select, shape_flags, milestones=(20, 50), extra=None,
        after_epoch=None):
    """Fine-tune `net` for epochs [start, --epochs): the learning rate of utils.warmup_step_lr (each
    group at its 'lr_scale'), a new identity-sampled loader per epoch, train_one_epoch with `step`,
    evaluations (see should_evaluate; SYSU-MM01 gallery draw 0, RegDB split --trial), <run>_best.t
    on the best Rank-1 of feature `select`, <run>_epoch_N.t (should_save) and <run>_state.t.

    With run.state_file (--resume_state) the run continues from it; shape_flags are the flags it must
    share. `extra` is a dict of the method's own values carried across epochs (saved in the state file
    and restored in place); after_epoch(epoch, stats) runs after each epoch's training.
    Returns the statistics of the epochs run now: train_one_epoch's, plus 'epoch', 'lr' and, when
    evaluated, 'scores' {feature name: (cmc, mAP, mINP)}.
    """
    args, logger, writer = run.args, run.logger, run.writer
    extra = {} if extra is None else extra
    start_epoch, best = 0, {'rank1': -1.0, 'epoch': None}
    if run.state_file:
        start_epoch, best, saved_extra = restore_state(run.state_file, args, net, optimizer, shape_flags)
        extra.update(saved_extra)
        restored = ''.join(f', {key} {value:.4g}' if isinstance(value, float) else f', {key} {value}'
                           for key, value in saved_extra.items())
        logger.info(f'==> resumed {run.state_file} at epoch {start_epoch} (best Rank-1 so far '
                    f'{100 * max(best["rank1"], 0):.2f}% at epoch {best["epoch"]}{restored})')
    if start_epoch >= args.epochs:
        logger.info(f'nothing to do: the run already has {start_epoch} epochs (--epochs {args.epochs})')
    history = []
    for epoch in range(start_epoch, args.epochs):
        lr = utils.warmup_step_lr(epoch, args.lr, milestones)
        utils.set_lr(optimizer, lr)
        start = time.time()
        loader = identity_loader(trainset, args, run.device)
        stats = train_one_epoch(net, loader, optimizer, step, run.device, epoch, writer)
        stats.update(epoch=epoch, lr=lr)
        if after_epoch is not None:
            after_epoch(epoch, stats)
        shown = ' '.join(f'{name} {value:.4f}' for name, value in stats.items()
                         if name not in ('epoch', 'lr', 'images_per_second'))
        logger.info(f'epoch {epoch} lr {lr:.4g} {shown} ({len(loader)} steps, {stats["images_per_second"]:.1f} img/s, '
                    f'{utils.format_seconds(time.time() - start)})')
        for name, value in stats.items():
            if name != 'epoch':
                writer.add_scalar(f'epoch/{name}', value, epoch)

        if should_evaluate(epoch, args):
            start = time.time()
            scores = {name: results[0] for name, results in evaluator.evaluate(net).items()}
            stats['scores'] = scores
            logger.info(f'test epoch {epoch} ({utils.format_seconds(time.time() - start)}):')
            for line in score_lines(scores):
                logger.info('  ' + line)
            for name, (cmc, mAP, mINP) in scores.items():
                writer.add_scalar(f'test/{name}_rank1', cmc[0], epoch)
                writer.add_scalar(f'test/{name}_mAP', mAP, epoch)
                writer.add_scalar(f'test/{name}_mINP', mINP, epoch)
            record = checkpoint_record(net, scores[select], epoch)
            if scores[select][0][0] > best['rank1']:
                best = {'rank1': float(scores[select][0][0]), 'epoch': epoch}
                utils.save_checkpoint(record, run.model_path / f'{run.name}_best.t')
                logger.info(f'  new best {select.upper()} Rank-1: saved {run.model_path / f"{run.name}_best.t"}')
            if should_save(epoch, args):
                utils.save_checkpoint(record, run.model_path / f'{run.name}_epoch_{epoch}.t')
        save_state(run.model_path / f'{run.name}_state.t', net, optimizer, epoch + 1, best, args, extra)
        history.append(stats)
    if best['epoch'] is not None:
        logger.info(f'best {select.upper()} Rank-1 {100 * best["rank1"]:.2f}% at epoch {best["epoch"]}')
    writer.close()
    return history


# ----------------------------------------------------------------------------- testing

def run_test(args, build_net, feature_names, default_checkpoint, unused_prefixes=()):
    """Most of a test script. build_net(class_num, arch) -> unloaded network whose eval forward gives
    one feature per name in feature_names. default_checkpoint: the file name when --resume is not
    given ('{trial}' standing for the RegDB split).

    SYSU-MM01 / synthetic: one checkpoint, 10 gallery draws (--mode, --shot), each reported, then averaged.
    RegDB: the checkpoint of split --trial, or with --trial 0 of each split 1..10, averaged.
    The test-time flags of retrieval_tools (--flip, --rerank, --visualize, --save_features) apply to
    every checkpoint tested.
    Returns {feature name: {'trials': [(cmc, mAP, mINP), ...], 'cmc', 'mAP', 'mINP' (averages)}}.
    """
    if args.dataset == 'regdb' and not 0 <= args.trial <= 10:
        raise utils.UserError(f'--trial {args.trial}: RegDB has splits 1..10 (0 tests all ten).')
    retrieval_tools.check_test_time_flags(args)
    pattern = args.resume or default_checkpoint
    if args.dataset == 'regdb':
        trials = list(range(1, 11)) if args.trial == 0 else [args.trial]
        if len(trials) > 1 and '{trial}' not in pattern:
            raise utils.UserError(f'--trial 0 tests the ten RegDB splits, each with its own checkpoint: write '
                                  f'"{{trial}}" in --resume where the split number goes (e.g. '
                                  f'regdb_agw_p4_n8_lr_0.1_seed_0_trial_{{trial}}_best.t), or pass --trial K.')
        files = {trial: pattern.replace('{trial}', str(trial)) for trial in trials}
    else:
        files = {None: pattern}
    paths = {trial: utils.find_checkpoint(name, args.model_path) for trial, name in files.items()}
    device = utils.select_device(args.gpu)
    data_path = prepare_dataset(args.dataset, args.data_path)
    distance = retrieval_tools.ranking_distance(args, device)

    per_trial = {name: [] for name in feature_names}
    for trial, path in paths.items():
        net, checkpoint = load_finetuned(path, build_net, args.arch, unused_prefixes)
        net = net.to(device).eval()
        recorded = f', epoch {checkpoint["epoch"]}' if 'epoch' in checkpoint else ''
        print(f'==> loaded {path} ({net.arch}, {net.classifier.out_features} training identities{recorded})')
        if args.dataset == 'regdb':
            evaluator = Evaluator.from_args(args, data_path, device, feature_names, trial=trial)
            retrieval_set = evaluator.retrieval_set(net)
            labels = [f'Test Trial: {trial}']
        else:
            evaluator = Evaluator.from_args(args, data_path, device, feature_names)
            retrieval_set = evaluator.retrieval_set(net, gallery_trials=range(10))
            labels = [f'Test Trial: {index}' for index in range(10)]
        results = retrieval_set.evaluate(distance)
        for index, label in enumerate(labels):
            print(label)
            for line in score_lines({name: results[name][index] for name in feature_names}):
                print('  ' + line)
        for name in feature_names:
            per_trial[name].extend(results[name])
        retrieval_tools.write_outputs(args, retrieval_set, distance, retrieval_tools.output_name(path, args),
                                      split=trial)

    summary = {}
    for name in feature_names:
        cmc, mAP, mINP = average_results(per_trial[name])
        summary[name] = {'trials': per_trial[name], 'cmc': cmc, 'mAP': mAP, 'mINP': mINP}
    count = len(per_trial[feature_names[0]])
    direction = 'thermal to visible' if args.dataset == 'regdb' and args.tvsearch else (
        'visible to thermal' if args.dataset == 'regdb' else f'infrared to visible, {args.mode} search, {args.shot}-shot')
    print(f'All Average ({count} trial{"s" if count > 1 else ""}, {direction}{retrieval_tools.describe(args)}):')
    for line in score_lines({name: (s['cmc'], s['mAP'], s['mINP']) for name, s in summary.items()}):
        print('  ' + line)
    return summary
