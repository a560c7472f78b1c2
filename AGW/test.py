"""Evaluate AGW fine-tuned checkpoints (those of AGW/train.py, or of the public AGW code).

    cd AGW
    python test.py --dataset sysu --mode all --resume sysu_agw_p4_n8_lr_0.1_seed_0_best.t --gpu 0
    python test.py --dataset regdb --resume 'regdb_agw_p4_n8_lr_0.1_seed_0_trial_{trial}_best.t' --gpu 0

Both features of the network are reported, each under its own name: POOL, the pooled feature, and FC,
the BNNeck feature (the one the public code selects on). SYSU-MM01: infrared queries against 10 visible
gallery draws (--mode all|indoor, --shot single|multi), each trial and the average. RegDB: one
checkpoint per split, "{trial}" in --resume standing for its number: --trial K tests split K, --trial 0
(default) all ten, averaged; --tvsearch searches visible images with thermal queries.
Test-time tools (retrieval_tools.py, shared with the other test scripts): --flip averages each feature
with its mirror image's, --rerank re-ranks every trial (k-reciprocal; --k1, --k2, --lambda_value),
--visualize N draws N queries' ranked lists into --visualize_dir, --save_features FILE writes the features.
Without --resume the checkpoint is the <run>_best.t that train.py writes with the same naming flags
(--method, --num_pos, --batch-size, --lr, --seed, --optim, --stream). The network is built for the
checkpoint (identities from its classifier, arch from its backbone) and must fit it exactly: a missing
file or one of another --method is an error, never the score of an unloaded network.
"""
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import evaluator  # noqa: E402
import utils  # noqa: E402
from AGW.agw_model import FEATURES, build_net, run_name  # noqa: E402


def get_args_parser():
    parser = evaluator.test_args_parser('Evaluate AGW fine-tuned checkpoints')
    parser.add_argument('--method', default='agw', choices=['agw', 'base'], help='the network the checkpoint holds')
    return parser


def main(argv=None):
    """Evaluate; returns {'pool' | 'fc': {'trials': [(cmc, mAP, mINP)], 'cmc', 'mAP', 'mINP'}} (averages)."""
    args = get_args_parser().parse_args(argv)
    default = run_name(args, trial='{trial}') + '_best.t'
    return evaluator.run_test(args, lambda class_num, arch: build_net(class_num, args.method, arch),
                             FEATURES, default)


if __name__ == '__main__':
    utils.run_main(main)
