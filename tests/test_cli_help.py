"""--help / -h on every entry point prints usage and exits 0; train.py's shows the values the chosen presets resolve
to; a warmup that covers the whole run is said at the start."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data
import evaluate
import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
BENCHES = sorted(p.stem for p in (ROOT / 'bench').glob('*.py') if p.stem != '__init__')


def exits_zero(main, argv, capsys):
    """The entry point's stdout for argv; it must return or exit with status 0 and print nothing to stderr."""
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), e.code
    out, err = capsys.readouterr()
    assert err == ''
    return out


@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_every_entry_point_prints_usage(flag, capsys):
    assert 'python evaluate.py ckpt.pt' in exits_zero(evaluate.main, [flag], capsys)
    assert '--export ckpt.pt --out DIR' in exits_zero(evaluate.main, ['ckpt.pt', flag], capsys)
    assert 'usage: python train.py' in exits_zero(train.main, [flag], capsys)
    for argv in ([flag], ['build-vocab', flag], ['build-demo-vocab', flag]):
        assert 'usage: python data.py build-vocab' in exits_zero(data.main, argv, capsys)
    for name in BENCHES:
        out = exits_zero(importlib.import_module(f'bench.{name}').main, [flag], capsys)
        assert f'python -m bench.{name}' in out or 'usage:' in out, name


def test_train_help_shows_the_values_the_presets_resolve_to():
    """Exit status and output of the real process: --dataset=cc3m brings the paper's recipe and its model, and its
    global batch split over the processes that torchrun would start (WORLD_SIZE)."""
    out = subprocess.run([sys.executable, str(ROOT / 'train.py'), '--dataset=cc3m', '--help'], capture_output=True,
                         text=True, env={**ENV, 'WORLD_SIZE': '32'}, timeout=300)
    assert out.returncode == 0 and out.stderr == ''
    values = {line.split()[0]: line.rsplit('(here: ', 1)[1].rstrip(')') for line in out.stdout.splitlines()
              if line.startswith('  --')}
    assert (values['--model'], values['--epochs'], values['--lr']) == ('resnet50', '32', '0.003')
    assert (values['--global_batch'], values['--batch_size'], values['--chunk']) == ('4096', '128', '128')
    assert (values['--weight_decay'], values['--text_layers'], values['--text_dropout']) == ('0.5', '6', '0.2')
    demo = subprocess.run([sys.executable, str(ROOT / 'evaluate.py'), '-h'], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert demo.returncode == 0 and 'usage' not in demo.stderr and '--export' in demo.stdout


def test_a_warmup_over_the_whole_run_is_one_line(tmp_path, capsys):
    flags = ['--vision_layers=1', '--text_layers=1', '--vision_width=32', '--text_width=32', '--image_size=32',
             '--local_crop_size=32', '--patch_size=16', '--embed_dim=16', '--mlp_hidden_dim=32', '--demo_train_size=32',
             '--batch_size=8', '--workers=0', '--eval_every=0', '--method=clip', '--epochs=1', '--warmup_epochs=1',
             f'--output_dir={tmp_path}']
    train.main(flags)
    warnings = [line for line in capsys.readouterr().out.splitlines() if 'warning' in line]
    assert len(warnings) == 1 and 'warmup (--warmup_epochs=1.0, 4 steps) covers the whole run of 4 steps' in warnings[0]
    train.main([*flags[:-3], '--epochs=2', f'--output_dir={tmp_path / "two"}'])
    assert 'warning' not in capsys.readouterr().out
