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

import torch

import engine
import options
import utils
from data_loader import UnpairedSampler
from loss import (PCC_FORMS, PERM_LOSSES, cycle_contrastive_loss, figure_contrastive_loss, permutation_accuracy,
                  permutation_loss, random_permutations, shuffle_stripes)
from model import PERM_INPUTS, MMGLNet

# Flags a --resume run must share with the run that wrote the state.
SHAPE_FLAGS = ('dataset', 'arch', 'stream', 'num_stripe', 'pcc', 'part', 'perm_input', 'perm_bn')


def get_args_parser():
    parser = argparse.ArgumentParser(description='MMGL self-supervised pre-training',
                                     parents=[options.data_flags(), options.training_flags()])
    parser.add_argument('--trial', default=1, type=int, help='RegDB split (1..10)')
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
    parser.add_argument('--pcc_grad_scale', default=1.0, type=float,
                        help='with --pcc_grad backbone: the share of the PCC gradient that reaches the backbone '
                             '(its projections get all of it); 1 is the paper')
    parser.add_argument('--pcc_start', default=0, type=int,
                        help='with --pcc_grad backbone: the epoch from which the PCC gradient reaches the backbone '
                             '(before, it trains the projections only)')
    parser.add_argument('--pcc_views', default='shuffled', choices=['shuffled', 'plain'],
                        help='the images PCC sees: shuffled, the stripe-shuffled ones of permutation recovery (one '
                             'forward pass); plain, the same images unshuffled (in the same pass, twice the images)')
    parser.add_argument('--steps_per_epoch', default=0, type=int,
                        help='optimiser steps that make an epoch (0: one pass over the visible images); lets a '
                             "small set follow the paper's step budget and schedule")
    parser.add_argument('--batch-size', default=32, type=int, dest='batch_size',
                        help='visible images per batch (and as many infrared); a step takes --accum_iter batches')
    parser.add_argument('--resume', default='', help='training-state file (<run>_state.t) to continue a run')
    return parser


def run_name(args):
    name = f'{args.dataset}_mmgl_{args.stream}_{args.arch}_s{args.num_stripe}'
    name += '_pcc' if args.pcc else ''
    name += '_part' if args.part else ''
    name += f'_{args.pcc_form}' if args.pcc and args.pcc_form != 'cycle' else ''
    name += f'_{args.perm_input}' if args.perm_input != 'parts' else ''
    if args.pcc and args.pcc_grad == 'backbone':
        name += '_pccbackbone'
        name += f'{args.pcc_grad_scale:g}' if args.pcc_grad_scale != 1 else ''
        name += f'_from{args.pcc_start}' if args.pcc_start else ''
    name += '_plain' if args.pcc and args.pcc_views == 'plain' else ''
    name += f'_{args.perm_loss}' if args.perm_loss != 'mse' else ''
    name += f'_lr_{args.lr}_seed_{args.seed}'
    return name + (f'_trial_{args.trial}' if args.dataset == 'regdb' else '')


def check_args(args):
    if args.img_h % args.num_stripe:
        raise utils.UserError(f'--img_h {args.img_h} is not divisible by --num_stripe {args.num_stripe}: '
                              f'choose sizes whose stripes have equal height.')
    if args.part and not args.pcc:
        raise utils.UserError('--part selects part embeddings for the PCC loss: add --pcc.')
    if args.pcc_views != 'shuffled' and not args.pcc:
        raise utils.UserError('--pcc_views chooses the images the PCC loss sees: add --pcc.')
    if args.num_stripe < 2:
        raise utils.UserError('--num_stripe must be at least 2.')
    for flag in ('steps_per_epoch', 'cl_warmup', 'pcc_start', 'pcc_grad_scale'):
        if getattr(args, flag) < 0:
            raise utils.UserError(f'--{flag} must be 0 or more, got {getattr(args, flag)}.')
    moved = [flag for flag, default in (('pcc_grad_scale', 1.0), ('pcc_start', 0)) if getattr(args, flag) != default]
    if moved and not (args.pcc and args.pcc_grad == 'backbone'):
        raise utils.UserError(f'--{moved[0]} says how the PCC gradient reaches the backbone: add --pcc --pcc_grad backbone.')
    if args.pcc and args.pcc_form == 'figure' and args.batch_size < 2:
        raise utils.UserError('--pcc_form figure looks for neighbours in other images: use --batch-size 2 or more.')


def pcc_weight(epoch, args):
    """The PCC weight of an epoch: --cl_weight, reached linearly over --cl_warmup epochs."""
    if not args.pcc:
        return 0.0
    if epoch < args.cl_warmup:
        return args.cl_weight * epoch / args.cl_warmup
    return args.cl_weight


def pcc_backbone_share(epoch, args):
    """The share of the PCC gradient that reaches the backbone in an epoch (0: the projections only)."""
    if args.pcc_grad == 'heads' or epoch < args.pcc_start:
        return 0.0
    return args.pcc_grad_scale


def pcc_loss_of(embeddings, num_visible, args):
    """The PCC loss of the selected form on (B_v + B_t, P, D) embeddings, visible first."""
    visible = embeddings[:num_visible].flatten(0, 1)
    thermal = embeddings[num_visible:].flatten(0, 1)
    if args.pcc_form == 'figure':
        return figure_contrastive_loss(visible, thermal, embeddings.shape[1], args.cl_temp)
    return cycle_contrastive_loss(visible, thermal, args.cl_temp)


def make_step(args):
    """The MMGL training step (see engine): shuffle the stripes of both batches, the i-th visible and
    the i-th infrared image with one permutation, recover the permutations, add PCC with --pcc
    (on the part embeddings of the shuffled images, or with --pcc_views plain of the same images
    unshuffled, which then go through the same forward pass). Identity labels are never read."""
    plain_views = args.pcc and args.pcc_views == 'plain'

    def step(model, visible, thermal, labels, epoch):
        batch = len(visible)
        permutations = random_permutations(batch, args.num_stripe, device=visible.device)
        shuffled_visible = shuffle_stripes(visible, permutations)
        shuffled_thermal = shuffle_stripes(thermal, permutations)
        permutations = torch.cat((permutations, permutations))

        inputs = (shuffled_visible, shuffled_thermal)
        if plain_views:  # the unshuffled images ride along in the same pass, for PCC only
            inputs = (torch.cat((shuffled_visible, visible)), torch.cat((shuffled_thermal, thermal)))
        outputs = model(*inputs, embedding_grad_scale=pcc_backbone_share(epoch, args))
        predicted, embeddings = outputs['permutations'], outputs['embeddings']
        if plain_views:  # rows: shuffled visible, plain visible, shuffled thermal, plain thermal
            shuffled_rows = torch.cat((torch.arange(batch, device=visible.device),
                                       torch.arange(2 * batch, 3 * batch, device=visible.device)))
            predicted, embeddings = predicted[shuffled_rows], embeddings[shuffled_rows + batch]
        with utils.full_precision(visible.device):
            perm_loss = permutation_loss(predicted.float(), permutations, args.perm_loss)
            cl_weight = pcc_weight(epoch, args)
            pcc_loss = (pcc_loss_of(embeddings.float(), batch, args) if args.pcc
                        else torch.zeros((), device=visible.device))
            exact, per_stripe = permutation_accuracy(predicted, permutations)
        return perm_loss + cl_weight * pcc_loss, {'perm_loss': perm_loss.detach(), 'pcc_loss': pcc_loss.detach(),
                                                  'perm_exact': exact, 'perm_stripe': per_stripe,
                                                  'cl_weight': cl_weight}
    return step


def main(argv=None):
    """Run pre-training; returns the per-epoch statistics of this invocation."""
    args = get_args_parser().parse_args(argv)
    check_args(args)
    name = run_name(args)
    run = engine.start_run(args, name, 'MMGL pre-training', state_file=args.resume)

    # ---- data: unpaired visible and infrared images, identity labels unused
    trainset = engine.training_set(run)
    if args.batch_size > len(trainset.visible_labels):
        raise utils.UserError(f'--batch-size {args.batch_size} is larger than the {len(trainset.visible_labels)} '
                              f'visible training images: lower it.')
    # Under torchrun each process takes its share of one draw: --steps_per_epoch optimiser steps each, of
    # --accum_iter batches.
    num_samples = args.steps_per_epoch * args.batch_size * args.accum_iter * run.world_size or None

    def make_loader(epoch):
        sampler = UnpairedSampler(len(trainset.visible_labels), len(trainset.thermal_labels), num_samples)
        return engine.make_loader(run, trainset, sampler, args.batch_size)

    # ---- model, loss, optimizer
    model = MMGLNet(args.arch, args.stream, args.num_stripe, args.part, sinkhorn_iter=args.sinkhorn_iter,
                    sinkhorn_tau=args.sinkhorn_tau, perm_input=args.perm_input, perm_bn=args.perm_bn).to(run.device)
    step = make_step(args)
    optimizer = utils.make_optimizer(model.parameters(), args.lr, args.optim)

    # ---- training loop: the plain weights every --save_epoch epochs and after the last
    def save_weights(epoch, stats):
        done = epoch + 1
        if run.is_main and (done % args.save_epoch == 0 or done == args.epochs):
            weights_file = run.model_path / f'{name}_epoch_{done}.t'
            utils.save_checkpoint(model.state_dict(), weights_file)
            run.logger.info(f'saved {weights_file}')

    return engine.fit(run, model, optimizer, step, make_loader, milestones=(20, 50), shape_flags=SHAPE_FLAGS,
                      end_of_epoch=save_weights, unused_parameters=not args.pcc)  # the part projections


if __name__ == '__main__':
    utils.run_main(main)
