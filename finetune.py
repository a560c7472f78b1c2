"""Fine-tuning on the training engine: what the AGW and DDAG training scripts share beyond engine.py.

A fine-tuning script brings its network, its step (losses) and its flags; this module adds:

    get_args_parser(description)        the flags every fine-tuning script has (public names and defaults)
    class_count(trainset)               identities to classify, from the labels
    identity_loader(run, trainset)      a loader over a fresh IdentitySampler: one per epoch
    initialise(run, net), load_pretrained(net, path, log)
                                        the backbone of an MMGL (or train.py state, AGW, DDAG) checkpoint
    fit(run, net, optimizer, step, trainset, evaluator, select, ...)
                                        engine.fit with identity-sampled epochs, evaluations and the
                                        public checkpoint files

Files a fine-tuning run writes into --model_path (epochs are numbered from 0, as in the public code):
    <run>_best.t       {'net', 'cmc' (tensor), 'mAP', 'mINP', 'epoch'}: the public format, kept for the best
                       Rank-1 of the selected feature (AGW: the BNNeck feature) over the evaluations so far
    <run>_epoch_N.t    the same, every --save_epoch epochs and after the last one
    <run>_state.t      engine.training_state's file ('model', 'optimizer', 'best' and the script's own objects),
                       for --resume_state
"""
import argparse
import time

import numpy as np
import torch

import engine
import options
import utils
from data_loader import IdentitySampler
from evaluator import score_lines
from model import backbone_state_dict


def get_args_parser(description, vis_log_path='log/vis_log/'):
    """An argparse parser with the flags shared by the fine-tuning scripts; add the method's own."""
    parser = argparse.ArgumentParser(description=description, parents=[
        options.data_flags(), options.evaluation_flags(), options.training_flags()])
    parser.set_defaults(epochs=81, vis_log_path=vis_log_path)  # the public code runs epochs 0..80
    parser.add_argument('--trial', default=1, type=int, help='RegDB split to train on and evaluate (1..10)')
    parser.add_argument('--resume', '-r', default='',
                        help='pre-trained checkpoint (MMGL, or train.py state, or AGW/DDAG) whose backbone '
                             'initialises the network: a path, or a file name in --model_path; '
                             'none: random initialisation')
    parser.add_argument('--resume_state', default='',
                        help='<run>_state.t of an interrupted fine-tuning run to continue (path or name in --model_path)')
    parser.add_argument('--batch-size', default=8, type=int, dest='batch_size', help='identities per batch')
    parser.add_argument('--num_pos', default=4, type=int, help='images of each identity per modality in a batch')
    parser.add_argument('--margin', default=0.3, type=float, help='margin of the batch-hard triplet loss')
    return parser


def start_run(args, name, title):
    """engine.start_run, after the fine-tuning flags are checked: --resume is the pre-trained
    checkpoint, --resume_state the state file of a run to continue."""
    for flag, option in (('num_pos', '--num_pos'), ('test_batch', '--test-batch')):
        if getattr(args, flag) < 1:
            raise utils.UserError(f'{option} must be at least 1, got {getattr(args, flag)}.')
    return engine.start_run(args, name, title, state_file=args.resume_state, pretrained_file=args.resume)


def class_count(trainset):
    """Number of identity classes: the largest training label + 1 (labels are 0..K-1)."""
    labels = np.concatenate([trainset.visible_labels, trainset.thermal_labels])
    if labels.min() < 0:
        raise utils.UserError(f'Training labels must be 0 or more, found {labels.min()}: check the training lists.')
    return int(labels.max()) + 1


def identity_loader(run, trainset):
    """A DataLoader of batches (visible, thermal, visible labels, thermal labels) over a new
    IdentitySampler: --batch-size identities x --num_pos images per modality (under torchrun, per
    process: each takes its share of one draw). Build one per epoch."""
    args = run.args
    sampler = IdentitySampler(trainset.visible_labels, trainset.thermal_labels, args.num_pos, args.batch_size)
    return engine.make_loader(run, trainset, sampler, args.batch_size * args.num_pos)


# ----------------------------------------------------------------------------- pre-trained weights

def initialise(run, net):
    """Log where the weights come from and load a pre-trained backbone for --resume:
    --resume_state (restored by fit), --resume, or random initialisation."""
    if run.state_file:
        run.logger.info(f'==> the weights come from {run.state_file} (--resume_state)')
    elif run.pretrained_file:
        load_pretrained(net, run.pretrained_file, run.logger.info)
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
    state = backbone_state_dict(utils.strip_data_parallel(state))
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


def checkpoint_record(net, scores, epoch):
    """The public checkpoint format: {'net', 'cmc', 'mAP', 'mINP', 'epoch'}. cmc is a float64 tensor,
    so the file loads with torch.load(weights_only=True)."""
    cmc, mAP, mINP = scores
    return {'net': net.state_dict(), 'cmc': torch.as_tensor(np.asarray(cmc, dtype=np.float64)),
            'mAP': float(mAP), 'mINP': float(mINP), 'epoch': int(epoch)}


# ----------------------------------------------------------------------------- the epoch loop

def should_evaluate(epoch, args):
    """Every 2 epochs from epoch 2 (the public schedule), at every saving epoch and after the last one."""
    return (epoch > 0 and epoch % 2 == 0) or should_save(epoch, args)


def should_save(epoch, args):
    return (epoch > 0 and epoch % args.save_epoch == 0) or epoch == args.epochs - 1


def fit(run, net, optimizer, step, trainset, evaluator, select, end_of_epoch=None, milestones=(20, 50),
        **engine_options):
    """Fine-tune `net` with engine.fit: a new identity-sampled loader per epoch; after each epoch
    end_of_epoch(epoch, stats) (the method's own), then the evaluations of should_evaluate
    (SYSU-MM01 gallery draw 0, RegDB split --trial), <run>_best.t on the best Rank-1 of feature
    `select` and <run>_epoch_N.t (should_save), on process 0. engine_options (shape_flags,
    unused_parameters, the objects to save with the run) go to engine.fit.
    Returns engine.fit's statistics, with 'scores' {feature name: (cmc, mAP, mINP)} when evaluated.
    """
    args, logger, writer = run.args, run.logger, run.writer
    best = engine.RunValues(rank1=-1.0, epoch=None)

    def evaluate(epoch, stats):
        if end_of_epoch is not None:
            end_of_epoch(epoch, stats)
        if not run.is_main or not should_evaluate(epoch, args):
            return
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
            best.update(rank1=float(scores[select][0][0]), epoch=epoch)
            utils.save_checkpoint(record, run.model_path / f'{run.name}_best.t')
            logger.info(f'  new best {select.upper()} Rank-1: saved {run.model_path / f"{run.name}_best.t"}')
        if should_save(epoch, args):
            utils.save_checkpoint(record, run.model_path / f'{run.name}_epoch_{epoch}.t')

    history = engine.fit(run, net, optimizer, step, lambda epoch: identity_loader(run, trainset), milestones,
                         end_of_epoch=evaluate, best=best, **engine_options)
    if best['epoch'] is not None:
        logger.info(f'best {select.upper()} Rank-1 {100 * best["rank1"]:.2f}% at epoch {best["epoch"]}')
    return history
