"""DDAG fine-tuning (Ye et al., ECCV 2020) of a backbone pre-trained by MMGL, or of a random one.

    cd DDAG
    python train_ddag.py --dataset sysu --lr 0.1 --wpa --graph --gpu 0 --resume NAME
    python train_ddag.py --dataset regdb --trial 1 --lr 0.1 --wpa --graph --gpu 0 --resume NAME

--resume NAME: the pre-trained checkpoint, a path or a file name in --model_path (default save_model/,
relative to where the script runs): a state dict of MMGL pre-training (the top-level train.py or the
public release), a training-state file of train.py, or an AGW/DDAG checkpoint; only its backbone is
used. A missing or unusable file stops the run; without --resume the network starts from random weights.
--resume_state <run>_state.t continues an interrupted fine-tuning run, graph-loss weight included.

Loss per batch, as the public train_ddag.py (Eq. 11 of the paper):
    L = CE(BNNeck logits) + batch-hard triplet(pooled features, --margin)
        [+ CE(part-attention logits), with --wpa]                 (the instance loss, Eq. 10)
        [+ --lambda0 * wG * NLL(graph attention over the batch graph), with --graph]
The batch graph links the images of one identity across both modalities (DDAG.ddag_model.identity_adjacency).
wG is 0 during the first epoch; after each epoch it becomes 1 / (1 + the epoch's mean instance loss),
as in the public code (which leaves the graph loss out of that mean).
--graph: train the graph attention branch with that loss. Without it the graph loss is neither
computed nor optimised (the public script only adds '_G' to the run name; it always adds the loss).
--lambda0: a constant factor on wG (default 1: the public behaviour; the public script parses
--lambda0 but never uses it).
--wpa: add the intra-modality weighted-part attention (IWPA) branch, --part stripes, and its loss.

Batches: --batch-size identities x --num_pos images in each modality (public: 8 x 4). SGD as AGW:
the backbone at 0.1 x --lr, the BNNeck, classifier and attention modules at --lr; linear warm-up over
10 epochs, then x0.1 at each epoch of --lr_steps. The default, 30 50 (x0.1 from epoch 30, x0.01 from
50), is the schedule of the MMGL authors' copy of the DDAG script, which gave the paper's DDAG+MMGL
figures; --lr_steps 20 50 is that of mangye16's DDAG code (x0.1 from epoch 20).
Evaluation every 2 epochs (SYSU-MM01: gallery draw 0 of --mode; RegDB: split --trial) of both
features: FC (the BNNeck feature) and ATT (the IWPA feature; without --wpa the BNNeck feature
again). As the public code, <run>_best.t keeps the best Rank-1 of ATT.

The run is named like the public code, <dataset>[_G][_P_<part>]_drop_<drop>_<num_pos>_<batch-size>_lr_<lr>_seed_<seed>
(+ _<optim> unless sgd, _stream_one for --stream one, _trial_<K> on RegDB), e.g.
sysu_G_P_3_drop_0.2_4_8_lr_0.1_seed_0; it writes <run>_best.t, <run>_epoch_<N>.t (the public
{'net', 'cmc', 'mAP', 'mINP', 'epoch'}) and <run>_state.t into --model_path, <run>.log into --log_path
and tensorboardX scalars (the losses, graph_loss and wG included) into --vis_log_path/<run>.
"""
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import engine  # noqa: E402
import finetune  # noqa: E402
import utils  # noqa: E402
from DDAG.ddag_model import FEATURES, add_network_flags, build_net, identity_adjacency, run_name  # noqa: E402
from evaluator import Evaluator  # noqa: E402
from loss import OriTripletLoss  # noqa: E402

# The feature whose Rank-1 selects <run>_best.t (the public code keeps the best attention feature).
SELECT = 'att'
# Flags a --resume_state run must share with the run that wrote the state.
SHAPE_FLAGS = ('dataset', 'trial', 'arch', 'stream', 'wpa', 'part', 'graph', 'low_dim', 'nheads')
# The default --lr_steps: the learning rate drops x0.1 at each of these epochs, after a 10-epoch
# warm-up. They are those of the MMGL authors' copy of train_ddag.py, which gave the paper's DDAG+MMGL
# figures; mangye16's DDAG steps at 20 and 50 (--lr_steps 20 50).
MMGL_LR_STEPS = (30, 50)


def get_args_parser():
    parser = finetune.get_args_parser('DDAG fine-tuning for visible-infrared re-identification',
                                      vis_log_path='log/vis_log_ddag/')
    add_network_flags(parser)
    parser.add_argument('--alpha', default=0.2, type=float, help='LeakyReLU slope of the graph attention')
    parser.add_argument('--lambda0', default=1.0, type=float,
                        help='constant factor on the adaptive graph-loss weight wG (1: the public behaviour)')
    parser.add_argument('--lr_steps', default=list(MMGL_LR_STEPS), type=int, nargs='+', metavar='EPOCH',
                        help='epochs at which the learning rate drops x0.1, after the 10-epoch warm-up. '
                             "Default 30 50: the MMGL authors' DDAG script; 20 50: mangye16's DDAG")
    return parser


def graph_weight(instance_loss):
    """The public adaptive weight of the graph loss after an epoch: 1 / (1 + mean instance loss)."""
    return 1.0 / (1.0 + instance_loss)


class DDAGLoss:
    """The DDAG training step (see engine) and the graph-loss weight wG it carries from epoch to
    epoch: 0 during the first epoch, then graph_weight of the previous epoch's mean instance loss
    (end_epoch). Its state_dict holds wG, so a resumed run goes on with the weight it had."""

    def __init__(self, args):
        self.graph, self.lambda0 = args.graph, args.lambda0
        self.criterion_id = nn.CrossEntropyLoss()
        self.criterion_tri = OriTripletLoss(args.margin)
        self.wG = 0.0

    def __call__(self, net, visible, thermal, labels, epoch):
        adjacency = identity_adjacency(labels) if self.graph else None
        outputs = net(visible, thermal, adjacency=adjacency)
        with utils.full_precision(labels.device):
            pooled, logits, attention_logits, graph_log_probs = (
                output.float() if output is not None else None for output in outputs)
            loss_id = self.criterion_id(logits, labels)
            loss_tri, _ = self.criterion_tri(pooled, labels)
            instance = loss_id + loss_tri
            values = {'id_loss': loss_id.detach(), 'tri_loss': loss_tri.detach()}
            if attention_logits is not None:
                loss_part = self.criterion_id(attention_logits, labels)
                instance = instance + loss_part
                values['part_loss'] = loss_part.detach()
            values['instance_loss'] = instance.detach()
            total = instance
            if graph_log_probs is not None:
                loss_graph = F.nll_loss(graph_log_probs, labels)
                weight = self.lambda0 * self.wG
                total = instance + weight * loss_graph
                values.update(graph_loss=loss_graph.detach(), graph_weight=weight)
        values['accuracy'] = (logits.detach().argmax(dim=1) == labels).float().mean()
        return total, values

    def end_epoch(self, epoch, stats):
        """Set wG from the epoch's mean instance loss (the public code leaves the graph loss out)."""
        self.wG = graph_weight(stats['instance_loss'])
        stats['wG'] = self.wG

    def state_dict(self):
        return {'wG': self.wG}

    def load_state_dict(self, state):
        self.wG = float(state['wG'])


def main(argv=None):
    """Fine-tune; returns finetune.fit's per-epoch statistics of this invocation, each with 'wG',
    the graph-loss weight set after that epoch."""
    args = get_args_parser().parse_args(argv)
    run = finetune.start_run(args, run_name(args), 'DDAG fine-tuning')
    trainset = engine.training_set(run)
    class_num = finetune.class_count(trainset)

    net = build_net(class_num, args, args.arch, args.stream).to(run.device)
    finetune.initialise(run, net)
    branches = ', '.join(branch for branch, on in (('part attention', args.wpa), ('graph attention', args.graph)) if on)
    run.logger.info(f'{args.arch} {args.stream}-stream DDAG network ({branches or "no attention branch"}), '
                    f'{class_num} training identities')

    step = DDAGLoss(args)
    optimizer = utils.make_optimizer(net.optimizer_groups(args.lr), args.lr, args.optim)
    evaluator = Evaluator.from_args(args, run.data_path, run.device, FEATURES)

    def update_graph_weight(epoch, stats):
        step.end_epoch(epoch, stats)
        run.logger.info(f'  graph-loss weight wG {step.wG:.4g} from epoch {epoch + 1}')

    return finetune.fit(run, net, optimizer, step, trainset, evaluator, select=SELECT, shape_flags=SHAPE_FLAGS,
                        milestones=args.lr_steps, end_of_epoch=update_graph_weight,
                        unused_parameters=not args.graph, ddag_loss=step)  # the graph attention


if __name__ == '__main__':
    utils.run_main(main)
