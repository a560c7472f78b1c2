"""The study scripts in bench/: variant flags and tables (no training here; the scripts' runs are measurements)."""
import sys

import pytest

import utils
from utils import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / 'bench'))
import pretext_study  # noqa: E402
import throughput  # noqa: E402
import train as mmgl_train  # noqa: E402


def parsed(flags):
    return mmgl_train.get_args_parser().parse_args(flags)


def test_study_variants_are_the_papers_command_with_their_changes():
    paper = parsed(pretext_study.variant_flags('paper'))
    assert (paper.stream, paper.lr, paper.optim, paper.pcc, paper.part) == ('two', 0.1, 'sgd', True, True)
    assert (paper.perm_input, paper.pcc_grad, paper.perm_loss, paper.pcc_form) == ('gap', 'backbone', 'mse', 'cycle')
    without_pcc = parsed(pretext_study.variant_flags('paper+nopcc'))
    assert not without_pcc.pcc and not without_pcc.part and without_pcc.perm_input == 'gap'
    # the 'default' variant is train.py's defaults with the paper's command
    default = parsed(pretext_study.variant_flags('default'))
    assert vars(default) == vars(parsed(['--stream', 'two', '--lr', '0.1', '--pcc', '--part']))
    for name in pretext_study.VARIANTS:
        parsed(pretext_study.variant_flags(name))  # every variant is a valid train.py command


def test_study_table_keeps_failed_variants(tmp_path):
    epoch = {'steps': 40, 'perm_exact': 0.25, 'perm_stripe': 0.5, 'pcc_loss': 1.0, 'perm_loss': 0.1}
    results = [{'name': 'default', 'flags': pretext_study.variant_flags('default'), 'history': [epoch, epoch],
                'test': {'perm_exact': 0.3, 'perm_stripe': 0.6, 'rank1': 0.1, 'mAP': 0.2}, 'seconds': 60},
               {'name': 'paper', 'flags': pretext_study.variant_flags('paper'), 'error': 'RuntimeError: boom'}]
    pretext_study.write_table(results, tmp_path / 'table.md', 'a setting')
    table = (tmp_path / 'table.md').read_text()
    assert '| default |' in table and '**30.0%**' in table
    assert '| paper |' in table and 'failed: RuntimeError: boom' in table
    pretext_study.plot_curves(results, tmp_path / 'curves.png')
    assert (tmp_path / 'curves.png').stat().st_size > 0


def test_throughput_times_each_method_at_each_batch_and_refuses_unknown_methods(tmp_path):
    table_file = tmp_path / 'throughput.md'
    throughput.main(['--arch', 'resnet18', '--img_h', '48', '--img_w', '24', '--batch', '2,3', '--warmup', '1',
                     '--steps', '1', '--epoch_steps', '0', '--methods', 'mmgl', '--precisions', 'fp32',
                     '--out', str(table_file)])
    rows = [line for line in table_file.read_text().splitlines() if line.startswith('| MMGL')]
    assert [row.split(' | ')[1] for row in rows] == ['2+2', '3+3']
    assert all(float(row.split(' | ')[3]) > 0 for row in rows)  # ms/step
    with pytest.raises(utils.UserError, match='--methods: unknown agv'):
        throughput.main(['--methods', 'mmgl,agv'])
