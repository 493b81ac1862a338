"""bench.peer: open_clip's trainer and ours train on one export from one description, one evaluator scores both."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import peer  # noqa: E402

pytest.importorskip('open_clip_train')


def test_one_description_builds_both_sides():
    """The same widths, depths, heads, context and recipe reach open_clip's config and flags and our flags."""
    spec = peer.SPEC
    oc = peer.openclip_model_config(spec)
    assert oc['vision_cfg']['width'] // oc['vision_cfg']['head_width'] == spec['vision_heads']
    assert oc['text_cfg']['heads'] == spec['text_heads'] and oc['text_cfg']['context_length'] == spec['context_length']
    theirs = peer.openclip_argv(spec, 't.tsv', 'logs', 3)
    assert theirs[theirs.index('--warmup') + 1] == '56' and theirs[theirs.index('--seed') + 1] == '3'
    import config
    cfg = config.resolve(config._split_flags(peer.ours_argv(spec, 't.tsv', 'out', 3)), verbose=False)
    steps = spec['train_size'] // spec['batch_size']
    assert int(cfg.warmup_epochs * steps) == spec['warmup_steps']
    assert (cfg.method, cfg.vit_style, cfg.image_size, cfg.local_crop_size, cfg.context_length, cfg.seed) == \
        ('clip', 'openai', 64, 64, 32, 3)


@pytest.mark.parametrize('scale', [None, 0.6])  # 0.6: neither side's own default, so both must read the spec
def test_one_training_crop_reaches_both_sides(scale):
    """open_clip's train transform and our weak view crop the same area range, bicubic, ratio 3/4-4/3; by default
    the demo recipe's range."""
    import config
    from augment import ImageViews
    from open_clip.transform import image_transform
    from open_clip_train.params import parse_args
    from torchvision.transforms import InterpolationMode, RandomResizedCrop
    spec = peer.SPEC if scale is None else dict(peer.SPEC, weak_min_scale=scale)
    want = (config.RECIPES['demo']['weak_min_scale'] if scale is None else scale, 1.0)
    theirs = parse_args(peer.openclip_argv(spec, 't.tsv', 'logs', 0))
    crop = image_transform(spec['image_size'], is_train=True, aug_cfg=theirs.aug_cfg).transforms[0]
    assert isinstance(crop, RandomResizedCrop) and crop.interpolation == InterpolationMode.BICUBIC
    assert tuple(crop.scale) == want and tuple(crop.ratio) == (3 / 4, 4 / 3)
    cfg = config.resolve(config._split_flags(peer.ours_argv(spec, 't.tsv', 'out', 0)), verbose=False)
    assert ImageViews(cfg).weak['scale'] == want


def test_both_sides_train_and_one_evaluator_scores_them(tmp_path):
    """A few steps of each side in its own process: checkpoints evaluated by ours, every figure parsed."""
    proc = subprocess.run([sys.executable, '-m', 'bench.peer', f'--cache={tmp_path}', '--train_size=128',
                           '--val_size=20', '--batch_size=32', '--warmup_steps=1', '--seeds=0',
                           '--rows=open_clip,ours,ours+old_vit_init'],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [json.loads(line) for line in (tmp_path / 'results.jsonl').read_text().splitlines()]
    assert [r['row'] for r in runs] == ['open_clip', 'ours', 'ours+old_vit_init']
    for r in runs:
        assert r['steps'] == 4 and r['parameters'] == runs[0]['parameters']
        assert 0 < r['loss'] < 10 and r['samples_per_s'] > 0 and r['peak_mb'] > 0
        assert all(0 <= r[k] <= 100 for k in (*peer.TASKS, 'i2t_r1', 't2i_r1'))
    assert 'mean ± half range' in proc.stdout and 'open_clip (n=1)' in proc.stdout
    again = subprocess.run([sys.executable, '-m', 'bench.peer', f'--cache={tmp_path}', '--train_size=128',
                            '--val_size=20', '--batch_size=32', '--warmup_steps=1', '--seeds=0', '--rows=ours'],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and 'ours seed 0:' not in again.stdout  # reused from results.jsonl, not rerun
