"""The DDAG fine-tuning network: the shared two-stream backbone with a BNNeck identity classifier,
intra-modality weighted-part attention (IWPA) and cross-modality graph attention over the batch
(Ye et al., "Dynamic Dual-Attentive Aggregation Learning for Visible-Infrared Person
Re-Identification", ECCV 2020).

The state dict has the keys and shapes of the public DDAG `embed_net`, all at the top level:
    visible_module.*, thermal_module.*, base_resnet.*   the backbone (see model.py)
    bottleneck.*                                       BNNeck: BatchNorm1d(pool_dim) without shift
    classifier.weight                                  (class_num, pool_dim), no bias
    wpa.fc1.0.*, wpa.fc2.*, wpa.fc3.*                  IWPA 1x1 convolutions (pool_dim -> pool_dim)
    wpa.bottleneck.*, wpa.gate                         IWPA batch norm and part weights (part,)
    attention_0 .. attention_{nheads-1}.{W, a}         graph attention heads, W (pool_dim, low_dim)
    out_att.{W, a}                                     graph attention output layer, W (nheads * low_dim, class_num)
The public network builds the graph attention inside `embed_net` (train_ddag.py only feeds it the
batch adjacency), so it lives here too. The public network also creates tensors its forward never
reads: `classifier1`, `classifier2` and the IWPA's `wpa.W.*`, and the IWPA even with wpa off.
Only what the forward uses is kept, so a public checkpoint loads with strict=False and exactly
those keys unexpected (with wpa on).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils
from model import TwoStreamBackbone, bnneck_and_classifier

# The two eval-mode outputs of embed_net, in order: BNNeck feature, part-attention feature.
FEATURES = ('fc', 'att')


def identity_adjacency(labels):
    """The batch graph of the public train script (Eq. 6): A = [y_i == y_j] + I, so the diagonal is 2,
    each row divided by its L2 norm. labels: (N,) -> (N, N) float on the labels' device.
    The graph attention layers use only where it is non-zero."""
    same_identity = (labels[:, None] == labels[None, :]).float()
    adjacency = same_identity + torch.eye(len(labels), device=labels.device)
    return adjacency / adjacency.norm(dim=1, keepdim=True)


class GraphAttentionLayer(nn.Module):
    """One graph attention head (Velickovic et al., ICLR 2018), parameters as in the public layer:
    W (in_features, out_features) and a (2 * out_features, 1).

    x: (N, in_features), adjacency: (N, N) -> (N, out_features). Node i aggregates the h_j = x_j W of
    its neighbours (adjacency > 0) weighted by softmax_j LeakyReLU(a . [h_i, h_j]); ELU follows when
    `concat` (hidden heads), not on the output layer.
    """

    def __init__(self, in_features, out_features, dropout, alpha=0.2, concat=True):
        super().__init__()
        self.dropout, self.concat = dropout, concat
        self.W = nn.Parameter(torch.empty(in_features, out_features))
        self.a = nn.Parameter(torch.empty(2 * out_features, 1))
        nn.init.xavier_uniform_(self.W, gain=1.414)
        nn.init.xavier_uniform_(self.a, gain=1.414)
        self.leaky_relu = nn.LeakyReLU(alpha)

    def forward(self, x, adjacency):
        h = x @ self.W                                              # (N, F)
        # a . [h_i, h_j] = a_1 . h_i + a_2 . h_j: two (N,) projections instead of the (N, N, 2F) pairs.
        source, target = (h @ self.a.view(2, -1).t()).unbind(dim=1)  # (N,), (N,)
        scores = self.leaky_relu(source[:, None] + target[None, :])  # (N, N)
        # Non-edges get the lowest finite score (the public -9e15, which half precision cannot hold):
        # zero weight, yet a node without neighbours still gets finite, uniform weights.
        attention = F.softmax(scores.masked_fill(adjacency <= 0, torch.finfo(scores.dtype).min), dim=1)
        attention = F.dropout(attention, self.dropout, training=self.training)
        aggregated = attention @ h
        return F.elu(aggregated) if self.concat else aggregated


class WeightedPartAttention(nn.Module):
    """Intra-modality weighted-part attention (IWPA; `wpa` in the public network).

    The feature map is pooled into `part` horizontal stripes; each stripe gathers context from all
    stripes of its image by dot-product attention through 1x1 convolutions (fc1 queries, fc2 keys,
    fc3 values), the refined stripes are averaged with learnable softmax weights (`gate`), added to
    the image's global BNNeck feature as a residual and batch-normalised (shift frozen).
    feature_map: (B, C, h, w), feat: (B, C) -> (B, C).
    """

    def __init__(self, channels, part=3):
        super().__init__()
        self.part = part
        self.fc1 = nn.Sequential(nn.Conv2d(channels, channels, kernel_size=1))  # a Sequential in the public keys
        self.fc2 = nn.Conv2d(channels, channels, kernel_size=1)
        self.fc3 = nn.Conv2d(channels, channels, kernel_size=1)
        self.bottleneck = nn.BatchNorm1d(channels)
        self.bottleneck.bias.requires_grad_(False)
        nn.init.normal_(self.bottleneck.weight, 1.0, 0.01)
        nn.init.zeros_(self.bottleneck.bias)
        self.gate = nn.Parameter(torch.full((part,), 1.0 / part))  # equal part weights to start

    def part_weights(self):
        """(part,) non-negative weights summing to 1."""
        return F.softmax(self.gate, dim=0)

    def forward(self, feature_map, feat):
        parts = F.adaptive_avg_pool2d(feature_map, (self.part, 1))  # (B, C, P, 1)
        queries = self.fc1(parts).flatten(2).transpose(1, 2)       # (B, P, C)
        keys = self.fc2(parts).flatten(2)                          # (B, C, P)
        values = self.fc3(parts).flatten(2).transpose(1, 2)        # (B, P, C)
        cross_part = F.softmax(queries @ keys, dim=2)              # (B, P, P), unscaled as in the public code
        refined = cross_part @ values                              # (B, P, C)
        weighted = torch.einsum('p,bpc->bc', self.part_weights(), refined)
        return self.bottleneck(weighted + feat)


class embed_net(TwoStreamBackbone):
    """DDAG network (the public class name and signature).

    low_dim: width of each graph attention head; class_num: identities of the training set;
    drop: dropout of the graph attention (inputs, between layers, attention weights); part: IWPA
    stripes; alpha: LeakyReLU slope of the graph attention; nheads: graph attention heads;
    arch: 'resnet50' (the public network) or 'resnet18'; wpa: add the IWPA branch;
    stream: 'two' (public) or 'one' for backbones pre-trained by MMGL with one shared stem.
    """

    def __init__(self, low_dim, class_num, drop=0.2, part=3, alpha=0.2, nheads=4, arch='resnet50',
                 wpa=False, stream='two'):
        super().__init__(arch, stream)
        self.dropout = drop
        self.bottleneck, self.classifier = bnneck_and_classifier(self.pool_dim, class_num)
        self.wpa = WeightedPartAttention(self.pool_dim, part) if wpa else None

        self.nheads = nheads
        for index in range(nheads):
            self.add_module(f'attention_{index}',
                            GraphAttentionLayer(self.pool_dim, low_dim, drop, alpha, concat=True))
        self.out_att = GraphAttentionLayer(nheads * low_dim, class_num, drop, alpha, concat=False)

    @property
    def attention_heads(self):
        return [getattr(self, f'attention_{index}') for index in range(self.nheads)]

    def graph_attention(self, pooled, adjacency):
        """Cross-modality graph attention over the batch: pooled (B, pool_dim), adjacency (B, B) from
        `identity_adjacency` -> (B, class_num) log-probabilities, for the NLL graph loss (Eq. 9)."""
        x = F.dropout(pooled, self.dropout, training=self.training)
        x = torch.cat([head(x, adjacency) for head in self.attention_heads], dim=1)
        x = F.dropout(x, self.dropout, training=self.training)
        return F.log_softmax(F.elu(self.out_att(x, adjacency)), dim=1)

    def forward(self, x_visible, x_thermal, modal=0, adjacency=None):
        """x_visible, x_thermal: (B_v, 3, H, W), (B_t, 3, H, W); modal as in `stems`;
        adjacency: (B, B) identity graph of the batch, `identity_adjacency(labels)`.

        Training: (pooled (B, pool_dim) for the triplet loss, identity logits (B, class_num) of the
        BNNeck feature, identity logits of the IWPA feature by the same classifier (None without
        wpa), graph log-probabilities (B, class_num) (None without adjacency)), the public order.
        Eval: (L2-normalised BNNeck feature, L2-normalised IWPA feature), both (B, pool_dim); without
        wpa the BNNeck feature twice (the public forward fails without wpa).
        B = B_v + B_t for modal 0 (visible first), else the batch of the one modality.
        """
        feature_map = self.feature_map(x_visible, x_thermal, modal)
        pooled = feature_map.mean(dim=(2, 3))
        feat = self.bottleneck(pooled)
        feat_att = self.wpa(feature_map, feat) if self.wpa is not None else None
        if self.training:
            attention_logits = self.classifier(feat_att) if feat_att is not None else None
            graph = self.graph_attention(pooled, adjacency) if adjacency is not None else None
            return pooled, self.classifier(feat), attention_logits, graph
        feat = F.normalize(feat, dim=1)
        return feat, (F.normalize(feat_att, dim=1) if feat_att is not None else feat)

    def optimizer_groups(self, lr):
        """Parameter groups as DDAG trains them: the backbone at 0.1 x lr; the BNNeck and classifier at
        lr; the attention modules (IWPA, graph heads, output layer) at lr. Each group carries its
        'lr_scale' for utils.set_lr. A one-stem backbone's shared stem appears once."""
        head = [*self.bottleneck.parameters(), *self.classifier.parameters()]
        attention_modules = [*self.attention_heads, self.out_att] + ([self.wpa] if self.wpa is not None else [])
        attention = [parameter for module in attention_modules for parameter in module.parameters()]
        head_ids = {id(parameter) for parameter in head + attention}
        backbone = [parameter for parameter in self.parameters() if id(parameter) not in head_ids]
        return [{'params': backbone, 'lr': 0.1 * lr, 'lr_scale': 0.1},
                {'params': head, 'lr': lr, 'lr_scale': 1.0},
                {'params': attention, 'lr': lr, 'lr_scale': 1.0}]


def add_network_flags(parser):
    """The flags that shape the DDAG network (train_ddag.py and test_ddag.py) and name the run."""
    parser.add_argument('--wpa', action='store_true', help='add the weighted part attention (IWPA) branch and its loss')
    parser.add_argument('--graph', action='store_true',
                        help='train the cross-modality graph attention with the graph loss (weight wG)')
    parser.add_argument('--part', default=3, type=int, help='horizontal stripes of the part attention')
    parser.add_argument('--low-dim', default=512, type=int, dest='low_dim', help='width of each graph attention head')
    parser.add_argument('--nheads', default=4, type=int, help='graph attention heads')
    parser.add_argument('--drop', default=0.2, type=float, help='dropout of the graph attention')
    return parser


def build_net(class_num, args, arch, stream='two'):
    """The network the flags of add_network_flags (and --alpha, when given) describe."""
    for flag, option in (('part', '--part'), ('low_dim', '--low-dim'), ('nheads', '--nheads')):
        if getattr(args, flag) < 1:
            raise utils.UserError(f'{option} must be at least 1, got {getattr(args, flag)}.')
    return embed_net(args.low_dim, class_num, drop=args.drop, part=args.part, alpha=getattr(args, 'alpha', 0.2),
                     nheads=args.nheads, arch=arch, wpa=args.wpa, stream=stream)


def run_name(args, trial=None):
    """The public name of a DDAG run, <dataset>[_G][_P_<part>]_drop_<drop>_<num_pos>_<batch-size>_lr_<lr>_seed_<seed>
    and the suffixes of utils.finetune_run_name, e.g. sysu_G_P_3_drop_0.2_4_8_lr_0.1_seed_0."""
    middle = ''
    if args.graph:
        middle += 'G_'
    if args.wpa:
        middle += f'P_{args.part}_'
    middle += f'drop_{args.drop}_{args.num_pos}_{args.batch_size}_lr_{args.lr}_seed_{args.seed}'
    return utils.finetune_run_name(args, middle, trial)
