"""--report_to mirrors every log.jsonl record into TensorBoard (read back here from its event files) and W&B; the
trackers are imported only when asked, and a missing one is one line naming its pip package."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import config
import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--vision_layers=1', '--text_layers=1', '--vision_width=32', '--text_width=32', '--image_size=32',
        '--local_crop_size=32', '--patch_size=16', '--embed_dim=16', '--mlp_hidden_dim=32', '--demo_train_size=32',
        '--batch_size=8', '--workers=0', '--log_every=1', '--epochs=1', '--method=clip', '--demo_val_size=16']


def test_tensorboard_holds_every_logged_number(tmp_path):
    pytest.importorskip('tensorboard', reason='tensorboard (a test-only dependency) is not installed')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train.main([*TINY, f'--output_dir={tmp_path}', '--report_to=tensorboard'])
    records = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    expected = {}  # name -> {step: value} from log.jsonl
    for record in records:
        for name, value in train.scalars(record).items():
            expected.setdefault(name, {})[record['step']] = value
    assert {'train/loss', 'train/lr', 'epoch/train_loss'} <= set(expected)
    assert any(name.startswith('epoch/test/demo_') for name in expected)  # the per-epoch evaluation, nested
    events = EventAccumulator(str(tmp_path / 'tensorboard'), size_guidance={'scalars': 0})
    events.Reload()
    assert set(events.Tags()['scalars']) == set(expected)
    for name, by_step in expected.items():
        logged = {e.step: e.value for e in events.Scalars(name)}
        assert logged.keys() == by_step.keys()
        assert all(logged[s] == pytest.approx(v, rel=1e-6) for s, v in by_step.items()), name  # float32 in events


def test_a_missing_tracker_is_one_line_naming_its_package(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'wandb' else real(name, *a))
    with pytest.raises(config.UserError, match='^--report_to=wandb needs the wandb package: pip install wandb$'):
        train.main([*TINY, f'--output_dir={tmp_path}', '--report_to=wandb'])
    assert not (tmp_path / 'log.jsonl').exists()  # stopped before anything was written
    with pytest.raises(SystemExit) as exit_info:
        config.parse_args(['--report_to=mlflow'])
    assert exit_info.value.code == 2


def test_trackers_are_imported_only_when_asked():
    code = ('import sys, config, train, evaluate, data, model, augment; '
            'train.open_trackers(config.Config(), None); '
            'print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorboard", "wandb")))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, 'PYTHONPATH': str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == '[]', out.stderr
