"""data.py datasets and loaders: every format from small fixtures, rank/worker splits, bad samples, the demo set."""
import collections
import contextlib
import csv
import dataclasses
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import config
from config import Config, UserError

import data as D
import train

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(**overrides):
    """Tiny views, captions untouched by text augmentation (so token row 0 names the sample), one process."""
    base = dict(image_size=16, local_crop_size=8, num_augs=2, remove_stopwords_prob=0.0, text_augment=False,
                workers=0, batch_size=2, seed=3, demo_val_size=40, eval_batch_size=4)
    return Config(**{**base, **overrides})


def chars(texts):
    """A tokenizer independent of data.py: code points, zero-padded to (N, 77)."""
    out = torch.zeros(len(texts), 77, dtype=torch.long)
    for i, t in enumerate(texts):
        out[i, :len(t)] = torch.tensor([ord(c) for c in t], dtype=torch.long)
    return out


def text_of(row):
    return ''.join(chr(c) for c in row.tolist() if c)


def jpeg(i, size=(20, 14)):
    """Distinct real JPEG bytes: a colour ramp whose hue depends on i."""
    x = np.linspace(0, 255, size[0], dtype=np.float32)[None, :, None]
    pixels = (x + np.array([40 * i, 255 - 30 * i, 90 * i]) + np.zeros((size[1], 1, 3))) % 256
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, 'JPEG', quality=90)
    return buf.getvalue()


def write_tar(path, members):
    with tarfile.open(path, 'w') as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


N = 6
CAPTIONS = [f'caption number {i}' for i in range(N)]


def write_formats(root):
    """The same N images and captions as cc3m/cc12m .npy, a yfcc pickle + zips, CSV, TSV and tar shards."""
    (root / 'img').mkdir()
    for i in range(N):
        (root / 'img' / f'{i}.jpg').write_bytes(jpeg(i))
    np.save(root / 'cc3m.npy', np.array([{'image_id': f'img/{i}.jpg', 'captions': [CAPTIONS[i]]} for i in range(N)]))
    np.save(root / 'cc12m.npy', np.array([{'image_name': f'img/{i}.jpg', 'image_id': i, 'captions': [CAPTIONS[i]]}
                                          for i in range(N)]))
    ids = [12345000 + i if i < 3 else 12346000 + i for i in range(N)]  # two archives: images/12/345.zip, 346.zip
    for i, image_id in enumerate(ids):
        name = f'{image_id:08d}'
        (root / 'images' / name[:2]).mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(root / 'images' / name[:2] / f'{name[2:5]}.zip', 'a') as zf:
            zf.writestr(f'{name[5:]}.jpg', jpeg(i))
    with open(root / 'yfcc.pkl', 'wb') as f:
        pickle.dump([(image_id, CAPTIONS[i], '') for i, image_id in enumerate(ids)], f)
    (root / 'pairs.csv').write_text('filepath,title\n' + ''.join(f'img/{i}.jpg,{CAPTIONS[i]}\n' for i in range(N)))
    (root / 'pairs.tsv').write_text('text\timage\n' + ''.join(f'{CAPTIONS[i]}\timg/{i}.jpg\n' for i in range(N)))
    (root / 'shards').mkdir()
    for s in range(2):
        samples = [(f'{i:05d}.jpg', jpeg(i)) if k == 0 else (f'{i:05d}.txt', CAPTIONS[i].encode())
                   for i in range(3 * s, 3 * s + 3) for k in (0, 1)]
        write_tar(root / 'shards' / f'{s:02d}.tar', samples)
    return {'cc3m': cfg_for(dataset='cc3m', metadata=str(root / 'cc3m.npy'), root=str(root)),
            'cc12m': cfg_for(dataset='cc12m', metadata=str(root / 'cc12m.npy'), root=str(root)),
            'yfcc15m': cfg_for(dataset='yfcc15m', metadata=str(root / 'yfcc.pkl'), root=str(root)),
            'csv': cfg_for(dataset='csv', metadata=str(root / 'pairs.csv')),
            'tsv': cfg_for(dataset='csv', metadata=str(root / 'pairs.tsv'), csv_image_key='image',
                           csv_caption_key='text'),
            'wds': cfg_for(dataset='wds', metadata=str(root / 'shards' / '{00..01}.tar'))}


def assert_same_sample(a, b):
    """Same views and tokens; a batch's token rows may end early, where only padding followed (data.trim_tokens)."""
    L = a['tokens'].shape[-1]
    assert torch.equal(a['weak'], b['weak']) and torch.equal(a['tokens'], b['tokens'][..., :L])
    assert not b['tokens'][..., L:].any()
    assert len(a['strong']) == len(b['strong']) and all(map(torch.equal, a['strong'], b['strong']))


# --- Datasets ---
def test_every_format_reads_the_same_images_captions_and_samples(tmp_path):
    cfgs = write_formats(tmp_path)
    pixels = [np.asarray(Image.open(tmp_path / 'img' / f'{i}.jpg').convert('RGB')) for i in range(N)]
    reference = D.build_train_loader(cfgs['cc3m'], chars).dataset
    for name in ('cc3m', 'cc12m', 'yfcc15m', 'csv', 'tsv'):
        loader = D.build_train_loader(cfgs[name], chars)
        for i in range(N):
            image, captions = loader.dataset.reader.load(i)
            assert np.array_equal(np.asarray(image.convert('RGB')), pixels[i]) and captions == (CAPTIONS[i],), name
            sample = loader.dataset[(1, i)]
            assert text_of(sample['tokens'][0]) == CAPTIONS[i] and sample['skipped'] == 0
            assert_same_sample(sample, reference[(1, i)])
    # tar shards: the global sample index keys the same randomness, so samples match the map-style ones
    loader = D.build_train_loader(cfgs['wds'], chars)
    assert len(loader) == N // 2
    seen = []
    for batch in loader:
        for b in range(2):
            i = CAPTIONS.index(text_of(batch['tokens'][b, 0]))
            assert_same_sample({'weak': batch['weak'][b], 'tokens': batch['tokens'][b],
                                'strong': [s[b] for s in batch['strong']]}, reference[(0, i)])
            seen.append(i)
    assert sorted(seen) == list(range(N))



def test_step_side_views_through_worker_processes_and_tar_shards(tmp_path):
    """--augment_device=cuda through the tar-shard loader with 2 worker processes (packed pixels handed over in
    shared memory): finished in the step, the views equal the per-sample reference views (rounded to uint8 there)."""
    import augment
    cfgs = write_formats(tmp_path)
    reference = D.build_train_loader(cfgs['cc3m'], chars).dataset
    cfg = dataclasses.replace(cfgs['wds'], augment_device='cuda', workers=2)
    loader, seen = D.build_train_loader(cfg, chars), []
    for batch in loader:
        weak, strong = augment.finish_views(batch, cfg, torch.device('cpu'))
        for b in range(len(weak)):
            i = CAPTIONS.index(text_of(batch['tokens'][b, 0]))
            want = reference[(0, i)]
            assert torch.equal(weak[b], augment.normalize(want['weak'], cfg.image_mean, cfg.image_std))
            for s, w in zip(strong, want['strong']):
                torch.testing.assert_close(s[b], augment.normalize(w, cfg.image_mean, cfg.image_std),
                                           atol=0.5 / 255 / min(cfg.image_std) + 1e-6, rtol=0)
            seen.append(i)
    assert len(seen) == len(loader) * cfg.batch_size == N  # one shard per worker: a 3-sample shard is re-read

def test_merged29m_maps_global_indices_through_the_offsets(tmp_path):
    cfgs = write_formats(tmp_path)
    cfg = dataclasses.replace(cfgs['cc3m'], dataset='merged29m', root='---'.join([str(tmp_path)] * 3),
                              metadata='---'.join(cfgs[k].metadata for k in ('cc3m', 'cc12m', 'yfcc15m')))
    reader = D.build_reader(cfg)
    assert len(reader) == 3 * N
    parts = [D.build_reader(cfgs[k]) for k in ('cc3m', 'cc12m', 'yfcc15m')]
    for i in range(3 * N):
        image, captions = reader.load(i)
        expected = parts[i // N].load(i % N)
        assert captions == expected[1] and np.array_equal(np.asarray(image), np.asarray(expected[0]))


def test_caption_sampling_single_and_multi(tmp_path):
    cfgs = write_formats(tmp_path)
    two = [[f'first {i}', f'second {i}'] for i in range(N)]
    np.save(tmp_path / 'two.npy', np.array([{'image_id': f'img/{i}.jpg', 'captions': two[i]} for i in range(N)]))
    rows = {}
    for sampling in ('single', 'multi'):
        cfg = dataclasses.replace(cfgs['cc3m'], metadata=str(tmp_path / 'two.npy'), caption_sampling=sampling)
        dataset = D.build_train_loader(cfg, chars).dataset
        rows[sampling] = [[text_of(r) for r in dataset[(e, i)]['tokens']] for e in range(4) for i in range(N)]
    # single: one caption drawn per sample for all 1+A rows, both candidates drawn across samples
    assert all(len(set(r)) == 1 for r in rows['single'])
    assert {r[0].split()[0] for r in rows['single']} == {'first', 'second'}
    # multi: each row draws its own caption
    assert any(len(set(r)) == 2 for r in rows['multi'])
    assert all(set(r) <= {f'first {i}', f'second {i}'} for e in range(4) for i, r in
               enumerate(rows['multi'][e * N:(e + 1) * N]))


def test_bad_samples_are_replaced_by_drawn_rows_and_counted_once(tmp_path):
    (tmp_path / 'img').mkdir()
    good = jpeg(1)
    files = {'0.jpg': good, '2.jpg': b'', '3.jpg': good[:len(good) // 2], '4.jpg': b'not an image', '5.jpg': jpeg(5),
             '6.jpg': jpeg(6)}  # 1.jpg is missing
    for name, payload in files.items():
        (tmp_path / 'img' / name).write_bytes(payload)
    (tmp_path / 'bad.csv').write_text('filepath,title\n' + ''.join(f'img/{i}.jpg,c{i}\n' for i in range(7)))
    cfg = cfg_for(dataset='csv', metadata=str(tmp_path / 'bad.csv'), batch_size=1)
    loader = D.build_train_loader(cfg, chars)
    for i in range(7):
        sample, bad = loader.dataset[(0, i)], i in (1, 2, 3, 4)
        assert sample['skipped'] == bad and text_of(sample['tokens'][0]) in ({'c0', 'c5', 'c6'} if bad else {f'c{i}'})
        names = json.loads(sample['skipped_files'])
        assert [n[0] for n in names] == ([str(tmp_path / 'img' / f'{i}.jpg')] if bad else [])
    assert json.loads(loader.dataset[(0, 1)]['skipped_files'])[0][1].startswith('FileNotFoundError: ')
    assert sum(int(b['skipped'].sum()) for b in loader) == 4  # each index of the epoch once
    # captions that are not text
    np.save(tmp_path / 'nontext.npy', np.array([{'image_id': 'img/0.jpg', 'captions': c} for c in
                                                (None, [3], [], ['ok'])], dtype=object))
    dataset = D.build_train_loader(dataclasses.replace(cfg, dataset='cc3m', metadata=str(tmp_path / 'nontext.npy'),
                                                       root=str(tmp_path)), chars).dataset
    assert [(text_of(dataset[(0, i)]['tokens'][0]), dataset[(0, i)]['skipped']) for i in range(4)] == \
        [('ok', 1), ('ok', 1), ('ok', 1), ('ok', 0)]


def test_bad_fraction_threshold():
    cfg = cfg_for(bad_sample_threshold=0.01)
    D.check_bad_fraction(0, 0, cfg)
    D.check_bad_fraction(1, 100, cfg)  # exactly 1% is allowed
    with pytest.raises(UserError, match=r'2 of 100 samples .*--bad_sample_threshold=0.01'):
        D.check_bad_fraction(2, 100, cfg)


def test_corrupt_tar_members_are_skipped_and_counted(tmp_path):
    members = [('00000.jpg', jpeg(0)), ('00000.txt', b'good zero'),
               ('00001.jpg', b'garbage'), ('00001.txt', b'bad image'),
               ('00002.jpg', jpeg(2)), ('00002.txt', b'\xff\xfe not utf-8'),
               ('00003.jpg', jpeg(3)),  # no caption
               ('00004.jpg', jpeg(4)), ('00004.txt', b'good four'),
               ('00005.jpg', jpeg(5)), ('00005.txt', b'good five'), ('00006.jpg', jpeg(6) * 20)]
    write_tar(tmp_path / 'a.tar', members)
    with tarfile.open(tmp_path / 'a.tar') as tar:
        last = tar.getmembers()[-1]
    data = (tmp_path / 'a.tar').read_bytes()
    (tmp_path / 'a.tar').write_bytes(data[:last.offset_data + last.size // 2])  # cut inside the last member
    cfg = cfg_for(dataset='wds', metadata=str(tmp_path / 'a.tar'), batch_size=1)
    loader = D.build_train_loader(cfg, chars)
    assert len(loader) == 7  # sample keys found by the header scan
    batches = list(loader)
    assert len(batches) == 7
    assert {text_of(b['tokens'][0, 0]) for b in batches} == {'good zero', 'good four', 'good five'}
    # the whole first pass (4 bad samples + the broken tail) is buffered and popped before any re-read
    assert sum(int(b['skipped'].sum()) for b in batches) >= 5


def test_bad_paths_and_formats_raise_one_line_before_loading(tmp_path):
    cfgs = write_formats(tmp_path)
    np.save(tmp_path / 'ints.npy', np.arange(3))
    with open(tmp_path / 'dict.pkl', 'wb') as f:
        pickle.dump({'a': 1}, f)
    r = dataclasses.replace
    cases = [(r(cfgs['cc3m'], metadata=str(tmp_path / 'nope.npy')), UserError, 'nope.npy not found'),
             (r(cfgs['cc3m'], root=str(tmp_path / 'nowhere')), UserError, 'nowhere not found'),
             (r(cfgs['cc3m'], root=str(tmp_path / 'shards')), ValueError, 'none of the first 6 samples'),
             (r(cfgs['cc12m'], metadata=str(tmp_path / 'ints.npy')), UserError, "{'image_name'"),
             (r(cfgs['cc12m'], metadata=str(tmp_path / 'cc3m.npy')), UserError, "{'image_name'"),
             (r(cfgs['yfcc15m'], metadata=str(tmp_path / 'dict.pkl')), UserError, 'pickled list'),
             (r(cfgs['csv'], csv_caption_key='caption'), UserError, "no column 'caption'"),
             (r(cfgs['wds'], metadata=str(tmp_path / 'shards' / '{00..02}.tar')), UserError, '1 of 3 shards'),
             (r(cfgs['wds'], workers=3), ValueError, '2 shards cannot feed'),
             (r(cfgs['cc3m'], dataset='merged29m'), ValueError, "joined by '---'"),
             (r(cfgs['cc3m'], batch_size=7), ValueError, 'less than one batch')]
    for cfg, error, message in cases:
        with pytest.raises(error) as info:
            D.build_train_loader(cfg, chars)
        assert message in str(info.value) and '\n' not in str(info.value), str(info.value)


def test_metadata_arrays_give_back_exactly_the_source_captions_paths_and_ids(tmp_path):
    texts = ['plain', '', 'émoji 🚀 and 漢字', 'combining e\u0301', 'nul \x00 inside', 'tab\tnew\nline', 'lone \ud800']
    (tmp_path / 'img').mkdir()
    (tmp_path / 'img' / 'x.jpg').write_bytes(jpeg(0))  # build_reader needs one readable sample
    captions = [[t] for t in texts] + [texts[:3], ['', ''], None, [3], []]
    paths = ['img/x.jpg'] + [f'dir/ünï/{i} {t[:4]}.jpg' for i, t in enumerate(texts + ['a'] * 5)][1:]
    np.save(tmp_path / 'm.npy', np.array([{'image_id': p, 'captions': c} for p, c in zip(paths, captions)]))
    reader = D.build_reader(cfg_for(dataset='cc3m', metadata=str(tmp_path / 'm.npy'), root=str(tmp_path)))
    assert [reader.paths[i] for i in range(len(paths))] == paths
    assert [reader.captions[i] for i in range(len(texts) + 2)] == [tuple(c) for c in captions[:len(texts) + 2]]
    for i in range(len(texts) + 2, len(paths)):  # not text: a bad sample when read, as before
        with pytest.raises(ValueError, match='not text'):
            reader.captions[i]
    # memory: the UTF-8 text plus one int64 offset per entry and field, the separators of multi-caption entries
    raw = sum(len(p.encode()) for p in paths) + sum(len(t.encode('utf-8', 'surrogatepass')) for c in captions[:-3]
                                                    for t in c)
    separators = 2 + 1 + 3  # two multi-caption entries (3 and 2 captions), 3 entries marked not-text (1 byte)
    size = sum(a.nbytes for a in (reader.paths.data, reader.paths.offsets, reader.captions.data,
                                  reader.captions.offsets))
    assert size == raw + separators + 2 * 8 * (len(paths) + 1)
    # YFCC: ids and (title, description); CSV, Unicode too
    ids = [12345000 + i for i in range(len(texts))]
    with open(tmp_path / 'y.pkl', 'wb') as f:
        pickle.dump([(i, t, texts[-1 - k]) for k, (i, t) in enumerate(zip(ids, texts))], f)
    yfcc_cfg = cfg_for(dataset='yfcc15m', metadata=str(tmp_path / 'y.pkl'), root=str(tmp_path),
                       output_dir=str(tmp_path / 'out'))
    yfcc = D.read_yfcc(yfcc_cfg)
    assert yfcc.ids.dtype == np.uint32 and yfcc.ids.tolist() == ids
    assert [yfcc.captions[k] for k in range(len(texts))] == [(t, texts[-1 - k]) for k, t in enumerate(texts)]
    yfcc = D.read_yfcc(yfcc_cfg)  # again, from the cached arrays
    assert isinstance(yfcc.ids, np.memmap) and yfcc.ids.tolist() == ids and yfcc.captions[2] == (texts[2], texts[-3])
    rows = [(f'img/{t[:3]}.jpg', t) for t in texts if '\x00' not in t and '\ud800' not in t and '\n' not in t]
    with open(tmp_path / 'u.csv', 'w', encoding='utf-8', newline='') as f:
        csv.writer(f).writerows([('filepath', 'title'), *rows])
    csv_reader = D.read_csv(cfg_for(dataset='csv', metadata=str(tmp_path / 'u.csv')))
    assert [(csv_reader.paths[i], csv_reader.captions[i]) for i in range(len(rows))] == [(p, (t,)) for p, t in rows]
    (tmp_path / 'bom.csv').write_bytes('\ufefffilepath,title\nimg/x.jpg,café\n'.encode())  # as Excel saves UTF-8
    assert D.read_csv(cfg_for(dataset='csv', metadata=str(tmp_path / 'bom.csv'))).captions[0] == ('café',)


def test_metadata_arrays_are_cached_reused_and_rebuilt_on_change(tmp_path, monkeypatch):
    cfg = write_formats(tmp_path)['cc3m']
    first = D.build_reader(cfg)
    assert (tmp_path / 'cc3m.npy.arrays' / 'stamp.json').is_file()
    parsed, load = [], np.load
    monkeypatch.setattr(np, 'load', lambda *a, **k: parsed.append(k.get('allow_pickle')) or load(*a, **k))
    second = D.build_reader(cfg)
    assert True not in parsed and isinstance(second.paths.data, np.memmap)  # the metadata was not parsed again
    assert all((second.paths[i], second.captions[i]) == (first.paths[i], first.captions[i]) for i in range(N))
    np.save(tmp_path / 'cc3m.npy', np.array([{'image_id': 'img/1.jpg', 'captions': ['changed']}]))
    third = D.build_reader(cfg)
    assert True in parsed and len(third) == 1 and third.captions[0] == ('changed',)
    # the folder beside the metadata cannot be made (here: a file has its name): the arrays go to output_dir
    (tmp_path / 'pairs.csv.arrays').write_text('')
    reader = D.build_reader(cfg_for(dataset='csv', metadata=str(tmp_path / 'pairs.csv'),
                                    output_dir=str(tmp_path / 'out')))
    assert (tmp_path / 'out' / 'pairs.csv.arrays' / 'stamp.json').is_file() and reader.captions[5] == (CAPTIONS[5],)


def upper_npy(cfg):
    """read_npy as a forker might edit it: the same file, row and settings, other code (captions upper-cased)."""
    def parse(path):
        meta = np.load(path, allow_pickle=True)
        return {**D.Strings.arrays('paths', [d['image_id'] for d in meta]),
                **D.CaptionLists.arrays('captions', [[c.upper() for c in d['captions']] for d in meta])}
    return D.FileReader(cfg.root, D.metadata_arrays(cfg, parse))


def test_an_edited_reader_parses_the_metadata_afresh(tmp_path, monkeypatch):
    """The cache keys on the reader's code: other code parses the unchanged file again, the same code reuses it."""
    cfg = write_formats(tmp_path)['cc3m']
    assert D.build_reader(cfg).captions[0] == (CAPTIONS[0],)
    monkeypatch.setitem(D.READERS, 'cc3m', D.READERS['cc3m']._replace(read=upper_npy))
    edited = D.build_reader(cfg)
    assert edited.captions[0] == (CAPTIONS[0].upper(),) and not isinstance(edited.paths.data, np.memmap)
    assert isinstance(D.build_reader(cfg).paths.data, np.memmap)  # unchanged code: the cached arrays
    monkeypatch.undo()
    assert D.build_reader(cfg).captions[0] == (CAPTIONS[0],)


def test_dataset_names_are_the_rows_of_readers(capsys):
    """train.py's --dataset takes the rows of READERS, and its --help lists them; a format needs no recipe; a recipe
    without a reader stops the import of data.py."""
    with pytest.raises(SystemExit):
        train.main(['--dataset=imagenet21k'])
    assert capsys.readouterr().err.strip() == f"error: --dataset=imagenet21k: choose one of {', '.join(D.READERS)}"
    with pytest.raises(SystemExit):
        train.main(['--help'])
    assert f"{', '.join(D.READERS)} (here: demo)" in capsys.readouterr().out
    formats = {**D.READERS, 'jsonl': D.READERS['csv']}
    no_recipe = dataclasses.replace(config.Config(), **config.MODELS['tiny'], dataset='jsonl')  # the preset alone
    assert config.resolve({'dataset': 'jsonl'}, False, formats) == no_recipe
    r = subprocess.run([sys.executable, '-c', "import config; config.RECIPES['laion'] = {}; import data"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "TypeError: config.RECIPES has rows without a reader: laion; add their rows to data.READERS or remove the "
        "recipes")


def test_wrong_format_and_missing_bpe_path_give_one_line(tmp_path):
    cfgs = write_formats(tmp_path)
    (tmp_path / 'list.tar').write_text('00000.jpg\n00001.jpg\n')
    (tmp_path / 'late.csv').write_bytes(b'filepath,title\n' + b'x.jpg,cafe\n' * 500 + b'x.jpg,caf\xe9\n')
    (tmp_path / 'latin.csv').write_bytes(b'filepath,title\nx.jpg,caf\xe9\n')
    r = dataclasses.replace
    cases = [(r(cfgs['csv'], metadata=cfgs['cc3m'].metadata), 'looks like a NumPy .npy array', 'a UTF-8 .csv'),
             (r(cfgs['cc3m'], metadata=cfgs['csv'].metadata), "looks like text starting 'filepath,title'",
              'a .npy object array'),
             (r(cfgs['wds'], metadata=str(tmp_path / 'list.tar')), "looks like text starting '00000.jpg'",
              'tar shards'),
             (r(cfgs['yfcc15m'], metadata=str(tmp_path / 'img' / '0.jpg')), 'looks like a JPEG image',
              'a pickled list'),
             (r(cfgs['csv'], metadata=str(tmp_path / 'latin.csv')), "non-UTF-8 text starting 'filepath,title'",
              'a UTF-8 .csv'),
             (r(cfgs['csv'], metadata=str(tmp_path / 'late.csv')), "not UTF-8 text: invalid continuation byte in "
              "b'\\xe9\\n'", 'a UTF-8 .csv')]
    for cfg, looks, expected in cases:
        with pytest.raises(UserError) as info:
            D.build_train_loader(cfg, chars)
        message = str(info.value)
        assert cfg.metadata in message and looks in message and expected in message and '\n' not in message
    for dataset in ('cc3m', 'csv', 'wds'):
        with pytest.raises(UserError, match=r'--dataset=\w+ needs --bpe_path: .*open_clip.*build-vocab') as info:
            D.build_tokenizer(cfgs[dataset])
        assert '\n' not in str(info.value)
    assert D.build_tokenizer(r(cfgs['csv'], bpe_path=str(D.DEMO_BPE_PATH))).vocab_size < 2000


def test_exif_orientation_is_applied_in_training_and_evaluation(tmp_path):
    import evaluate
    stored = Image.fromarray(np.kron(np.array([[[250, 0, 0], [0, 250, 0], [0, 0, 250]]], np.uint8),
                                     np.ones((8, 8, 1), np.uint8)))  # (8, 24): red, green, blue blocks left to right
    plain, rotated = io.BytesIO(), io.BytesIO()
    stored.save(plain, 'JPEG', quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(rotated, 'JPEG', quality=95, exif=exif)
    upright = np.rot90(np.asarray(Image.open(plain)), k=-1)  # the stored pixels turned clockwise: (24, 8)
    (tmp_path / 'r.jpg').write_bytes(rotated.getvalue())
    (tmp_path / 'r.csv').write_text('filepath,title\nr.jpg,sideways\n')
    train = D.build_reader(cfg_for(dataset='csv', metadata=str(tmp_path / 'r.csv'))).load(0)[0]
    evaluation = evaluate.ImageList([str(tmp_path / 'r.jpg')], [0], np.asarray)[0][0]
    for pixels in (np.asarray(train), evaluation):
        assert pixels.shape == upright.shape == (24, 8, 3) and np.array_equal(pixels, upright)
    assert np.asarray(D.open_image(plain.getvalue())).shape == (8, 24, 3)  # no tag: untouched


def test_shard_counts_come_from_img2dataset_stats_then_a_cached_index(tmp_path, monkeypatch):
    for s in range(6):
        write_tar(tmp_path / f'{s:05d}.tar', [(f'{s}_{j}.{ext}', b'x') for j in range(s + 1) for ext in ('jpg', 'txt')])
    (tmp_path / '00002_stats.json').write_text(json.dumps({'count': 10, 'successes': 9, 'failed_to_download': 1}))
    cfg = cfg_for(dataset='wds', metadata=str(tmp_path / '{00000..00005}.tar'), output_dir=str(tmp_path / 'out'))
    monkeypatch.setattr(D, 'PARALLEL_BYTES', 0)
    shards, counts = D.read_shards(cfg)
    assert counts == [1, 2, 9, 4, 5, 6]  # shard 2 as its stats file says, the others scanned (in a process pool)
    index = json.loads((tmp_path / D.SHARD_INDEX).read_text())
    assert sorted(index) == sorted(str(Path(s).resolve()) for s in shards)
    scanned = []
    monkeypatch.setattr(D, 'count_shard', lambda path: scanned.append(Path(path).name) or D.count_samples(path))
    assert D.read_shards(cfg)[1] == counts and scanned == []  # reused: nothing read
    write_tar(tmp_path / '00004.tar', [(f'new_{j}.jpg', b'xy') for j in range(3)])  # size and mtime change
    assert D.read_shards(cfg)[1] == [1, 2, 9, 4, 3, 6] and scanned == ['00004.tar']
    assert D.read_shards(cfg)[1] == [1, 2, 9, 4, 3, 6] and scanned == ['00004.tar']
    # a read-only shard folder: the index goes to the next place (output_dir)
    (tmp_path / 'file').write_text('')
    files = [tmp_path / 'file' / D.SHARD_INDEX, tmp_path / 'out' / D.SHARD_INDEX]
    assert D.write_index({'a': [1, 2, 3]}, files) == files[1] and json.loads(files[1].read_text()) == {'a': [1, 2, 3]}




def test_header_scan_counts_as_tarfile_does(tmp_path):
    members = [(f'{k}.{ext}', b'x' * k) for k in range(5) for ext in ('jpg', 'txt')]
    long = [(f'{"d" * 90}/{"n" * 60}{k}.{ext}', b'y') for k in range(3) for ext in ('jpg', 'txt')]  # ustar prefix
    pax = [('é' * 120 + '.jpg', b'z'), ('é' * 120 + '.txt', b'z')]  # a pax header: left to tarfile
    cases = {'plain': (members, tarfile.USTAR_FORMAT), 'prefix': (long, tarfile.USTAR_FORMAT),
             'gnu': (members, tarfile.GNU_FORMAT), 'gnu_long_names': (long, tarfile.GNU_FORMAT),
             'pax': (members + pax, tarfile.PAX_FORMAT)}
    for name, (content, form) in cases.items():
        with tarfile.open(tmp_path / f'{name}.tar', 'w', format=form) as tar:
            folder = tarfile.TarInfo('folder')
            folder.type = tarfile.DIRTYPE  # not a sample
            tar.addfile(folder)
            for member, payload in content:
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(tmp_path / 'plain.tar.gz', 'w:gz') as tar:
        tar.add(tmp_path / 'plain.tar', 'a.jpg')
    data = (tmp_path / 'plain.tar').read_bytes()
    (tmp_path / 'cut.tar').write_bytes(data[:512 * 12 + 1])  # inside 3.jpg's data (blocks: 1 + 1 + 1 + 2 + 2 ...)
    expected = {'plain': 5, 'prefix': 3, 'gnu': 5, 'gnu_long_names': 3, 'pax': 6, 'plain.tar.gz': 1, 'cut': 4}
    for name, count in expected.items():
        path = tmp_path / (name if name.endswith('.gz') else f'{name}.tar')
        keys = set()  # tarfile's reading: the keys before a broken tail
        with pytest.raises(tarfile.ReadError) if name == 'cut' else contextlib.nullcontext():
            with tarfile.open(path) as tar:
                keys.update(D.member_key(m.name)[0] for m in tar if m.isfile())
        assert D.count_samples(path) == len(keys) == count, name
        assert (D.scan_keys(path) is None) == (name in ('gnu_long_names', 'pax', 'plain.tar.gz')), name

DDP_COUNT = """
import json, os, sys
import torch.distributed as dist
from config import Config
import data as D
rank, tmp = int(sys.argv[1]), sys.argv[2]
dist.init_process_group('gloo', init_method=f'file://{tmp}/rendezvous', rank=rank, world_size=2)
scanned = []
D.count_shard = lambda path: scanned.append(os.path.basename(path)) or D.count_samples(path)
cfg = Config(dataset='wds', metadata=f'{tmp}/{{0..7}}.tar', output_dir=f'{tmp}/out', workers=1)
first = D.read_shards(cfg, rank, 2)[1]
mine, scanned = scanned, []
cached = D.read_shards(cfg, rank, 2)[1]
dist.barrier()  # neither rank leaves while the other still talks to it
dist.destroy_process_group()
print(json.dumps({'first': first, 'cached': cached, 'scanned': mine, 'rescanned': scanned}))
"""


def test_shard_counts_are_split_across_ranks_and_read_back_by_all(tmp_path):
    for s in range(8):
        write_tar(tmp_path / f'{s}.tar', [(f'{j}.{ext}', b'x') for j in range(s + 2) for ext in ('jpg', 'txt')])
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'LOCAL_WORLD_SIZE': '2'}
    procs = [subprocess.Popen([sys.executable, '-c', DDP_COUNT, str(rank), str(tmp_path)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True) for rank in range(2)]
    results = [json.loads(p.communicate(timeout=600)[0]) for p in procs]  # a hang guard
    assert all(p.returncode == 0 for p in procs)
    counts = list(range(2, 10))
    assert all(r['first'] == r['cached'] == counts and r['rescanned'] == [] for r in results)
    scanned = [set(r['scanned']) for r in results]
    assert not scanned[0] & scanned[1] and scanned[0] | scanned[1] == {f'{s}.tar' for s in range(8)}
    assert len(json.loads((tmp_path / D.SHARD_INDEX).read_text())) == 8

def test_zip_members_are_read_without_parsing_the_whole_archive(tmp_path):
    payloads = {f'{i:03d}.jpg': jpeg(i) * (i + 1) for i in range(5)}
    path = tmp_path / 'a.zip'
    with zipfile.ZipFile(path, 'w') as zf:
        for k, (name, payload) in enumerate(payloads.items()):
            zf.writestr(name, payload, zipfile.ZIP_DEFLATED if k % 2 else zipfile.ZIP_STORED)
        zf.writestr('sub/001.jpg', b'another member ending with a requested name')
    for name, payload in payloads.items():
        assert D.read_zip_member(path, name) == payload
    with pytest.raises(KeyError):
        D.read_zip_member(path, '01.jpg')  # a suffix of member names, not a member
    (tmp_path / 'b.zip').write_bytes(b'prefix data' + path.read_bytes())  # offsets shifted, as zipfile allows
    assert D.read_zip_member(tmp_path / 'b.zip', '003.jpg') == payloads['003.jpg']
    with zipfile.ZipFile(tmp_path / 'c.zip', 'w') as zf:  # a comment: read by zipfile
        zf.writestr('000.jpg', payloads['000.jpg'])
        zf.comment = b'yfcc'
    assert D.read_zip_member(tmp_path / 'c.zip', '000.jpg') == payloads['000.jpg']
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo('002.jpg')
    data[info.header_offset + 30 + len('002.jpg') + 100] ^= 0xFF  # one flipped byte in a stored member
    (tmp_path / 'd.zip').write_bytes(bytes(data))
    with pytest.raises(zipfile.BadZipFile, match='CRC'):
        D.read_zip_member(tmp_path / 'd.zip', '002.jpg')

# --- Loaders ---
@pytest.mark.parametrize('size,world_size', [(10, 1), (10, 2), (7, 3), (2, 3)])
def test_sampler_is_torch_distributed_order_and_splits_the_epoch(size, world_size):
    for epoch in (0, 3):
        keys = []
        for rank in range(world_size):
            sampler = D.EpochSampler(size, 2, 5, rank, world_size)
            sampler.set_epoch(epoch)
            reference = torch.utils.data.DistributedSampler(range(size), world_size, rank, shuffle=True, seed=5)
            reference.set_epoch(epoch)
            assert [i for _, i in sampler] == list(reference) and len(sampler) == len(reference)
            assert {e for e, _ in sampler} == {epoch}
            keys += [i for _, i in sampler]
        counts = collections.Counter(keys)
        assert set(counts) == set(range(size)) and sum(counts.values()) == -(-size // world_size) * world_size


def test_ranks_and_workers_cover_each_sample_once_and_agree(tmp_path):
    cfg = dataclasses.replace(write_formats(tmp_path)['csv'], batch_size=1)
    epochs = []
    for epoch in (0, 1):
        captions = []
        for rank in range(2):
            loader = D.build_train_loader(cfg, chars, rank, 2)
            loader.sampler.set_epoch(epoch)
            captions += [text_of(b['tokens'][0, 0]) for b in loader]
        assert sorted(captions) == sorted(CAPTIONS)
        epochs.append(captions)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    # worker processes give bit-identical batches: randomness is keyed by (seed, epoch, index), not by worker
    single, multi = (D.build_train_loader(dataclasses.replace(cfg, workers=w, batch_size=2), chars, 1, 2)
                     for w in (0, 2))
    for loader in (single, multi):
        loader.sampler.set_epoch(1)
    for a, b in zip(list(single), list(multi), strict=True):
        assert_same_sample(a, b)


def test_start_batch_equals_dropping_the_first_batches_without_reading_them(tmp_path):
    cfg = dataclasses.replace(write_formats(tmp_path)['cc12m'], batch_size=2)
    loader = D.build_train_loader(cfg, chars)
    loader.sampler.set_epoch(4)
    full = list(loader)
    loads = []
    reader = loader.dataset.reader
    loader.dataset.reader = type('Counting', (), {'__len__': lambda s: len(reader),
                                                  'load': lambda s, i: loads.append(i) or reader.load(i)})()
    loader.sampler.set_epoch(4, start_batch=2)
    resumed = list(loader)
    assert len(full) == len(loader) == 3 and len(resumed) == 1 and len(loads) == 2
    assert_same_sample(resumed[0], full[2])


def test_tar_shards_split_over_ranks_and_workers_once_per_epoch_and_resume_by_shard(tmp_path):
    for s in range(8):
        write_tar(tmp_path / f'{s}.tar', [(f'{s}_{j}.{ext}', payload) for j in range(3) for ext, payload in
                                          (('jpg', jpeg(j, (8, 8))), ('txt', f'shard {s} sample {j}'.encode()))])
    cfg = cfg_for(dataset='wds', metadata=str(tmp_path / '{0..7}.tar'), batch_size=3, workers=2, num_augs=0)
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            loader = D.build_train_loader(cfg, chars, rank, 2)
            loader.sampler.set_epoch(epoch)
            batches = [[text_of(r[0]) for r in b['tokens']] for b in loader]
            assert len(batches) == len(loader) == 4
            seen += sum(batches, [])
            if epoch == 1:  # resume after one batch: worker 0 skips its first shard, unread
                loader.sampler.set_epoch(epoch, start_batch=1)
                resumed = sum([[text_of(r[0]) for r in b['tokens']] for b in loader], [])
                gone = set(sum(batches, [])) - set(resumed)
                assert len(resumed) == 9 and len(gone) == 3 and len({t.split()[1] for t in gone}) == 1
        assert sorted(seen) == sorted(f'shard {s} sample {j}' for s in range(8) for j in range(3))


@pytest.mark.parametrize('n,world_size', [(0, 2), (1, 3), (10, 3), (12, 4)])
def test_eval_loader_slices_are_exact_disjoint_and_contiguous(n, world_size):
    dataset = torch.utils.data.TensorDataset(torch.arange(n))
    parts = [torch.cat([b[0] for b in D.build_eval_loader(dataset, cfg_for(eval_batch_size=4), r, world_size)] or
                       [torch.zeros(0, dtype=torch.long)]).tolist() for r in range(world_size)]
    assert sum(parts, []) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


# --- Demo dataset ---
def test_demo_is_deterministic_and_its_images_match_their_records():
    canvas = 40
    for i in range(30):
        scene = D.demo_scene(0, 'single', i)
        assert scene == D.demo_scene(0, 'single', i) and scene != D.demo_scene(1, 'single', i)
        img = np.asarray(D.draw_scene(scene, canvas))
        assert np.array_equal(img, np.asarray(D.draw_scene(scene, canvas)))
        o = scene.objects[0]
        assert tuple(img[int(o.y * canvas), int(o.x * canvas)]) == o.rgb  # the centre of every shape is filled
        assert np.abs(np.array(o.rgb) - D.COLOURS[o.colour]).max() <= 12
    assert D.demo_captions(0, 'train', 5) == D.demo_captions(0, 'train', 5) != D.demo_captions(0, 'train', 6)


def test_held_out_combinations_never_appear_in_training():
    counts, objects = collections.Counter(), collections.Counter()
    mention = re.compile('|'.join(f'{c} {s}|{s} (in|coloured) {c}' for c, s in D.HELD_OUT))
    for i in range(3000):
        scene = D.demo_scene(0, 'train', i)
        counts[len(scene.objects)] += 1
        objects.update((o.colour, o.shape) for o in scene.objects)
        assert len({o.position for o in scene.objects}) == len(scene.objects)
        if i < 500:
            assert not any(mention.search(c) for c in D.demo_captions(0, 'train', i))
    assert not set(objects) & D.HELD_OUT and set(objects) == set(D.COMBOS) - D.HELD_OUT
    assert 1300 < counts[1] < 1700 and counts[1] + counts[2] == 3000
    unseen = {(o.colour, o.shape) for i in range(300) for o in D.demo_scene(0, 'unseen', i).objects}
    assert unseen == D.HELD_OUT


def test_demo_eval_tasks_and_retrieval_follow_the_records():
    cfg = cfg_for(demo_val_size=12)
    tasks = {t.name: t for t in D.demo_eval_tasks(cfg)}
    assert set(tasks) == {'shape', 'colour', 'colour_shape_unseen'}
    for i in range(12):
        image, label = tasks['shape'].dataset[i]
        o = D.demo_scene(cfg.seed, 'single', i).objects[0]
        assert image.shape == (3, 16, 16) and tasks['shape'].classnames[label] == o.shape
        assert tasks['colour'].classnames[tasks['colour'].dataset[i][1]] == o.colour
        u = D.demo_scene(cfg.seed, 'unseen', i).objects[0]
        unseen = tasks['colour_shape_unseen']
        assert unseen.classnames[unseen.dataset[i][1]] == f'{u.colour} {u.shape}'
    assert all(len(t.dataset) == 12 and t.metric == 'acc' and t.templates[0].format('x') for t in tasks.values())
    images, captions, ids = D.demo_retrieval(cfg)
    assert len(images) == 12 and ids == [i for i in range(12) for _ in range(D.DEMO_CAPTIONS)]
    assert images[7][1] == 7 and captions[21:24] == list(D.demo_captions(cfg.seed, 'retrieval', 7))


def test_demo_training_samples_and_loader():
    cfg = cfg_for(dataset='demo', demo_train_size=8, batch_size=4, num_augs=1)
    loader = D.build_train_loader(cfg, chars)
    batch = next(iter(loader))
    assert len(loader) == 2 and batch['weak'].shape == (4, 3, 16, 16) and batch['tokens'].shape[:2] == (4, 2)
    assert [s.shape for s in batch['strong']] == [(4, 3, 8, 8)] and batch['skipped'].sum() == 0
    order = [i for _, i in loader.sampler][:4]
    assert [text_of(t[0]) for t in batch['tokens']] == [text_of(loader.dataset[(0, i)]['tokens'][0]) for i in order]
    assert all(text_of(t[0]) in D.demo_captions(cfg.seed, 'train', i) for t, i in zip(batch['tokens'], order))


# --- Tokenizer ---
def test_demo_vocabulary_encodes_every_caption_word_as_one_token():
    tokenizer = D.build_tokenizer(Config())
    words = {w for i in range(300) for c in D.demo_captions(0, 'train', i) for w in re.findall('[a-z]+', c)}
    words |= {w for t in D.demo_eval_tasks(cfg_for(demo_val_size=1)) for x in t.templates + t.classnames
              for w in re.findall('[a-z]+', x)}
    assert all(len(tokenizer.encode(w)) == 1 for w in words), [w for w in words if len(tokenizer.encode(w)) > 1]
    caption = D.demo_captions(0, 'retrieval', 3)[0]
    assert tokenizer.decode(tokenizer.encode(caption)).strip() == caption
    assert tokenizer.vocab_size < 2000
    with pytest.raises(UserError, match='--bpe_path=.*missing.txt.gz not found'):
        D.build_tokenizer(Config(bpe_path='missing.txt.gz'))


def test_demo_vocabulary_file_regenerates_byte_for_byte(tmp_path):
    D.build_demo_vocab_main([f'--out={tmp_path / "demo.txt.gz"}'])
    assert (tmp_path / 'demo.txt.gz').read_bytes() == D.DEMO_BPE_PATH.read_bytes()


def test_batches_drop_only_the_padding_after_the_longest_caption():
    """Training batches end their token rows at the batch's longest caption: every id is kept, only zero
    padding goes, and the text tower's EOT features are the same as with the full context."""
    from data import Tokenizer, trim_tokens
    from model import TextTransformer
    tokenizer = Tokenizer(str(D.DEMO_BPE_PATH), 32)
    tokens = tokenizer(['a red circle', 'two small blue squares on a grey background', 'a star'])
    trimmed = trim_tokens(tokens)
    longest = int((tokens != 0).sum(dim=1).max())
    assert trimmed.shape == (3, longest) and torch.equal(trimmed, tokens[:, :longest])
    assert not tokens[:, longest:].any()
    torch.manual_seed(0)
    text = TextTransformer(tokenizer.vocab_size, 32, 32, 2, 2).eval()
    torch.testing.assert_close(text(trimmed), text(tokens), atol=1e-6, rtol=1e-5)
    assert trim_tokens(tokens[:, None].expand(3, 3, 32)).shape == (3, 3, longest)  # (B, 1+A, L) rows too
    cfg = cfg_for(num_augs=2, context_length=32)
    batch = next(iter(D.build_train_loader(cfg, tokenizer)))
    assert batch['tokens'].shape[-1] == int((batch['tokens'] != 0).sum(-1).max()) < 32
