"""The training engine's speed features on the CPU: mixed precision, augmentation on the device,
channels-last, device-side permutation decoding."""
import contextlib
import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader

import engine
import train as mmgl_train
import utils
from AGW import train as agw_train
from AGW.agw_model import build_net as build_agw
from DDAG import train_ddag
from DDAG.ddag_model import build_net as build_ddag
from loss import decode_permutations
from model import MMGLNet, sinkhorn
from tests.helpers import run_args

MMGL_RUN = 'synthetic_mmgl_two_resnet18_s6_pcc_part_lr_0.1_seed_0'


@pytest.mark.parametrize('num_stripe', [2, 4, 6, 7, 8])
def test_decoding_finds_the_permutation_the_hungarian_algorithm_finds(num_stripe):
    generator = torch.Generator().manual_seed(num_stripe)
    predicted = sinkhorn(torch.randn(64, num_stripe, num_stripe, generator=generator) * 3)
    expected = [linear_sum_assignment(matrix, maximize=True)[1] for matrix in predicted.log().numpy()]
    assert torch.equal(decode_permutations(predicted), torch.from_numpy(np.stack(expected)).long())


def three_methods():
    """{name: (a small ResNet-18 network, its script's training step)} for MMGL, AGW and DDAG."""
    ddag_args = train_ddag.get_args_parser().parse_args(['--wpa', '--graph', '--low-dim', '8', '--nheads', '2'])
    return {'mmgl': (MMGLNet('resnet18', part=True, perm_input='parts'),
                     mmgl_train.make_step(mmgl_train.get_args_parser().parse_args(['--pcc', '--part']))),
            'agw': (build_agw(2, 'agw', 'resnet18'), agw_train.make_step('agw', 0.3)),
            'ddag': (build_ddag(2, ddag_args, 'resnet18'), train_ddag.DDAGLoss(ddag_args))}


def test_every_step_gives_a_float32_loss_under_bfloat16_autocast():
    precision = engine.Precision(True, torch.device('cpu'))
    assert precision.dtype == torch.bfloat16 and not precision.scaler.is_enabled()
    visible, thermal = torch.randn(4, 3, 48, 24), torch.randn(4, 3, 48, 24)
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    runs = three_methods()
    for name, (net, step) in runs.items():
        with precision.autocast():
            assert net.feature_map(visible, thermal).dtype == torch.bfloat16, name  # the network runs in bf16
            loss, values = step(net.train(), visible, thermal, labels, epoch=0)
        assert loss.dtype == torch.float32 and torch.isfinite(loss), name
        precision.backward_and_step(loss, torch.optim.SGD(net.parameters(), lr=0.01))
        gradients = [parameter.grad for parameter in net.parameters() if parameter.grad is not None]
        assert gradients and all(gradient.dtype == torch.float32 and torch.isfinite(gradient).all()
                                 for gradient in gradients), name


class HostWaits(TorchFunctionMode):
    """Records the calls that make the host wait for the GPU: reading a tensor's values (item, tolist,
    bool, float, int, cpu, numpy, nonzero) and copies from host memory to a device that are not
    non-blocking (to, copy_, torch.tensor/as_tensor with a device: PyTorch then synchronises the stream)."""
    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero}

    def __init__(self):
        super().__init__()
        self.waits = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.READS:
            self.waits.append(func.__name__)
        elif func in (torch.tensor, torch.as_tensor) and torch.device(kwargs.get('device') or 'cpu').type != 'cpu':
            self.waits.append(f'{func.__name__}(device=...)')
        elif func is torch.Tensor.to:
            target, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            self.record_copy('to', args[0], target, non_blocking)
        elif func is torch.Tensor.copy_:
            self.record_copy('copy_', args[1], args[0].device, kwargs.get('non_blocking', args[2:3] == (True,)))
        return func(*args, **kwargs)

    def record_copy(self, name, source, target, non_blocking):
        if target is not None and source.device.type == 'cpu' and target.type != 'cpu' and not non_blocking:
            self.waits.append(f'{name} from host memory')


def test_a_training_step_never_makes_the_host_wait_for_the_device(sysu_preprocessed, monkeypatch):
    """No per-step synchronisation (issue #10): MMGL's, AGW's and DDAG's steps, from the loader's batch
    (uint8, augmented on the device) to the optimiser step, read no value of a device tensor and make no
    blocking copy to the device once the first step has run. Run on the meta device, which has no
    values at all, under a recorder of the calls that would make a GPU's host wait."""
    monkeypatch.setattr(utils, 'full_precision', lambda device: contextlib.nullcontext())  # no autocast on meta
    meta = torch.device('meta')
    args = mmgl_train.get_args_parser().parse_args(run_args(sysu_preprocessed.parent, sysu_preprocessed,
                                                            '--augment', 'device'))
    run = engine.Run(args, 'x', meta, sysu_preprocessed, None, engine.NullWriter(),
                     precision=engine.Precision(False, meta), augment_on_device=True)
    runs = three_methods()
    images = torch.zeros(4, 60, 30, 3, dtype=torch.uint8)  # a loader's batch: uint8, in host memory
    batch = (images, images, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1]))
    for name, (net, step) in runs.items():
        net.to(meta).train()
        optimizer = utils.make_optimizer(net.parameters(), 0.01)
        for _ in range(2):  # the first step may place constants on the device once
            with HostWaits() as recorder:
                engine.train_step(run, net, optimizer, step, batch, epoch=0)
        assert recorder.waits == [], name
    with HostWaits() as recorder:  # the recorder sees what it is meant to see
        torch.tensor([0.5], device=meta)
        images.to(meta)
        torch.empty(4, 60, 30, 3, dtype=torch.uint8, device=meta).copy_(images)
    assert recorder.waits == ['tensor(device=...)', 'to from host memory', 'copy_ from host memory']


def test_speed_flags_reach_the_run_and_resume_stays_exact(tmp_path, sysu_preprocessed):
    flags = ('--arch', 'resnet18', '--batch-size', '4', '--steps_per_epoch', '3', '--pcc', '--part', '--amp',
             '--channels_last', '--augment', 'device', '--log_every', '2')
    straight, interrupted = tmp_path / 'straight', tmp_path / 'interrupted'
    history = mmgl_train.main(run_args(straight, sysu_preprocessed, *flags, '--epochs', '2'))
    assert all(np.isfinite(stats['loss']) for stats in history)
    log = (straight / 'log' / f'{MMGL_RUN}.log').read_text()
    assert 'bfloat16 autocast' in log and 'augmentation in the device' in log
    assert 'grad_scaler' in utils.load_checkpoint(straight / 'save_model' / f'{MMGL_RUN}_state.t')

    mmgl_train.main(run_args(interrupted, sysu_preprocessed, *flags, '--epochs', '1'))
    mmgl_train.main(run_args(interrupted, sysu_preprocessed, *flags, '--epochs', '2', '--resume', f'{MMGL_RUN}_state.t'))
    reference = utils.load_checkpoint(straight / 'save_model' / f'{MMGL_RUN}_epoch_2.t')
    resumed = utils.load_checkpoint(interrupted / 'save_model' / f'{MMGL_RUN}_epoch_2.t')
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key


def test_augmentation_in_the_loader_or_on_the_device_feeds_the_same_kind_of_batches(sysu_preprocessed):
    """The two paths give normalised float batches of one shape, one memory layout (channels-last
    with --channels_last only) and similar statistics."""
    batches = {}
    for where, layout in itertools.product(('loader', 'device'), ('standard', 'channels_last')):
        layout_flags = ('--channels_last',) if layout == 'channels_last' else ()
        args = mmgl_train.get_args_parser().parse_args(run_args(
            sysu_preprocessed.parent, sysu_preprocessed, '--augment', where, '--img_h', '96', '--img_w', '48', *layout_flags))
        logger = utils.make_logger(sysu_preprocessed.parent / f'augment_{where}_{layout}.log')
        run = engine.Run(args, 'x', torch.device('cpu'), sysu_preprocessed, logger, engine.NullWriter(),
                         precision=engine.Precision(False, torch.device('cpu')), augment_on_device=where == 'device')
        trainset = engine.training_set(run)
        torch.manual_seed(0)
        pairs = [(index, index % len(trainset.thermal_labels)) for index in range(32)]
        visible, _, _, _ = next(iter(DataLoader(trainset, batch_size=32, sampler=pairs)))
        assert visible.dtype == (torch.uint8 if where == 'device' else torch.float32)
        batches[where, layout] = run.batch_to_device(visible)
        memory_format = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
        assert batches[where, layout].is_contiguous(memory_format=memory_format), (where, layout)
    loader, device = batches['loader', 'standard'], batches['device', 'standard']
    assert loader.shape == device.shape == (32, 3, 96, 48) and loader.dtype == device.dtype == torch.float32
    assert abs(loader.mean() - device.mean()) < 0.05 and abs(loader.std() - device.std()) < 0.05


def test_a_compiled_network_trains_to_the_weights_of_the_plain_one(tmp_path, sysu_preprocessed):
    """--compile: train.py steps through torch.compile's network (inductor on the CPU), and two steps
    end with the weights of the same run without it, up to float rounding."""
    flags = ('--arch', 'resnet18', '--batch-size', '2', '--steps_per_epoch', '2', '--epochs', '1', '--pcc', '--part',
             '--lr', '0.01')
    torch._dynamo.reset()
    mmgl_train.main(run_args(tmp_path / 'plain', sysu_preprocessed, *flags))
    compiled_runs = torch._dynamo.utils.counters['stats']['unique_graphs']
    mmgl_train.main(run_args(tmp_path / 'compiled', sysu_preprocessed, *flags, '--compile'))
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] > compiled_runs  # dynamo traced the network
    plain = utils.load_checkpoint(tmp_path / 'plain' / 'save_model' / f'{MMGL_RUN.replace("0.1", "0.01")}_epoch_1.t')
    compiled = utils.load_checkpoint(tmp_path / 'compiled' / 'save_model' / f'{MMGL_RUN.replace("0.1", "0.01")}_epoch_1.t')
    assert plain.keys() == compiled.keys()  # the files hold the plain network's keys, no _orig_mod. prefix
    for key, value in plain.items():
        assert torch.allclose(compiled[key].float(), value.float(), rtol=1e-3, atol=1e-4), key


@pytest.mark.parametrize('flags, mode', [(('--compile',), None), (('--compile', 'reduce-overhead'), 'reduce-overhead'),
                                         (('--compile', 'max-autotune', '--amp'), 'max-autotune')])
def test_the_compile_mode_reaches_torch_compile_and_every_step_marks_a_new_iteration(tmp_path, sysu_preprocessed,
                                                                                     monkeypatch, flags, mode):
    """--compile [MODE]: torch.compile gets the mode (None is torch's default); each training step first
    tells CUDA graphs that a new iteration begins, so that graph outputs of the last step may be reused.
    (The compilation itself is checked above; here torch.compile is replaced by a recorder.)"""
    compiled, marks = [], []
    monkeypatch.setattr(torch, 'compile', lambda network, mode=None: compiled.append(mode) or network)
    monkeypatch.setattr(torch.compiler, 'cudagraph_mark_step_begin', lambda: marks.append(1))
    mmgl_train.main(run_args(tmp_path, sysu_preprocessed, '--arch', 'resnet18', '--batch-size', '2',
                             '--steps_per_epoch', '3', '--epochs', '1', *flags))
    assert compiled == [mode] and len(marks) == 3


def test_an_unknown_compile_mode_is_refused():
    with pytest.raises(SystemExit) as refused:
        mmgl_train.get_args_parser().parse_args(['--compile', 'fastest'])
    assert refused.value.code == 2
