"""Config parsing, presets against recipe §5.1, errors, and the JSON round trip."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import config
from config import Config, ConfigError, resolve, _split_flags

ROOT = Path(__file__).resolve().parents[1]


def parse(*argv):
    return resolve(_split_flags(list(argv)), verbose=False)


# --- flag syntax ---
def test_key_value_forms_and_dashes():
    a = parse('--lr=3e-3', '--batch_size', '32', '--weight-decay=0.2')
    assert (a.lr, a.batch_size, a.weight_decay) == (3e-3, 32, 0.2)
    assert isinstance(a.batch_size, int) and isinstance(a.lr, float)


@pytest.mark.parametrize('raw,value', [('true', True), ('1', True), ('false', False), ('0', False)])
def test_booleans(raw, value):
    assert parse(f'--compile={raw}').compile is value
    assert parse('--compile', raw).compile is value


def test_bare_flag_means_true_even_before_another_flag():
    c = parse('--compile', '--overwrite', '--lr=1')
    assert c.compile and c.overwrite and c.lr == 1


def test_list_values():
    assert parse('--image_mean=0.5,0.5,0.5').image_mean == [0.5, 0.5, 0.5]


# --- precedence ---
def test_precedence_default_recipe_method_flag():
    assert Config().weight_decay == 0.1
    assert parse('--dataset=cc3m').weight_decay == 0.5          # recipe over default
    assert parse('--dataset=cc3m', '--weight_decay=0.3').weight_decay == 0.3  # flag over recipe
    assert parse('--dataset=cc3m', '--method=clip').label_smoothing == 0.0  # method over recipe
    assert parse('--dataset=cc3m', '--method=clip', '--label_smoothing=0.2').label_smoothing == 0.2


def test_model_preset_fills_architecture_but_recipe_and_flags_win():
    c = parse('--dataset=cc3m', '--model=vit_b16')
    assert (c.vision, c.vision_width, c.vision_heads, c.patch_size) == ('vit', 768, 12, 16)
    assert c.text_layers == 6  # the CC3M recipe's 6 text layers win over the preset's 12
    assert parse('--dataset=cc3m', '--text_layers=4').text_layers == 4


def test_image_size_comes_with_the_model_unless_a_paper_recipe_or_a_flag_sets_it():
    for dataset in ('demo', 'csv', 'wds'):
        assert (parse(f'--dataset={dataset}').image_size, parse(f'--dataset={dataset}').local_crop_size) == (64, 64)
        c = parse(f'--dataset={dataset}', '--model=vit_b16')
        assert (c.image_size, c.local_crop_size) == (224, 224)
    for dataset in ('cc3m', 'cc12m', 'yfcc15m'):
        assert parse(f'--dataset={dataset}', '--model=tiny').image_size == 224  # the paper's recipe says so
    assert parse('--dataset=merged29m', '--model=tiny').local_crop_size == 192
    c = parse('--dataset=csv', '--image_size=128', '--local_crop_size=96')
    assert (c.image_size, c.local_crop_size) == (128, 96)


def test_help_shows_the_resolved_image_size():
    h = subprocess.run([sys.executable, 'train.py', '--dataset=csv', '--model=tiny', '--help'], cwd=ROOT,
                       capture_output=True, text=True)
    line = next(l for l in h.stdout.splitlines() if l.split()[:1] == ['--image_size'])
    assert h.returncode == 0 and line.endswith('(here: 64)'), line
    h = subprocess.run([sys.executable, 'train.py', '--dataset=csv', '--model=vit_s16', '--help'], cwd=ROOT,
                       capture_output=True, text=True)
    assert '(here: 224)' in next(l for l in h.stdout.splitlines() if l.split()[:1] == ['--local_crop_size'])


def test_presets_print_what_they_set(capsys):
    resolve(_split_flags(['--dataset=cc3m', '--lr=1e-3']))
    out = capsys.readouterr().out
    assert 'dataset recipe cc3m sets' in out and 'weight_decay=0.5' in out
    assert 'lr=' not in out.split('dataset recipe cc3m sets')[1].split('\n')[0]  # the explicit flag is not claimed


# --- recipes: recipe §5.1 ---
def test_cc3m_recipe():
    c = parse('--dataset=cc3m')
    assert (c.model, c.weight_decay, c.text_layers, c.text_dropout, c.label_smoothing) == ('resnet50', 0.5, 6, 0.2, 0.1)
    assert (c.loss_reduction, c.clean_before_augment, c.epochs, c.lr) == ('avg', False, 32, 3e-3)
    assert (c.global_batch, c.batch_size, c.chunk) == (4096, 4096, 128)  # 128 x 32 GPUs; one process here
    assert (c.num_augs, c.embed_dim, c.text_width, c.mlp_hidden_dim) == (2, 256, 512, 4096)
    assert not c.gather_with_grad  # the paper's detached gather


def test_cc12m_yfcc_29m_recipes():
    c12 = parse('--dataset=cc12m')
    assert (c12.text_dropout, c12.loss_reduction, c12.weight_decay, c12.text_layers) == (0.05, 'sum', 0.1, 12)
    assert parse('--dataset=cc12m', '--method=barlip').text_dropout == 0.1
    y = parse('--dataset=yfcc15m')
    assert (y.remove_stopwords_prob, y.text_dropout, y.clean_before_augment, y.loss_reduction) == (0.9, 0.0, True, 'sum')
    assert parse('--dataset=yfcc15m', '--model=vit_b16').remove_stopwords_prob == 0.8
    m = parse('--dataset=merged29m')
    assert (m.lr, m.caption_sampling, m.local_crop_size, m.clean_before_augment) == (2e-3, 'multi', 192, True)


@pytest.mark.parametrize('method', ['rocket', 'clip'])
def test_weak_crop_demo_keeps_most_of_the_scene_paper_recipes_keep_half(method):
    """The demo's weak view crops 90-100% (its captions name both objects and their places, recipe §5.1); the
    paper's recipes and the plain dataset formats keep the official 0.5-1, for every model."""
    assert parse(f'--method={method}').weak_min_scale == 0.9
    assert parse(f'--method={method}', '--model=vit_b16').weak_min_scale == 0.9
    assert Config().weak_min_scale == 0.5 and 'weak_min_scale' not in config.MODELS['tiny']
    for dataset in ('cc3m', 'cc12m', 'yfcc15m', 'merged29m', 'csv', 'wds'):
        for model in ('resnet50', 'vit_b16', 'tiny'):
            assert parse(f'--dataset={dataset}', f'--model={model}', f'--method={method}').weak_min_scale == 0.5
    assert parse('--weak_min_scale=0.5').weak_min_scale == 0.5  # a flag still wins over the demo recipe


def test_model_presets():
    widths = {'vit_s16': (384, 6, 16), 'vit_s16_12h': (384, 12, 16), 'vit_s32': (384, 6, 32),
              'vit_b32': (768, 12, 32), 'vit_b16': (768, 12, 16), 'vit_l16': (1024, 16, 16)}
    for name, (w, h, p) in widths.items():
        c = parse(f'--model={name}')
        assert (c.vision_width, c.vision_heads, c.patch_size, c.text_width, c.text_heads) == (w, h, p, 512, 8)
    assert parse('--model=vit_l16').vision_layers == 24


def test_methods():
    clip = parse('--method=clip')
    assert (clip.num_augs, clip.remove_stopwords_prob, clip.text_augment) == (0, 0.0, False)
    assert parse('--method=swalip', '--dataset=cc12m').label_smoothing == 0.0
    assert math.isclose(Config().logit_scale_init, 2.659260, abs_tol=1e-6)
    assert math.isclose(Config().l2l_logit_scale_init, 2.302585, abs_tol=1e-6)


# --- errors ---
def test_unknown_key_suggests_close_ones():
    with pytest.raises(ConfigError, match=r'unknown option --batchsize; did you mean --batch_size'):
        parse('--batchsize=3')


@pytest.mark.parametrize('argv,message', [
    (['--lr=-1'], '--lr=-1.0: must be >= 0'),
    (['--batch_size=0'], '--batch_size=0: must be >= 1'),
    (['--label_smoothing=1'], r'--label_smoothing=1.0: must be in \[0, 1\)'),
    (['--batch_size=abc'], "--batch_size: expected int, got 'abc'"),
    (['--compile=maybe'], '--compile: expected true/false'),
    (['--model=vit_h14'], '--model=vit_h14: choose one of'),
    (['--method=swalip', '--label_smoothing=0.1'], 'swalip needs --label_smoothing=0'),
    (['--lr'], '--lr needs a value'),
    (['positional'], "unexpected argument 'positional'"),
])
def test_bad_values(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse(*argv)


def test_cli_exit_codes_and_one_line():
    r = subprocess.run([sys.executable, '-c', 'import config; config.parse_args()', '--learnig_rate=1', '--lrr=2'],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count('\n') == 0 and 'unknown option --learnig_rate' in r.stderr
    h = subprocess.run([sys.executable, '-c', 'import config; config.parse_args()', '--help'],
                       cwd=ROOT, capture_output=True, text=True)
    assert h.returncode == 0
    for f in config.fields(Config):
        assert f'--{f.name}' in h.stdout


# --- round trip ---
def test_json_round_trip(tmp_path):
    c = parse('--dataset=yfcc15m', '--model=vit_s16_12h', '--lr=1e-4', '--image_std=0.1,0.2,0.3')
    config.save_json(c, tmp_path / 'config.json')
    assert config.load_json(tmp_path / 'config.json') == c
    assert Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_from_dict_ignores_unknown_and_validates():
    d = Config().to_dict()
    d['some_future_key'] = 1
    assert Config.from_dict(d) == Config()
    d['batch_size'] = 0
    with pytest.raises(ConfigError):
        Config.from_dict(d)


def test_workers_and_threads_never_oversubscribe_the_cores(monkeypatch):
    """Auto workers/threads fill this process's share of its CPU affinity exactly; explicit values are kept."""
    for cores in (1, 2, 3, 8, 16, 96):
        monkeypatch.setattr(config.os, 'sched_getaffinity', lambda pid, n=cores: set(range(n)))
        for device in ('cpu', 'cuda'):
            for local in (1, 2, 8):
                share = max(1, cores // local)
                workers, threads = config.cpu_split(-1, 0, device, local)
                assert workers + threads == share and threads >= 1
                assert workers >= (1 if share >= 2 else 0)
        assert config.cpu_split(3, 5, 'cpu') == (3, 5)
    monkeypatch.setattr(config.os, 'sched_getaffinity', lambda pid: {0, 1})
    assert config.cpu_split(-1, 0, 'cpu') == (1, 1)  # a 2-core laptop: one loader worker, one model thread
    assert config.cpu_split(0, 0, 'cpu') == (0, 2)
