"""The AGW fine-tuning network: the shared two-stream backbone with non-local attention blocks,
generalised-mean pooling and a BNNeck identity classifier (Ye et al., TPAMI 2021).

The state dict has the keys and shapes of the public AGW `embed_net`, all at the top level:
    visible_module.*, thermal_module.*, base_resnet.*   the backbone (see model.py)
    NL_1 .. NL_4                                       non-local blocks of stages 1..4 (ModuleLists), each
                                                       with the public single inner channel (see NonLocal)
    bottleneck.*                                       BNNeck: BatchNorm1d(pool_dim) without shift
    classifier.weight                                  (class_num, pool_dim), no bias
so public AGW checkpoints load here and these load in the public code.

    --method base   embed_net(n, no_local='off', gm_pool='off')   average pooling, no attention
    --method agw    embed_net(n)                                   non-local blocks + GeM pooling
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils
from model import TwoStreamBackbone, bnneck_and_classifier

# The two eval-mode outputs of embed_net, in order: pooled feature, BNNeck feature.
FEATURES = ('pool', 'fc')

# Non-local blocks per stage with no_local='on', placed after the last that many blocks of the
# stage: for ResNet-50 (3, 4, 6, 3 blocks) after blocks 2, 3 of layer2 and 3, 4, 5 of layer3.
# ResNet-18 stages have 2 blocks, so layer3 gets one after each.
NON_LOCAL_PER_STAGE = (0, 2, 3, 0)


class NonLocal(nn.Module):
    """Non-local block with dot-product affinity scaled by 1/N (no softmax), added as a residual.

    x: (B, C, H, W) -> (B, C, H, W). theta, phi and g are 1x1 convolutions from C to
    C // reduc_ratio inner channels; W maps them back to C and ends in a batch norm that starts at
    weight 0 and bias 0, so a fresh block is the identity and leaves the pre-trained backbone undisturbed.

    reduc_ratio defaults to C, i.e. ONE inner channel: the public AGW block sets its inner width to
    `reduc_ratio // reduc_ratio`, which is 1 whatever the ratio, and the published AGW and AGW+MMGL
    results and checkpoints come from that block. reduc_ratio=2 gives the C/2 inner channels of the
    non-local paper (and of AGW networks built by this repository before it matched the public
    block); their tensors have other shapes than the public ones.
    """

    def __init__(self, in_channels, reduc_ratio=None):
        super().__init__()
        reduc_ratio = in_channels if reduc_ratio is None else reduc_ratio
        if not 1 <= reduc_ratio <= in_channels:
            raise ValueError(f'reduc_ratio must be in 1..{in_channels}, got {reduc_ratio}')
        self.inter_channels = in_channels // reduc_ratio
        self.g = nn.Sequential(nn.Conv2d(in_channels, self.inter_channels, kernel_size=1))
        self.W = nn.Sequential(nn.Conv2d(self.inter_channels, in_channels, kernel_size=1),
                               nn.BatchNorm2d(in_channels))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)
        self.theta = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)
        self.phi = nn.Conv2d(in_channels, self.inter_channels, kernel_size=1)

    def forward(self, x):
        batch, _, height, width = x.shape
        queries = self.theta(x).flatten(2).transpose(1, 2)    # (B, N, inner), N = H * W
        keys = self.phi(x).flatten(2)                         # (B, inner, N)
        values = self.g(x).flatten(2).transpose(1, 2)         # (B, N, inner)
        affinity = queries @ keys / (height * width)          # (B, N, N)
        context = (affinity @ values).transpose(1, 2).reshape(batch, self.inter_channels, height, width)
        return x + self.W(context)


def gem_pool(feature_map, p=3.0):
    """Generalised-mean pooling: (B, C, H, W) -> (B, C), the p-th root of the mean of x^p over
    positions, in float32 at least. The inputs are post-ReLU, so non-negative; 1e-12 keeps the root's
    gradient finite at a channel that is zero everywhere, which it does not in float16 (--amp fp16
    where autocast leaves pow in float16, as on CPUs): there it rounds to 0 and the gradient is NaN."""
    feature_map = feature_map.to(torch.promote_types(feature_map.dtype, torch.float32))
    return (feature_map.flatten(2).pow(p).mean(dim=2) + 1e-12).pow(1.0 / p)


class embed_net(TwoStreamBackbone):
    """AGW network (the public class name and signature).

    class_num: identities of the training set; no_local, gm_pool: 'on' or 'off';
    arch: 'resnet50' (the public network) or 'resnet18'; stream: 'two' (public) or 'one' for
    backbones pre-trained by MMGL with one shared stem.
    """

    def __init__(self, class_num, no_local='on', gm_pool='on', arch='resnet50', stream='two'):
        super().__init__(arch, stream)
        for name, value in (('no_local', no_local), ('gm_pool', gm_pool)):
            if value not in ('on', 'off'):
                raise ValueError(f'{name} must be "on" or "off", got {value!r}')
        self.gem = gm_pool == 'on'
        counts = NON_LOCAL_PER_STAGE if no_local == 'on' else (0, 0, 0, 0)
        # Stage k outputs pool_dim / 2^(4-k) channels: 256, 512, 1024, 2048 for ResNet-50.
        channels = [self.pool_dim >> shift for shift in (3, 2, 1, 0)]
        self.NL_1, self.NL_2, self.NL_3, self.NL_4 = (
            nn.ModuleList(NonLocal(width) for _ in range(min(count, len(stage))))
            for width, count, stage in zip(channels, counts, self.base_resnet.base))

        self.bottleneck, self.classifier = bnneck_and_classifier(self.pool_dim, class_num)

    def stages_with_non_local(self):
        """(stage, its non-local blocks) for layer1..layer4; block j of k follows stage block len(stage) - k + j."""
        return zip(self.base_resnet.base, (self.NL_1, self.NL_2, self.NL_3, self.NL_4))

    def forward(self, x_visible, x_thermal, modal=0):
        """x_visible, x_thermal: (B_v, 3, H, W), (B_t, 3, H, W); modal as in `stems`.

        Training: (pooled (B, pool_dim) for the triplet loss, identity logits (B, class_num)).
        Eval: (L2-normalised pooled, L2-normalised BNNeck feature), both (B, pool_dim).
        B = B_v + B_t for modal 0 (visible first), else the batch of the one modality.
        """
        x = self.stems(x_visible, x_thermal, modal)
        for stage, non_locals in self.stages_with_non_local():
            first_with_non_local = len(stage) - len(non_locals)
            for index, block in enumerate(stage):
                x = block(x)
                if index >= first_with_non_local:
                    x = non_locals[index - first_with_non_local](x)
        pooled = gem_pool(x) if self.gem else x.mean(dim=(2, 3))
        feat = self.bottleneck(pooled)
        if self.training:
            return pooled, self.classifier(feat)
        return F.normalize(pooled, dim=1), F.normalize(feat, dim=1)

    def optimizer_groups(self, lr):
        """Parameter groups as AGW trains them: the backbone and non-local blocks at 0.1 x lr, the
        BNNeck and classifier at lr. Each group carries its 'lr_scale' for utils.set_lr.
        A one-stem backbone's shared stem appears once (parameters() skips repeats)."""
        head = list(self.bottleneck.parameters()) + list(self.classifier.parameters())
        head_ids = {id(parameter) for parameter in head}
        backbone = [parameter for parameter in self.parameters() if id(parameter) not in head_ids]
        return [{'params': backbone, 'lr': 0.1 * lr, 'lr_scale': 0.1},
                {'params': head, 'lr': lr, 'lr_scale': 1.0}]


def build_net(class_num, method, arch, stream='two'):
    """The network of --method agw (non-local blocks, GeM pooling) or base (neither)."""
    switch = 'on' if method == 'agw' else 'off'
    return embed_net(class_num, no_local=switch, gm_pool=switch, arch=arch, stream=stream)


def run_name(args, trial=None):
    """The public name of an AGW run, <dataset>_<method>_p<num_pos>_n<batch-size>_lr_<lr>_seed_<seed>
    and the suffixes of utils.finetune_run_name, e.g. sysu_agw_p4_n8_lr_0.1_seed_0."""
    return utils.finetune_run_name(
        args, f'{args.method}_p{args.num_pos}_n{args.batch_size}_lr_{args.lr}_seed_{args.seed}', trial)
