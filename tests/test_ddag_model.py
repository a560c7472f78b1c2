"""The DDAG network: public state-dict layout, graph attention, weighted-part attention, the batch
graph, forward outputs, optimiser groups and loading of MMGL pre-trained backbones."""
import math

import pytest
import torch
import torch.nn.functional as F

import utils
from DDAG.ddag_model import GraphAttentionLayer, WeightedPartAttention, embed_net, identity_adjacency
from tests.helpers import BN_KEYS, assert_mmgl_backbone_fills_every_backbone_tensor, public_agw_backbone_keys


def batch_norm_shapes(prefix, channels):
    shapes = {f'{prefix}.{name}': (channels,) for name in BN_KEYS if name != 'num_batches_tracked'}
    shapes[f'{prefix}.num_batches_tracked'] = ()
    return shapes


def public_ddag_shapes(low_dim, class_num, part, nheads, wpa, pool_dim=2048):
    """Shapes of the public DDAG tensors outside the backbone that its forward uses, written out
    from its module names (attention.py IWPA, GraphAttentionLayer; model_main.py embed_net)."""
    shapes = batch_norm_shapes('bottleneck', pool_dim)
    shapes['classifier.weight'] = (class_num, pool_dim)
    if wpa:
        for conv in ('wpa.fc1.0', 'wpa.fc2', 'wpa.fc3'):
            shapes[f'{conv}.weight'] = (pool_dim, pool_dim, 1, 1)
            shapes[f'{conv}.bias'] = (pool_dim,)
        shapes.update(batch_norm_shapes('wpa.bottleneck', pool_dim))
        shapes['wpa.gate'] = (part,)
    for head in range(nheads):
        shapes[f'attention_{head}.W'] = (pool_dim, low_dim)
        shapes[f'attention_{head}.a'] = (2 * low_dim, 1)
    shapes['out_att.W'] = (nheads * low_dim, class_num)
    shapes['out_att.a'] = (2 * class_num, 1)
    return shapes


def public_unused_shapes(class_num, pool_dim):
    """Tensors the public network creates but its forward never reads (kept out of this one)."""
    shapes = {'classifier1.weight': (class_num, pool_dim), 'classifier2.weight': (class_num, pool_dim),
              'wpa.W.0.weight': (pool_dim, pool_dim, 1, 1), 'wpa.W.0.bias': (pool_dim,)}
    shapes.update(batch_norm_shapes('wpa.W.1', pool_dim))
    return shapes


@pytest.mark.parametrize('wpa, stream', [(True, 'two'), (False, 'two'), (True, 'one')])
def test_state_dict_is_the_public_ddag_layout(wpa, stream):
    state = embed_net(512, 395, part=3, nheads=4, wpa=wpa, stream=stream).state_dict()
    heads = public_ddag_shapes(512, 395, part=3, nheads=4, wpa=wpa)
    assert set(state) == public_agw_backbone_keys() | set(heads)
    assert {key: tuple(state[key].shape) for key in heads} == heads
    assert state['attention_3.W'].shape == (2048, 512) and state['out_att.W'].shape == (2048, 395)


def test_public_checkpoint_loads_with_only_its_unused_tensors_left_over():
    model = embed_net(16, 7, nheads=2, arch='resnet18', wpa=True)
    public = {key: value.clone() for key, value in model.state_dict().items()}
    public.update({key: torch.zeros(shape) for key, shape in public_unused_shapes(7, 512).items()})
    missing, unexpected = embed_net(16, 7, nheads=2, arch='resnet18', wpa=True).load_state_dict(public, strict=False)
    assert missing == [] and set(unexpected) == set(public_unused_shapes(7, 512))


def test_heads_start_as_in_the_public_code():
    model = embed_net(64, 300, part=4, arch='resnet18', wpa=True)
    for bottleneck in (model.bottleneck, model.wpa.bottleneck):
        assert bottleneck.bias.requires_grad is False and (bottleneck.bias == 0).all()
        assert bottleneck.weight.mean().item() == pytest.approx(1.0, abs=0.003)
        assert bottleneck.weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert model.classifier.bias is None
    assert model.classifier.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert torch.equal(model.wpa.gate.detach(), torch.full((4,), 0.25))
    # xavier uniform with gain 1.414: bound gain * sqrt(6 / (fan_in + fan_out))
    W = model.attention_0.W
    bound = 1.414 * math.sqrt(6 / sum(W.shape))
    assert W.abs().max().item() <= bound and W.abs().max().item() > 0.9 * bound


def naive_graph_attention(layer, x, adjacency, alpha=0.2):
    """The GAT layer as written in the paper: every pair's [h_i, h_j] (an N x N x 2F tensor) scored
    by a, then each node's scores normalised over its neighbours one node at a time."""
    h = x @ layer.W
    n, f = h.shape
    pairs = torch.cat([h[:, None, :].expand(n, n, f), h[None, :, :].expand(n, n, f)], dim=2)
    scores = F.leaky_relu(pairs @ layer.a[:, 0], alpha)
    out = torch.zeros_like(h)
    for i in range(n):
        neighbours = [j for j in range(n) if adjacency[i, j] > 0]
        weights = torch.exp(scores[i, neighbours] - scores[i, neighbours].max())
        out[i] = (weights / weights.sum()) @ h[neighbours]
    return F.elu(out) if layer.concat else out


@pytest.mark.parametrize('concat', [True, False])
@pytest.mark.parametrize('masked', [False, True])
def test_graph_attention_layer_equals_the_pairwise_concatenation(concat, masked):
    torch.manual_seed(0)
    layer = GraphAttentionLayer(5, 3, dropout=0.5, alpha=0.2, concat=concat).double().eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    adjacency = torch.ones(6, 6, dtype=torch.float64)
    if masked:
        adjacency = (torch.rand(6, 6) < 0.4).double().fill_diagonal_(1.0)
        assert (adjacency == 0).any()
    with torch.no_grad():
        assert torch.allclose(layer(x, adjacency), naive_graph_attention(layer, x, adjacency), atol=1e-12)


def test_graph_attention_layer_ignores_non_neighbours():
    layer = GraphAttentionLayer(4, 2, dropout=0.0).eval()
    adjacency = identity_adjacency(torch.tensor([0, 0, 1, 1]))
    x = torch.randn(4, 4)
    changed = x.clone()
    changed[2:] = torch.randn(2, 4)  # identity 1 only
    with torch.no_grad():
        assert torch.allclose(layer(x, adjacency)[:2], layer(changed, adjacency)[:2])
        assert not torch.allclose(layer(x, adjacency)[2:], layer(changed, adjacency)[2:])


def test_identity_adjacency_normalises_rows_of_same_identity_plus_self_loops():
    adjacency = identity_adjacency(torch.tensor([3, 5, 3, 7]))
    # [y_i == y_j] + I: diagonal 2, 1 between the two images of identity 3; rows over their L2 norms
    r5 = math.sqrt(5)
    expected = torch.tensor([[2 / r5, 0, 1 / r5, 0],
                             [0, 1, 0, 0],
                             [1 / r5, 0, 2 / r5, 0],
                             [0, 0, 0, 1]])
    assert torch.allclose(adjacency, expected)


def test_graph_attention_gives_log_probabilities_from_the_heads_and_output_layer():
    torch.manual_seed(0)
    model = embed_net(8, 5, nheads=3, arch='resnet18').eval()
    pooled = torch.rand(6, 512)
    adjacency = identity_adjacency(torch.tensor([0, 1, 2, 0, 1, 2]))
    with torch.no_grad():
        log_probs = model.graph_attention(pooled, adjacency)
        hidden = torch.cat([getattr(model, f'attention_{i}')(pooled, adjacency) for i in range(3)], dim=1)
        expected = F.log_softmax(F.elu(model.out_att(hidden, adjacency)), dim=1)
    assert log_probs.shape == (6, 5)
    assert torch.allclose(log_probs, expected)
    assert torch.allclose(log_probs.exp().sum(dim=1), torch.ones(6))
    assert len(model.attention_heads) == 3 and hidden.shape == (6, 24)


def test_weighted_part_attention_shapes_weights_and_gradients():
    torch.manual_seed(0)
    attention = WeightedPartAttention(16, part=3)
    with torch.no_grad():
        attention.gate.copy_(torch.tensor([0.3, -1.0, 2.0]))
    weights = attention.part_weights()
    assert weights.shape == (3,) and (weights > 0).all()
    assert weights.sum().item() == pytest.approx(1.0)
    feature_map = torch.rand(4, 16, 6, 3, requires_grad=True)
    feat = torch.randn(4, 16, requires_grad=True)
    out = attention(feature_map, feat)
    assert out.shape == (4, 16)
    out.pow(2).sum().backward()
    for tensor in (feature_map, feat, attention.gate, attention.fc1[0].weight, attention.fc2.weight,
                   attention.fc3.weight, attention.bottleneck.weight):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    assert attention.bottleneck.bias.grad is None


def test_weighted_part_attention_follows_the_public_computation_per_image():
    torch.manual_seed(0)
    attention = WeightedPartAttention(8, part=3).double().eval()
    with torch.no_grad():
        attention.gate.copy_(torch.tensor([0.5, 0.1, -0.2]))
        attention.bottleneck.running_mean.uniform_()
    feature_map = torch.rand(2, 8, 6, 2, dtype=torch.float64)
    feat = torch.randn(2, 8, dtype=torch.float64)

    def conv(layer, vector):  # a 1x1 convolution on one (C,) stripe
        return layer.weight[:, :, 0, 0] @ vector + layer.bias

    gate = torch.exp(attention.gate) / torch.exp(attention.gate).sum()
    norm = attention.bottleneck
    expected = torch.zeros(2, 8, dtype=torch.float64)
    for b in range(2):
        stripes = [feature_map[b, :, 2 * p:2 * p + 2].mean(dim=(1, 2)) for p in range(3)]  # 6 rows, 3 stripes
        queries = [conv(attention.fc1[0], s) for s in stripes]
        keys = [conv(attention.fc2, s) for s in stripes]
        values = [conv(attention.fc3, s) for s in stripes]
        weighted = torch.zeros(8, dtype=torch.float64)
        for p in range(3):
            affinity = torch.softmax(torch.stack([queries[p] @ k for k in keys]), dim=0)
            weighted += gate[p] * sum(affinity[q] * values[q] for q in range(3))
        residual = weighted + feat[b]
        expected[b] = (residual - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
    with torch.no_grad():
        assert torch.allclose(attention(feature_map, feat), expected, atol=1e-10)


@pytest.mark.parametrize('wpa', [True, False])
def test_training_outputs_follow_the_public_order(wpa):
    torch.manual_seed(0)
    model = embed_net(16, 7, nheads=2, arch='resnet18', wpa=wpa)
    visible, thermal = torch.randn(3, 3, 64, 32), torch.randn(3, 3, 64, 32)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    pooled, logits, attention_logits, graph = model(visible, thermal, adjacency=identity_adjacency(labels))
    assert pooled.shape == (6, 512) and logits.shape == (6, 7) and graph.shape == (6, 7)
    assert torch.allclose(graph.exp().sum(dim=1), torch.ones(6))
    assert (attention_logits is None) == (not wpa)
    loss = F.cross_entropy(logits, labels) + F.nll_loss(graph, labels)
    if wpa:
        assert attention_logits.shape == (6, 7)
        loss = loss + F.cross_entropy(attention_logits, labels)
    loss.backward()
    reached = [model.attention_0.W, model.out_att.a, model.classifier.weight, model.visible_module.visible.conv1.weight]
    if wpa:
        reached += [model.wpa.gate, model.wpa.fc1[0].weight]
    for parameter in reached:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    # without a batch graph the graph branch is skipped
    assert model(visible, thermal)[3] is None


@pytest.mark.parametrize('wpa', [True, False])
def test_eval_outputs_are_normalised_bnneck_and_attention_features(wpa):
    model = embed_net(16, 7, nheads=2, arch='resnet18', wpa=wpa).eval()
    visible, thermal = torch.randn(3, 3, 64, 32), torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        for modal, batch in ((0, 5), (1, 3), (2, 2)):
            feat, feat_att = model(visible, thermal, modal=modal)
            assert feat.shape == feat_att.shape == (batch, 512)
            assert torch.allclose(feat.norm(dim=1), torch.ones(batch), atol=1e-5)
            assert torch.allclose(feat_att.norm(dim=1), torch.ones(batch), atol=1e-5)
        feature_map = model.feature_map(visible, thermal)
        bnneck = model.bottleneck(feature_map.mean(dim=(2, 3)))
        feat, feat_att = model(visible, thermal)
        assert torch.allclose(feat, F.normalize(bnneck), atol=1e-6)
        expected_att = model.wpa(feature_map, bnneck) if wpa else bnneck
        assert torch.allclose(feat_att, F.normalize(expected_att), atol=1e-6)


@pytest.mark.parametrize('wpa, stream', [(True, 'two'), (False, 'one')])
def test_optimizer_groups_scale_only_the_backbone(wpa, stream):
    model = embed_net(16, 7, nheads=2, arch='resnet18', wpa=wpa, stream=stream)
    groups = model.optimizer_groups(lr=0.1)
    assert [group['lr_scale'] for group in groups] == [0.1, 1.0, 1.0]
    ids = [{id(parameter) for parameter in group['params']} for group in groups]
    everything = [id(parameter) for parameter in model.parameters()]
    assert sorted(sum((sorted(group) for group in ids), [])) == sorted(everything)  # each parameter once
    assert ids[1] == {id(model.bottleneck.weight), id(model.bottleneck.bias), id(model.classifier.weight)}
    attention = [model.attention_0.W, model.attention_1.a, model.out_att.W, model.out_att.a]
    if wpa:
        attention += list(model.wpa.parameters())
    assert {id(parameter) for parameter in attention} <= ids[2]
    assert id(model.base_resnet.base.layer4[0].conv1.weight) in ids[0]
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # SGD refuses repeated parameters
    utils.set_lr(optimizer, 0.02)
    assert [group['lr'] for group in optimizer.param_groups] == pytest.approx([0.002, 0.02, 0.02])


@pytest.mark.parametrize('stream', ['one', 'two'])
def test_mmgl_backbone_fills_every_backbone_tensor(stream):
    assert_mmgl_backbone_fills_every_backbone_tensor(lambda stream: embed_net(32, 10, wpa=True, stream=stream), stream,
                                                     heads=('bottleneck', 'classifier', 'wpa', 'attention_', 'out_att'))
