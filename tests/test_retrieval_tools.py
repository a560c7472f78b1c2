"""The test-time tools of retrieval_tools.py and their flags in the three test scripts."""
import dataclasses
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import AGW.test as agw_test
import DDAG.test_ddag as ddag_test
import data_loader
import retrieval_tools
import test as mmgl_test
from AGW.agw_model import embed_net as agw_net
from DDAG.ddag_model import embed_net as ddag_net
from data_manager import process_gallery_sysu, process_query_sysu
from eval_metrics import RetrievalSet, average_results, eval_sysu, sysu_retrieval_set
from evaluator import Evaluator
from model import MMGLNet
from rerank import k_reciprocal_distance
from tests.helpers import eval_args
from utils import REPO_ROOT, UserError

SIZE = (24, 48)  # (width, height) of the images in the script runs below: their --img_w, --img_h


# ----------------------------------------------------------------------------- flip, pictures, feature files

class MirrorSensitiveNet(torch.nn.Module):
    """Features that change under a horizontal flip: the channel means of four vertical bands, left to
    right (and the same of the right half alone), L2-normalised; eval-mode forward as the fine-tuned nets."""

    def forward(self, visible, thermal, modal):
        images = visible if modal == 1 else thermal
        bands = images.unflatten(3, (4, -1)).mean(dim=(2, 4))                       # (B, 3, 4)
        right = images[..., images.shape[3] // 2:].unflatten(3, (2, -1)).mean(dim=(2, 4))
        return F.normalize(bands.flatten(1), dim=1), F.normalize(right.flatten(1), dim=1)


def test_flip_averages_each_feature_with_that_of_the_mirror_image(sysu_tree):
    paths = process_query_sysu(sysu_tree)[0][:5]
    dataset = data_loader.TestData(paths, np.zeros(len(paths)), data_loader.test_transform(48, 24), img_size=SIZE)
    images = torch.stack([image for image, _ in dataset])
    net = MirrorSensitiveNet()
    evaluator = Evaluator('synthetic', sysu_tree, torch.device('cpu'), ('bands', 'right'), img_h=48, img_w=24,
                          workers=0, flip=True)
    flipped = evaluator.extractor(net)(paths, 1)
    for index, name in enumerate(('bands', 'right')):
        plain, mirrored = net(images, images, 1)[index], net(images.flip(3), images.flip(3), 1)[index]
        assert not torch.allclose(plain, mirrored, atol=1e-3)  # the features do change under a flip
        expected = F.normalize(plain + mirrored, dim=1).numpy()
        np.testing.assert_allclose(flipped[name], expected, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(flipped[name], axis=1), 1, atol=1e-6)
    plain_run = Evaluator('synthetic', sysu_tree, torch.device('cpu'), ('bands', 'right'), img_h=48, img_w=24,
                          workers=0).extractor(net)(paths, 1)
    np.testing.assert_allclose(plain_run['bands'], net(images, images, 1)[0].numpy(), atol=1e-6)


def random_retrieval_set(data_path, seed=0):
    """A SYSU-MM01 RetrievalSet of the tree at data_path, with random 8-d 'a' and 'b' features."""
    rng = np.random.default_rng(seed)

    def extract(paths, modal):
        return {name: rng.normal(size=(len(paths), 8)).astype(np.float32) for name in ('a', 'b')}
    return sysu_retrieval_set(extract, data_path, trials=range(3))


def test_ranked_lists_are_drawn_for_evenly_spread_queries_with_frames_by_identity(tmp_path, sysu_tree):
    retrieval_set = random_retrieval_set(sysu_tree)
    distance = retrieval_tools.RankingDistance()
    written = retrieval_tools.write_ranked_lists(tmp_path / 'lists', retrieval_set, distance, 3)
    num_queries = len(retrieval_set.query_paths)
    queries = [0, round((num_queries - 1) / 2), num_queries - 1]
    assert sorted(path.name for path in written) == sorted(f'{name}_query_{query:05d}.png'
                                                           for name in ('a', 'b') for query in queries)
    assert sorted((tmp_path / 'lists').iterdir()) == sorted(written)
    rows = retrieval_set.trial_rows[0]
    for path in written:
        name, query = path.stem.split('_query_')[0], int(path.stem.split('_query_')[1])
        with Image.open(path) as picture:
            assert picture.format == 'PNG' and picture.size == retrieval_tools.ranked_list_size()
            picture = picture.convert('RGB')
            distmat = retrieval_set.distances(name, 0, distance)
            (ranked,) = retrieval_set.ranked_lists(distmat, [query], 0)
            assert len(ranked) == min(10, len(rows))
            for rank, position in enumerate(ranked):
                left = (retrieval_tools.SPACING + retrieval_tools.FRAMED_WIDTH + retrieval_tools.QUERY_SPACING
                        + rank * (retrieval_tools.FRAMED_WIDTH + retrieval_tools.SPACING))
                frame = picture.getpixel((left + 1, retrieval_tools.TITLE_HEIGHT + 1))
                same = retrieval_set.gallery_ids[rows[position]] == retrieval_set.query_ids[query]
                assert frame == (retrieval_tools.MATCH_COLOUR if same else retrieval_tools.OTHER_COLOUR)
    assert retrieval_tools.write_ranked_lists(tmp_path / 'none', retrieval_set, distance, 0) == []
    many = retrieval_tools.write_ranked_lists(tmp_path / 'all', retrieval_set, distance, 10 * num_queries)
    assert len(many) == 2 * num_queries  # never more than there are queries


def test_ranked_lists_follow_the_sysu_camera_rule():
    retrieval_set = RetrievalSet('sysu', ['q3', 'q6'], np.array([1, 1]), np.array([3, 6]), {},
                                 ['g0', 'g1', 'g2', 'g3'], np.array([1, 1, 2, 1]), np.array([2, 1, 2, 4]), {},
                                 [np.array([0, 1, 2, 3])])
    distmat = np.array([[0.1, 0.4, 0.2, 0.3], [0.1, 0.4, 0.2, 0.3]])
    camera_three, camera_six = retrieval_set.ranked_lists(distmat, [0, 1], 0, length=3)
    assert camera_three.tolist() == [3, 1]        # the camera-2 images g0 and g2 are skipped
    assert camera_six.tolist() == [0, 2, 3]
    regdb = dataclasses.replace(retrieval_set, protocol='regdb')
    assert regdb.ranked_lists(distmat, [0], 0, length=3)[0].tolist() == [0, 2, 3]


def test_saved_features_hold_every_array_under_its_name(tmp_path, sysu_tree):
    retrieval_set = random_retrieval_set(sysu_tree)
    path = tmp_path / 'sub' / 'features.npz'
    retrieval_tools.save_features(path, retrieval_set)
    assert [entry.name for entry in path.parent.iterdir()] == ['features.npz']  # no temporary left behind
    num_query, num_gallery = len(retrieval_set.query_paths), len(retrieval_set.gallery_paths)
    with np.load(path, allow_pickle=False) as saved:
        assert set(saved.files) == {'feature_names', 'query_features_a', 'query_features_b', 'gallery_features_a',
                                    'gallery_features_b', 'query_ids', 'query_cams', 'query_paths', 'gallery_ids',
                                    'gallery_cams', 'gallery_paths', 'gallery_trials'}
        assert saved['feature_names'].tolist() == ['a', 'b']
        assert saved['query_features_a'].shape == (num_query, 8) and saved['gallery_features_b'].shape == (num_gallery, 8)
        for key in ('query_ids', 'query_cams', 'query_paths'):
            assert saved[key].shape == (num_query,)
        for key in ('gallery_ids', 'gallery_cams', 'gallery_paths'):
            assert saved[key].shape == (num_gallery,)
        assert saved['gallery_trials'].shape == (3, len(retrieval_set.trial_rows[0]))
        np.testing.assert_array_equal(saved['gallery_features_a'], retrieval_set.gallery_features['a'])
        assert saved['query_paths'].tolist() == [str(path) for path in retrieval_set.query_paths]
        # the saved arrays are enough to redo a trial's evaluation
        rows = saved['gallery_trials'][1]
        gallery_paths, gallery_ids, gallery_cams = process_gallery_sysu(sysu_tree, 'all', 1, 'single')
        assert saved['gallery_paths'][rows].tolist() == gallery_paths
        assert saved['gallery_ids'][rows].tolist() == gallery_ids.tolist()
        assert saved['gallery_cams'][rows].tolist() == gallery_cams.tolist()


# ----------------------------------------------------------------------------- the flags in the three scripts

@pytest.fixture(scope='module')
def png_trees(tmp_path_factory, sysu_tree):
    """Two copies of the small SYSU-MM01 tree with every image stored losslessly (PNG) at the size the
    scripts run at, so that they read exactly these pixels: (plain copy, copy of the mirror images)."""
    roots = []
    for kind in ('plain', 'mirrored'):
        root = tmp_path_factory.mktemp(kind) / 'SYSU-MM01'
        shutil.copytree(sysu_tree / 'exp', root / 'exp')
        for source in sysu_tree.glob('cam*/*/*.jpg'):
            target = root / source.relative_to(sysu_tree).with_suffix('.png')
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(source) as image:
                image = image.convert('RGB').resize(SIZE, Image.Resampling.LANCZOS)
            (image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if kind == 'mirrored' else image).save(target)
        roots.append(root)
    return tuple(roots)


def run_mmgl(folder, data_path, *flags):
    """test.py on a random ResNet-18 MMGL checkpoint: {'pool': (cmc, mAP, mINP)}."""
    checkpoint = folder / 'mmgl.t'
    if not checkpoint.exists():
        torch.manual_seed(0)
        torch.save(MMGLNet('resnet18').state_dict(), checkpoint)
    results = mmgl_test.main(eval_args(data_path, '--resume', str(checkpoint), *flags, dataset='sysu'))
    return {'pool': (results['cmc'], results['mAP'], results['mINP'])}


def run_finetuned(main, eval_args, build):
    def run(folder, data_path, *flags):
        """A fine-tuning test script on a random checkpoint: {feature name: (cmc, mAP, mINP)}."""
        checkpoint = folder / 'net_best.t'
        if not checkpoint.exists():
            torch.manual_seed(0)
            torch.save({'net': build().state_dict(), 'epoch': 0}, checkpoint)
        results = main(eval_args(data_path, '--resume', str(checkpoint), *flags, dataset='sysu'))
        return {name: (result['cmc'], result['mAP'], result['mINP']) for name, result in results.items()}
    return run


SCRIPTS = {
    'test.py': run_mmgl,
    'AGW/test.py': run_finetuned(agw_test.main, eval_args, lambda: agw_net(7, arch='resnet18')),
    'DDAG/test_ddag.py': run_finetuned(ddag_test.main, lambda *args, **kwargs: eval_args(*args, '--low-dim', '32', '--nheads', '2', '--wpa', **kwargs),
                                       lambda: ddag_net(32, 7, nheads=2, arch='resnet18', wpa=True)),
}


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_flag_reaches_the_script(script, tmp_path, png_trees):
    run = SCRIPTS[script]
    plain_tree, mirrored_tree = png_trees
    run(tmp_path, plain_tree, '--save_features', str(tmp_path / 'plain.npz'))
    run(tmp_path, mirrored_tree, '--save_features', str(tmp_path / 'mirrored.npz'))
    lists = tmp_path / 'lists'
    scores = run(tmp_path, plain_tree, '--flip', '--rerank', '--k1', '6', '--k2', '3', '--lambda_value', '0.2',
                 '--visualize', '2', '--visualize_dir', str(lists), '--save_features', str(tmp_path / 'both.npz'))

    with np.load(tmp_path / 'plain.npz') as plain, np.load(tmp_path / 'mirrored.npz') as mirrored, \
            np.load(tmp_path / 'both.npz') as both:
        names = both['feature_names'].tolist()
        assert names == list(scores)
        # --flip: the features are those of the images and of their mirrors, averaged and normalised
        for side in ('query', 'gallery'):
            for name in names:
                key = f'{side}_features_{name}'
                average = plain[key] + mirrored[key]
                average /= np.linalg.norm(average, axis=1, keepdims=True)
                np.testing.assert_allclose(both[key], average, atol=1e-5)
                assert not np.allclose(both[key], plain[key], atol=1e-4)
        # --rerank with its parameters: each trial re-ranked on its own gallery, then the protocol
        for name in names:
            trials = []
            for rows in both['gallery_trials']:
                distmat = k_reciprocal_distance(both[f'query_features_{name}'], both[f'gallery_features_{name}'][rows],
                                                k1=6, k2=3, lambda_value=0.2)
                trials.append(eval_sysu(distmat, both['query_ids'], both['gallery_ids'][rows], both['query_cams'],
                                        both['gallery_cams'][rows]))
            cmc, mAP, mINP = average_results(trials)
            np.testing.assert_allclose(scores[name][0], cmc, atol=1e-12)
            assert scores[name][1:] == pytest.approx((mAP, mINP), abs=1e-12)
    # --visualize: two queries for each feature, in a folder named after the checkpoint and the settings
    (folder,) = lists.iterdir()
    assert folder.name.endswith('_all_single_flip_rerank')
    pictures = sorted(folder.iterdir())
    assert [path.name.split('_query_')[0] for path in pictures] == sorted(names * 2)
    for path in pictures:
        with Image.open(path) as picture:
            assert picture.size == retrieval_tools.ranked_list_size()


def test_regdb_features_are_saved_per_split(tmp_path, regdb_tree, capsys):
    torch.save({'net': agw_net(5, arch='resnet18').state_dict()}, tmp_path / 'net.t')
    for split in (1, 2):
        shutil.copy(tmp_path / 'net.t', tmp_path / f'net_{split}.t')
    args = eval_args(regdb_tree, dataset='regdb')
    with pytest.raises(UserError, match='write "{trial}" in the file name'):
        agw_test.main(args + ['--trial', '0', '--resume', str(tmp_path / 'net_{trial}.t'),
                              '--save_features', str(tmp_path / 'features.npz')])
    agw_test.main(args + ['--trial', '2', '--tvsearch', '--rerank', '--resume', str(tmp_path / 'net_{trial}.t'),
                          '--save_features', str(tmp_path / 'features_{trial}.npz')])
    assert 'k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3)' in capsys.readouterr().out
    with np.load(tmp_path / 'features_2.npz') as saved:
        assert set(saved['query_cams'].tolist()) == {2} and set(saved['gallery_cams'].tolist()) == {1}  # thermal queries
        assert saved['gallery_trials'].tolist() == [list(range(len(saved['gallery_ids'])))]


@pytest.mark.parametrize('flags, message', [
    (['--visualize', '-1'], '--visualize -1: give the number of queries'),
    (['--k1', '0'], 'must both be at least 1'),
    (['--lambda_value', '1.5'], 'must lie between 0 and 1'),
    (['--save_features', '{file}/features.npz'], 'cannot write there'),
    (['--save_features', '{folder}'], 'is a folder'),
    (['--visualize', '1', '--visualize_dir', '{file}/lists'], 'cannot write there'),
])
def test_bad_test_time_flags_are_user_errors_before_any_work(flags, message, tmp_path):
    (tmp_path / 'a_file').write_text('')
    flags = [flag.format(file=tmp_path / 'a_file', folder=tmp_path) for flag in flags]
    missing = ['--dataset', 'sysu', '--data_path', str(tmp_path / 'nothing'), '--resume', 'missing.t',
               '--model_path', str(tmp_path)]
    for main in (mmgl_test.main, agw_test.main, ddag_test.main):
        with pytest.raises(UserError, match=message):  # before the missing checkpoint and data are noticed
            main(missing + flags)


def test_a_bad_flag_is_one_sentence_and_a_non_zero_exit(tmp_path):
    completed = subprocess.run([sys.executable, 'test_ddag.py', '--visualize', '-3'], capture_output=True,
                               text=True, cwd=REPO_ROOT / 'DDAG')
    assert completed.returncode == 2 and 'Traceback' not in completed.stderr
    assert completed.stderr.strip() == 'error: --visualize -3: give the number of queries to draw (0 or more).'
