"""Zero-shot evaluation and retrieval: metrics against hand computations, stand-in models with known
answers, the evaluation sets against recipe §6.2, data-parallel exactness, bad inputs, and the CLI end to end."""
import io
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

evaluate = pytest.importorskip('evaluate', exc_type=ImportError)  # needs model.py / data.py / augment.py
import data  # noqa: E402
from config import Config, UserError  # noqa: E402
from evaluate import (EVAL_SETS, ENSEMBLE_WEIGHTS, build_dataset, class_counts, class_embeddings,  # noqa: E402
                      accuracy_metrics, main, read_checkpoint, recall_at_k, retrieval, roc_auc, similarities,
                      zero_shot)

ROOT = Path(__file__).resolve().parents[1]
# recipe §6.2: classes and templates per dataset
SPEC_COUNTS = {
    'imagenet': (1000, 80), 'mnist': (10, 1), 'food101': (101, 1), 'cifar10': (10, 18), 'cifar100': (100, 18),
    'cub200': (200, 1), 'cars': (196, 8), 'aircraft': (100, 2), 'dtd': (47, 8), 'pets': (37, 1),
    'caltech101': (102, 34), 'flowers': (102, 1), 'stl10': (10, 2), 'eurosat': (10, 3), 'resisc45': (45, 18),
    'gtsrb': (43, 3), 'kitti_distance': (4, 1), 'country211': (211, 5), 'patch_camelyon': (2, 1),
    'ucf101_frames': (101, 48), 'clevr_counts': (8, 1), 'hateful_memes': (2, 1), 'rendered_sst2': (2, 1),
}


# --- Stand-ins: a model whose image and text embeddings agree by construction ---
class Agree(nn.Module):
    """Images carry their class id in pixel [0, 0, 0], prompts in token 0; both map to 3 * one-hot(id).
    The h head is a fixed rotation of z, so both heads and every ensemble classify perfectly."""

    def __init__(self, dim=16, heads=('z', 'h')):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.probe = nn.Parameter(torch.zeros(()))  # gives evaluate a device
        rotation = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(0)))[0]
        self.register_buffer('rotation', rotation)

    def embed(self, ids, head):
        e = 3 * F.one_hot(ids, self.dim).float()  # not unit norm: evaluation must normalise
        return e if head == 'z' else e @ self.rotation

    def encode_image(self, images, head='z'):
        return self.embed(images[:, 0, 0, 0].round().long(), head)

    def encode_text(self, tokens, head='z'):
        return self.embed(tokens[:, 0], head)

    def encode_image_heads(self, images):
        return {head: self.encode_image(images, head) for head in self.heads}

    def encode_text_heads(self, tokens):
        return {head: self.encode_text(tokens, head) for head in self.heads}


def tokenize(texts):
    """Stand-in tokenizer: token 0 = the number in the class name 'cN', token 1 = prompt length."""
    return torch.tensor([[int(re.search(r'c(\d+)', t).group(1)), len(t)] for t in texts])


def coded_images(ids):
    return torch.as_tensor(ids, dtype=torch.float)[:, None, None, None].expand(-1, 3, 2, 2).contiguous()


CLASSES = [f'c{i}' for i in range(10)]
TEMPLATES = ['a photo of {}.', 'art of the {}.']


def cfg_for_tests(**kw):
    return Config(**{'eval_batch_size': 64, 'workers': 0, **kw})


# --- Evaluation sets ---
def test_paper_sets_hold_the_spec_counts_from_the_assets():
    """The paper's sets in its order with recipe §6.2's class and template counts, read from the assets they name."""
    labels = json.loads((ROOT / 'assets' / 'labels.json').read_text())
    templates = json.loads((ROOT / 'assets' / 'templates.json').read_text())
    assert [name for name in EVAL_SETS if name in SPEC_COUNTS] == list(SPEC_COUNTS)
    for name, (classes, prompts) in SPEC_COUNTS.items():
        row = EVAL_SETS[name]
        assert (row.classnames, row.templates) == (labels[name], templates[name]), name
        assert (len(row.classnames), len(row.templates)) == (classes, prompts), name
    assert len(set(templates['imagenet'])) == 80
    # spot checks of the standard class-index order (torchvision / ImageFolder / recipe §6.2 clevr order)
    assert labels['imagenet'][0] == 'tench' and labels['imagenet'][999] == 'toilet paper'
    assert labels['cifar10'] == ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                                 'truck']
    assert labels['clevr_counts'] == ['10', '3', '4', '5', '6', '7', '8', '9']
    assert labels['dtd'] == sorted(labels['dtd']) and labels['caltech101'][0] == 'background'


def test_a_row_without_class_names_or_templates_is_refused():
    """Each row holds lists, or names an asset file with its entry; a row without them, or a template without one
    {}, raises (at import, for the table's rows) instead of being skipped at run time."""
    for row in EVAL_SETS.values():
        assert row.classnames and row.templates and all(t.count('{}') == 1 for t in row.templates)
    ok = evaluate.EvalSet(evaluate.read_folder, 'test', 'acc', ['cat', 'dog'], ['a {}.'])
    assert evaluate.with_lists({'pets2': ok}) == {'pets2': ok}
    for bad in (ok._replace(classnames=[]), ok._replace(templates=['a photo.']), ok._replace(classnames='labels.json'),
                ok._replace(templates='nowhere.json')):
        with pytest.raises((TypeError, UserError), match="evaluation set 'pets2' needs|nowhere.json"):
            evaluate.with_lists({'pets2': bad})


# --- Metrics ---
def test_roc_auc_hand_computed_with_ties():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # pairs (pos, neg): (.5,.5) tie = 1/2, (.5,.2), (.9,.5), (.9,.2) = 1 each -> 3.5 / 4
    assert roc_auc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(0.875)
    assert np.isnan(roc_auc([0.3, 0.7], [1, 1]))
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 5, 200).astype(float), rng.integers(0, 2, 200)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert roc_auc(scores, labels) == pytest.approx(pairwise)


def test_accuracy_and_mean_per_class_hand_computed():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    predicted = torch.tensor([0, 1, 0, 1, 0, 2])
    counts = class_counts(F.one_hot(predicted, 3).float(), labels, 3)
    assert counts.tolist() == [[2, 1, 1], [3, 1, 2], [3, 1, 2]]  # top-1 hits, top-5 hits (C = 3), samples
    m = accuracy_metrics(counts, 'z', per_class=True)
    assert m['acc1_z'] == pytest.approx(100 * 4 / 6)
    assert m['mean_per_class_z'] == pytest.approx(100 * (2 / 3 + 1 + 1 / 2) / 3)
    assert m['acc5_z'] == 100


def test_top5_counts_by_rank():
    sim = torch.tensor([[7., 6, 5, 4, 3, 2, 1], [1., 2, 3, 4, 5, 6, 7], [1., 2, 3, 4, 5, 6, 7]])
    # labels ranked 1st, 6th and 5th
    counts = class_counts(sim, torch.tensor([0, 1, 2]), 7)
    assert counts[0].sum() == 1 and counts[1].sum() == 2 and counts[2].sum() == 3


# --- Zero-shot classification ---
def test_template_ensemble_matches_direct_computation():
    torch.manual_seed(0)
    model = nn.Module()
    table, factors = torch.randn(200, 8), {'z': 2, 'h': -1}
    model.heads = tuple(factors)
    model.encode_text_heads = lambda tokens: {h: table[tokens].sum(1) * f for h, f in factors.items()}
    classnames = ['c1', ['c2', 'c3'], 'c4']  # a synonym list: every template x every synonym
    got = class_embeddings(model, tokenize, classnames, TEMPLATES, 'cpu')
    assert list(got) == ['z', 'h']
    for head, factor in factors.items():
        for row, name in zip(got[head], classnames):
            prompts = [t.format(s) for s in (name if isinstance(name, list) else [name]) for t in TEMPLATES]
            direct = sum(F.normalize(table[tokenize([p])[0]].sum(0) * factor, dim=0) for p in prompts)
            assert torch.allclose(row, direct / direct.norm(), atol=1e-6)
    sims = similarities(Agree(), coded_images([1, 2]), {'z': torch.randn(3, 16), 'h': torch.randn(3, 16)})
    assert list(sims) == ['z', 'h'] + [f'ens{w}' for w in ENSEMBLE_WEIGHTS]
    assert torch.allclose(sims['ens0.3'], 0.3 * sims['z'] + 0.7 * sims['h'])


def test_agreeing_model_is_perfect_and_shuffled_is_chance():
    ids = torch.arange(1000) % 10
    data = TensorDataset(coded_images(ids), ids)
    out = zero_shot(Agree(), tokenize, cfg_for_tests(), data, CLASSES, TEMPLATES, 'mean_per_class')
    keys = ['z', 'h'] + [f'ens{w}' for w in ENSEMBLE_WEIGHTS]
    assert {out[f'{m}_{k}'] for m in ('acc1', 'acc5', 'mean_per_class') for k in keys} == {100.0}
    shuffled = TensorDataset(coded_images(ids), ids[torch.randperm(1000, generator=torch.Generator().manual_seed(0))])
    out = zero_shot(Agree(heads=('z',)), tokenize, cfg_for_tests(), shuffled, CLASSES, TEMPLATES, 'acc')
    assert set(out) == {'acc1_z', 'acc5_z', 'images', 'skipped'} and (out['images'], out['skipped']) == (1000, 0)
    # P(hit) = 1/10 and 5/10; 1000 samples: sd 0.95 and 1.6 points, bounds at > 5 sd
    assert 5 < out['acc1_z'] < 15 and 42 < out['acc5_z'] < 58


def test_roc_auc_metric_of_binary_set():
    ids = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    out = zero_shot(Agree(), tokenize, cfg_for_tests(), TensorDataset(coded_images(ids), ids), ['c0', 'c1'],
                    ['{}'], 'roc_auc')
    assert out['roc_auc_z'] == out['roc_auc_ens0.5'] == 100 and out['acc1_h'] == 100
    flipped = TensorDataset(coded_images(ids), 1 - ids)
    assert zero_shot(Agree(), tokenize, cfg_for_tests(), flipped, ['c0', 'c1'], ['{}'], 'roc_auc')['roc_auc_z'] == 0


def _distributed_worker(rank, world_size, tmp):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{tmp}/rendezvous', rank=rank, world_size=world_size)
    ids = torch.arange(13) % 3  # 13 samples: not a multiple of the world size, so padding would show
    labels = torch.tensor([0, 1, 2, 0, 2, 2, 1, 0, 1, 0, 2, 1, 1])
    out = zero_shot(Agree(), tokenize, cfg_for_tests(eval_batch_size=2), TensorDataset(coded_images(ids), labels),
                    CLASSES[:3], TEMPLATES, 'mean_per_class', rank, world_size)
    images = TensorDataset(coded_images(torch.arange(5)), torch.arange(5))
    found = retrieval(Agree(), tokenize, cfg_for_tests(eval_batch_size=2), images, [f'c{i % 5}' for i in range(7)],
                      [i % 5 for i in range(7)], rank, world_size)
    out.update({f'retrieval_{k}' if k in ('images', 'captions', 'skipped') else k: v for k, v in found.items()})
    undecoded = torch.tensor([0, -1, 2, 0, -1, 2, 1, 0, -1, 0, 2, 1, 1])  # -1: what ImageList gives a broken file
    partial = zero_shot(Agree(), tokenize, cfg_for_tests(eval_batch_size=2), TensorDataset(coded_images(ids),
                        undecoded), CLASSES[:3], TEMPLATES, 'acc', rank, world_size)
    out.update(partial_images=partial['images'], partial_skipped=partial['skipped'], partial_acc1=partial['acc1_z'])
    Path(tmp, f'rank{rank}.json').write_text(json.dumps(out))
    dist.destroy_process_group()


def test_data_parallel_counts_are_exact(tmp_path):
    torch.multiprocessing.spawn(_distributed_worker, args=(2, str(tmp_path)), nprocs=2)
    ids = torch.arange(13) % 3
    labels = torch.tensor([0, 1, 2, 0, 2, 2, 1, 0, 1, 0, 2, 1, 1])
    single = zero_shot(Agree(), tokenize, cfg_for_tests(), TensorDataset(coded_images(ids), labels), CLASSES[:3],
                       TEMPLATES, 'mean_per_class')  # the same computation in one process
    hits = (ids == labels)
    assert single['acc1_z'] == pytest.approx(100 * hits.float().mean().item())
    for rank in range(2):
        got = json.loads((tmp_path / f'rank{rank}.json').read_text())
        assert {k: got[k] for k in single} == pytest.approx(single)
        assert got['i2t_r1_z'] == got['t2i_r1_z'] == 100
        assert (got['retrieval_images'], got['retrieval_captions'], got['retrieval_skipped']) == (5, 7, 0)
        # skipped samples are counted over both ranks and left out of the metrics: 10 kept, 5 of them right
        assert (got['partial_images'], got['partial_skipped']) == (10, 3) and got['partial_acc1'] == 50


# --- Retrieval ---
def test_recall_hand_computed_with_several_captions():
    # 2 images; captions 0, 1 describe image 0, caption 2 describes image 1
    sim = torch.tensor([[0.1, 0.9, 0.5],
                        [0.8, 0.2, 0.3]])
    out = recall_at_k(sim, torch.tensor([0, 1]), torch.tensor([0, 0, 1]), ks=(1, 2))
    # image 0: its best caption (0.9) is first; image 1: caption 2 (0.3) is behind caption 0 (0.8)
    assert out['i2t_r1'] == 50 and out['i2t_r2'] == 100
    # caption 0: image 0 (0.1) is behind image 1 (0.8); caption 1: first; caption 2: image 1 (0.3) behind 0.5
    assert out['t2i_r1'] == pytest.approx(100 / 3) and out['t2i_r2'] == 100


def test_retrieval_perfect_for_agreeing_model_and_chance_for_random():
    images = TensorDataset(coded_images(torch.arange(12)), torch.arange(12))
    captions = [f'c{i % 12} again' if i >= 12 else f'c{i}' for i in range(30)]
    out = retrieval(Agree(), tokenize, cfg_for_tests(eval_batch_size=5), images, captions,
                    [i % 12 for i in range(30)])
    assert (out.pop('images'), out.pop('captions'), out.pop('skipped')) == (12, 30, 0)
    assert set(out.values()) == {100.0} and len(out) == 12  # 2 heads x 2 directions x k in 1, 5, 10
    g = torch.Generator().manual_seed(0)
    n = 400
    sim = torch.randn(n, 16, generator=g) @ torch.randn(n, 16, generator=g).T
    out = recall_at_k(sim, torch.arange(n), torch.arange(n))
    # P(hit@k) = k / 400: R@10 has mean 2.5 points and sd 0.8
    assert out['i2t_r1'] < 2 and out['t2i_r1'] < 2 and out['i2t_r10'] < 7 and out['t2i_r10'] < 7


# --- Datasets and bad input ---
def save_images(folder, count, size=8):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new('RGB', (size, size), (40 * i % 255, 80, 120)).save(folder / f'{i}.png')


def test_dataset_layout_errors(tmp_path):
    with pytest.raises(UserError, match=r'dtd: expected .*/test/ with one sub-folder'):
        build_dataset('dtd', tmp_path, None, ['a', 'b'])
    save_images(tmp_path / 'test' / 'a', 1)
    save_images(tmp_path / 'test' / 'b', 1)
    with pytest.raises(UserError, match='the data has 2 classes but 3 class names are given'):
        build_dataset('dtd', tmp_path, None, ['a', 'b', 'c'])
    assert build_dataset('dtd', tmp_path, None, ['a', 'b']).labels == [0, 1]
    (tmp_path / 'test' / 'c').mkdir()
    with pytest.raises(UserError, match=r'dtd: .*/test/ needs one sub-folder of images per class \(Found no valid'):
        build_dataset('dtd', tmp_path, None, ['a', 'b', 'c'])
    with pytest.raises(UserError, match=r"cifar10: expected .*/cifar-10-batches-py/test_batch \(the test files"):
        build_dataset('cifar10', tmp_path, None, list(range(10)))


def test_torchvision_reader_mnist(tmp_path):
    raw = tmp_path / 'MNIST' / 'raw'  # what torchvision.datasets.MNIST(root, download=True) writes
    raw.mkdir(parents=True)
    for split, labels in (('t10k', [7, 2, 1]), ('train', [5])):
        images = np.stack([np.full((28, 28), 50 * i, np.uint8) for i in range(len(labels))])
        (raw / f'{split}-images-idx3-ubyte').write_bytes(struct.pack('>IIII', 2051, len(labels), 28, 28) +
                                                         images.tobytes())
        (raw / f'{split}-labels-idx1-ubyte').write_bytes(struct.pack('>II', 2049, len(labels)) + bytes(labels))
    data = build_dataset('mnist', tmp_path, evaluate.eval_transform(Config(image_size=16)), [str(i) for i in range(10)])
    (image, label), std = data[2], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert len(data) == 3 and label == 1 and image.shape == (3, 16, 16)  # the test split, grey -> RGB
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    assert torch.allclose(image * std + mean, torch.full((3, 16, 16), 100 / 255), atol=1e-5)


def test_clevr_counts_file_list(tmp_path):
    save_images(tmp_path / 'img', 3)
    np.save(tmp_path / 'val_images.npy', np.array(['img/0.png', 'img/1.png', str(tmp_path / 'img/2.png')]))
    np.save(tmp_path / 'val_labels.npy', np.array(['count_3', 'count_10', 'count_9']))
    names = ['10', '3', '4', '5', '6', '7', '8', '9']
    data = build_dataset('clevr_counts', tmp_path, lambda img: img.size, names)
    assert [data[i] for i in range(3)] == [((8, 8), 1), ((8, 8), 0), ((8, 8), 7)]
    np.save(tmp_path / 'val_labels.npy', np.array(['count_3', 'count_11', 'count_9']))
    with pytest.raises(UserError, match=r"labels \['count_11'\] are not among"):
        build_dataset('clevr_counts', tmp_path, None, names)


def test_read_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match='not found'):
        read_checkpoint(tmp_path / 'nope.pt')
    (tmp_path / 'junk.pt').write_bytes(b'not a zip at all')
    with pytest.raises(UserError, match='corrupt or unreadable'):
        read_checkpoint(tmp_path / 'junk.pt')
    torch.save({'visual.proj': torch.zeros(2)}, tmp_path / 'raw.pt')
    with pytest.raises(UserError, match=r"raw state_dict of 1 tensors \(e.g. 'visual.proj'\)"):
        read_checkpoint(tmp_path / 'raw.pt')
    torch.save({'epoch': 3, 'name': 'RN50', 'state_dict': {}}, tmp_path / 'openclip.pt')
    with pytest.raises(UserError, match=r"keys \['epoch', 'name', 'state_dict'\]"):
        read_checkpoint(tmp_path / 'openclip.pt')
    torch.save({'format': 'rocket-clip/0'}, tmp_path / 'old.pt')
    with pytest.raises(UserError, match="found format='rocket-clip/0'"):
        read_checkpoint(tmp_path / 'old.pt')


def run_main(argv, capsys):
    """(exit status, stderr) of the CLI."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    torch.save({'state_dict': {}}, tmp_path / 'foreign.pt')
    cases = [([tmp_path / 'missing.pt'], 1, 'not found'), ([tmp_path / 'foreign.pt'], 1, 'not a rocket-clip'),
             ([tmp_path / 'x.pt', '--dataset=cifar10'], 2, 'did you mean --datasets'),
             ([tmp_path / 'x.pt', '--datasets=cifar11'], 2, 'did you mean cifar10'),
             ([tmp_path / 'x.pt', '--batch_size=0'], 2, 'integer >= 1'), (['--out=x.json'], 2, 'usage'),
             ([tmp_path / 'x.pt', '--workers=-1'], 2, 'integer >= 0'),
             ([tmp_path / 'x.pt', '--precision=fp64'], 2, 'choose fp32, bf16'),
             (['--check_data'], 2, 'needs --data_root'), ([tmp_path / 'x.pt', '--check_data'], 2, 'no checkpoint')]
    for argv, status, message in cases:
        code, err = run_main(argv, capsys)
        assert code == status and message in err and len(err.strip().splitlines()) == 1, (argv, err)


# --- End to end: a real tiny model, checkpoint and ImageFolder ---
@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint in train.py's format of an untrained tiny rocket model (demo vocabulary, 16 px)."""
    if not (ROOT / 'assets' / 'demo_bpe.txt.gz').exists():
        pytest.skip('the demo vocabulary assets/demo_bpe.txt.gz is not built yet')
    return save_tiny(tmp_path_factory.mktemp('ckpt') / 'ckpt.pt')


def save_tiny(path, bpe_merges=None, **cfg_overrides):
    """Write a tiny untrained rocket model in train.py's format; bpe_merges as train.py adds them (None: an older
    checkpoint without them)."""
    cfg = Config(vision_width=32, vision_layers=1, vision_heads=2, patch_size=8, text_width=32, text_heads=2,
                 text_layers=1, embed_dim=16, mlp_hidden_dim=32, image_size=16, local_crop_size=16,
                 eval_batch_size=4, workers=0, demo_val_size=12, **cfg_overrides)
    torch.manual_seed(0)
    model = evaluate.build_model(cfg, evaluate.build_tokenizer(cfg).vocab_size)
    ckpt = {'format': 'rocket-clip/1', 'config': cfg.to_dict(), 'model': model.state_dict(), 'optimizer': {},
            'scaler': {}, 'momentum_model': None, 'epoch': 2, 'step': 10, 'rng': [], 'data': {}, 'metrics': {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt if bpe_merges is None else {**ckpt, 'bpe_merges': bpe_merges}, path)
    return path


HEADS = ['z', 'h'] + [f'ens{w}' for w in ENSEMBLE_WEIGHTS]
RECALLS = {f'{d}_r{k}_{h}' for d in ('i2t', 't2i') for k in (1, 5, 10) for h in ('z', 'h')}
COUNTS = {'images', 'skipped'}


def test_end_to_end_image_folder_and_csv(tiny_checkpoint, tmp_path, capsys):
    for c, n in (('banded', 3), ('dotted', 2), ('woven', 2)):
        save_images(tmp_path / 'data' / 'dtd' / 'test' / c, n, size=20)
    (tmp_path / 'labels.json').write_text(json.dumps({'dtd': ['banded', 'dotted', 'woven']}))
    (tmp_path / 'templates.json').write_text(json.dumps({'dtd': ['a photo of a {} texture.', 'a {} thing.']}))
    (tmp_path / 'pairs.csv').write_text('image,caption\ndata/dtd/test/woven/0.png,a woven thing\n'
                                        'data/dtd/test/woven/0.png,woven cloth\ndata/dtd/test/banded/1.png,stripes\n')
    ckpt = tmp_path / 'ckpt.pt'
    ckpt.write_bytes(tiny_checkpoint.read_bytes())
    argv = [ckpt, f'--data_root={tmp_path / "data"}', f'--labels={tmp_path / "labels.json"}',
            f'--templates={tmp_path / "templates.json"}', '--datasets=dtd,cifar10', '--batch_size=3',
            f'--retrieval={tmp_path / "pairs.csv"}', '--device=cpu']
    records = main([str(a) for a in argv])
    out = capsys.readouterr().out
    assert f"skip cifar10: no data at {tmp_path / 'data' / 'cifar10'}" in out and 'dtd' in out.splitlines()[-3]
    assert re.search(r'^dtd: start\ndtd: done, 7 images in [\d.]+ s \([\d.]+ images/s\), acc1_z [\d.]+$', out, re.M)
    saved = json.loads((tmp_path / 'ckpt_eval.json').read_text())
    assert saved == json.loads(json.dumps(records[0]))
    assert (saved['epoch'], saved['step'], sorted(saved['results'])) == (2, 10, ['dtd', 'retrieval'])
    assert set(saved['results']['dtd']) == {f'{m}_{k}' for m in ('acc1', 'acc5') for k in HEADS} | COUNTS
    assert set(saved['results']['retrieval']) == RECALLS | COUNTS | {'captions'}
    assert saved['results']['dtd']['acc5_z'] == 100  # 3 classes: every label is in the top 5
    assert saved['results']['retrieval']['i2t_r5_z'] == 100  # 2 images
    main([str(a) for a in argv + [ckpt, f'--out={tmp_path / "both.json"}']])
    both = json.loads((tmp_path / 'both.json').read_text())
    assert len(both) == 2 and both[0]['results'] == both[1]['results'] == saved['results']
    assert capsys.readouterr().out.splitlines()[-2].startswith('ckpt.pt')  # a row per checkpoint, then 'wrote'


def test_end_to_end_demo_tasks(tiny_checkpoint, tmp_path, capsys):
    results = main([str(tiny_checkpoint), '--datasets=demo', f'--out={tmp_path / "demo.json"}'])[0]['results']
    assert json.loads((tmp_path / 'demo.json').read_text())[0]['results'] == results
    tasks = {f'demo_{t.name}': t for t in evaluate.demo_eval_tasks(Config(demo_val_size=12))}
    assert set(results) == set(tasks) | {'demo_retrieval'}
    assert set(results['demo_retrieval']) == RECALLS | COUNTS | {'captions'}
    for name, task in tasks.items():
        assert set(results[name]) == {f'{m}_{k}' for m in ('acc1', 'acc5') for k in HEADS} | COUNTS
        assert results[name]['images'] == len(task.dataset) and results[name]['skipped'] == 0
        assert all(0 <= v <= 100 for k, v in results[name].items() if k not in COUNTS)
        if len(task.classnames) <= 5:
            assert results[name]['acc5_z'] == 100


# --- Portable checkpoints ---
def test_moved_checkpoint_evaluates_without_its_bpe_file(tmp_path, capsys):
    bpe = tmp_path / 'vocab' / 'merges.txt.gz'
    bpe.parent.mkdir()
    bpe.write_bytes(data.DEMO_BPE_PATH.read_bytes())
    first = save_tiny(tmp_path / 'a' / 'ckpt.pt', data.checkpoint_merges(str(bpe)), bpe_path=str(bpe))
    old = save_tiny(tmp_path / 'a' / 'old.pt', bpe_path=str(bpe))  # a checkpoint that carries no merges
    before = main([str(first), '--datasets=demo'])[0]['results']
    moved = tmp_path / 'b' / 'ckpt.pt'
    moved.parent.mkdir()
    first.rename(moved)
    shutil.rmtree(bpe.parent)
    assert main([str(moved), '--datasets=demo'])[0]['results'] == before
    assert json.loads((tmp_path / 'b' / 'ckpt_eval.json').read_text())['results'] == before
    code, err = run_main([old, '--datasets=demo'], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and 'Traceback' not in err
    assert f'{bpe} not found' in err and 'pass --bpe_path=FILE' in err
    assert main([str(old), '--datasets=demo', f'--bpe_path={data.DEMO_BPE_PATH}'])[0]['results'] == before


def test_weights_that_do_not_fit_name_the_tensor_and_shapes(tmp_path, capsys):
    path = save_tiny(tmp_path / 'ckpt.pt')
    ckpt = torch.load(path, weights_only=True)
    key = next(k for k in ckpt['model'] if k.endswith('token_embedding.weight'))
    rows, width = ckpt['model'][key].shape
    ckpt['model'][key] = torch.zeros(rows + 1, width)
    torch.save(ckpt, path)
    code, err = run_main([path, '--datasets=demo'], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f'size mismatch for {key}: copying a param with shape torch.Size([{rows + 1}, {width}])' in err
    assert f'the shape in current model is torch.Size([{rows}, {width}])' in err


# --- Robust readers ---
def noise_jpeg(size=(40, 30), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, 'JPEG', quality=90)
    return out.getvalue()


def label_files(tmp_path, classes):
    """--labels and --templates flags for {dataset: class names}."""
    (tmp_path / 'labels.json').write_text(json.dumps(classes))
    (tmp_path / 'templates.json').write_text(json.dumps({d: ['a photo of a {}.'] for d in classes}))
    return [f'--labels={tmp_path / "labels.json"}', f'--templates={tmp_path / "templates.json"}']


def test_truncated_images_load_and_undecodable_ones_are_skipped(tiny_checkpoint, tmp_path, capsys):
    split = tmp_path / 'data' / 'pets' / 'test'
    for c in ('cat', 'dog'):
        save_images(split / c, 2, size=20)
    truncated, broken = split / 'cat' / 'truncated.jpg', split / 'dog' / 'broken.jpg'
    truncated.write_bytes(noise_jpeg()[:700])  # the headers and the first rows of blocks
    broken.write_bytes(b'not an image at all')
    with pytest.raises(OSError, match='truncated'):
        Image.open(truncated).load()  # Pillow's default, which training keeps
    image, label = build_dataset('pets', tmp_path / 'data' / 'pets', np.asarray, ['cat', 'dog'])[2]
    assert label == 0 and image.shape == (30, 40, 3)  # sorted: 0.png, 1.png, truncated.jpg
    (tmp_path / 'pairs.csv').write_text('image,caption\ndata/pets/test/dog/broken.jpg,a dog\n'
                                        'data/pets/test/cat/0.png,a cat\ndata/pets/test/cat/0.png,a small cat\n')
    records = main([str(tiny_checkpoint), f'--data_root={tmp_path / "data"}', '--datasets=pets', '--workers=1',
                    f'--retrieval={tmp_path / "pairs.csv"}', f'--out={tmp_path / "out.json"}',
                    *label_files(tmp_path, {'pets': ['cat', 'dog']})])
    pets, found = records[0]['results']['pets'], records[0]['results']['retrieval']
    assert (pets['images'], pets['skipped'], pets['skipped_files']) == (5, 1, [str(broken)])
    assert 0 <= pets['mean_per_class_z'] <= 100
    assert (found['images'], found['captions'], found['skipped']) == (1, 2, 1) and found['i2t_r1_z'] == 100
    assert found['skipped_files'] == [str(tmp_path / 'data/pets/test/dog/broken.jpg')]
    out = capsys.readouterr().out
    assert 'pets: done, 5 images in ' in out and f', 1 undecodable images skipped (e.g. {broken})\n' in out
    assert not evaluate.ImageFile.LOAD_TRUNCATED_IMAGES


def strict_json(path):
    """Parse as strict JSON: NaN or Infinity fail."""
    return json.loads(Path(path).read_text(), parse_constant=lambda c: pytest.fail(f'{c} in {path}'))


def test_a_failing_dataset_keeps_the_others_and_the_json_valid(tiny_checkpoint, tmp_path, capsys):
    root = tmp_path / 'data'
    for c in ('banded', 'dotted'):
        save_images(root / 'dtd' / 'test' / c, 2, size=20)
    for c in ('cat', 'dog', 'fox'):  # three folders for two labels
        save_images(root / 'pets' / 'test' / c, 1, size=20)
    (root / 'clevr_counts').mkdir(parents=True)
    np.save(root / 'clevr_counts' / 'val_images.npy', np.array([], dtype=str))  # an empty split
    np.save(root / 'clevr_counts' / 'val_labels.npy', np.array([], dtype=str))
    flags = [f'--data_root={root}', '--datasets=dtd,pets,clevr_counts', f'--out={tmp_path / "out.json"}',
             *label_files(tmp_path, {'dtd': ['banded', 'dotted'], 'pets': ['cat', 'dog'],
                                     'clevr_counts': ['10', '3', '4', '5', '6', '7', '8', '9']})]
    code, err = run_main([tiny_checkpoint, *flags], capsys)
    assert code == 1 and err.strip().splitlines() == [
        'error: clevr_counts, pets failed (reasons above and in the JSON); the other results are written']
    results = strict_json(tmp_path / 'out.json')[0]['results']
    assert results['dtd']['images'] == 4 and results['dtd']['acc5_z'] == 100
    assert results['pets'] == {'error': 'pets: the data has 3 classes but 2 class names are given; fix the class '
                                        'names (its row of EVAL_SETS, or --labels) or the dataset folder'}
    assert results['clevr_counts']['error'].startswith('clevr_counts: the val split under')

    def deliberate_bug(*args, **kwargs):
        raise RuntimeError('a deliberate bug')
    real = evaluate.zero_shot
    evaluate.zero_shot = lambda *a, **k: (deliberate_bug if a[3].labels == [0, 1, 2] else real)(*a, **k)
    try:  # a bug keeps its traceback; the datasets finished before it are already in the JSON
        with pytest.raises(RuntimeError, match='deliberate'):
            main([str(tiny_checkpoint), *flags[:-3], '--datasets=dtd,pets', f'--out={tmp_path / "bug.json"}',
                  *label_files(tmp_path, {'dtd': ['banded', 'dotted'], 'pets': ['cat', 'dog', 'fox']})])
    finally:
        evaluate.zero_shot = real
    assert list(strict_json(tmp_path / 'bug.json')[0]['results']) == ['dtd']


def test_undefined_metrics_are_null_with_a_reason():
    ids = torch.ones(4, dtype=torch.long)  # one class only: ROC-AUC has no negatives
    out = zero_shot(Agree(), tokenize, cfg_for_tests(), TensorDataset(coded_images(ids), ids), ['c0', 'c1'], ['{}'],
                    'roc_auc')
    assert out['roc_auc_z'] is None and 'one class' in out['note'] and out['acc1_z'] == 100
    json.dumps(out, allow_nan=False)
    broken = TensorDataset(coded_images(ids), -ids)  # every sample undecodable
    with pytest.raises(UserError, match='no image of the 4 in the split could be decoded'):
        zero_shot(Agree(), tokenize, cfg_for_tests(), broken, ['c0', 'c1'], ['{}'], 'acc')


def test_precision_defaults_to_fp32_whatever_the_training_run_used(tmp_path, monkeypatch):
    path = save_tiny(tmp_path / 'ckpt.pt', precision='bf16')
    seen = []
    real = evaluate.autocast_dtype
    monkeypatch.setattr(evaluate, 'autocast_dtype', lambda cfg, device: seen.append(cfg.precision) or
                        real(cfg, device))
    main([str(path), '--datasets=demo'])
    assert set(seen) == {'fp32'}
    seen.clear()
    results = main([str(path), '--datasets=demo', '--precision=bf16'])[0]['results']
    assert set(seen) == {'bf16'} and 0 <= results['demo_shape']['acc1_z'] <= 100


# --- Torchvision-format sets from their test files alone, and --check_data ---
def write_idx(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(f'>I{array.ndim}I', 0x800 + array.ndim, *array.shape) + array.tobytes())


def write_cifar(path, images, labels, label_key):
    """A CIFAR python batch: rows of R, G and B planes (row-major), as the dataset's site describes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    path.write_bytes(pickle.dumps({'batch_label': 'testing batch 1 of 1', 'data': rows, label_key: labels},
                                  protocol=2))


def write_stl10(folder, images, labels):
    """STL-10's binary: per image, the R, G and B planes each in column-major order; labels 1..10."""
    folder.mkdir(parents=True, exist_ok=True)
    planes = [np.ravel(img[:, :, c], order='F') for img in images for c in range(3)]
    (folder / 'test_X.bin').write_bytes(np.concatenate(planes).tobytes())
    (folder / 'test_y.bin').write_bytes(np.asarray(labels, np.uint8).tobytes() + b'')


def random_images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_cifar_and_stl10_read_their_test_files_alone(tmp_path):
    ten, hundred, stl = random_images(3, 32), random_images(2, 32, 1), random_images(2, 96, 2)
    write_cifar(tmp_path / 'c10' / 'cifar-10-batches-py' / 'test_batch', ten, [3, 0, 9], 'labels')
    write_cifar(tmp_path / 'c100' / 'cifar-100-python' / 'test', hundred, [99, 5], 'fine_labels')
    write_stl10(tmp_path / 'stl' / 'stl10_binary', stl, [1, 10])
    for name, root, images, labels in (('cifar10', 'c10', ten, [3, 0, 9]), ('cifar100', 'c100', hundred, [99, 5]),
                                       ('stl10', 'stl', stl, [0, 9])):
        got = build_dataset(name, tmp_path / root, np.asarray, EVAL_SETS[name].classnames)
        assert len(got) == len(images) and [got[i][1] for i in range(len(got))] == labels, name
        assert all(np.array_equal(got[i][0], images[i]) for i in range(len(got))), name
    class Evil:
        def __reduce__(self):
            return (print, ('pickled code ran',))
    (tmp_path / 'c10' / 'cifar-10-batches-py' / 'test_batch').write_bytes(pickle.dumps({'data': Evil()}))
    with pytest.raises(UserError, match=r'not a CIFAR python batch \(UnpicklingError: unexpected global'):
        build_dataset('cifar10', tmp_path / 'c10', None, list(range(10)))


def test_check_data_reports_each_layout(tmp_path, capsys):
    root = tmp_path / 'eval'
    save_images(root / 'dtd' / 'test' / 'banded', 2)
    save_images(root / 'dtd' / 'test' / 'dotted', 1)
    for c in ('cat', 'dog', 'fox'):
        save_images(root / 'pets' / 'test' / c, 1)
    write_idx(root / 'mnist' / 'MNIST' / 'raw' / 't10k-images-idx3-ubyte', np.zeros((3, 28, 28), np.uint8))
    write_idx(root / 'mnist' / 'MNIST' / 'raw' / 't10k-labels-idx1-ubyte', np.array([7, 2, 1], np.uint8))
    write_cifar(root / 'cifar10' / 'cifar-10-batches-py' / 'test_batch', random_images(4, 32), [0, 1, 2, 3], 'labels')
    (root / 'cifar100' / 'cifar-100-python').mkdir(parents=True)  # the folder, but not its test file
    write_stl10(root / 'stl10' / 'stl10_binary', random_images(2, 96), [1, 2])
    save_images(root / 'clevr_counts' / 'images', 3)
    np.save(root / 'clevr_counts' / 'val_images.npy', np.array([f'images/{i}.png' for i in range(3)]))
    np.save(root / 'clevr_counts' / 'val_labels.npy', np.array(['count_3', 'count_10', 'count_9']))
    (tmp_path / 'labels.json').write_text(json.dumps({'dtd': ['banded', 'dotted'], 'pets': ['cat', 'dog']}))
    statuses = main(['--check_data', f'--data_root={root}', f'--labels={tmp_path / "labels.json"}'])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:5] for line in lines[1:-1]}
    assert list(rows) == list(EVAL_SETS) == list(statuses) and len(lines) == len(EVAL_SETS) + 2
    assert rows['dtd'] == ['test', 'found', '3', '2'] and rows['mnist'] == ['test', 'found', '3', '10']
    assert rows['cifar10'] == ['test', 'found', '4', '10'] and rows['stl10'] == ['test', 'found', '2', '10']
    assert rows['clevr_counts'] == ['val', 'found', '3', '8'] and rows['imagenet'] == ['val', 'missing', '-', '-']
    assert rows['pets'][1] == 'malformed' and 'the data has 3 classes but 2 class names are given' in lines[10]
    assert rows['cifar100'][1] == 'malformed' and 'expected' in lines[5] and 'cifar-100-python/test' in lines[5]
    assert lines[-1].startswith(f'5 found, {len(EVAL_SETS) - 7} missing, 2 malformed')


# --- Retrieval ties ---
def test_retrieval_ties_count_against_the_hit():
    # image 0 ties its caption with caption 1; caption 1 ties its image with image 0
    sim = torch.tensor([[0.5, 0.5],
                        [0.2, 0.5]])
    out = recall_at_k(sim, torch.tensor([0, 1]), torch.tensor([0, 1]), ks=(1, 2))
    assert out == {'i2t_r1': 50, 'i2t_r2': 100, 't2i_r1': 50, 't2i_r2': 100}
    # a tie between two right captions is no miss; every score equal: R@1 = 0, not 100
    out = recall_at_k(torch.tensor([[0.7, 0.7, 0.1]]), torch.tensor([0]), torch.tensor([0, 0, 1]), ks=(1,))
    assert out['i2t_r1'] == 100
    out = recall_at_k(torch.ones(3, 3), torch.arange(3), torch.arange(3), ks=(1, 3))
    assert out == {'i2t_r1': 0, 'i2t_r3': 100, 't2i_r1': 0, 't2i_r3': 100}


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_two_ranks_report_a_failing_dataset_once(tiny_checkpoint, tmp_path):
    """evaluate.py as torchrun starts it (RANK, WORLD_SIZE, MASTER_* set), without torchrun's own report."""
    root = tmp_path / 'data'
    for c, n in (('banded', 3), ('dotted', 2)):
        save_images(root / 'dtd' / 'test' / c, n, size=20)
    save_images(root / 'pets' / 'test' / 'cat', 1, size=20)  # one folder for two labels
    broken = root / 'dtd' / 'test' / 'dotted' / 'broken.png'
    broken.write_bytes(b'\x89PNG but no more')
    argv = [sys.executable, 'evaluate.py', str(tiny_checkpoint), f'--data_root={root}', '--datasets=dtd,pets',
            '--device=cpu', f'--out={tmp_path / "out.json"}',
            *label_files(tmp_path, {'dtd': ['banded', 'dotted'], 'pets': ['cat', 'dog']})]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1',
           'MASTER_PORT': str(free_port())}
    ranks = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, 'RANK': str(r), 'LOCAL_RANK': str(r)}) for r in range(2)]
    (out0, err0), (out1, err1) = [p.communicate(timeout=300) for p in ranks]
    assert [p.returncode for p in ranks] == [1, 1] and err1 == '' and 'dtd: start' not in out1, err1
    assert err0.splitlines() == ['error: pets failed (reasons above and in the JSON); the other results are written']
    assert out0.count('dtd: done, 5 images') == 1 and 'pets: failed: the data has 1 classes' in out0
    results = strict_json(tmp_path / 'out.json')[0]['results']
    assert (results['dtd']['images'], results['dtd']['skipped']) == (5, 1) and 'error' in results['pets']
    assert results['dtd']['skipped_files'] == [str(broken)]  # found by rank 1 (the second half), gathered
