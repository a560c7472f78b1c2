"""Digests of the weights after short seeded CPU runs of the three training scripts: run it before and
after a change that should not change what is trained (a refactor), and compare the three lines.

    python bench/weights_digest.py

MMGL pre-training (ResNet-18, 48x24, 2 epochs of 3 steps, --pcc --part), then AGW and DDAG (--wpa
--graph) fine-tuned from its checkpoint for 3 epochs, on a small generated SYSU-MM01 tree, one
thread. Each line is the first 16 hex digits of a sha256 over the state dict (keys and bytes).
The figures hold for one machine and torch build; compare them on the same one.
"""
import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import synthetic  # noqa: E402
import train as mmgl_train  # noqa: E402
import utils  # noqa: E402
from AGW import train as agw_train  # noqa: E402
from DDAG import train_ddag  # noqa: E402
from pre_process_sysu import preprocess_sysu  # noqa: E402


def digest(state):
    hasher = hashlib.sha256()
    for key in sorted(state):
        hasher.update(key.encode())
        hasher.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()[:16]


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.split('\n\n')[0]).parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        data = synthetic.make_synthetic_sysu(folder / 'SYSU-MM01', seed=0, num_train_ids=5, num_val_ids=2,
                                             num_test_ids=4, images_per_camera=3, gallery_images_per_camera=12,
                                             size=(48, 96))
        preprocess_sysu(data, progress=False)
        common = ['--dataset', 'synthetic', '--data_path', str(data), '--arch', 'resnet18', '--img_h', '48',
                  '--img_w', '24', '--workers', '0', '--log_path', str(folder / 'log'),
                  '--vis_log_path', str(folder / 'vis'), '--model_path', str(folder / 'save_model')]
        mmgl_train.main(common + ['--batch-size', '4', '--epochs', '2', '--steps_per_epoch', '3', '--pcc', '--part'])
        pretrained = folder / 'save_model' / 'synthetic_mmgl_two_resnet18_s6_pcc_part_lr_0.1_seed_0_epoch_2.t'
        finetune = common + ['--batch-size', '2', '--num_pos', '2', '--epochs', '3', '--resume', str(pretrained)]
        agw_train.main(finetune)
        train_ddag.main(finetune + ['--wpa', '--graph'])
        states = {'MMGL': utils.load_checkpoint(pretrained)}
        for method, name in (('AGW', 'synthetic_agw_p2_n2_lr_0.1_seed_0'),
                             ('DDAG', 'synthetic_G_P_3_drop_0.2_2_2_lr_0.1_seed_0')):
            states[method] = utils.load_checkpoint(folder / 'save_model' / f'{name}_state.t')['model']
        lines = [f'{method} {digest(state)}' for method, state in states.items()]
    print('\n'.join(lines))


if __name__ == '__main__':
    utils.run_main(main)
