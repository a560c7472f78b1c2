"""Training speed on the device present: ms per step, images/s and peak GPU memory of the MMGL, AGW
and DDAG training steps in float32 and with --amp (and --channels_last, and --compile), then images/s
of whole train.py epochs with the loader (and with the augmentation on the device).

    python bench/throughput.py                                       # GPU: 288x144, batch 32+32
    python bench/throughput.py --methods mmgl --batch 32,64,128      # MMGL at larger batches
    python bench/throughput.py --loader_only --workers 2             # can the loader keep up?
    python bench/throughput.py --methods mmgl --nproc_per_node 4 --epoch_flags='--amp --channels_last --augment device'
                                                                     # scaling over 4 GPUs
    python bench/throughput.py --img_h 96 --img_w 48 --batch 8 --arch resnet18 --epoch_steps 10   # CPU

The step figures time the scripts' own steps (train.make_step, AGW's make_step, DDAG's DDAGLoss)
with engine.Precision on random images already on the device: forward, losses, backward and the
optimiser step, --steps timed after --warmup (the `compile step` precision compiles the step function,
network and losses, where --compile compiles the network alone); on a GPU one more step runs under CUDA's
synchronisation debug mode, which counts the times the host waits for the GPU. TFLOP/s is the
step's convolution and matrix-product arithmetic (torch.utils.flop_counter, forward and backward;
batch norm and elementwise work uncounted) over its time, to hold against the card's peak. The
loader rows time pre-training's loader on its own (no step), with the augmentation in it, without,
and over the images held on the device (--data_on_device), with the main process's CPU time a batch. The epoch
figures run train.main on the synthetic set (generated on first use), two epochs of --epoch_steps
steps, and report the second (the first pays for start-up); with --nproc_per_node N they run
train.py under torchrun with 1 process and with N, and give the speed-up of N, the scaling a
machine with N GPUs reaches (on the CPU, N gloo processes with the same threads each). Prints a Markdown table; --out also writes it to a file.
"""
import argparse
import sys
import tempfile
import time
import traceback
import types
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
import train as mmgl_train  # noqa: E402
import utils  # noqa: E402
from AGW import train as agw_train  # noqa: E402
from AGW.agw_model import build_net as build_agw  # noqa: E402
from DDAG import train_ddag  # noqa: E402
from DDAG.ddag_model import build_net as build_ddag  # noqa: E402
from data_loader import (DeviceArrays, SYSUData, UnpairedSampler, as_uint8_tensor, prepare_dataset,  # noqa: E402
                         train_transform)
from model import ARCHS, MMGLNet  # noqa: E402
from study_tools import publish, read_history, torchrun  # noqa: E402

PRECISIONS = {'fp32': dict(amp=None, channels_last=False, compile=None),
              'amp': dict(amp='auto', channels_last=False, compile=None),
              'amp bf16': dict(amp='bf16', channels_last=False, compile=None),  # also where --amp refuses a CPU
              'amp + channels_last': dict(amp='auto', channels_last=True, compile=None),
              'amp fp16 + channels_last': dict(amp='fp16', channels_last=True, compile=None),
              'amp + channels_last + compile': dict(amp='auto', channels_last=True, compile='default'),
              'amp + channels_last + compile reduce-overhead': dict(amp='auto', channels_last=True,
                                                                    compile='reduce-overhead'),
              # Not what --compile does: the whole step function (network and losses; backward() and the
              # optimiser stay outside) through torch.compile, to measure what compiling the losses too
              # would gain where the step waits for the host's dispatch.
              'amp + channels_last + compile step reduce-overhead': dict(amp='auto', channels_last=True,
                                                                         compile='reduce-overhead',
                                                                         compile_step=True)}
EPOCH_FLAGS = ((), ('--augment', 'device'), ('--amp', '--channels_last'),
               ('--amp', '--channels_last', '--augment', 'device'),
               ('--amp', '--channels_last', '--augment', 'device', '--compile'),
               ('--amp', '--channels_last', '--augment', 'device', '--compile', 'reduce-overhead'))
CLASSES = 395  # SYSU-MM01's training identities


METHODS = ('mmgl', 'agw', 'ddag')


def counts(text):
    """'32,64' -> [32, 64] (argparse type of --batch)."""
    try:
        values = [int(value) for value in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected numbers separated by commas, got {text!r}')
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f'a batch has at least 1 image, got {text!r}')
    return values


def get_args_parser():
    parser = argparse.ArgumentParser(description='Training throughput of MMGL, AGW and DDAG')
    parser.add_argument('--arch', default='resnet50', choices=ARCHS)
    parser.add_argument('--img_h', default=288, type=int)
    parser.add_argument('--img_w', default=144, type=int)
    parser.add_argument('--batch', default='32', type=counts,
                        help='images per modality in a step (AGW/DDAG: identities of 4 images), or a comma list of '
                             'such numbers: every row at each')
    parser.add_argument('--methods', default=','.join(METHODS), type=lambda text: text.split(','),
                        help=f'the training steps timed, a comma list of {", ".join(METHODS)}')
    parser.add_argument('--warmup', default=5, type=int)
    parser.add_argument('--steps', default=20, type=int)
    parser.add_argument('--epoch_steps', default=50, type=int, help='steps of each timed train.py epoch (0: skip)')
    parser.add_argument('--workers', default=8, type=int, help='loader processes of the train.py epochs')
    parser.add_argument('--data_path', default=None,
                        help='the synthetic set of the epoch and loader rows (default: data/synthetic, generated '
                             'on first use)')
    parser.add_argument('--precisions', default=','.join(PRECISIONS))
    parser.add_argument('--epoch_flags', action='append', type=str.split,
                        help="the train.py flags of one epoch row, in one argument (--epoch_flags='--amp "
                             "--channels_last'; repeat it for more rows); default: every row of EPOCH_FLAGS")
    parser.add_argument('--nproc_per_node', default=1, type=int,
                        help='N > 1: the train.py epoch rows run under torchrun, with 1 process and with N (one GPU '
                             'each, or gloo on the CPU, every process with the same torch threads), and say the '
                             "speed-up of N; --batch is then each process's")
    parser.add_argument('--gpu', default='0')
    parser.add_argument('--loader_only', action='store_true', help='only the rows of the loader alone')
    parser.add_argument('--compiled_only', action='store_true',
                        help='only the --compile rows (the step rows of the --compile precisions, the compiled epoch)')
    parser.add_argument('--out', default=None, help='also write the table to this file')
    return parser


def networks_and_steps(args, methods=METHODS):
    """{method's name: (network builder, step)} with each script's default flags, for those in `methods`."""
    mmgl_args = mmgl_train.get_args_parser().parse_args(['--pcc', '--part'])
    ddag_args = train_ddag.get_args_parser().parse_args(['--wpa', '--graph'])
    every = {
        'mmgl': ('MMGL (--pcc --part)', lambda: MMGLNet(args.arch, 'two', 6, part=True, perm_input='parts'),
                 mmgl_train.make_step(mmgl_args)),
        'agw': ('AGW', lambda: build_agw(CLASSES, 'agw', args.arch), agw_train.make_step('agw', 0.3)),
        'ddag': ('DDAG (--wpa --graph)', lambda: build_ddag(CLASSES, ddag_args, args.arch),
                 train_ddag.DDAGLoss(ddag_args)),
    }
    unknown = sorted(set(methods) - set(every))
    if unknown:
        raise utils.UserError(f'--methods: unknown {", ".join(unknown)}; choose from {", ".join(METHODS)}.')
    return {every[method][0]: every[method][1:] for method in METHODS if method in methods}


def training_setup(build, batch, img_h, img_w, device, memory_format=torch.contiguous_format):
    """(network, optimiser, (visible, thermal, labels)): a method's network in training mode with the
    optimiser its script makes, and batch + batch random images in that memory format, of identities
    of 4 images each (as in AGW/DDAG batches)."""
    torch.manual_seed(0)
    model = build().to(device).train()
    params = model.optimizer_groups(0.01) if hasattr(model, 'optimizer_groups') else model.parameters()
    optimizer = utils.make_optimizer(params, 0.01)
    model.to(memory_format=memory_format)
    visible, thermal = (torch.randn(batch, 3, img_h, img_w, device=device).contiguous(memory_format=memory_format)
                        for _ in range(2))
    ids = torch.arange(batch, device=device) // 4
    return model, optimizer, (visible, thermal, torch.cat((ids, ids)))


def step_runner(build, step, precision, options, batch, args, device):
    """one_step(): one training step of a method on batch + batch images made once on the device, in
    precision and the memory format of options (a PRECISIONS entry; with its compile mode, of the
    torch.compile'd network, as --compile does, or with compile_step of the compiled step), after
    --warmup such steps (which pay for a compilation)."""
    memory_format = torch.channels_last if options['channels_last'] else torch.contiguous_format
    model, optimizer, (visible, thermal, labels) = training_setup(build, batch, args.img_h, args.img_w, device,
                                                                  memory_format)
    compile_mode, trained = options['compile'], model
    if options.get('compile_step'):  # torch.compile takes the step function as it takes a module
        step = engine.compile_network(step, compile_mode)
    elif compile_mode:
        trained = engine.compile_network(model, compile_mode)

    def one_step():
        if compile_mode:
            torch.compiler.cudagraph_mark_step_begin()
        with precision.autocast():
            loss, _ = step(trained, visible, thermal, labels, epoch=20)
        precision.backward_and_step(loss, optimizer)

    for _ in range(args.warmup):
        one_step()
    return one_step


def milliseconds_per_step(one_step, steps, device):
    """Wall time of `steps` calls of one_step, divided by steps; on a GPU from an idle card to an idle card."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / steps


def gflop_per_image(build, step, batch, args, device):
    """GFLOP per image of a method's training step on batch + batch images: its convolutions and
    matrix products, forward and backward, as torch.utils.flop_counter counts them (in float32)."""
    model, _, (visible, thermal, labels) = training_setup(build, batch, args.img_h, args.img_w, device)
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = step(model, visible, thermal, labels, epoch=20)
        loss.backward()
    return counter.get_total_flops() / (2 * batch) / 1e9


def time_step(build, step, precision, options, batch, args, device):
    """(ms per step, peak GPU memory in GiB or None, host waits in a step or None) of one method's training
    step (step_runner's). The memory and the waits are measured on GPUs only; the peak counts the warm-up
    steps too, where a compiled network captures its CUDA graphs and allocates their memory pool."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    one_step = step_runner(build, step, precision, options, batch, args, device)
    milliseconds = milliseconds_per_step(one_step, args.steps, device)
    if device.type != 'cuda':
        return milliseconds, None, None
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    with warnings.catch_warnings(record=True) as caught:  # CUDA warns at every synchronising call
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            one_step()
        finally:
            torch.cuda.set_sync_debug_mode('default')
    return milliseconds, peak, sum('synchroniz' in str(warning.message) for warning in caught)


def time_epochs(args, batch, extra_flags, processes=0):
    """images/s (of all processes) of the second of two train.py epochs of --epoch_steps steps of batch +
    batch images a process on the synthetic set: train.main in this process, or with `processes`, under
    torchrun with that many, each with the torch threads this process has over --nproc_per_node."""
    with tempfile.TemporaryDirectory() as folder:
        data = ['--data_path', args.data_path] if args.data_path else []
        flags = ['--dataset', 'synthetic', *data, '--arch', args.arch, '--img_h', str(args.img_h),
                 '--img_w', str(args.img_w), '--batch-size', str(batch), '--pcc', '--part', '--epochs', '2',
                 '--steps_per_epoch', str(args.epoch_steps), '--workers', str(args.workers), '--gpu', args.gpu,
                 '--model_path', folder, '--log_path', folder, '--vis_log_path', folder, *extra_flags]
        if not processes:
            return mmgl_train.main(flags)[-1]['images_per_second']
        console = Path(folder) / 'console' / 'torchrun.log'
        threads = max(1, torch.get_num_threads() // args.nproc_per_node) * processes
        try:
            torchrun('train.py', flags, processes, threads, console)
        except RuntimeError as error:  # the folder goes with the error: keep the end of its output
            raise RuntimeError(f'{error}; its last lines:\n{console.read_text()[-2000:]}') from None
        run_log, = Path(folder).glob('*.log')
        return read_history(run_log)[-1]['images_per_second']


# The loader rows: how pre-training's batches come to the step.
LOADER_ROWS = {'loader': '--augment loader', 'device': '--augment device',
               'held': '--augment device --data_on_device'}


def time_loader(args, batch, where, device):
    """(images/s (both modalities) that pre-training's loader yields on its own, the main process's CPU
    milliseconds a batch), over --epoch_steps batches after the first (which pays for starting the
    --workers processes): with --augment loader they crop, flip and normalise every image with PIL;
    with --augment device they only hand over the uint8 arrays, which the device then augments in
    the step; with --data_on_device the batches are gathered from the images held on the device,
    with no loader processes (on a CPU the main process then does the gathering itself). The main
    process's time is the host's: on a GPU whose step waits for the host, it adds to every step."""
    data_path = prepare_dataset('synthetic', args.data_path, need_train_arrays=True)
    trainset = SYSUData(data_path, train_transform(args.img_h, args.img_w) if where == 'loader' else as_uint8_tensor)
    if where == 'held':
        trainset = DeviceArrays(trainset, device)
    sampler = UnpairedSampler(len(trainset.visible_labels), len(trainset.thermal_labels),
                              (args.epoch_steps + 1) * batch)
    run = types.SimpleNamespace(args=types.SimpleNamespace(workers=args.workers, accum_iter=1), device=device,
                                rank=0, world_size=1)  # what engine.make_loader reads
    batches = iter(engine.make_loader(run, trainset, sampler, batch))
    next(batches)
    start, host_start = time.perf_counter(), time.process_time()
    images = sum(len(visible) + len(thermal) for visible, thermal, _, _ in batches)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    host_milliseconds = 1000 * (time.process_time() - host_start) / args.epoch_steps
    return images / (time.perf_counter() - start), host_milliseconds


def images_per_second_row(label, batch, measure, baseline=None, processes=1):
    """(a table row of the images/s that measure() returns, printed as it comes, and that figure); a
    failure stays in the table (figure None). With baseline (the figure of one process), the cell adds
    the speed-up of `processes` over it and its share of linear. A measure that returns (images/s, host
    milliseconds a batch), the loader's, shows both."""
    figure = None
    try:
        figure = measure()
        if isinstance(figure, tuple):
            figure, host_milliseconds = figure
            cell = f'{figure:.0f} (main process: {host_milliseconds:.2f} ms of CPU a batch)'
        else:
            cell = f'{figure:.0f}'
    except Exception as error:
        cell = failure(error)
    if figure is not None and baseline:
        cell += f' ({figure / baseline:.2f}x one process, {100 * figure / baseline / processes:.0f}% of linear)'
    row = f'| {label} | {batch}+{batch} | {cell} |'
    print(row, flush=True)
    return row, figure


def failure(error):
    """The table cell of a row that failed (its traceback goes to the log)."""
    traceback.print_exc()
    return f'failed: {type(error).__name__}: {(str(error).splitlines() or [""])[0][:200]}'


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = utils.select_device(args.gpu)
    if args.nproc_per_node < 1 or (device.type == 'cuda' and args.nproc_per_node > torch.cuda.device_count()):
        raise utils.UserError(f'--nproc_per_node {args.nproc_per_node}: give a number from 1 to the '
                              f'{torch.cuda.device_count() if device.type == "cuda" else "CPU"} GPUs or processes '
                              'this machine can run (one GPU a process).')
    launches = (1, args.nproc_per_node) if args.nproc_per_node > 1 else (0,)  # 0: in this process
    card = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    lines = [f'{card}, torch {torch.__version__}, {args.arch} {args.img_h}x{args.img_w}', '',
             '| training step | images a step | precision | ms/step | images/s | TFLOP/s | peak GPU memory (GiB) '
             '| host waits a step |',
             '|---|---|---|---|---|---|---|---|']
    precisions = [] if args.loader_only else args.precisions.split(',')
    # Compiled rows come last in each table: they pay for the compilation, so a run cut short by a
    # time limit has printed every plain row first (the tables keep the PRECISIONS order).
    step_rows, epoch_rows, gflops = {}, {}, {}
    networks = networks_and_steps(args, args.methods)
    epoch_flags = [tuple(flags) for flags in args.epoch_flags or EPOCH_FLAGS] if not args.loader_only else []
    for compiled in (True,) if args.compiled_only else (False, True):
        for method, (build, step) in networks.items():
            for batch in args.batch:
                for name in precisions:
                    options = PRECISIONS[name]
                    if (options['compile'] is not None) != compiled:
                        continue
                    shown = name
                    try:  # a CPU that --amp refuses gives a failed row too
                        precision = engine.Precision(options['amp'], device)
                        shown = f'{name} ({precision})'
                        if (method, batch) not in gflops:
                            gflops[method, batch] = gflop_per_image(build, step, batch, args, device)
                        milliseconds, peak, waits = time_step(build, step, precision, options, batch, args, device)
                        images_per_second = 2 * batch * 1000 / milliseconds
                        figures = (f'{milliseconds:.1f} | {images_per_second:.0f} | '
                                   f'{gflops[method, batch] * images_per_second / 1000:.3g} | '
                                   f'{"-" if peak is None else f"{peak:.2f}"} | {"-" if waits is None else waits}')
                    except Exception as error:  # a failed row stays in the table
                        figures = failure(error) + ' | | | |'
                    row = f'| {method} | {batch}+{batch} | {shown} | {figures} |'
                    step_rows[method, batch, name] = row
                    print(row, flush=True)
        for batch in args.batch if args.epoch_steps and 'mmgl' in args.methods and not compiled else ():
            for where, flags in LOADER_ROWS.items():
                epoch_rows[batch, where], _ = images_per_second_row(
                    f'the loader alone, {flags}', batch, lambda: time_loader(args, batch, where, device))
        for batch in args.batch if args.epoch_steps and 'mmgl' in args.methods else ():
            for flags in epoch_flags:
                if ('--compile' in flags) != compiled:
                    continue
                one_process = None  # the first launch's figure, the baseline of the second
                for processes in launches:
                    launch = {0: '', 1: ', torchrun, 1 process'}.get(processes, f', torchrun, {processes} processes')
                    epoch_rows[batch, flags, processes], figure = images_per_second_row(
                        (' '.join(flags) or 'defaults') + launch, batch,
                        lambda: time_epochs(args, batch, list(flags), processes), one_process, processes)
                    one_process = one_process or figure
    if not step_rows:
        lines = lines[:1]
    lines += [step_rows[key] for key in sorted(step_rows, key=lambda key: (
        list(networks).index(key[0]), key[1], list(PRECISIONS).index(key[2])))]
    if gflops:
        lines += ['', 'GFLOP per training image (convolutions and matrix products, forward and backward): ' +
                  ', '.join(f'{method} {gflop:.1f} at {batch}+{batch}' for (method, batch), gflop in gflops.items())]
    if epoch_rows:
        if args.nproc_per_node > 1:
            lines += ['', 'Under torchrun, images a step are those of each process and images/s those of all.']
        lines += ['', f'| whole train.py epoch of {args.epoch_steps} steps (--pcc --part), or its loader alone '
                      '| images a step | images/s |',
                  '|---|---|---|',
                  *(epoch_rows[key] for batch in args.batch for row in (*LOADER_ROWS, *epoch_flags)
                    for key in [(batch, row), *((batch, row, processes) for processes in launches)]
                    if key in epoch_rows)]
    publish('\n'.join(lines), args.out)


if __name__ == '__main__':
    utils.run_main(main)
