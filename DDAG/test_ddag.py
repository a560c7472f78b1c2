"""Evaluate DDAG fine-tuned checkpoints (those of DDAG/train_ddag.py, or of the public DDAG code).

    cd DDAG
    python test_ddag.py --dataset sysu --mode all --wpa --graph --gpu 0 --resume sysu_G_P_3_drop_0.2_4_8_lr_0.1_seed_0_best.t
    python test_ddag.py --dataset regdb --wpa --graph --gpu 0 --resume 'regdb_G_P_3_drop_0.2_4_8_lr_0.1_seed_0_trial_{trial}_best.t'

Both features of the network are reported, each under its own name: FC, the BNNeck feature, and
ATT, the part-attention (IWPA) feature (without --wpa the network has none, and ATT repeats FC).
The graph attention is used in training only. SYSU-MM01: infrared queries against 10 visible gallery
draws (--mode all|indoor, --shot single|multi), each trial and the average. RegDB: one checkpoint per
split, "{trial}" in --resume standing for its number: --trial K tests split K, --trial 0 (default) all
ten, averaged; --tvsearch searches visible images with thermal queries.
Test-time tools (retrieval_tools.py, shared with the other test scripts): --flip averages each feature
with its mirror image's, --rerank re-ranks every trial (k-reciprocal; --k1, --k2, --lambda_value),
--visualize N draws N queries' ranked lists into --visualize_dir, --save_features FILE writes the features.
Without --resume the checkpoint is the <run>_best.t that train_ddag.py writes with the same naming
flags (--graph, --wpa, --part, --drop, --num_pos, --batch-size, --lr, --seed, --optim, --stream).
The network is built for the checkpoint (identities from its classifier, arch from its backbone;
--wpa, --part, --low-dim, --nheads as in training) and must fit it exactly, apart from the tensors
the public network creates and never uses (classifier1, classifier2, wpa.W): a missing file or one
of another network is an error, never the score of an unloaded network.
"""
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import evaluator  # noqa: E402
import utils  # noqa: E402
from DDAG.ddag_model import FEATURES, add_network_flags, build_net, run_name  # noqa: E402

# Tensors of public DDAG checkpoints that its forward never reads.
PUBLIC_UNUSED = ('classifier1.', 'classifier2.', 'wpa.W.')


def get_args_parser():
    parser = evaluator.test_args_parser('Evaluate DDAG fine-tuned checkpoints')
    add_network_flags(parser)
    return parser


def main(argv=None):
    """Evaluate; returns {'fc' | 'att': {'trials': [(cmc, mAP, mINP)], 'cmc', 'mAP', 'mINP'}} (averages)."""
    args = get_args_parser().parse_args(argv)
    default = run_name(args, trial='{trial}') + '_best.t'
    return evaluator.run_test(args, lambda class_num, arch: build_net(class_num, args, arch), FEATURES, default,
                             unused_prefixes=PUBLIC_UNUSED)


if __name__ == '__main__':
    utils.run_main(main)
