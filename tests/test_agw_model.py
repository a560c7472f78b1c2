"""The AGW network: public state-dict layout, forward pass, pooling, non-local blocks, optimiser groups
and loading of MMGL pre-trained backbones."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

import utils
from AGW.agw_model import NonLocal, embed_net, gem_pool
from model import MMGLNet
from tests.helpers import BN_KEYS, assert_mmgl_backbone_fills_every_backbone_tensor, public_agw_backbone_keys, randomised

# The public AGW network with non-local on: 2 blocks in layer2 (512 channels), 3 in layer3 (1024).
PUBLIC_NON_LOCAL = {'NL_2': (2, 512), 'NL_3': (3, 1024)}
# The public block's inner width: its `inter_channels = reduc_ratio // reduc_ratio` is 1 whatever the
# ratio, so g, theta and phi are C -> 1 convolutions and W is 1 -> C (+ BatchNorm2d(C)).
PUBLIC_NON_LOCAL_INNER = 1


def public_agw_shapes(class_num, non_local):
    """Shapes of the public AGW tensors outside the backbone, written out from its module names."""
    shapes = {f'bottleneck.{name}': (2048,) for name in BN_KEYS if name != 'num_batches_tracked'}
    shapes['bottleneck.num_batches_tracked'] = ()
    shapes['classifier.weight'] = (class_num, 2048)
    if non_local:
        inner = PUBLIC_NON_LOCAL_INNER
        for name, (count, channels) in PUBLIC_NON_LOCAL.items():
            for index in range(count):
                block = f'{name}.{index}'
                for conv in ('g.0', 'theta', 'phi'):
                    shapes[f'{block}.{conv}.weight'] = (inner, channels, 1, 1)
                    shapes[f'{block}.{conv}.bias'] = (inner,)
                shapes[f'{block}.W.0.weight'] = (channels, inner, 1, 1)
                shapes[f'{block}.W.0.bias'] = (channels,)
                shapes.update({f'{block}.W.1.{key}': (channels,) for key in BN_KEYS if key != 'num_batches_tracked'})
                shapes[f'{block}.W.1.num_batches_tracked'] = ()
    return shapes


def public_backbone_shapes():
    """The public backbone modules wrap torchvision-layout ResNet-50s (last stride 1 changes no
    shape), so each backbone tensor has the shape of the torchvision tensor of the same name."""
    resnet = torchvision.models.resnet50().state_dict()
    shapes = {}
    for key in public_agw_backbone_keys():
        name = key.split('.', 2)[2]  # drop 'visible_module.visible.' and the like
        shapes[key] = tuple(resnet[name].shape)
    return shapes


@pytest.mark.parametrize('method, stream', [('base', 'two'), ('agw', 'two'), ('agw', 'one')])
def test_state_dict_is_the_public_agw_layout(method, stream):
    switch = 'on' if method == 'agw' else 'off'
    state = embed_net(395, no_local=switch, gm_pool=switch, stream=stream).state_dict()
    expected = {**public_backbone_shapes(), **public_agw_shapes(395, non_local=method == 'agw')}
    assert {key: tuple(value.shape) for key, value in state.items()} == expected
    if method == 'agw':
        assert state['NL_2.0.g.0.weight'].shape == (1, 512, 1, 1)
        assert state['NL_3.0.W.0.weight'].shape == (1024, 1, 1, 1)
    assert state['classifier.weight'].shape == (395, 2048)


def test_non_local_blocks_have_the_small_public_parameter_count():
    # Per block of C channels, with one inner channel: g, theta, phi are C weights + 1 bias each;
    # W is a 1 -> C convolution (C weights + C biases) and a batch norm (C weights + C biases).
    # 3 (C + 1) + 2C + 2C = 7C + 3: 3,587 at C = 512 (two blocks) and 7,171 at C = 1024 (three).
    expected = 2 * 3_587 + 3 * 7_171
    assert expected == 28_687
    model = embed_net(395)
    blocks = [model.NL_1, model.NL_2, model.NL_3, model.NL_4]
    assert sum(len(stage) for stage in blocks) == 5
    assert sum(parameter.numel() for stage in blocks for parameter in stage.parameters()) == expected


def test_bnneck_and_classifier_start_as_in_the_public_code():
    model = embed_net(300, arch='resnet18')
    assert model.bottleneck.bias.requires_grad is False
    assert (model.bottleneck.bias == 0).all()
    assert model.bottleneck.weight.mean().item() == pytest.approx(1.0, abs=0.003)
    assert model.bottleneck.weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert model.classifier.bias is None
    assert model.classifier.weight.mean().item() == pytest.approx(0.0, abs=2e-5)
    assert model.classifier.weight.std().item() == pytest.approx(0.001, rel=0.05)


def test_non_local_blocks_follow_the_public_block_indices():
    model = embed_net(10).eval()
    order = []
    for name, module in model.named_modules():
        is_block = name.startswith('base_resnet.base.layer') and name.count('.') == 3
        if is_block or (name.startswith('NL_') and name.count('.') == 1):
            module.register_forward_hook(lambda module, inputs, output, name=name: order.append(name))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 32), None, modal=1)

    def blocks(layer, indices):
        return [f'base_resnet.base.layer{layer}.{index}' for index in indices]

    expected = (blocks(1, range(3)) + blocks(2, range(3)) + ['NL_2.0'] + blocks(2, [3]) + ['NL_2.1']
                + blocks(3, range(4)) + ['NL_3.0'] + blocks(3, [4]) + ['NL_3.1'] + blocks(3, [5]) + ['NL_3.2']
                + blocks(4, range(3)))
    assert order == expected


def test_resnet18_runs_every_non_local_block_once():
    # two blocks per stage: layer3 has room for two of the three non-local blocks, one after each
    model = embed_net(10, arch='resnet18').eval()
    assert [len(blocks) for blocks in (model.NL_1, model.NL_2, model.NL_3, model.NL_4)] == [0, 2, 2, 0]
    assert model.NL_3[0].W[0].out_channels == 256
    calls = []
    for name, module in model.named_modules():
        if name.startswith('NL_') and name.count('.') == 1:
            module.register_forward_hook(lambda module, inputs, output, name=name: calls.append(name))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 32), None, modal=1)
    assert calls == ['NL_2.0', 'NL_2.1', 'NL_3.0', 'NL_3.1']


@pytest.mark.parametrize('switch', ['on', 'off'])
def test_forward_shapes_in_training_and_eval(switch):
    model = embed_net(7, no_local=switch, gm_pool=switch, arch='resnet18')
    visible, thermal = torch.randn(3, 3, 64, 32), torch.randn(2, 3, 64, 32)
    pooled, logits = model(visible, thermal)
    assert pooled.shape == (5, 512) and logits.shape == (5, 7)
    assert (pooled >= 0).all()  # pooled post-ReLU maps
    model.eval()
    with torch.no_grad():
        for modal, batch in ((0, 5), (1, 3), (2, 2)):
            outputs = model(visible, thermal, modal=modal)
            assert len(outputs) == 2
            for output in outputs:
                assert output.shape == (batch, 512)
                assert torch.allclose(output.norm(dim=1), torch.ones(batch), atol=1e-5)


@pytest.mark.parametrize('gm_pool', ['on', 'off'])
def test_eval_outputs_are_the_pooled_map_and_its_bnneck_feature(gm_pool):
    model = embed_net(7, no_local='off', gm_pool=gm_pool, arch='resnet18').eval()
    visible, thermal = torch.randn(2, 3, 64, 32), torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        pooled_normalised, feat_normalised = model(visible, thermal)
        feature_map = model.feature_map(visible, thermal)
        pooled = gem_pool(feature_map) if gm_pool == 'on' else feature_map.mean(dim=(2, 3))
        feat = model.bottleneck(pooled)
    assert torch.allclose(pooled_normalised, F.normalize(pooled), atol=1e-6)
    assert torch.allclose(feat_normalised, F.normalize(feat), atol=1e-6)


def test_gem_pool_is_the_cube_root_of_the_mean_cube():
    feature_map = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    pooled = gem_pool(feature_map)
    for b in range(2):
        for c in range(3):
            values = feature_map[b, c].flatten().tolist()
            expected = (sum(v ** 3 for v in values) / len(values) + 1e-12) ** (1 / 3)
            assert pooled[b, c].item() == pytest.approx(expected, rel=1e-12)
    # between the mean and the max, and exact on a constant map
    assert (pooled >= feature_map.mean(dim=(2, 3))).all() and (pooled <= feature_map.amax(dim=(2, 3))).all()
    assert torch.allclose(gem_pool(torch.full((1, 2, 3, 3), 0.5)), torch.full((1, 2), 0.5))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_gem_pool_of_a_channel_zero_everywhere_has_finite_gradients_in_half_precision(dtype):
    """A post-ReLU channel can be 0 at every position; the root's gradient there stays finite in
    half precision too (under autocast on a CPU, pow stays in the input's dtype)."""
    feature_map = torch.rand(2, 3, 4, 5)
    feature_map[0, 1] = 0
    feature_map = feature_map.to(dtype).requires_grad_()
    with torch.autocast('cpu', dtype=dtype):
        pooled = gem_pool(feature_map)
    pooled.sum().backward()
    assert pooled.dtype == torch.float32 and torch.isfinite(feature_map.grad).all()
    assert torch.allclose(pooled, gem_pool(feature_map.detach().float()))


@pytest.mark.parametrize('reduc_ratio, inner', [(None, 1), (2, 8), (16, 1)])
def test_reduc_ratio_sets_the_inner_channels(reduc_ratio, inner):
    block = NonLocal(16, reduc_ratio)
    assert block.theta.out_channels == block.phi.out_channels == block.g[0].out_channels == inner
    assert block.W[0].in_channels == inner and block.W[0].out_channels == 16


@pytest.mark.parametrize('reduc_ratio', [0, 17])
def test_reduc_ratio_out_of_range_is_refused(reduc_ratio):
    with pytest.raises(ValueError, match='reduc_ratio'):
        NonLocal(16, reduc_ratio)


@pytest.mark.parametrize('reduc_ratio', [None, 2])
def test_fresh_non_local_block_is_the_identity(reduc_ratio):
    block = NonLocal(16, reduc_ratio)
    x = torch.randn(2, 16, 5, 3)
    assert torch.allclose(block(x), x)
    assert torch.allclose(block.eval()(x), x)


@pytest.mark.parametrize('reduc_ratio', [None, 2])
def test_non_local_block_mixes_positions_by_scaled_dot_product(reduc_ratio):
    torch.manual_seed(0)
    block = NonLocal(8, reduc_ratio).eval()
    torch.nn.init.normal_(block.W[1].weight)
    torch.nn.init.normal_(block.W[1].bias)
    x = torch.randn(2, 8, 3, 2)

    def conv(layer, inputs):  # a 1x1 convolution written out
        return torch.einsum('oc,bchw->bohw', layer.weight[:, :, 0, 0], inputs) + layer.bias.view(1, -1, 1, 1)

    theta, phi, g = conv(block.theta, x), conv(block.phi, x), conv(block.g[0], x)
    positions = [(i, j) for i in range(3) for j in range(2)]
    context = torch.zeros_like(theta)
    for b in range(2):
        for (i, j) in positions:
            for (k, l) in positions:
                affinity = (theta[b, :, i, j] * phi[b, :, k, l]).sum() / len(positions)
                context[b, :, i, j] += affinity * g[b, :, k, l]
    norm = block.W[1]
    projected = conv(block.W[0], context)
    expected = x + (projected - norm.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        norm.running_var.view(1, -1, 1, 1) + norm.eps) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(block(x), expected, atol=1e-5)


@pytest.mark.parametrize('stream', ['one', 'two'])
def test_optimizer_groups_scale_the_backbone_by_a_tenth(stream):
    model = embed_net(7, arch='resnet18', stream=stream)
    groups = model.optimizer_groups(lr=0.1)
    assert [group['lr_scale'] for group in groups] == [0.1, 1.0]
    ids = [[id(parameter) for parameter in group['params']] for group in groups]
    everything = [id(parameter) for parameter in model.parameters()]
    assert sorted(ids[0] + ids[1]) == sorted(everything)  # each parameter once, shared stem included
    head = [model.bottleneck.weight, model.bottleneck.bias, model.classifier.weight]
    assert set(ids[1]) == {id(parameter) for parameter in head}
    assert {id(parameter) for parameter in model.NL_3.parameters()} <= set(ids[0])
    assert id(model.visible_module.visible.conv1.weight) in ids[0]
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # SGD refuses repeated parameters
    utils.set_lr(optimizer, 0.02)
    assert [group['lr'] for group in optimizer.param_groups] == pytest.approx([0.002, 0.02])


@pytest.mark.parametrize('stream', ['one', 'two'])
def test_mmgl_backbone_fills_every_backbone_tensor(stream):
    assert_mmgl_backbone_fills_every_backbone_tensor(lambda stream: embed_net(10, stream=stream), stream, heads=('NL_', 'bottleneck', 'classifier'))


def whole_resnet_keys(state, arch='resnet18'):
    """What the public AGW-style networks add to a checkpoint: each of their modules wraps a whole
    torchvision ResNet, so the stems also carry layer1..4 and fc, and base_resnet.base a stem and fc."""
    import torchvision
    resnet = torchvision.models.__dict__[arch]().state_dict()
    extra = {}
    for prefix, unused in (('visible_module.visible.', ('layer', 'fc.')), ('thermal_module.thermal.', ('layer', 'fc.')),
                           ('base_resnet.base.', ('conv1.', 'bn1.', 'fc.'))):
        extra.update({prefix + key: value for key, value in resnet.items() if key.startswith(unused)})
    assert not set(extra) & set(state)
    return {**state, **extra}, sorted(extra)


def test_load_backbone_reports_loaded_missing_and_ignored_tensors():
    model = embed_net(10, arch='resnet18', no_local='off', gm_pool='off')
    expected = sorted(key for key in model.state_dict() if key.startswith(('visible_module.', 'thermal_module.',
                                                                            'base_resnet.')))
    pretrained = MMGLNet('resnet18').state_dict()
    report = model.load_backbone(pretrained)
    assert report.loaded == expected and report.missing == [] and report.ignored == []

    # a checkpoint lacking a tensor: the rest loads, the gap is reported and keeps its initialisation
    before = model.state_dict()['base_resnet.base.layer2.0.conv1.weight'].clone()
    del pretrained['base_resnet.base.layer2.0.conv1.weight']
    report = embed_net(10, arch='resnet18', no_local='off', gm_pool='off').load_backbone(pretrained)
    assert report.missing == ['base_resnet.base.layer2.0.conv1.weight']
    assert len(report.loaded) == len(expected) - 1
    model.load_backbone(pretrained)
    assert torch.equal(model.state_dict()['base_resnet.base.layer2.0.conv1.weight'], before)

    # the public whole-ResNet leftovers are counted as ignored, and the backbone still loads
    public, leftovers = whole_resnet_keys(randomised(MMGLNet('resnet18').state_dict()))
    report = model.load_backbone(public)
    assert report.loaded == expected and report.missing == [] and report.ignored == leftovers
    state = model.state_dict()
    assert all(torch.equal(state[key], public[key]) for key in expected)


def test_load_backbone_refuses_other_shapes_and_foreign_state_dicts():
    model = embed_net(10, arch='resnet18', no_local='off', gm_pool='off')
    with pytest.raises(ValueError, match='other shapes'):
        model.load_backbone(MMGLNet('resnet50').state_dict())
    with pytest.raises(ValueError, match='fills none'):
        model.load_backbone({'encoder.weight': torch.zeros(3, 3), 'classifier.weight': torch.zeros(10, 512)})
    with pytest.raises(ValueError, match='fills none'):
        model.load_backbone({})
    # a one-stem network takes a one-stem checkpoint, not two different stems
    one_stream = embed_net(10, arch='resnet18', stream='one')
    one_stream.load_backbone(MMGLNet('resnet18', 'one').state_dict())
    with pytest.raises(ValueError, match='two-stream'):
        one_stream.load_backbone(MMGLNet('resnet18', 'two').state_dict())


def test_switches_must_be_on_or_off():
    with pytest.raises(ValueError, match='no_local'):
        embed_net(10, no_local=True, arch='resnet18')
