"""The two-stream ResNet backbone shared by MMGL, AGW and DDAG, and the MMGL pre-training network.

State-dict keys follow the public AGW/DDAG networks, so weights move between them unchanged:
    visible_module.visible.{conv1,bn1}.*    stem of the visible stream
    thermal_module.thermal.{conv1,bn1}.*    stem of the infrared stream
    base_resnet.base.layer{1,2,3,4}.*       stages shared by both modalities
The public modules wrap a whole torchvision ResNet each and use only these parts of it; only the
parts in use are kept here, under the same names and with the same shapes.
"""
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import utils

ARCHS = ('resnet18', 'resnet50')
BACKBONE_PREFIXES = ('visible_module.', 'thermal_module.', 'base_resnet.')


class BackboneReport(NamedTuple):
    """What TwoStreamBackbone.load_backbone did, as sorted lists of state-dict keys."""
    loaded: list    # copied into the network
    missing: list   # backbone tensors of the network the checkpoint lacks: left as initialised
    ignored: list   # backbone-named tensors of the checkpoint the network does not have


def make_resnet(arch):
    """A randomly initialised torchvision ResNet whose last stage has stride 1 (a 288x144 input
    gives an 18x9 map), as in the public AGW backbone."""
    if arch not in ARCHS:
        raise ValueError(f'arch must be one of {ARCHS}, got {arch!r}')
    resnet = getattr(torchvision.models, arch)(weights=None)
    first_block = resnet.layer4[0]
    # Bottleneck strides in conv2, BasicBlock in conv1; the shortcut strides with them.
    strided_conv = first_block.conv2 if arch == 'resnet50' else first_block.conv1
    strided_conv.stride = (1, 1)
    first_block.downsample[0].stride = (1, 1)
    return resnet


def feature_dim(arch):
    return 2048 if arch == 'resnet50' else 512


class ModalityStem(nn.Module):
    """conv1, bn1, relu, maxpool of a ResNet, held under the attribute `modality`
    ('visible' or 'thermal') as in the public code. x: (B, 3, H, W) -> (B, 64, H/4, W/4)."""

    def __init__(self, modality, arch='resnet50', stem=None):
        super().__init__()
        if stem is None:
            resnet = make_resnet(arch)
            stem = nn.Sequential(OrderedDict(
                conv1=resnet.conv1, bn1=resnet.bn1, relu=resnet.relu, maxpool=resnet.maxpool))
        self.modality = modality
        self.add_module(modality, stem)

    def forward(self, x):
        return getattr(self, self.modality)(x)


class SharedResNet(nn.Module):
    """layer1..layer4 of a ResNet, shared by both modalities.
    (B, 64, H/4, W/4) -> (B, C, H/16, W/16) with C = 2048 for ResNet-50, 512 for ResNet-18."""

    def __init__(self, arch='resnet50'):
        super().__init__()
        resnet = make_resnet(arch)
        self.base = nn.Sequential(OrderedDict(
            layer1=resnet.layer1, layer2=resnet.layer2, layer3=resnet.layer3, layer4=resnet.layer4))

    def forward(self, x):
        return self.base(x)


class TwoStreamBackbone(nn.Module):
    """Modality-specific stems and shared ResNet stages.

    stream='two': separate visible and thermal stems (the AGW design).
    stream='one': one stem for both modalities, registered under both names so the state dict
    carries `visible_module.*` and `thermal_module.*` (the same tensors) and loads anywhere; it runs
    on both batches at once, so its batch norm trains on the statistics it keeps for evaluation.
    Subclasses (the MMGL, AGW and DDAG networks) add their heads next to these modules, which
    keeps every key at the top level as in the public networks.
    """

    def __init__(self, arch='resnet50', stream='two'):
        super().__init__()
        if stream not in ('one', 'two'):
            raise ValueError(f'stream must be "one" or "two", got {stream!r}')
        self.arch, self.stream = arch, stream
        self.visible_module = ModalityStem('visible', arch)
        shared_stem = self.visible_module.visible if stream == 'one' else None
        self.thermal_module = ModalityStem('thermal', arch, stem=shared_stem)
        self.base_resnet = SharedResNet(arch)
        self.pool_dim = feature_dim(arch)

    def stems(self, x_visible, x_thermal, modal=0):
        """modal 0: both batches, visible first, concatenated on dim 0; 1: visible only; 2: thermal only."""
        if modal == 1:
            return self.visible_module(x_visible)
        if modal == 2:
            return self.thermal_module(x_thermal)
        if self.stream == 'one':
            # Run on each modality apart, the stem trained on statistics evaluation never uses: held-out
            # infrared exact 29.9% at 288x144, 99.3% with them re-estimated on infrared
            # (bench/results/gpu_h200_onestream_stem_per_modality).
            return self.visible_module(torch.cat((x_visible, x_thermal), 0))
        return torch.cat((self.visible_module(x_visible), self.thermal_module(x_thermal)), 0)

    def feature_map(self, x_visible, x_thermal, modal=0):
        """(B_v + B_t, C, H/16, W/16) for modal 0, else the map of the one modality."""
        return self.base_resnet(self.stems(x_visible, x_thermal, modal))

    def load_backbone(self, state_dict):
        """Copy the backbone tensors (visible_module.*, thermal_module.*, base_resnet.*) of another
        network's state dict, an MMGL, AGW or DDAG one, into this network; keys outside the backbone
        are heads and are not looked at, and this network's heads keep their initialisation.

        Every backbone tensor whose key this network has is copied. Backbone-named keys this network
        lacks are ignored: the public AGW-style networks wrap a whole ResNet in each module, so their
        checkpoints also hold e.g. visible_module.visible.layer1.*, visible_module.visible.fc.* and
        base_resnet.base.conv1.*, which no forward pass reads.
        Returns a BackboneReport (loaded, missing, ignored: sorted key lists); `missing` are backbone
        tensors of this network the checkpoint does not hold (they keep their initialisation).
        Raises ValueError when a key is found with another shape (another arch) or when nothing of
        this backbone is filled, and when a one-stream network is given two different stems.
        """
        given = {key: value for key, value in state_dict.items()
                 if key.startswith(BACKBONE_PREFIXES) and torch.is_tensor(value)}
        expected = {key: value.shape for key, value in self.state_dict().items() if key.startswith(BACKBONE_PREFIXES)}
        common = sorted(set(given) & set(expected))
        reshaped = [key for key in common if tuple(given[key].shape) != tuple(expected[key])]
        if reshaped:
            key = reshaped[0]
            raise ValueError(f'the checkpoint has other shapes for {len(reshaped)} backbone tensors of a {self.arch} '
                             f'network, e.g. {key}: {tuple(given[key].shape)} instead of {tuple(expected[key])} '
                             f'(was it trained with another arch?)')
        if not common:
            found = ', '.join(list(state_dict)[:3]) or 'nothing'
            raise ValueError(f'the checkpoint fills none of the {len(expected)} backbone tensors of a {self.arch} '
                             f'network (keys such as {next(iter(expected))}); it holds {found}, ...')
        # One shared stem cannot hold two different ones: loading would silently keep the thermal one.
        if self.stream == 'one':
            for key in common:
                twin = 'thermal_module.thermal' + key[len('visible_module.visible'):]
                if key.startswith('visible_module.visible.') and twin in given and not torch.equal(given[key], given[twin]):
                    raise ValueError('the checkpoint has separate visible and thermal stems: '
                                     'load it into a two-stream network')
        self.load_state_dict({key: given[key] for key in common}, strict=False)
        return BackboneReport(loaded=common, missing=sorted(set(expected) - set(given)),
                              ignored=sorted(set(given) - set(expected)))


def bnneck_and_classifier(dim, class_num):
    """The BNNeck (a BatchNorm1d that scales but does not shift) and the bias-free identity
    classifier of AGW and DDAG, initialised as in the public code."""
    bottleneck = nn.BatchNorm1d(dim)
    bottleneck.bias.requires_grad_(False)
    nn.init.normal_(bottleneck.weight, 1.0, 0.01)
    nn.init.zeros_(bottleneck.bias)
    classifier = nn.Linear(dim, class_num, bias=False)
    nn.init.normal_(classifier.weight, 0.0, 0.001)
    return bottleneck, classifier


def sinkhorn(logits, num_iter=20, tau=1.0):
    """Doubly-stochastic matrices from scores, by alternate row and column normalisation in log space.
    logits: (B, S, S) -> (B, S, S), rows and columns each summing to 1.

    Each normalisation x - logsumexp(x) is log_softmax, one kernel forward and one backward; written as
    a logsumexp (nine kernels) and a subtraction, the 20 iterations made the MMGL training step run
    1,308 kernels instead of 748 (bench/step_ops.py), each a launch the host pays for on a GPU."""
    log_alpha = logits / tau
    for _ in range(num_iter):
        log_alpha = F.log_softmax(F.log_softmax(log_alpha, dim=2), dim=1)
    return log_alpha.exp()


PERM_INPUTS = ('gap', 'parts')


class MMGLNet(TwoStreamBackbone):
    """MMGL pre-training network: the backbone, a permutation head and part projections.

    One forward pass over stripe-shuffled images gives both what the permutation-recovery loss
    needs (`permutations`, doubly-stochastic (B, S, S)) and what the part-aware cycle-contrastive
    loss needs (`embeddings`, L2-normalised (B, P, 256) with P = S parts with `part`, else 1).

    perm_input: what the permutation head reads. 'gap' (the paper's figure): the global average of
    the last map, (B, C), which keeps no trace of where a stripe lies but what the zero padding
    leaves; 'parts': the map average-pooled into S horizontal parts and concatenated in stripe
    order, (B, S * C), so the head sees which content sits at which height.
    perm_bn: a BatchNorm1d on the head's input (scales the random-init features for the head).
    """

    def __init__(self, arch='resnet50', stream='two', num_stripe=6, part=True, embed_dim=256,
                 sinkhorn_iter=20, sinkhorn_tau=1.0, perm_input='gap', perm_bn=False):
        super().__init__(arch, stream)
        if perm_input not in PERM_INPUTS:
            raise ValueError(f'perm_input must be one of {PERM_INPUTS}, got {perm_input!r}')
        self.num_stripe, self.part, self.perm_input = num_stripe, part, perm_input
        self.sinkhorn_iter, self.sinkhorn_tau = sinkhorn_iter, sinkhorn_tau
        # Permutation head: names as in the public MMGL checkpoints (dropped before fine-tuning).
        head_input = self.pool_dim * (num_stripe if perm_input == 'parts' else 1)
        self.perm_bn = nn.BatchNorm1d(head_input) if perm_bn else None
        self.fc1 = nn.Linear(head_input, 1024)
        self.fc2 = nn.Linear(1024, num_stripe * num_stripe)
        num_parts = num_stripe if part else 1
        self.local_conv_list = nn.ModuleList(
            nn.Sequential(nn.Conv2d(self.pool_dim, embed_dim, kernel_size=1),
                          nn.BatchNorm2d(embed_dim), nn.ReLU(inplace=True))
            for _ in range(num_parts))

    def permutation_head(self, feature_map):
        """(B, C, h, w) -> doubly-stochastic (B, S, S) estimate of each image's stripe permutation."""
        if self.perm_input == 'parts':
            head_input = F.adaptive_avg_pool2d(feature_map, (self.num_stripe, 1)).flatten(1)
        else:
            head_input = feature_map.mean(dim=(2, 3))
        if self.perm_bn is not None:
            head_input = self.perm_bn(head_input)
        scores = self.fc2(F.relu(self.fc1(head_input)))
        scores = scores.view(-1, self.num_stripe, self.num_stripe)
        with utils.full_precision(scores.device):
            return sinkhorn(scores.float(), self.sinkhorn_iter, self.sinkhorn_tau)

    def part_embeddings(self, feature_map):
        """(B, C, h, w) -> L2-normalised float32 (B, P, D): each horizontal part pooled and projected by its
        own conv."""
        parts = F.adaptive_avg_pool2d(feature_map, (len(self.local_conv_list), 1))
        embeddings = torch.stack([conv(parts[:, :, i:i + 1]).flatten(1)
                                  for i, conv in enumerate(self.local_conv_list)], dim=1)
        # In float32, as GPU autocast runs the norm: in float16 on a CPU, F.normalize's eps underflows and
        # an all-zero part (ReLU can give one) would come out NaN.
        with utils.full_precision(embeddings.device):
            return F.normalize(embeddings.float(), dim=2)

    def forward(self, x_visible, x_thermal, embedding_grad_scale=1.0):
        """x_visible: (B_v, 3, H, W), x_thermal: (B_t, 3, H, W), stripe-shuffled.
        Returns {'permutations': (B_v + B_t, S, S), 'embeddings': (B_v + B_t, P, D)}, visible first.
        embedding_grad_scale: the share of the embeddings' gradient that reaches the backbone (0: it
        trains the projections only; the forward values are the same whatever the scale)."""
        feature_map = self.feature_map(x_visible, x_thermal)
        return {'permutations': self.permutation_head(feature_map),
                'embeddings': self.part_embeddings(scale_gradient(feature_map, embedding_grad_scale))}


def scale_gradient(tensor, scale):
    """The tensor itself, whose gradient is multiplied by `scale` on the way back (0: detached)."""
    if scale == 1:
        return tensor
    if scale == 0:
        return tensor.detach()
    return tensor * scale + tensor.detach() * (1 - scale)


def mmgl_config(state_dict):
    """The MMGLNet arguments that built `state_dict`: arch, num_stripe, part, perm_input, perm_bn
    (ValueError if it is no MMGL pre-training state dict). A one-stream checkpoint holds both stems,
    so it loads as two."""
    required = ('visible_module.visible.conv1.weight', 'thermal_module.thermal.conv1.weight',
                'base_resnet.base.layer4.0.conv1.weight', 'fc1.weight', 'fc2.weight', 'local_conv_list.0.0.weight')
    missing = [key for key in required if key not in state_dict]
    if missing:
        found = ', '.join(list(state_dict)[:3]) or 'nothing'
        raise ValueError(f'expected an MMGL pre-training state dict with keys such as {", ".join(missing)}; '
                         f'found {found}, ...')
    num_stripe = round(state_dict['fc2.weight'].shape[0] ** 0.5)
    num_parts = len({key.split('.')[1] for key in state_dict if key.startswith('local_conv_list.')})
    arch = 'resnet50' if 'base_resnet.base.layer1.0.conv3.weight' in state_dict else 'resnet18'
    head_input = state_dict['fc1.weight'].shape[1]
    return {'arch': arch, 'num_stripe': num_stripe, 'part': num_parts > 1,
            'perm_input': 'parts' if head_input == feature_dim(arch) * num_stripe else 'gap',
            'perm_bn': 'perm_bn.weight' in state_dict}


def backbone_state_dict(state_dict):
    """The backbone tensors of a state dict: what the AGW/DDAG fine-tuning scripts load."""
    heads = ('fc1.', 'fc2.', 'perm_bn.', 'local_conv_list')
    return {key: value for key, value in state_dict.items() if not key.startswith(heads)}


def checkpoint_arch(state_dict):
    """'resnet50' or 'resnet18': the backbone of a state dict with base_resnet.* keys (None without them).
    Only ResNet-50's bottleneck blocks have a conv3."""
    keys = [key for key in state_dict if key.startswith('base_resnet.base.layer')]
    if not keys:
        return None
    return 'resnet50' if any('.conv3.' in key for key in keys) else 'resnet18'
