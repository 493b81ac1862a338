"""Imports that never guess: open_clip files without head counts stop with one line, open_clip's own config beside a
file gives them, --image_mean/--image_std reach the model, and converted files carry their merges."""
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from config import Config
from data import load_merges, save_merges
from evaluate import read_checkpoint
from evaluate import main

FIXTURES = Path(__file__).resolve().parents[2] / 'shared' / 'fixtures'
CLIP_BPE = FIXTURES.parent / 'vocab' / 'bpe_simple_vocab_16e6.txt.gz'


def open_clip_file(tmp_path):
    """A small open_clip CLIP whose head counts (4 and 2) are not OpenAI's width / 64 rule (2 and 2)."""
    open_clip = pytest.importorskip('open_clip', reason='open_clip_torch (a test-only dependency) is not installed')
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=24, quick_gelu=True, vision_cfg=dict(image_size=32, layers=1, width=128,
                                                                          patch_size=8, head_width=32),
                           text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=1))
    torch.save(model.state_dict(), tmp_path / 'open_clip.pt')
    return tmp_path / 'open_clip.pt'


def test_open_clip_without_head_counts_stops_with_one_line(tmp_path, capsys):
    path = open_clip_file(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), '--datasets=cifar10'])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count('\n') == 1
    assert 'head counts are unknown' in err and '--text_heads=N --vision_heads=N (or --guess_heads' in err
    guessed = Config.from_dict(read_checkpoint(path, {'guess_heads': True})['config'])
    assert (guessed.vision_heads, guessed.text_heads) == (2, 2)  # the rule, on request: wrong for this model
    assert 'head counts from OpenAI\'s rule (width / 64, --guess_heads)' in capsys.readouterr().out


def test_open_clip_config_beside_the_file_gives_heads_and_statistics(tmp_path, capsys):
    path = open_clip_file(tmp_path)
    (tmp_path / 'open_clip_config.json').write_text(json.dumps({
        'model_cfg': {'embed_dim': 24, 'quick_gelu': True, 'vision_cfg': {'width': 128, 'head_width': 32},
                      'text_cfg': {'width': 128, 'heads': 2}},
        'preprocess_cfg': {'mean': [0.5, 0.5, 0.5], 'std': [0.25, 0.25, 0.25]}}))
    cfg = Config.from_dict(read_checkpoint(path)['config'])
    assert (cfg.vision_heads, cfg.text_heads, cfg.image_mean, cfg.vision_act) == (4, 2, [0.5] * 3, 'quickgelu')
    line = capsys.readouterr().out
    assert 'head counts from' in line and 'open_clip_config.json' in line and 'assumed QuickGELU' not in line
    flagged = read_checkpoint(path, {'image_mean': [0.1, 0.2, 0.3], 'image_std': [1, 2, 3], 'vision_heads': 2})
    assert Config.from_dict(flagged['config']).image_mean == [0.1, 0.2, 0.3]


def test_bad_image_statistics_flag_is_one_line(tmp_path, capsys):
    path = open_clip_file(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), '--guess_heads', '--image_std=1,2'])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith('error: --image_std=1,2: expected three') and err.count('\n') == 1


@pytest.mark.skipif(not (FIXTURES / 'rocket_vit.pt').is_file(), reason=f'importer fixtures not found in {FIXTURES}')
def test_converted_files_evaluate_without_bpe_path(tmp_path, capsys, monkeypatch):
    vocab = tmp_path / 'vocab1000.txt.gz'
    save_merges(load_merges(CLIP_BPE)[:1000 - 514], vocab)  # the fixtures' 1000-token vocabulary
    converted = tmp_path / 'converted.pt'
    main(['--convert', str(FIXTURES / 'rocket_vit.pt'), '--out', str(converted), '--vision_heads=3',
          '--text_heads=2', f'--bpe_path={vocab}'])
    os.remove(vocab)  # only the copy inside the checkpoint is left
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    for i in range(3):
        Image.new('RGB', (40, 40), (80 * i, 40, 200 - 60 * i)).save(elsewhere / f'{i}.png')
    (elsewhere / 'pairs.csv').write_text('image,caption\n0.png,a red square\n1.png,a blue dog\n2.png,two cats\n')
    monkeypatch.chdir(elsewhere)
    records = main([str(converted), '--retrieval=pairs.csv', '--workers=0'])  # catalogue sets: no data, skipped
    assert records[0]['results']['retrieval']['captions'] == 3
    capsys.readouterr()
    with pytest.raises(SystemExit):  # no merges to carry: one line naming the flag
        main(['--convert', str(FIXTURES / 'rocket_vit.pt'), '--out', str(tmp_path / 'x.pt'), '--vision_heads=3',
              '--text_heads=2', '--bpe_path=missing.txt.gz'])
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'pass --bpe_path=FILE' in err and not (tmp_path / 'x.pt').exists()
