"""AGW fine-tuning (Ye et al., TPAMI 2021) of a backbone pre-trained by MMGL, or of a random one.

    cd AGW
    python train.py --dataset sysu --mode all --lr 0.1 --method agw --gpu 0 --resume NAME
    python train.py --dataset regdb --trial 1 --lr 0.1 --method agw --gpu 0 --resume NAME

--resume NAME: the pre-trained checkpoint, a path or a file name in --model_path (default save_model/,
relative to where the script runs): a state dict of MMGL pre-training (the top-level train.py or the
public release), a training-state file of train.py, or an AGW/DDAG checkpoint; only its backbone is
used. A missing or unusable file stops the run; without --resume the network starts from random weights.
--resume_state <run>_state.t continues an interrupted fine-tuning run.

Loss: cross-entropy on the BNNeck logits + a triplet loss on the pooled features (--method agw: the
weighted regularised triplet; base: batch-hard with --margin, and no non-local blocks nor GeM).
Batches: --batch-size identities x --num_pos images in each modality. The run is named like the
public code, <dataset>_<method>_p<num_pos>_n<batch-size>_lr_<lr>_seed_<seed> (+ _<optim> unless sgd,
_stream_one for --stream one, _trial_<K> on RegDB), e.g. sysu_agw_p4_n8_lr_0.1_seed_0; it writes
<run>_best.t (best Rank-1 of the BNNeck feature), <run>_epoch_<N>.t and <run>_state.t into
--model_path, <run>.log into --log_path and tensorboardX scalars into --vis_log_path/<run>.
"""
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch.nn as nn  # noqa: E402

import engine  # noqa: E402
import finetune  # noqa: E402
import utils  # noqa: E402
from AGW.agw_model import FEATURES, build_net, run_name  # noqa: E402
from evaluator import Evaluator  # noqa: E402
from loss import OriTripletLoss, TripletLoss_WRT  # noqa: E402

# Flags a --resume_state run must share with the run that wrote the state.
SHAPE_FLAGS = ('dataset', 'trial', 'arch', 'stream', 'method')


def get_args_parser():
    parser = finetune.get_args_parser('AGW fine-tuning for visible-infrared re-identification')
    parser.add_argument('--method', default='agw', choices=['agw', 'base'],
                        help='agw: non-local blocks, GeM pooling, weighted regularised triplet; '
                             'base: average pooling, batch-hard triplet with --margin')
    return parser


def make_step(method, margin):
    """The AGW training step (see engine): identity cross-entropy + triplet loss."""
    criterion_id = nn.CrossEntropyLoss()
    criterion_tri = TripletLoss_WRT() if method == 'agw' else OriTripletLoss(margin)

    def step(net, visible, thermal, labels, epoch):
        feat, logits = net(visible, thermal)
        with utils.full_precision(labels.device):
            feat, logits = feat.float(), logits.float()
            loss_id = criterion_id(logits, labels)
            loss_tri, _ = criterion_tri(feat, labels)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return loss_id + loss_tri, {'id_loss': loss_id.detach(), 'tri_loss': loss_tri.detach(), 'accuracy': accuracy}
    return step


def main(argv=None):
    """Fine-tune; returns finetune.fit's per-epoch statistics of this invocation."""
    args = get_args_parser().parse_args(argv)
    run = finetune.start_run(args, run_name(args), f'AGW fine-tuning ({args.method})')
    trainset = engine.training_set(run)
    class_num = finetune.class_count(trainset)

    net = build_net(class_num, args.method, args.arch, args.stream).to(run.device)
    finetune.initialise(run, net)
    run.logger.info(f'{args.arch} {args.stream}-stream {args.method} network, {class_num} training identities')

    step = make_step(args.method, args.margin)
    optimizer = utils.make_optimizer(net.optimizer_groups(args.lr), args.lr, args.optim)
    evaluator = Evaluator.from_args(args, run.data_path, run.device, FEATURES)
    return finetune.fit(run, net, optimizer, step, trainset, evaluator, select='fc', shape_flags=SHAPE_FLAGS)


if __name__ == '__main__':
    utils.run_main(main)
