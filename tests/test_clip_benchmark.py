"""clip_benchmark (a test-only dependency, pinned with the numpy it runs on in requirements-test.txt) scores our
open_clip export of a briefly trained demo model on a labelled ImageFolder split, with our class names and templates
through its custom class-name and template files: the top-1 of evaluate.py on the same folder, within one image."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import clip_benchmark  # noqa: F401 (its command line runs below, in a subprocess of this interpreter)
from config import Config
from data import COLOURS, demo_canvas, demo_scene, draw_scene

ROOT = Path(__file__).resolve().parents[1]
IMAGES_PER_CLASS = 12
# clip_benchmark has no dataset of its own kind for a user's folder: 'imagenet1k-unverified' is a plain ImageFolder
# of <root>/val (its test split), whose class names and templates the custom files replace
BENCH_SET = 'imagenet1k-unverified'


def run(*args):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=1200)  # a hang guard
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def colour_folder(root, cfg):
    """The demo's held-out single-object scenes as an ImageFolder split, one folder per colour, drawn at the canvas
    size (80 px: both sides resize them to 64), with the demo's colour class names and templates beside them."""
    split, counts, i = root / 'val', dict.fromkeys(COLOURS, 0), 0
    while min(counts.values()) < IMAGES_PER_CLASS:
        scene, i = demo_scene(cfg.seed, 'single', i), i + 1
        colour = scene.objects[0].colour
        if counts[colour] < IMAGES_PER_CLASS:
            (split / colour).mkdir(parents=True, exist_ok=True)
            draw_scene(scene, demo_canvas(cfg)).save(split / colour / f'{i}.png')
            counts[colour] += 1
    classnames = sorted(COLOURS)  # ImageFolder's class order: the folders sorted
    templates = ['the {} circle', 'the {} square', 'a photo of the {} star']
    (split / 'classnames.txt').write_text('\n'.join(classnames) + '\n')  # read by evaluate.py's folder: sets
    (split / 'templates.txt').write_text('\n'.join(templates) + '\n')
    (root / 'classnames.json').write_text(json.dumps({BENCH_SET: classnames}))  # clip_benchmark's custom files
    (root / 'templates.json').write_text(json.dumps({BENCH_SET: [t.replace('{}', '{c}') for t in templates]}))
    return split


@pytest.mark.slow
def test_clip_benchmark_scores_our_export_as_evaluate_does(tmp_path):
    run('train.py', '--method=clip', '--demo_train_size=2560', '--epochs=3', '--eval_every=0', '--log_every=40',
        f'--output_dir={tmp_path / "run"}')  # 120 steps: colours above chance (demo_colour 31.5%), far from learned
    run('evaluate.py', '--export', str(tmp_path / 'run' / 'checkpoint.pt'), '--out', str(tmp_path / 'exported'))
    split = colour_folder(tmp_path / 'colours', Config())
    run('evaluate.py', str(tmp_path / 'run' / 'checkpoint.pt'), f'--datasets=folder:{split}', '--workers=0',
        f'--out={tmp_path / "ours.json"}')
    ours = json.loads((tmp_path / 'ours.json').read_text())
    ours = (ours[0] if isinstance(ours, list) else ours)['results']['val']
    run('-m', 'clip_benchmark.cli', 'eval', '--model_type=open_clip', f'--model=local-dir:{tmp_path / "exported"}',
        '--pretrained=none', f'--dataset={BENCH_SET}', f'--dataset_root={tmp_path / "colours"}', '--split=test',
        f'--custom_classname_file={tmp_path / "colours" / "classnames.json"}',
        f'--custom_template_file={tmp_path / "colours" / "templates.json"}', '--no_amp', '--num_workers=0',
        '--batch_size=32', f'--output={tmp_path / "theirs.json"}')
    theirs = json.loads((tmp_path / 'theirs.json').read_text())['metrics']
    images = len(COLOURS) * IMAGES_PER_CLASS
    assert ours['images'] == images and ours['classes'] == len(COLOURS)
    assert abs(100 * theirs['acc1'] - ours['acc1_z']) <= 100 / images + 1e-9, (theirs, ours)
    assert 100 / len(COLOURS) + 100 / images < ours['acc1_z'] < 100  # learned something: an agreement that could fail
