"""The change map of README's "Where to change what", proven: on a copy of the project, a new method (CyCLIP: CLIP
plus cyclic consistency, with its weight as a hyperparameter), a new data format (JSON Lines) and a new evaluation
set are each added to the one module its concept lives in, nothing else edited; then each trains or evaluates."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODULES = ('config.py', 'data.py', 'augment.py', 'model.py', 'train.py', 'evaluate.py')
HANG = 1200  # seconds: a guard far above any run here, never a speed limit
TINY = ['--vision_layers=1', '--text_layers=1', '--vision_width=32', '--text_width=32', '--image_size=32',
        '--local_crop_size=32', '--patch_size=16', '--embed_dim=16', '--mlp_hidden_dim=32', '--batch_size=4',
        '--eval_every=0', '--log_every=1', '--max_steps=2', '--context_length=32']

# model.py: the loss, its term, and the row with its own hyperparameter
METHOD = '''
def cyclip_loss(z_image, z_text):
    """CyCLIP's cyclic consistency (Goel et al., 2022): mean squared gaps between the cosines <I_j, T_k> and
    <I_k, T_j> (cross-modal) and between <I_j, I_k> and <T_j, T_k> (in-modal)."""
    image = gather(F.normalize(z_image.float(), dim=-1), with_grad=True)  # (N, D): every rank's rows
    text = gather(F.normalize(z_text.float(), dim=-1), with_grad=True)
    cross = image @ text.t()
    return (cross - cross.t()).square().mean() + (image @ image.t() - text @ text.t()).square().mean()


def cyclip_term(out, cfg, target):
    return {'loss': cyclip_loss(out['z_image'], out['z_text'])}


METHODS['cyclip'] = Method(clip_term, cyclip_term, 'cyclip_weight', views=None,
                           params=(Param('cyclip_weight', 0.25, 'weight of the CyCLIP cyclic terms', '[0, inf)'),))
'''
# data.py: the reader and its row
FORMAT = '''
def read_jsonl(cfg):
    """JSON Lines, one {"image": path, "captions": [str, ...]} a line; paths relative to --root or the file."""
    def parse(path):
        rows = [json.loads(line) for line in Path(path).read_text(encoding='utf-8').splitlines() if line.strip()]
        return {**Strings.arrays('paths', [r['image'] for r in rows]),
                **CaptionLists.arrays('captions', [r['captions'] for r in rows])}
    root = Path(cfg.root) if cfg.root else Path(cfg.metadata).expanduser().parent
    return FileReader(root, metadata_arrays(cfg, parse), cfg.max_image_pixels)


READERS['jsonl'] = Reader(read_jsonl, 'a JSON Lines file of {"image": path, "captions": [str, ...]}', {'text'})
'''
# evaluate.py: one row with its class names and templates
EVAL_SET = '''
EVAL_SETS['shapes'] = EvalSet(read_folder, 'test', 'acc', ['circle', 'square'], ['a {}.', 'a drawing of a {}.'])
'''


def add_to(module, code):
    """code at the end of module, before its command-line entry point (which would otherwise run first)."""
    text = module.read_text()
    main = text.find("\nif __name__ == '__main__':")
    module.write_text(text + code if main < 0 else text[:main] + '\n' + code + text[main:])


def run(fork, *args):
    r = subprocess.run([sys.executable, *map(str, args)], cwd=fork, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                       capture_output=True, text=True, timeout=HANG)
    assert r.returncode == 0, r.stdout + r.stderr


def save_images(folder, colours):
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(colours):
        Image.new('RGB', (40, 40), colour).save(folder / f'{i}.png')


def records(out):
    return [r for r in map(json.loads, (out / 'log.jsonl').read_text().splitlines()) if r['type'] == 'train']


def test_a_method_a_format_and_an_evaluation_set_each_live_in_one_module(tmp_path):
    fork = tmp_path / 'fork'
    fork.mkdir()
    for name in MODULES:
        shutil.copy(ROOT / name, fork / name)
    shutil.copytree(ROOT / 'assets', fork / 'assets')
    add_to(fork / 'model.py', METHOD)
    add_to(fork / 'data.py', FORMAT)
    add_to(fork / 'evaluate.py', EVAL_SET)
    assert {p.name for p in fork.iterdir()} == {*MODULES, 'assets'}

    # the method: its hyperparameter is a flag, reaches the loss (total = CLIP's + weight x cyclic) and the config
    run(fork, 'train.py', *TINY, '--method=cyclip', '--cyclip_weight=2.5', '--demo_train_size=16', '--workers=0',
        f'--output_dir={tmp_path / "cyclip"}')
    steps = records(tmp_path / 'cyclip')
    assert len(steps) == 2 and all(r['cyclip_loss'] > 0 for r in steps)
    for r in steps:
        assert np.isclose(r['loss'], (r['image_loss'] + r['text_loss']) / 2 + 2.5 * r['cyclip_loss'], rtol=1e-5), r
    assert json.loads((tmp_path / 'cyclip' / 'config.json').read_text())['cyclip_weight'] == 2.5

    # the format: its name is a --dataset choice without a recipe; loader workers read it
    save_images(tmp_path / 'pairs' / 'img', [(30 * i, 200 - 20 * i, 90) for i in range(8)])
    lines = [json.dumps({'image': f'img/{i}.png', 'captions': [f'a photo number {i}', f'picture {i}']})
             for i in range(8)]
    (tmp_path / 'pairs' / 'pairs.jsonl').write_text('\n'.join(lines) + '\n')
    run(fork, 'train.py', *TINY, '--dataset=jsonl', f'--metadata={tmp_path / "pairs" / "pairs.jsonl"}',
        f'--bpe_path={fork / "assets" / "demo_bpe.txt.gz"}', '--workers=1', f'--output_dir={tmp_path / "jsonl"}')
    assert len(records(tmp_path / 'jsonl')) == 2
    assert (tmp_path / 'pairs' / 'pairs.jsonl.arrays' / 'stamp.json').is_file()  # parsed once, cached

    # the evaluation set: its class names and templates come with its row
    save_images(tmp_path / 'eval' / 'shapes' / 'test' / 'circle', [(200, 30, 30)] * 3)
    save_images(tmp_path / 'eval' / 'shapes' / 'test' / 'square', [(30, 30, 200)] * 2)
    run(fork, 'evaluate.py', tmp_path / 'cyclip' / 'checkpoint.pt', '--datasets=shapes',
        f'--data_root={tmp_path / "eval"}', '--workers=0', f'--out={tmp_path / "eval.json"}')
    shapes = json.loads((tmp_path / 'eval.json').read_text())[0]['results']['shapes']
    assert shapes['images'] == 5 and shapes['acc5_z'] == 100 and 0 <= shapes['acc1_z'] <= 100
