"""The flags several scripts share, declared once as argparse parent parsers.

    data_flags()        which dataset, where, at what image size, loader workers, --gpu   (every script)
    evaluation_flags()  --mode, --test-batch                       (the scripts that evaluate retrieval)
    training_flags()    network, optimiser, schedule, seed and the files a run writes   (training scripts)

A script builds its parser as argparse.ArgumentParser(parents=[...]) and adds its own flags; where
its default differs (the number of epochs, the tensorboardX folder) it says so with set_defaults.
Names and defaults are those of the public scripts.
"""
import argparse

from model import ARCHS

DATASETS = ('sysu', 'regdb', 'synthetic')
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune')  # torch.compile's modes
AMP_MODES = ('auto', 'bf16', 'fp16')  # --amp alone is auto (engine.autocast_dtype)


def data_flags():
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('--dataset', default='sysu', choices=DATASETS)
    parser.add_argument('--data_path', default=None,
                        help='dataset folder (holding cam1..cam6 and exp/, or Visible/, Thermal/ and idx/); '
                             'default: data/SYSU-MM01, data/RegDB or data/synthetic at the repo root')
    parser.add_argument('--img_h', default=288, type=int)
    parser.add_argument('--img_w', default=144, type=int)
    parser.add_argument('--workers', default=4, type=int, help='data loading processes')
    parser.add_argument('--gpu', default='0', help='sets CUDA_VISIBLE_DEVICES; the CPU is used without CUDA')
    return parser


def evaluation_flags():
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('--mode', default='all', choices=['all', 'indoor'], help='SYSU-MM01 search mode')
    parser.add_argument('--test-batch', default=64, type=int, dest='test_batch')
    return parser


def training_flags():
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('--arch', default='resnet50', choices=ARCHS)
    parser.add_argument('--stream', default='two', choices=['one', 'two'],
                        help='two: modality-specific stems; one: one stem for both modalities')
    parser.add_argument('--lr', default=0.1, type=float)
    parser.add_argument('--optim', default='sgd', choices=['sgd', 'adam'])
    parser.add_argument('--epochs', default=100, type=int)
    parser.add_argument('--model_path', default='save_model/', help='where checkpoints are read and written')
    parser.add_argument('--save_epoch', default=20, type=int, help='also keep the weights every N epochs')
    parser.add_argument('--log_path', default='log/')
    parser.add_argument('--vis_log_path', default='log/vis_log/', help='tensorboardX logs')
    parser.add_argument('--seed', default=0, type=int)
    speed = parser.add_argument_group('speed (README, "Speed and several GPUs")')
    speed.add_argument('--amp', nargs='?', const='auto', default=None, choices=AMP_MODES,
                       help='mixed precision, the losses in float32: the network in bfloat16 where the device '
                            'computes it natively (GPUs from Ampere on, CPUs with AVX-512), else in float16 with '
                            'gradient scaling on GPUs (older ones such as the paper\'s 2080Ti) and an error on CPUs; '
                            '--amp bf16 or --amp fp16 name the dtype')
    speed.add_argument('--channels_last', action='store_true', help='channels-last memory format (faster convolutions on GPUs)')
    speed.add_argument('--augment', default='loader', choices=['loader', 'device'],
                       help='where the training augmentation runs: loader, per image with PIL in the loader '
                            'processes (the public code); device, batched on the GPU (or CPU) after the transfer')
    speed.add_argument('--data_on_device', action='store_true',
                       help='with --augment device: the training images are copied to the device once (SYSU-MM01 '
                            'at 288x144: 4.3 GB) and each batch is gathered there, with no loader processes')
    speed.add_argument('--log_every', default=20, type=int,
                       help='batches between progress updates and per-batch tensorboardX scalars (the only times '
                            'the host waits for the GPU)')
    speed.add_argument('--compile', nargs='?', const='default', default=None, choices=COMPILE_MODES,
                       help='torch.compile the network for training (the first steps pay for the compilation), '
                            'in torch\'s default mode or the one named: reduce-overhead adds CUDA graphs, which '
                            'spare the host its per-operator work on GPUs')
    speed.add_argument('--accum_iter', default=1, type=int, metavar='K',
                       help='accumulate the gradients of K batches of --batch-size before each optimiser step: K '
                            'times the global batch, each batch normalised and its losses computed apart, as K '
                            'processes of torchrun would (a K-GPU run on one GPU, or less memory a step)')
    speed.add_argument('--sync_bn', action='store_true', help='under torchrun: batch norm statistics over every GPU')
    speed.add_argument('--ghost_bn', default=1, type=int, metavar='K',
                       help='batch norm statistics over K interleaved groups of each batch while training, as K '
                            'processes without --sync_bn compute them (a K-GPU run on one GPU)')
    return parser
