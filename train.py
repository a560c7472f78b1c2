"""MMGL self-supervised pre-training of a one- or two-stream ResNet on visible and infrared images.

Each step draws unpaired visible and infrared images, cuts each into horizontal stripes, shuffles
them (the i-th visible and i-th infrared image share one permutation) and trains the network to
recover the permutation (Sinkhorn + MSE) and, with --pcc, to keep part embeddings cycle-consistent
across modalities. No identity label is read.

Two defaults deviate from the paper because its settings did not learn (README, "The pre-training
study"): the permutation head reads the map's S part-pooled features in stripe order (--perm_input
gap: the paper's global pool), and the PCC gradient trains the part projections only (--pcc_grad
backbone: the paper's).

    python train.py --dataset sysu --stream two --lr 0.1 --pcc --part --gpu 0
"""
import argparse
import time
from pathlib import Path

import torch
from tensorboardX import SummaryWriter
from torch.utils.data import DataLoader
from tqdm import tqdm

import utils
from data_loader import RegDBData, SYSUData, UnpairedSampler, train_transform
from data_manager import prepare_dataset
from loss import (PCC_FORMS, PERM_LOSSES, cycle_contrastive_loss, figure_contrastive_loss, permutation_accuracy,
                  permutation_loss, random_permutations, shuffle_stripes)
from model import ARCHS, PERM_INPUTS, MMGLNet


def get_args_parser():
    parser = argparse.ArgumentParser(description='MMGL self-supervised pre-training')
    parser.add_argument('--dataset', default='sysu', choices=['sysu', 'regdb', 'synthetic'])
    parser.add_argument('--data_path', default=None,
                        help='dataset folder (holding cam1..cam6 and exp/, or Visible/, Thermal/ and idx/); '
                             'default: data/SYSU-MM01, data/RegDB or data/synthetic at the repo root')
    parser.add_argument('--trial', default=1, type=int, help='RegDB split (1..10)')
    parser.add_argument('--arch', default='resnet50', choices=ARCHS)
    parser.add_argument('--stream', default='two', choices=['one', 'two'],
                        help='two: modality-specific stems; one: one stem for both modalities')
    parser.add_argument('--num_stripe', default=6, type=int, help='horizontal stripes per image')
    parser.add_argument('--sinkhorn_iter', default=20, type=int)
    parser.add_argument('--sinkhorn_tau', default=1.0, type=float)
    parser.add_argument('--perm_input', default='parts', choices=PERM_INPUTS,
                        help='input of the permutation head: parts, the S horizontal parts of the last map pooled '
                             "and concatenated in stripe order (the default); gap, its global average (the paper's "
                             'figure: permutation recovery stays at chance, see the README)')
    parser.add_argument('--perm_bn', action='store_true', help='BatchNorm1d on the input of the permutation head')
    parser.add_argument('--perm_loss', default='mse', choices=PERM_LOSSES,
                        help='mse: squared error averaged over the SxS entries (the paper); mse_sum: summed over '
                             'them; ce: cross-entropy of each row of the Sinkhorn matrix against its true column')
    parser.add_argument('--pcc', action='store_true', help='add the part-aware cycle-contrastive loss')
    parser.add_argument('--part', action='store_true', help='PCC on the S part embeddings of every image')
    parser.add_argument('--pcc_form', default='cycle', choices=PCC_FORMS,
                        help="cycle: walk to the other modality and back to oneself; figure: the paper figure's "
                             'InfoNCE between the soft neighbours in the other modality and in other images')
    parser.add_argument('--cl_weight', default=0.5, type=float, help='weight of the PCC loss')
    parser.add_argument('--cl_temp', default=0.07, type=float, help='PCC temperature')
    parser.add_argument('--cl_warmup', default=0, type=int,
                        help='the PCC weight rises linearly from 0 to --cl_weight over this many epochs')
    parser.add_argument('--pcc_grad', default='heads', choices=['heads', 'backbone'],
                        help='where the PCC gradient goes: heads, its part projections only (the default: with '
                             'the backbone too, permutation recovery stays at chance, see the README); backbone, '
                             'the projections and the backbone (the paper)')
    parser.add_argument('--lr', default=0.1, type=float)
    parser.add_argument('--optim', default='sgd', choices=['sgd', 'adam'])
    parser.add_argument('--epochs', default=100, type=int)
    parser.add_argument('--steps_per_epoch', default=0, type=int,
                        help='steps that make an epoch (0: one pass over the visible images); lets a small set '
                             "follow the paper's step budget and schedule")
    parser.add_argument('--batch-size', default=32, type=int, dest='batch_size',
                        help='visible images per step (and as many infrared)')
    parser.add_argument('--img_h', default=288, type=int)
    parser.add_argument('--img_w', default=144, type=int)
    parser.add_argument('--workers', default=4, type=int)
    parser.add_argument('--resume', default='', help='training-state file (<run>_state.t) to continue a run')
    parser.add_argument('--model_path', default='save_model/', help='where checkpoints are written')
    parser.add_argument('--save_epoch', default=20, type=int, help='save weights every N epochs')
    parser.add_argument('--log_path', default='log/')
    parser.add_argument('--vis_log_path', default='log/vis_log/')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--gpu', default='0', help='sets CUDA_VISIBLE_DEVICES; the CPU is used without CUDA')
    return parser


def run_name(args):
    name = f'{args.dataset}_mmgl_{args.stream}_{args.arch}_s{args.num_stripe}'
    name += '_pcc' if args.pcc else ''
    name += '_part' if args.part else ''
    name += f'_{args.pcc_form}' if args.pcc and args.pcc_form != 'cycle' else ''
    name += f'_{args.perm_input}' if args.perm_input != 'parts' else ''
    name += '_pccbackbone' if args.pcc and args.pcc_grad == 'backbone' else ''
    name += f'_{args.perm_loss}' if args.perm_loss != 'mse' else ''
    name += f'_lr_{args.lr}_seed_{args.seed}'
    return name + (f'_trial_{args.trial}' if args.dataset == 'regdb' else '')


def check_args(args):
    if args.img_h % args.num_stripe:
        raise utils.UserError(f'--img_h {args.img_h} is not divisible by --num_stripe {args.num_stripe}: '
                              f'choose sizes whose stripes have equal height.')
    if args.part and not args.pcc:
        raise utils.UserError('--part selects part embeddings for the PCC loss: add --pcc.')
    if args.num_stripe < 2:
        raise utils.UserError('--num_stripe must be at least 2.')
    for flag, option in (('steps_per_epoch', '--steps_per_epoch'), ('cl_warmup', '--cl_warmup')):
        if getattr(args, flag) < 0:
            raise utils.UserError(f'{option} must be 0 or more, got {getattr(args, flag)}.')
    if args.pcc and args.pcc_form == 'figure' and args.batch_size < 2:
        raise utils.UserError('--pcc_form figure looks for neighbours in other images: use --batch-size 2 or more.')


def pcc_weight(epoch, args):
    """The PCC weight of an epoch: --cl_weight, reached linearly over --cl_warmup epochs."""
    if not args.pcc:
        return 0.0
    if epoch < args.cl_warmup:
        return args.cl_weight * epoch / args.cl_warmup
    return args.cl_weight


def pcc_loss_of(embeddings, num_visible, args):
    """The PCC loss of the selected form on (B_v + B_t, P, D) embeddings, visible first."""
    visible = embeddings[:num_visible].flatten(0, 1)
    thermal = embeddings[num_visible:].flatten(0, 1)
    if args.pcc_form == 'figure':
        return figure_contrastive_loss(visible, thermal, embeddings.shape[1], args.cl_temp)
    return cycle_contrastive_loss(visible, thermal, args.cl_temp)


def train_one_epoch(model, loader, optimizer, args, device, epoch, writer):
    """One pass over the loader. Returns the epoch means of the logged quantities."""
    model.train()
    meters = {name: utils.AverageMeter() for name in ('loss', 'perm_loss', 'pcc_loss', 'perm_exact', 'perm_stripe')}
    images_per_step = 2 * args.batch_size
    cl_weight = pcc_weight(epoch, args)
    throughput = utils.Throughput(len(loader) * images_per_step)
    progress = tqdm(loader, desc=f'epoch {epoch}', unit='step', leave=False, dynamic_ncols=True, mininterval=1.0)
    for step, (visible, thermal, _, _) in enumerate(progress):
        # The i-th visible and the i-th infrared image share one permutation.
        permutations = random_permutations(len(visible), args.num_stripe).to(device)
        visible = shuffle_stripes(visible.to(device, non_blocking=True), permutations)
        thermal = shuffle_stripes(thermal.to(device, non_blocking=True), permutations)
        permutations = torch.cat((permutations, permutations))

        outputs = model(visible, thermal, detach_embeddings=args.pcc_grad == 'heads')
        perm_loss = permutation_loss(outputs['permutations'], permutations, args.perm_loss)
        loss = perm_loss
        pcc_loss = torch.zeros((), device=device)
        if args.pcc:
            pcc_loss = pcc_loss_of(outputs['embeddings'], len(visible), args)
            loss = loss + cl_weight * pcc_loss

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        exact, per_stripe = permutation_accuracy(outputs['permutations'], permutations)
        for name, value in (('loss', loss.item()), ('perm_loss', perm_loss.item()), ('pcc_loss', pcc_loss.item()),
                            ('perm_exact', exact), ('perm_stripe', per_stripe)):
            meters[name].update(value, images_per_step)
        throughput.update(images_per_step)
        progress.set_postfix_str(f'loss {meters["loss"].avg:.4f} perm {meters["perm_exact"].avg:.3f} '
                                 f'lr {optimizer.param_groups[0]["lr"]:.4f} {throughput}')
        global_step = epoch * len(loader) + step
        writer.add_scalar('train/loss', loss.item(), global_step)
        writer.add_scalar('train/perm_loss', perm_loss.item(), global_step)
        writer.add_scalar('train/pcc_loss', pcc_loss.item(), global_step)
        writer.add_scalar('train/perm_exact', exact, global_step)
    stats = {name: meter.avg for name, meter in meters.items()}
    stats['images_per_second'] = throughput.done / max(time.time() - throughput.start, 1e-9)
    stats['cl_weight'] = cl_weight
    return stats


def load_training_state(path, args, model, optimizer):
    """Restore an interrupted run from its training-state file; returns the epoch to start from."""
    state = utils.load_checkpoint(path)
    if not isinstance(state, dict) or not {'model', 'optimizer', 'epoch', 'rng', 'args'} <= set(state):
        raise utils.UserError(f'{path} is not a training-state file of train.py: --resume continues a run '
                              f'from its <run>_state.t file in --model_path.')
    shape_flags = ('dataset', 'arch', 'stream', 'num_stripe', 'pcc', 'part', 'perm_input', 'perm_bn')
    saved = {flag: state['args'].get(flag) for flag in shape_flags}
    if saved != {flag: getattr(args, flag) for flag in shape_flags}:
        given = ' '.join(f'--{flag} {value}' for flag, value in saved.items())
        raise utils.UserError(f'{path} was written by a run with {given}: resume with the same flags.')
    model.load_state_dict(state['model'])
    optimizer.load_state_dict(state['optimizer'])
    utils.set_rng_state(state['rng'])
    return state['epoch']


def main(argv=None):
    """Run pre-training; returns the per-epoch statistics of this invocation."""
    args = get_args_parser().parse_args(argv)
    check_args(args)
    resume_file = utils.find_checkpoint(args.resume, args.model_path) if args.resume else None
    device = utils.select_device(args.gpu)
    utils.set_seed(args.seed)

    # ---- data: unpaired visible and infrared images, identity labels unused
    data_path = prepare_dataset(args.dataset, args.data_path, need_train_arrays=args.dataset != 'regdb')
    transform = train_transform(args.img_h, args.img_w)
    if args.dataset == 'regdb':
        trainset = RegDBData(data_path, args.trial, transform)
    else:
        trainset = SYSUData(data_path, transform)
    if args.batch_size > len(trainset.visible_labels):
        raise utils.UserError(f'--batch-size {args.batch_size} is larger than the {len(trainset.visible_labels)} '
                              f'visible training images: lower it.')
    num_samples = args.steps_per_epoch * args.batch_size or None
    sampler = UnpairedSampler(len(trainset.visible_labels), len(trainset.thermal_labels), num_samples)
    loader = DataLoader(trainset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        drop_last=True, pin_memory=device.type == 'cuda')
    name = run_name(args)
    logger = utils.make_logger(Path(args.log_path) / f'{name}.log')
    writer = SummaryWriter(str(Path(args.vis_log_path) / name))
    logger.info(f'MMGL pre-training {name} on {device}\n{vars(args)}')
    logger.info(f'{len(trainset.visible_labels)} visible and {len(trainset.thermal_labels)} infrared images '
                f'from {data_path}; {len(loader)} steps of {args.batch_size}+{args.batch_size} images per epoch')

    # ---- model, optimizer
    model = MMGLNet(args.arch, args.stream, args.num_stripe, args.part, sinkhorn_iter=args.sinkhorn_iter,
                    sinkhorn_tau=args.sinkhorn_tau, perm_input=args.perm_input, perm_bn=args.perm_bn).to(device)
    optimizer = utils.sgd(model.parameters(), args.lr, args.optim)
    start_epoch = 0
    if resume_file:
        start_epoch = load_training_state(resume_file, args, model, optimizer)
        logger.info(f'resumed {resume_file} at epoch {start_epoch}')

    # ---- training loop
    model_path = Path(args.model_path)
    history = []
    for epoch in range(start_epoch, args.epochs):
        utils.set_lr(optimizer, utils.warmup_step_lr(epoch, args.lr, milestones=(20, 50)))
        start = time.time()
        stats = train_one_epoch(model, loader, optimizer, args, device, epoch, writer)
        stats.update(epoch=epoch, steps=(epoch + 1) * len(loader))
        history.append(stats)
        logger.info(f'epoch {epoch} lr {optimizer.param_groups[0]["lr"]:.4g} loss {stats["loss"]:.4f} '
                    f'(perm {stats["perm_loss"]:.4f}, pcc {stats["pcc_loss"]:.4f}) '
                    f'perm acc exact {stats["perm_exact"]:.4f} per-stripe {stats["perm_stripe"]:.4f} '
                    f'{stats["images_per_second"]:.1f} img/s {utils.format_seconds(time.time() - start)}')
        for key, value in stats.items():
            if key != 'epoch':
                writer.add_scalar(f'epoch/{key}', value, epoch)
        writer.add_scalar('epoch/lr', optimizer.param_groups[0]['lr'], epoch)

        done = epoch + 1
        utils.save_checkpoint({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': done,
                               'rng': utils.rng_state(), 'args': vars(args)}, model_path / f'{name}_state.t')
        if done % args.save_epoch == 0 or done == args.epochs:
            weights_file = model_path / f'{name}_epoch_{done}.t'
            utils.save_checkpoint(model.state_dict(), weights_file)
            logger.info(f'saved {weights_file}')
    writer.close()
    return history


if __name__ == '__main__':
    utils.run_main(main)
