"""The training engine's speed features on the CPU: mixed precision, augmentation on the device,
images held on the device, channels-last, device-side permutation decoding."""
import argparse
import contextlib
import copy
import itertools
import re
import threading

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
from data_loader import DeviceArrays, DeviceLoader, RankShare, SYSUData, UnpairedSampler, as_uint8_tensor
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


@pytest.mark.parametrize('amp, dtype', [('bf16', torch.bfloat16), ('fp16', torch.float16)])
def test_every_step_gives_a_float32_loss_under_autocast(amp, dtype):
    """--amp bf16 (what --amp picks on CPUs and GPUs with bfloat16) and --amp fp16 (the paper's 2080Ti path, with gradient scaling):
    each network runs in the autocast dtype, each loss comes out in float32, and the optimiser step
    gets float32 gradients, unscaled and finite. (In float16 the first steps may overflow at the
    scaler's initial scale: it then skips the step and halves the scale, until a step is taken.)"""
    precision = engine.Precision(amp, torch.device('cpu'))
    assert precision.dtype == dtype and precision.scaler.is_enabled() == (dtype == torch.float16)
    torch.manual_seed(1)  # whatever ran before (with this seed, AGW's GeM pooling met a channel zero everywhere)
    visible, thermal = torch.randn(4, 3, 48, 24), torch.randn(4, 3, 48, 24)
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    runs = three_methods()
    for name, (net, step) in runs.items():
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        for skipped in range(40):
            scale = precision.scaler.get_scale()
            with precision.autocast():
                assert net.feature_map(visible, thermal).dtype == dtype, name  # the network runs in the autocast dtype
                loss, values = step(net.train(), visible, thermal, labels, epoch=0)
            assert loss.dtype == torch.float32 and torch.isfinite(loss), name
            before = [parameter.detach().clone() for parameter in net.parameters()]
            precision.backward_and_step(loss, optimizer)
            if precision.scaler.get_scale() >= scale:  # the step was taken
                break
            assert all(torch.equal(old, new) for old, new in zip(before, net.parameters())), name
        assert skipped < (16 if precision.scaler.is_enabled() else 1), name
        gradients = [parameter.grad for parameter in net.parameters() if parameter.grad is not None]
        assert gradients and all(gradient.dtype == torch.float32 and torch.isfinite(gradient).all()
                                 for gradient in gradients), name
        assert any(not torch.equal(old, new) for old, new in zip(before, net.parameters())), name
        if precision.scaler.is_enabled():  # the optimiser saw unscaled gradients
            assert max(gradient.abs().max() for gradient in gradients) < 1e3, (name, skipped)


@pytest.mark.parametrize('amp, capability, expected', [
    (None, (9, 0), None), ('auto', (9, 0), torch.bfloat16), ('auto', (8, 0), torch.bfloat16),
    ('auto', (7, 5), torch.float16), ('fp16', (9, 0), torch.float16), ('bf16', (8, 6), torch.bfloat16)])
def test_amp_picks_bfloat16_only_where_the_gpu_computes_it_natively(monkeypatch, amp, capability, expected):
    """--amp alone on a GPU: bfloat16 from Ampere (compute capability 8) on, float16 before, such as
    the paper's 2080Ti (7.5), which torch.cuda.is_bf16_supported() calls bfloat16-capable (it
    emulates it). Checked with the capability of a pretend GPU."""
    monkeypatch.setattr(torch.version, 'hip', None)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    assert engine.autocast_dtype(amp, torch.device('cuda', 0)) == expected


@pytest.mark.parametrize('native', [True, False])
def test_amp_on_the_cpu_is_bfloat16_where_the_cpu_has_it_and_refused_where_not(monkeypatch, native):
    """--amp alone on a CPU: bfloat16 where oneDNN computes it; on a CPU without (an AVX2-only one,
    where a bfloat16 step was 15 to 21 times slower than float32) one clear sentence; a named dtype runs on
    any CPU. Both kinds of CPU are pretended; this machine's own answer is oneDNN's."""
    cpu = torch.device('cpu')
    assert engine.native_bfloat16(cpu) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    monkeypatch.setattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', lambda: native)
    assert engine.native_bfloat16(cpu) == native
    assert engine.autocast_dtype('bf16', cpu) == torch.bfloat16 and engine.autocast_dtype('fp16', cpu) == torch.float16
    if native:
        assert engine.autocast_dtype('auto', cpu) == torch.bfloat16
    else:
        with pytest.raises(utils.UserError, match=r'--amp: this CPU has no bfloat16 .* \(--amp bf16\) to run it'):
            engine.autocast_dtype('auto', cpu)


def test_amp_bf16_on_a_gpu_without_native_bfloat16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.version, 'hip', None)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'NVIDIA GeForce RTX 2080 Ti')
    with pytest.raises(utils.UserError, match='--amp bf16: NVIDIA GeForce RTX 2080 Ti .* use --amp'):
        engine.autocast_dtype('bf16', torch.device('cuda', 0))


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
                     precision=engine.Precision(None, meta), augment_on_device=True)
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


@pytest.mark.parametrize('amp, shown', [(('--amp', 'bf16'), 'bfloat16 autocast'),
                                         (('--amp', 'fp16'), 'float16 autocast with gradient scaling')])
def test_speed_flags_reach_the_run_and_resume_stays_exact(tmp_path, sysu_preprocessed, amp, shown):
    """--amp [fp16] --channels_last --augment device reach train.py's run, and a run resumed from its
    state file (with the gradient scaler's scale) ends with the weights of the uninterrupted run."""
    flags = ('--arch', 'resnet18', '--batch-size', '4', '--steps_per_epoch', '3', '--pcc', '--part', *amp,
             '--channels_last', '--augment', 'device', '--log_every', '2')
    straight, interrupted = tmp_path / 'straight', tmp_path / 'interrupted'
    history = mmgl_train.main(run_args(straight, sysu_preprocessed, *flags, '--epochs', '2'))
    assert all(np.isfinite(stats['loss']) for stats in history)
    log = (straight / 'log' / f'{MMGL_RUN}.log').read_text()
    assert shown in log and 'augmentation in the device' in log
    scaler = utils.load_checkpoint(straight / 'save_model' / f'{MMGL_RUN}_state.t')['grad_scaler']
    assert (scaler != {}) == ('fp16' in amp)  # a disabled scaler has no state

    mmgl_train.main(run_args(interrupted, sysu_preprocessed, *flags, '--epochs', '1'))
    mmgl_train.main(run_args(interrupted, sysu_preprocessed, *flags, '--epochs', '2', '--resume', f'{MMGL_RUN}_state.t'))
    reference = utils.load_checkpoint(straight / 'save_model' / f'{MMGL_RUN}_epoch_2.t')
    resumed = utils.load_checkpoint(interrupted / 'save_model' / f'{MMGL_RUN}_epoch_2.t')
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), key
    assert utils.load_checkpoint(interrupted / 'save_model' / f'{MMGL_RUN}_state.t')['grad_scaler'] == scaler


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
                         precision=engine.Precision(None, torch.device('cpu')), augment_on_device=where == 'device')
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
                                         (('--compile', 'max-autotune', '--amp', 'bf16'), 'max-autotune')])
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


def test_accumulated_batches_make_one_step_on_the_mean_of_their_losses():
    """--accum_iter 2: the first batch leaves the weights alone; after the second they are those of
    one SGD step on the mean of the two batches' losses, each batch normalised on its own (what two
    processes of one batch each compute)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    reference = copy.deepcopy(net)
    batches = [(torch.randn(2, 3, 8, 6), torch.randn(2, 3, 8, 6), torch.tensor([0, 1]), torch.tensor([2, 0]))
               for _ in range(2)]

    def step(model, visible, thermal, labels, epoch):
        return torch.nn.functional.cross_entropy(model(torch.cat((visible, thermal))), labels), {}

    cpu = torch.device('cpu')
    args = argparse.Namespace(accum_iter=2, compile=None, channels_last=False)
    run = engine.Run(args, 'x', cpu, None, None, engine.NullWriter(), precision=engine.Precision(None, cpu))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    start = copy.deepcopy(net.state_dict())
    engine.train_step(run, net, optimizer, step, batches[0], epoch=0, accumulated=0)
    assert all(torch.equal(net.state_dict()[key], value) for key, value in start.items() if 'running' not in key
               and 'tracked' not in key)
    engine.train_step(run, net, optimizer, step, batches[1], epoch=0, accumulated=1)

    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    losses = [step(reference, visible, thermal, torch.cat(labels), 0)[0] for visible, thermal, *labels in batches]
    ((losses[0] + losses[1]) / 2).backward()
    reference_optimizer.step()
    for (key, value), (_, expected) in zip(net.state_dict().items(), reference.state_dict().items()):
        assert torch.allclose(value.float(), expected.float(), atol=1e-6), key
    assert not torch.equal(net[0].weight, start['0.weight'])


def test_train_py_with_accum_iter_steps_once_every_k_batches(tmp_path, sysu_preprocessed, monkeypatch):
    """--accum_iter 2 --steps_per_epoch 2: an epoch of 2 optimiser steps of 2 batches each, said in the
    log; --accum_iter 0 is refused in one sentence."""
    calls = []
    for method in ('backward', 'step'):
        original = getattr(engine.Precision, method)
        monkeypatch.setattr(engine.Precision, method,
                            lambda self, *objects, method=method, original=original: calls.append(method)
                            or original(self, *objects))
    history = mmgl_train.main(run_args(tmp_path, sysu_preprocessed, '--arch', 'resnet18', '--batch-size', '2',
                                       '--steps_per_epoch', '2', '--epochs', '1', '--accum_iter', '2'))
    assert calls == ['backward', 'backward', 'step'] * 2 and history[0]['steps'] == 2
    assert '(2 steps of 2 batches,' in next((tmp_path / 'log').glob('*.log')).read_text()
    with pytest.raises(utils.UserError, match='--accum_iter must be at least 1, got 0.'):
        mmgl_train.main(run_args(tmp_path / 'bad', sysu_preprocessed, '--accum_iter', '0'))


def test_an_unknown_compile_mode_is_refused():
    with pytest.raises(SystemExit) as refused:
        mmgl_train.get_args_parser().parse_args(['--compile', 'fastest'])
    assert refused.value.code == 2


@pytest.mark.parametrize('shape, momentum', [((8, 5, 3, 2), 0.1), ((12, 5), None), ((6, 4, 3), 0.3)])
def test_ghost_batch_norm_normalises_each_interleaved_group_as_a_batch_norm_of_its_own(shape, momentum):
    groups = 2 if shape[0] == 8 else 3
    plain = {2: torch.nn.BatchNorm2d, 1: torch.nn.BatchNorm1d}.get(len(shape) - 2, torch.nn.BatchNorm1d)(
        shape[1], momentum=momentum)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2)
        plain.bias.uniform_(-1, 1)
    separate = [type(plain)(shape[1], momentum=momentum) for _ in range(groups)]
    for group_norm in separate:
        group_norm.load_state_dict(plain.state_dict())
    ghost = engine.GhostBatchNorm(plain, groups)
    assert ghost.weight is plain.weight and ghost.running_var is plain.running_var
    images = torch.randn(*shape) * 3 + 1
    for _ in range(2):  # twice, for the running statistics' update from the second step on
        out = ghost(images)
        for group, group_norm in enumerate(separate):
            torch.testing.assert_close(out[group::groups], group_norm(images[group::groups]))
    for name in ('running_mean', 'running_var'):
        expected = torch.stack([getattr(group_norm, name) for group_norm in separate]).mean(0)
        torch.testing.assert_close(getattr(plain, name), expected)
    assert int(plain.num_batches_tracked) == 2
    out.sum().backward()  # the gradient reaches the shared parameters
    assert plain.weight.grad is not None and plain.bias.grad.abs().sum() > 0
    ghost.eval()
    torch.testing.assert_close(ghost(images), plain.eval()(images))
    with pytest.raises(utils.UserError, match='--ghost_bn 2: a batch norm got 3 images'):
        engine.GhostBatchNorm(torch.nn.BatchNorm1d(5), 2)(torch.randn(3, 5))


def test_a_network_with_ghost_batch_norm_computes_what_each_process_of_a_torchrun_run_would():
    """MMGL with --ghost_bn 2 on 4+4 images: the outputs of images 0 and 2 of each modality are those
    of the plain network on those images alone (one process's share under torchrun), and the state
    dict keeps its keys and tensors."""
    torch.manual_seed(0)
    network = MMGLNet('resnet18', part=True, perm_input='parts', perm_bn=True)
    per_process = MMGLNet('resnet18', part=True, perm_input='parts', perm_bn=True)
    per_process.load_state_dict(network.state_dict())
    keys_and_tensors = {key: value.data_ptr() for key, value in network.state_dict().items()}
    engine.ghost_batchnorm(network, 2)
    assert {key: value.data_ptr() for key, value in network.state_dict().items()} == keys_and_tensors
    assert sum(isinstance(module, engine.GhostBatchNorm) for module in network.modules()) > 20
    visible, thermal = torch.randn(4, 3, 48, 24), torch.randn(4, 3, 48, 24)
    together = network(visible, thermal)
    for group in (0, 1):
        alone = per_process(visible[group::2], thermal[group::2])
        for name, value in alone.items():
            torch.testing.assert_close(together[name][group::2], value, atol=1e-4, rtol=1e-4)


def test_ghost_batch_norm_reaches_the_run_and_refuses_what_it_cannot_do(tmp_path, sysu_preprocessed):
    flags = ('--arch', 'resnet18', '--steps_per_epoch', '1', '--epochs', '1')
    mmgl_train.main(run_args(tmp_path, sysu_preprocessed, *flags, '--batch-size', '4', '--ghost_bn', '2'))
    assert "'ghost_bn': 2" in (tmp_path / 'log' / 'synthetic_mmgl_two_resnet18_s6_lr_0.1_seed_0.log').read_text()
    with pytest.raises(utils.UserError, match='a batch norm got 3 images, which do not split into 2 equal groups'):
        mmgl_train.main(run_args(tmp_path / 'odd', sysu_preprocessed, *flags, '--batch-size', '3', '--ghost_bn', '2'))
    for bad in (('--ghost_bn', '0'), ('--ghost_bn', '2', '--sync_bn')):
        with pytest.raises(utils.UserError, match='--ghost_bn must be at least 1 and cannot go with --sync_bn'):
            mmgl_train.main(run_args(tmp_path / 'bad', sysu_preprocessed, *flags, *bad))


@pytest.mark.parametrize('world_size, accum_iter', [(1, 1), (2, 2)])
def test_a_device_loader_gives_the_batches_of_a_dataloader_and_draws_alike(sysu_preprocessed, world_size, accum_iter):
    """--data_on_device: DeviceLoader's batches over the images held on the device are the DataLoader's
    over the dataset (the same images, labels, dtypes and count, for each process's share), and
    iterating either leaves torch's generator in the same state."""
    trainset = SYSUData(sysu_preprocessed, as_uint8_tensor)
    held = DeviceArrays(trainset, torch.device('cpu'))
    assert len(held) == len(trainset) and held.nbytes == sum(array.nbytes for array in (
        trainset.visible_images, trainset.thermal_images)) + 8 * (len(trainset) + len(trainset.thermal_labels))
    for rank in range(world_size):
        loaders = {}
        for kind in ('dataloader', 'device'):
            torch.manual_seed(0)
            sampler = RankShare(UnpairedSampler(len(trainset), len(trainset.thermal_labels), 22), 3, rank, world_size,
                                accum_iter)
            loader = (DataLoader(trainset, batch_size=3, sampler=sampler, drop_last=True) if kind == 'dataloader'
                      else DeviceLoader(held, sampler, 3))
            loaders[kind] = (len(loader), list(loader), torch.rand(1))
        (count, batches, after), (device_count, device_batches, device_after) = loaders.values()
        assert count == device_count == len(batches) == len(device_batches) == (2 if world_size > 1 else 7)
        for batch, device_batch in zip(batches, device_batches):
            for part, device_part in zip(batch, device_batch):
                assert part.dtype == device_part.dtype and torch.equal(part, device_part)
        assert torch.equal(after, device_after)


def test_a_device_loader_copies_from_host_memory_once_an_epoch(sysu_preprocessed):
    """The images are copied to the device once a run, the epoch's draw once an epoch; its batches are
    gathered there with nothing that makes a GPU's host wait (on the meta device, under HostWaits)."""
    held = DeviceArrays(SYSUData(sysu_preprocessed, as_uint8_tensor), torch.device('meta'))
    assert all(tensor.device.type == 'meta' for tensor in held.on_device.values())
    pairs = list(UnpairedSampler(len(held), len(held.thermal_labels), 12))  # drawn in host memory, as on a GPU
    with HostWaits() as recorder:
        batches = list(DeviceLoader(held, pairs, 4))
    assert len(batches) == 3 and recorder.waits == ['to from host memory']
    assert [tuple(part.shape) for part in batches[0]] == [(4, *held.on_device['visible_images'].shape[1:]),
                                                         (4, *held.on_device['thermal_images'].shape[1:]), (4,), (4,)]


@pytest.mark.parametrize('script', ['mmgl', 'agw'])
def test_data_on_device_trains_what_the_loader_trains(tmp_path, sysu_preprocessed, script):
    """train.py and AGW/train.py with --augment device end two epochs with the same statistics and
    weights whether the images come through loader processes or are held on the device."""
    main, flags = {'mmgl': (mmgl_train.main, ('--steps_per_epoch', '3', '--batch-size', '4', '--pcc', '--part')),
                   'agw': (agw_train.main, ('--batch-size', '4', '--num_pos', '2'))}[script]
    runs = {}
    for where, extra in (('loader', ('--workers', '2')), ('device', ('--data_on_device',))):
        history = main(run_args(tmp_path / where, sysu_preprocessed, '--arch', 'resnet18', '--epochs', '2',
                                '--augment', 'device', *flags, *extra))
        state, = (tmp_path / where / 'save_model').glob('*_state.t')
        runs[where] = history, utils.load_checkpoint(state)['model']
    (history, state), (device_history, device_state) = runs.values()
    for stats, device_stats in zip(history, device_history, strict=True):
        stats.pop('images_per_second'), device_stats.pop('images_per_second')
        torch.testing.assert_close(device_stats, stats, rtol=0, atol=0)  # AGW's too: its evaluation's scores
    for key, value in state.items():
        assert torch.equal(device_state[key], value), key
    log, = (tmp_path / 'device' / 'log').glob('*.log')
    assert re.search(r'\n  held on cpu: [\d,]+\.\d MiB\n', log.read_text())
    assert re.search(r'\n2 epochs in 0:\d\d:\d\d: [\d.]+ img/s over the run, its evaluations and files included\n',
                     log.read_text())
    with pytest.raises(utils.UserError, match='--data_on_device holds .* add --augment device'):
        main(run_args(tmp_path / 'refused', sysu_preprocessed, '--arch', 'resnet18', *flags, '--data_on_device'))
    assert not (tmp_path / 'refused').exists()  # refused before anything started


def test_a_background_writer_writes_what_it_was_handed_and_reports_a_failed_write(tmp_path, monkeypatch):
    """utils.BackgroundWriter (the state file of every epoch): the file holds the tensors as they were
    when write() returned, however training changes them while the thread writes; close() waits for
    the file; a failed write raises at the next write or at close."""
    handed_over, changed = threading.Event(), threading.Event()
    save = utils.save_checkpoint

    def save_once_changed(obj, path):  # the thread writes only after the originals have changed
        handed_over.set()
        changed.wait(timeout=10)
        save(obj, path)
    monkeypatch.setattr(utils, 'save_checkpoint', save_once_changed)
    weights, momentum = torch.arange(4.0), torch.ones(2)
    with utils.BackgroundWriter() as writer:
        writer.write({'model': {'w': weights}, 'optimizer': [momentum, {'step': 3}], 'epoch': 1}, tmp_path / 'state.t')
        assert handed_over.wait(timeout=10)
        weights.add_(10), momentum.mul_(5)
        changed.set()
    state = utils.load_checkpoint(tmp_path / 'state.t')
    assert torch.equal(state['model']['w'], torch.arange(4.0)) and torch.equal(state['optimizer'][0], torch.ones(2))
    assert state['optimizer'][1] == {'step': 3} and state['epoch'] == 1

    def fail(obj, path):
        raise OSError(f'No space left on device: {path}')
    monkeypatch.setattr(utils, 'save_checkpoint', fail)
    for wait_by in ('the next write', 'close'):
        writer = utils.BackgroundWriter()
        writer.write({'epoch': 2}, tmp_path / 'full.t')
        with pytest.raises(OSError, match='No space left'):
            writer.write({'epoch': 3}, tmp_path / 'full.t') if wait_by == 'the next write' else writer.close()
        writer.close()  # nothing left to write: the error was raised once
