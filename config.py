"""One source of truth for every setting: a flat dataclass (its method fields declared by model.METHODS' rows),
presets, and the --key=value parser; and the plumbing every command shares: one-line errors (UserError, run_cli),
the atomic file writer and the process-group set-up. Checkpoints live with training (train.py) and with reading
them (evaluate.py); the model's weights in and out, with the model (model.py).

Precedence: dataclass default < model preset < dataset recipe < method preset < explicit flag.
Paper recipes follow recipe §5.1 (Fini et al., TMLR 2023, "CLIP 🚀").
"""
import contextlib
import dataclasses
import difflib
import errno
import glob
import importlib.metadata
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

from model import METHODS


def _f(default, help):
    """A dataclass field with a help string (shown by --help)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={'help': help})
    return field(default=default, metadata={'help': help})


@dataclass
class SharedConfig:
    """The settings every method shares; Config (below) adds each method's own hyperparameters (its row's params)."""
    # --- presets ---
    dataset: str = _f('demo', 'data format (a row of data.READERS) and its recipe (RECIPES), if it has one')
    model: str = _f('tiny', 'model preset: ' + ', '.join(['tiny', 'resnet50', 'vit_s16', 'vit_s16_12h',
                                                         'vit_s32', 'vit_b32', 'vit_b16', 'vit_l16', 'vit_l14']))
    method: str = _f('rocket', 'objective: ' + ', '.join(METHODS))

    # --- model: image encoder ---
    vision: str = _f('vit', 'image encoder family: vit or resnet50')
    vision_width: int = _f(128, 'ViT width (ignored for resnet50, whose width is 2048)')
    vision_layers: int = _f(4, 'ViT depth')
    vision_heads: int = _f(4, 'ViT attention heads')
    patch_size: int = _f(16, 'ViT patch size')
    vit_style: str = _f('timm', "'timm' (recipe §1.2) or 'openai' (OpenAI CLIP's ViT: LN before the blocks, eps 1e-5)")
    vision_act: str = _f('gelu', "ViT MLP activation: 'gelu' or 'quickgelu' (OpenAI's CLIP weights)")
    patch_dropout_weak: float = _f(0.0, 'fraction of ViT patches dropped from the weak view in training (FLIP); '
                                        'not for resnet50')
    patch_dropout_strong: float = _f(0.0, 'fraction of ViT patches dropped from each strong view in training; '
                                          'not for resnet50')
    # --- model: text encoder ---
    text_width: int = _f(128, 'text transformer width (512 in the paper)')
    text_heads: int = _f(4, 'text transformer heads (8 in the paper)')
    text_layers: int = _f(3, 'text transformer layers (12; 6 for CC3M)')
    context_length: int = _f(77, 'text tokens per caption, SOT and EOT included')
    vocab_size: int = _f(0, 'token vocabulary size; 0 = take it from the BPE file')
    text_dropout: float = _f(0.0, 'residual-stream dropout of the local (augmented) captions only')
    text_act: str = _f('quickgelu', "text MLP activation: 'quickgelu' (OpenAI CLIP) or 'gelu' (some LAION models)")
    # --- model: heads ---
    embed_dim: int = _f(64, 'joint embedding dimension (256 in the paper)')
    mlp_hidden_dim: int = _f(512, 'hidden width of the local MLP projectors (4096 in the paper)')
    logit_scale_init: float = _f(math.log(1 / 0.07), 'initial log logit scale of the global CLIP loss')
    l2l_logit_scale_init: float = _f(math.log(1 / 0.1), 'initial log logit scale of the local loss')
    logit_scale_max: float = _f(100.0, 'logit scales are clamped to [1, this] after every step')

    # --- objective ---
    num_augs: int = _f(2, 'A: strong image/caption views per sample (0 = plain CLIP)')
    label_smoothing: float = _f(0.1, 'label smoothing of the local (strong-view) InfoNCE pairs; the global pair '
                                     'never has it, except where it is the only InfoNCE term (plain CLIP)')
    loss_reduction: str = _f('avg', "'avg' (half the sum) or 'sum' of the image->text and text->image InfoNCE "
                                    "terms: sum doubles every InfoNCE term, plain CLIP's too (no other loss)")
    gather_with_grad: bool = _f(True, 'with several ranks, the full gradient through gathered embeddings (false = '
                                      'the paper: constants; recipe §2.1)')

    # --- image augmentation ---
    image_size: int = _f(64, 'global (weak) crop and evaluation size (the model preset\'s: 64 for tiny, 224 for the '
                             'others; the paper recipes: 224)')
    local_crop_size: int = _f(64, 'strong (local) crop size (the model preset\'s: 64 for tiny, 224 for the others; the '
                                  'paper recipes: 224, 192 for merged29m)')
    weak_min_scale: float = _f(0.5, 'RandomResizedCrop min scale of the weak view')
    strong_min_scale: float = _f(0.08, 'RandomResizedCrop min scale of the strong views')
    strong_max_scale: float = _f(1.0, 'RandomResizedCrop max scale of the strong views')
    color_jitter_prob: float = _f(0.8, 'probability of colour jitter (0.4, 0.4, 0.4, 0.1) on strong views')
    grayscale_prob: float = _f(0.2, 'probability of grayscale on strong views')
    blur_prob: float = _f(0.5, 'probability of Gaussian blur (sigma in [0.1, 2]) on strong views')
    solarize_prob: float = _f(0.0, 'probability of solarize on strong views')
    byol_augment: bool = _f(False, 'asymmetric BYOL strong pipelines (needs num_augs=2)')
    augment_device: str = _f('cpu', "where the views' crops and the strong views' colour, blur and flip run: cpu "
                             "(data workers, per sample; they send uint8 views) or cuda (the training device, "
                             "batched; workers decode, draw and send the uint8 pixels the crops cover); the "
                             "training device normalises either way")
    image_mean: list = _f([0.485, 0.456, 0.406], 'normalisation mean (ImageNet statistics)')
    image_std: list = _f([0.229, 0.224, 0.225], 'normalisation std (ImageNet statistics)')
    alpha_background: list = _f([255, 255, 255], 'R,G,B (0-255) that transparent pixels are composited onto, in '
                                                  'training and evaluation (default white)')
    # --- text augmentation ---
    remove_stopwords_prob: float = _f(0.8, 'probability of stopword removal (weak and strong captions)')
    text_augment: bool = _f(True, 'apply one EDA operation to each strong caption')
    synonym_prob: float = _f(0.4, 'EDA weight of synonym replacement')
    swap_prob: float = _f(0.4, 'EDA weight of random swap')
    deletion_prob: float = _f(0.2, 'EDA weight of random deletion')
    identity_prob: float = _f(0.0, 'EDA weight of leaving the caption unchanged')
    clean_before_augment: bool = _f(False, 'ftfy/html/whitespace/lowercase cleaning before augmentation')
    wordnet_dir: str = _f('/usr/share/wordnet', 'WordNet 3.0 database (Debian wordnet-base)')

    # --- data ---
    root: str = _f('', 'image root directory (or three joined by --- for merged29m)')
    metadata: str = _f('', "metadata file or shard pattern, as --dataset's row of data.READERS expects")
    bpe_path: str = _f('', 'BPE merges file (CLIP format, .txt or .txt.gz); required but for the demo dataset')
    caption_sampling: str = _f('single', "'single' (one caption for all views) or 'multi' (each view draws)")
    csv_image_key: str = _f('filepath', 'CSV column of image paths')
    csv_caption_key: str = _f('title', 'CSV column of captions')
    demo_train_size: int = _f(20000, 'training samples of the built-in demo dataset')
    demo_val_size: int = _f(2000, 'held-out samples of the built-in demo dataset')
    workers: int = _f(-1, 'data-loader worker processes per rank (-1: chosen from the cores available)')
    threads: int = _f(0, 'torch threads of each training process (0: the cores available less the workers)')
    bad_sample_threshold: float = _f(0.01, 'stop (after saving a checkpoint) when more than this fraction of the '
                                           'samples read this epoch is unreadable')
    max_image_pixels: int = _f(4096 * 4096, 'pixel budget of a training image (PIL refuses 179M): a JPEG over it is '
                                            'decoded at 1/2, 1/4 or 1/8 scale, another image is skipped as unreadable '
                                            '(0: no budget)')
    bad_sample_min: int = _f(1000, 'samples read this epoch before --bad_sample_threshold is checked at every log '
                                   'line (it is always checked at the epoch end)')

    # --- optimisation ---
    epochs: int = _f(32, 'training epochs')
    max_steps: int = _f(0, 'stop after this many optimizer steps (0 = run all epochs)')
    warmup_epochs: float = _f(1.0, 'linear warmup length in epochs')
    global_batch: int = _f(128, 'image-text pairs of one contrastive batch over all processes (every pair is a '
                                'negative of the others): --batch_size = this / processes (WORLD_SIZE)')
    batch_size: int = _f(128, 'per-process batch size (set: it sets --global_batch = this x processes)')
    chunk: int = _f(0, 'gradient caching: each process encodes its batch in chunks of this many samples (activation '
                       'memory of a chunk), the heads and the loss see the whole batch; 0 or >= --batch_size: one pass')
    lr: float = _f(3e-3, 'peak learning rate')
    lr_start: float = _f(1e-6, 'learning rate at the start of warmup')
    lr_end: float = _f(1e-5, 'learning rate at the end of the cosine')
    weight_decay: float = _f(0.1, 'AdamW weight decay (biases, norms and logit scales excluded)')
    beta1: float = _f(0.9, 'AdamW beta1')
    beta2: float = _f(0.98, 'AdamW beta2')
    eps: float = _f(1e-8, 'AdamW epsilon')
    update_freq: int = _f(1, 'gradient accumulation micro-steps per optimizer step')
    precision: str = _f('auto', 'auto (bf16 on GPUs with native bf16, fp16 + GradScaler on older ones, fp32 on CPU), '
                                'fp32, bf16 or fp16')
    grad_checkpointing: bool = _f(False, 'recompute activations in the backward pass to save memory')
    channels_last: bool = _f(False, 'channels_last memory format for the ResNet')
    compile: bool = _f(False, 'torch.compile the model')

    # --- evaluation ---
    eval_datasets: str = _f('', 'comma-separated zero-shot sets, folder:PATH for an ImageFolder of your own (empty: '
                                'the demo tasks for demo data, else imagenet under --data_root)')
    data_root: str = _f('', 'root of the evaluation datasets')
    eval_batch_size: int = _f(256, 'evaluation batch size')
    eval_every: int = _f(1, 'zero-shot evaluation every N epochs (0 = never during training)')

    # --- system ---
    output_dir: str = _f('out', 'where logs and checkpoints go')
    resume: str = _f('', "'auto' (latest in output_dir), a checkpoint path, or empty")
    init: str = _f('', 'start from the model weights of this checkpoint (ours, SLIP, CLIP 🚀 or open_clip); '
                       'fresh optimizer and schedule')
    overwrite: bool = _f(False, 'reuse an output_dir that belongs to another config')
    seed: int = _f(0, 'random seed (each rank adds its rank)')
    device: str = _f('auto', 'auto, cpu, cuda')
    log_every: int = _f(10, 'optimizer steps between log lines')
    save_every: int = _f(0, 'optimizer steps between checkpoints (0 = epoch ends only)')
    keep_last: int = _f(2, 'step checkpoints to keep')
    max_nonfinite: int = _f(5, 'consecutive non-finite losses before training stops')
    report_to: str = _f('', "mirror every log.jsonl record to tensorboard (output_dir/tensorboard) and/or wandb, "
                            "comma-separated; each needs its pip package")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Rebuild a config saved by to_dict; keys this version does not know are reported and ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            print(f"config: ignoring unknown saved keys {unknown}", file=sys.stderr)
        return validate(cls(**{k: v for k, v in d.items() if k in known}))


def method_params():
    """{name: Param} of every row's own hyperparameters, once each; a param that a shared field or another row
    declares otherwise, or whose default lies outside its bound, stops the import."""
    params, shared = {}, {f.name for f in fields(SharedConfig)}
    for method, row in METHODS.items():
        for p in row.params:
            first = params.setdefault(p.name, p)
            if p.name in shared or first != p or not in_bound(p.default, p.bound):
                raise TypeError(f"model.METHODS[{method!r}]: {p} names a shared field, or differs from {first} of "
                                f"another row, or its default is outside its bound")
    return params


def in_bound(value, bound):
    """Whether value lies in the interval `bound`, written '[0, 1]', '(0, inf)', ..."""
    low, high = map(float, bound[1:-1].split(','))
    return (low <= value if bound[0] == '[' else low < value) and (value <= high if bound[-1] == ']' else value < high)


# the settings: the shared fields, then every method's own (a row of model.METHODS adds its flags without edits here)
PARAMS = method_params()
Config = dataclasses.make_dataclass('Config', [(p.name, type(p.default), _f(p.default, p.help))
                                               for p in PARAMS.values()],
                                    bases=(SharedConfig,), namespace={'__module__': __name__})  # so pickle finds it


# --- presets ---
# the paper's text tower, heads and image size (recipe §5.1)
_SIZES = dict(text_width=512, text_heads=8, text_layers=12, embed_dim=256, mlp_hidden_dim=4096, image_size=224,
              local_crop_size=224)
MODELS = {  # image sizes live here: a model keeps its own unless a flag or a paper recipe sets one
    # tiny trains on a laptop CPU in minutes on the demo data; 16-pixel patches (a 4x4 grid at 64 px) learn its
    # shapes far faster than 8-pixel ones (a supervised probe: 93% against 24% after 200 steps); GELU in both towers,
    # so that open_clip, whose one quick_gelu switch sets both of its towers, loads its export
    'tiny': dict(vision='vit', vision_width=128, vision_layers=4, vision_heads=4, patch_size=16,
                 text_width=128, text_heads=4, text_layers=3, embed_dim=64, mlp_hidden_dim=512, text_act='gelu',
                 image_size=64, local_crop_size=64),
    'resnet50': dict(vision='resnet50', **_SIZES),
    'vit_s16': dict(vision='vit', vision_width=384, vision_layers=12, vision_heads=6, patch_size=16, **_SIZES),
    'vit_s16_12h': dict(vision='vit', vision_width=384, vision_layers=12, vision_heads=12, patch_size=16, **_SIZES),
    'vit_s32': dict(vision='vit', vision_width=384, vision_layers=12, vision_heads=6, patch_size=32, **_SIZES),
    'vit_b32': dict(vision='vit', vision_width=768, vision_layers=12, vision_heads=12, patch_size=32, **_SIZES),
    'vit_b16': dict(vision='vit', vision_width=768, vision_layers=12, vision_heads=12, patch_size=16, **_SIZES),
    'vit_l16': dict(vision='vit', vision_width=1024, vision_layers=24, vision_heads=16, patch_size=16, **_SIZES),
    'vit_l14': dict(vision='vit', vision_width=1024, vision_layers=24, vision_heads=16, patch_size=14, **_SIZES),
}

# recipe §5.1: 32 epochs, 128 per GPU x 32 GPUs, lr 3e-3, wd 0.1, label smoothing 0.1, A = 2, detached gather. The
# global batch on any number of GPUs; chunks of the official 128 per GPU (which fit a V100-32GB) on fewer of them
PAPER_BATCH = 4096
_PAPER = dict(model='resnet50', epochs=32, global_batch=PAPER_BATCH, chunk=128, lr=3e-3, weight_decay=0.1,
              label_smoothing=0.1, num_augs=2, gather_with_grad=False, image_size=224, local_crop_size=224,
              text_dropout=0.0)
RECIPES = {
    # sized so that `python train.py` (tiny model, 561 steps) ends within 10 minutes on a slow 2-core AVX2 CPU.
    # Demo captions fit in 32 tokens; at batch 64 a lower lr learns shape far faster
    # (2.5e-4: 36% after 3 epochs, 2e-3: 23%), and strong crops of at least a quarter of the scene show an object
    'demo': dict(epochs=3, global_batch=64, lr=2.5e-4, weight_decay=0.1, warmup_epochs=0.3, eval_batch_size=256,
                 demo_train_size=12000, demo_val_size=1000, context_length=32, weak_min_scale=0.9,
                 strong_min_scale=0.25),
    'cc3m': dict(_PAPER, weight_decay=0.5, text_layers=6, text_dropout=0.2, loss_reduction='avg',
                 clean_before_augment=False),
    'cc12m': dict(_PAPER, text_dropout=0.05, loss_reduction='sum', clean_before_augment=False),
    'yfcc15m': dict(_PAPER, text_dropout=0.0, loss_reduction='sum', clean_before_augment=True),
    'merged29m': dict(_PAPER, lr=2e-3, caption_sampling='multi', local_crop_size=192, text_dropout=0.0,
                      loss_reduction='sum', clean_before_augment=True),
}  # formats without a row here (csv, wds) take the defaults and the model preset's image size
PAPER_RECIPES = ('cc3m', 'cc12m', 'yfcc15m', 'merged29m')  # the start line warns when one runs at another batch


def dataset_recipe(dataset, model, method):
    """A dataset's recipe, if it has one; a method's row may add to it, for any model or for one (recipe §5.1)."""
    extra = METHODS[method].recipes
    return {**RECIPES.get(dataset, {}), **extra.get((dataset, None), {}), **extra.get((dataset, model), {})}


# recipe §8.1: a method that never looks at strong views trains without them, stopword removal, EDA and smoothing
PLAIN = dict(num_augs=0, remove_stopwords_prob=0.0, text_augment=False, label_smoothing=0.0)


def method_preset(method):
    """Settings a method implies: PLAIN for a row that never looks at strong views, then its preset and fixed ones."""
    row = METHODS[method]
    return {**(PLAIN if row.views is None else {}), **row.preset, **row.fixed}


# --- parsing ---
_FIELDS = {f.name: f for f in fields(Config)}
_TRUE, _FALSE = ('true', '1', 'yes', 'on'), ('false', '0', 'no', 'off')


class UserError(Exception):
    """An error raised on purpose (bad path, format, data, threshold, checkpoint): one line naming the fix; exit 1.
    every_rank=True: every rank raised it together (a decision agreed across ranks), so only rank 0 prints it."""
    exit_code = 1

    def __init__(self, message, every_rank=False):
        super().__init__(message)
        self.every_rank = every_rank


class ConfigError(UserError, ValueError):
    """A bad flag or value (a usage error): one line naming the problem and the fix; exit 2."""
    exit_code = 2


class StdoutOrStderr:
    """sys.stdout until its reader goes away (`python train.py | head`), then stderr: the run goes on, and neither
    the next line nor the flush at exit raises BrokenPipeError."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.fall_back()
            return self.stream.write(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.fall_back()

    def fall_back(self):
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())  # what the old stream still holds goes there
        self.stream = sys.stderr

    def __getattr__(self, name):  # isatty, fileno, encoding ...
        return getattr(self.stream, name)


def run_cli(main_fn, argv=None):
    """Run a command: a UserError prints `error: <message>` on one line (naming a rank other than 0) and exits
    with its code; any other exception is a bug and keeps its traceback. Output survives stdout's reader going."""
    if not isinstance(sys.stdout, StdoutOrStderr) and sys.stdout is not None:
        sys.stdout = StdoutOrStderr(sys.stdout)
    try:
        return main_fn(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        rank = int(os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0')))  # torchrun's, else srun's task
        if rank == 0 or not getattr(e, 'every_rank', False):
            text = str(e)
            if 'Traceback' in text:  # raised in a loader worker: torch re-raises it wrapped in the worker's traceback
                text = text.rstrip().splitlines()[-1].split(f'{type(e).__name__}: ', 1)[-1]
            message = ' '.join(text.split())  # always one line
            print(f"error: {'' if rank == 0 else f'rank {rank}: '}{message}", file=sys.stderr, flush=True)
        dist = sys.modules.get('torch.distributed')
        if dist is not None and dist.is_available() and dist.is_initialized():
            sys.stdout.flush()
            os._exit(e.exit_code)  # tearing a gloo process group down at interpreter exit can abort (SIGABRT)
        sys.exit(e.exit_code)


def first_line(e, limit=160):
    """An exception's first line, cut at a word boundary."""
    line = (str(e).strip().splitlines() or [''])[0]
    return line if len(line) <= limit else line[:limit].rsplit(' ', 1)[0] + ' ...'


def _convert(name, raw):
    kind = type(_FIELDS[name].default) if _FIELDS[name].default is not dataclasses.MISSING else list
    if kind is bool:
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise ConfigError(f"--{name}: expected true/false/1/0, got {raw!r}")
    try:
        return [float(x) for x in raw.split(',')] if kind is list else kind(raw)
    except ValueError:
        raise ConfigError(f"--{name}: expected {kind.__name__ if kind is not list else 'comma-separated numbers'}, "
                          f"got {raw!r}") from None


def parse_flags(argv, known, switches=(), positional=False):
    """(positional arguments, {key: raw value}) of ['a.pt', '--k=v', '--k', 'v', '--switch']: the one flag parser of
    every command. Dashes in keys become underscores; a key not in `known` raises ConfigError naming the nearest."""
    args, out, i = [], {}, 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if not arg.startswith('--') or arg == '--':
            if not positional:
                raise ConfigError(f"unexpected argument {arg!r}: flags look like --key=value")
            args.append(arg)
            continue
        key, eq, value = arg[2:].partition('=')
        key = key.replace('-', '_')
        if not eq:
            nxt = argv[i] if i < len(argv) else None
            # a switch takes the next word only as a boolean where a following path is positional
            if nxt is not None and not nxt.startswith('--') and (
                    key not in switches or not positional or nxt.lower() in _TRUE + _FALSE):
                value, i = nxt, i + 1
            elif key in switches:
                value = 'true'  # a bare switch
            elif key in known:
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; see --help"
            raise ConfigError(f"unknown option --{key}{hint}")
        out[key] = value
    return args, out


def _split_flags(argv):
    """train.py's flags: {key: raw value} of Config fields; booleans may go without a value."""
    return parse_flags(argv, _FIELDS, [k for k, f in _FIELDS.items() if isinstance(f.default, bool)])[1]


CHOICES = {'vision': ('vit', 'resnet50'), 'vit_style': ('timm', 'openai'), 'vision_act': ('gelu', 'quickgelu'),
           'text_act': ('gelu', 'quickgelu'), 'loss_reduction': ('avg', 'sum'), 'caption_sampling': ('single', 'multi'),
           'precision': ('auto', 'fp32', 'bf16', 'fp16'), 'device': ('auto', 'cpu', 'cuda'),
           'augment_device': ('cpu', 'cuda')}


def _check(cond, msg):
    if not cond:
        raise ConfigError(msg)


def validate(cfg):
    """Range and choice checks; raises ConfigError with one line naming the field."""
    _check(cfg.model in MODELS, f"--model={cfg.model}: choose one of {', '.join(MODELS)}")
    _check(cfg.method in METHODS, f"--method={cfg.method}: choose one of {', '.join(METHODS)}")
    for name, choices in CHOICES.items():
        value = getattr(cfg, name)
        _check(value in choices or name == 'device' and value.startswith('cuda:'),
               f"--{name}={value}: choose {', '.join(choices[:-1])} or {choices[-1]}")
    _check(set(filter(None, cfg.report_to.split(','))) <= {'tensorboard', 'wandb'},
           f"--report_to={cfg.report_to}: choose tensorboard, wandb or both (comma-separated)")
    for name in ('lr', 'lr_start', 'lr_end', 'weight_decay', 'eps', 'warmup_epochs', 'text_dropout', 'max_image_pixels',
                 'bad_sample_threshold', 'synonym_prob', 'swap_prob', 'deletion_prob', 'identity_prob', 'chunk',
                 'num_augs', 'threads', 'max_steps', 'save_every', 'eval_every', 'vocab_size', 'demo_train_size',
                 'demo_val_size', 'bad_sample_min'):
        _check(getattr(cfg, name) >= 0, f"--{name}={getattr(cfg, name)}: must be >= 0")
    for name in ('batch_size', 'global_batch', 'eval_batch_size', 'epochs', 'update_freq', 'image_size',
                 'local_crop_size', 'vision_width', 'vision_layers', 'vision_heads', 'patch_size', 'text_width',
                 'text_heads', 'text_layers', 'context_length', 'embed_dim', 'mlp_hidden_dim', 'keep_last',
                 'max_nonfinite', 'log_every', 'logit_scale_max'):
        _check(getattr(cfg, name) >= 1, f"--{name}={getattr(cfg, name)}: must be >= 1")
    _check(cfg.workers >= -1, f"--workers={cfg.workers}: must be >= 0, or -1 to choose from the cores available")
    if 0 < cfg.chunk < cfg.batch_size:
        _check(cfg.batch_size % cfg.chunk == 0,
               f"--chunk={cfg.chunk} does not divide the per-process batch of {cfg.batch_size}: pass --chunk="
               f"{max(d for d in range(1, cfg.chunk + 1) if cfg.batch_size % d == 0)}, or another divisor of it")
        _check(not cfg.compile, f"--compile does not combine with gradient caching (--chunk={cfg.chunk} below the "
                                f"per-process batch of {cfg.batch_size}): drop --compile, or pass --chunk=0")
    _check(0 <= cfg.label_smoothing < 1, f"--label_smoothing={cfg.label_smoothing}: must be in [0, 1)")
    _check(cfg.text_dropout < 1, f"--text_dropout={cfg.text_dropout}: must be in [0, 1)")
    for name in ('patch_dropout_weak', 'patch_dropout_strong'):
        _check(0 <= getattr(cfg, name) < 1, f"--{name}={getattr(cfg, name)}: must be in [0, 1)")
        _check(cfg.vision == 'vit' or getattr(cfg, name) == 0,
               f"--{name}={getattr(cfg, name)} applies to the ViT only: set it to 0 for --vision={cfg.vision}")
    for name in ('remove_stopwords_prob', 'color_jitter_prob', 'grayscale_prob', 'blur_prob', 'solarize_prob',
                 'weak_min_scale', 'strong_min_scale', 'strong_max_scale'):
        _check(0 <= getattr(cfg, name) <= 1, f"--{name}={getattr(cfg, name)}: must be in [0, 1]")
    _check(cfg.strong_min_scale <= cfg.strong_max_scale,
           f"--strong_min_scale={cfg.strong_min_scale} is above --strong_max_scale={cfg.strong_max_scale}")
    _check(cfg.synonym_prob + cfg.swap_prob + cfg.deletion_prob + cfg.identity_prob > 0 or not cfg.text_augment,
           "--text_augment needs one of synonym/swap/deletion/identity_prob > 0")
    for name, param in PARAMS.items():  # every method's own, whichever method runs
        _check(in_bound(getattr(cfg, name), param.bound), f"--{name}={getattr(cfg, name)}: must be in {param.bound}")
    _check(len(cfg.image_mean) == 3 and len(cfg.image_std) == 3 and min(cfg.image_std) > 0,
           "--image_mean/--image_std: give three numbers each, std > 0, e.g. --image_std=0.229,0.224,0.225")
    _check(len(cfg.alpha_background) == 3 and all(v == int(v) and 0 <= v <= 255 for v in cfg.alpha_background),
           f"--alpha_background={','.join(f'{v:g}' for v in cfg.alpha_background)}: give three integers 0-255 "
           f"(R,G,B), e.g. 255,255,255 (white) or 0,0,0 (black)")
    method = METHODS[cfg.method]
    for name, value in method.fixed.items():
        _check(getattr(cfg, name) == value, f"--method={cfg.method} needs --{name}={value:g} (it trains only with it)")
    _check(method.views is not None or cfg.num_augs == 0,
           f"--method={cfg.method} never encodes strong views: set --num_augs=0")
    _check(method.views is None or cfg.num_augs >= method.views,
           f"--method={cfg.method} needs --num_augs >= {method.views} (it uses the strong views)")
    _check(not cfg.byol_augment or cfg.num_augs == 2, "--byol_augment needs --num_augs=2")
    _check(cfg.vision != 'vit' or cfg.vision_width % cfg.vision_heads == 0,
           f"--vision_width={cfg.vision_width} must be divisible by --vision_heads={cfg.vision_heads}")
    _check(cfg.text_width % cfg.text_heads == 0,
           f"--text_width={cfg.text_width} must be divisible by --text_heads={cfg.text_heads}")
    _check(cfg.vision != 'vit' or (cfg.image_size % cfg.patch_size == 0 and cfg.local_crop_size % cfg.patch_size == 0),
           f"--image_size={cfg.image_size} and --local_crop_size={cfg.local_crop_size} must be multiples of "
           f"--patch_size={cfg.patch_size}")
    return cfg


# automatic loader workers per GPU at most: the official code's 10 (recipe §4.4). At ~200 samples/s a worker (CPU
# views, 224 px; bench/README.md) they feed ~2,000 samples/s, above a GPU's rocket step; more only fill /dev/shm
MAX_AUTO_WORKERS = 10


def cpu_split(workers, threads, device_type, local_world_size=1):
    """(loader workers, torch threads) of one process; -1 / 0 split this rank's share of the usable cores, never more in
    all: on a GPU the workers take all but one (at most MAX_AUTO_WORKERS), on a CPU one per 4 cores feeds threads."""
    cores = max(1, len(os.sched_getaffinity(0)) // max(1, local_world_size))
    if workers < 0:
        workers = 0 if cores == 1 else min(cores - 1, MAX_AUTO_WORKERS) if device_type == 'cuda' else max(1, cores // 4)
    if threads <= 0:
        threads = max(1, cores - workers)
    return workers, threads


def help_text(cfg=None, datasets=()):
    """Every flag with its help and its value in cfg (the config the other flags resolve to; default: Config())."""
    cfg = cfg or Config()
    lines = ['usage: python train.py [--key=value ...]   (also --key value; dashes or underscores)', '',
             f"values for --dataset={cfg.dataset} --model={cfg.model} --method={cfg.method}, "
             f"{cfg.global_batch // cfg.batch_size} process(es) (WORLD_SIZE) and the flags given:"]
    for f in fields(Config):
        choices = f": {', '.join(datasets)}" if f.name == 'dataset' and datasets else ''
        lines.append(f"  --{f.name:<24} {f.metadata['help']}{choices} (here: {getattr(cfg, f.name)})")
    lines += ['', f"precedence: default < model preset < dataset recipe ({', '.join(RECIPES)}) < method < flag"]
    return '\n'.join(lines)


def resolve(flags, verbose=True, datasets=None):
    """Build a Config from explicit flags ({key: raw string}) with presets filled in underneath them. datasets: the
    names --dataset accepts, data.READERS (the command passes them: config cannot import data); None: any."""
    values = {k: _convert(k, v) for k, v in flags.items()}
    base = Config()
    dataset, method = values.get('dataset', base.dataset), values.get('method', base.method)
    _check(datasets is None or dataset in datasets, f"--dataset={dataset}: choose one of {', '.join(datasets or ())}")
    _check(method in METHODS, f"--method={method}: choose one of {', '.join(METHODS)}")
    recipe = dataset_recipe(dataset, values.get('model', RECIPES.get(dataset, {}).get('model', base.model)), method)
    model = values.get('model', recipe.get('model', base.model))
    _check(model in MODELS, f"--model={model}: choose one of {', '.join(MODELS)}")
    layers = [(f'model preset {model}', MODELS[model]), (f'dataset recipe {dataset}', recipe),
              (f'method {method}', method_preset(method))]
    merged = {}
    for source, preset in layers:
        applied = {k: v for k, v in preset.items() if k not in values}
        merged.update(applied)
        if verbose and applied:
            print(f"config: {source} sets " + ' '.join(f'{k}={v}' for k, v in applied.items()))
    merged.update(values)
    merged.update(split_batch(merged.get('global_batch', base.global_batch), values,
                              int(os.environ.get('WORLD_SIZE', 1))))
    return validate(dataclasses.replace(base, **merged))


def split_batch(global_batch, explicit, world):
    """{'batch_size': global_batch / world}, or {'global_batch': batch_size x world} for an explicit --batch_size."""
    if 'batch_size' in explicit:
        b = explicit['batch_size']
        _check(explicit.get('global_batch', b * world) == b * world, f"--global_batch={global_batch} and "
               f"--batch_size={b} disagree on {world} process(es) ({b} x {world} = {b * world}): give one of them")
        return {'global_batch': b * world}
    _check(global_batch >= 1, f"--global_batch={global_batch}: must be >= 1")
    _check(global_batch % world == 0,
           f"--global_batch={global_batch} does not split over {world} processes: run a number of processes that "
           f"divides it, or pass --global_batch={world * max(1, round(global_batch / world))}")
    return {'batch_size': global_batch // world}


def parse_args(argv=None, datasets=None):
    """Parse --key=value flags into a Config (datasets: see resolve); bad input exits with status 2 and one line."""
    argv = sys.argv[1:] if argv is None else argv
    rank0 = int(os.environ.get('RANK', '0')) == 0  # under torchrun every rank parses the same flags: rank 0 speaks
    try:
        if '-h' in argv or '--help' in argv:  # the values the other flags resolve to: presets included
            if rank0:
                flags = _split_flags([a for a in argv if a not in ('-h', '--help')])
                print(help_text(resolve(flags, False, datasets), datasets or ()))
            sys.exit(0)
        return resolve(_split_flags(argv), rank0, datasets)
    except ConfigError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def save_json(cfg, path):
    atomic_write(path, lambda f: f.write(json.dumps(cfg.to_dict(), indent=2).encode()))


def load_json(path):
    with open(path) as f:
        return Config.from_dict(json.load(f))


# --- Files ---
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
TMP_NAME = '.{name}.{pid}.tmp'  # a killed writer leaves one behind; train.py removes those of checkpoints


def atomic_write(path, write, size=None):
    """The one writer of every file: write(file) into a temporary file beside `path`, fsync, rename, fsync the folder
    (readers and crashes see the old or the new file). A full disk raises OSError(ENOSPC) naming the size needed."""
    path = Path(path)
    tmp = path.with_name(TMP_NAME.format(name=path.name, pid=os.getpid()))
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save raises a RuntimeError, with the OSError as its context
        if getattr(e, 'errno', None) in NO_SPACE or getattr(e.__context__, 'errno', None) in NO_SPACE:
            need = f"it needs ~{size:,} bytes, " if size else ''
            raise OSError(errno.ENOSPC, f"no space left on the device of {path}: {need}"
                                        f"{shutil.disk_usage(path.parent).free:,} are free") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path):
    """torch.save through atomic_write: a crash at any moment leaves the old file or the new one."""
    atomic_write(path, lambda f: torch.save(obj, f), tensor_bytes(obj))


def tensor_bytes(obj):
    """The bytes of the tensors and byte strings in nested dicts, lists and tuples: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, bytes):
        return len(obj)
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(map(tensor_bytes, items))


# --- Processes ---
def setup_distributed(cfg):
    """Join torchrun's process group (NCCL on GPU, gloo on CPU) and split the cores between loader workers and
    torch threads (cfg.workers, cfg.threads); returns (rank, world_size, device). Used by training and evaluation."""
    check_launcher()
    rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    device = pick_device(cfg, world_size)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision('high')  # TF32 for fp32 matmuls on Ampere and later
    elif world_size > 1 and cfg.device == 'auto' and rank == 0:
        print(f"warning: {world_size} processes on the CPU (gloo): no CUDA device here; pass --device=cpu if that is "
              f"meant", file=sys.stderr, flush=True)
    # never oversubscribe the cores: loader workers + torch threads fit this rank's share of them
    cfg.workers, cfg.threads = cpu_split(cfg.workers, cfg.threads, device.type,
                                         int(os.environ.get('LOCAL_WORLD_SIZE', 1)))
    torch.set_num_threads(cfg.threads)
    if world_size > 1:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                device_id=device if device.type == 'cuda' else None)
    return rank, world_size, device


def check_launcher():
    """Refuse SLURM tasks started without torchrun (`srun python train.py`): each would be a lone rank 0 on GPU 0,
    all writing one output dir. Said once, by task 0."""
    tasks = int(os.environ.get('SLURM_STEP_NUM_TASKS', os.environ.get('SLURM_NTASKS', 1)))
    if 'RANK' not in os.environ and 'SLURM_PROCID' in os.environ and tasks > 1:
        raise UserError(f"{tasks} SLURM tasks started this command without torchrun (srun python ...): each would "
                        f"run alone on GPU 0 into the same output dir; start one torchrun per node instead: srun "
                        f"--ntasks-per-node=1 torchrun --nproc_per_node=GPUS ... (README, Training)", every_rank=True)


def pick_device(cfg, world_size):
    """This process's device: the CPU, or its rank's GPU (--device=cuda:N for one process). One line, instead of a
    silent CPU run or a crash at the first kernel, where NVIDIA GPUs are here but this PyTorch cannot use them."""
    if cfg.device == 'cpu':
        return torch.device('cpu')
    if not torch.cuda.is_available():
        if nvidia_devices():
            raise UserError(no_cuda_message(cfg.device), every_rank=True)
        if cfg.device != 'auto':
            raise ConfigError(f"--device={cfg.device} but CUDA is not available here; use --device=cpu")
        return torch.device('cpu')
    device = (torch.device(cfg.device) if cfg.device.startswith('cuda:') and world_size == 1
              else torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0))))
    major, minor = torch.cuda.get_device_capability(device)
    if not has_kernels((major, minor), torch.cuda.get_arch_list()):
        raise UserError(f"GPU {device.index} ({torch.cuda.get_device_name(device)}, sm_{major}{minor}) has no "
                        f"kernels in torch {torch.__version__} (CUDA {torch.version.cuda}: "
                        f"{' '.join(torch.cuda.get_arch_list())}); install PyTorch's CUDA 12 build, which has them: "
                        f"{cuda12_install()}; or pass --device=cpu", every_rank=True)
    return device


def nvidia_devices():
    """The NVIDIA GPU device files here (/dev/nvidia0, ...): there whenever a driver runs the GPUs, usable or not."""
    return sorted(glob.glob('/dev/nvidia[0-9]*'))


def nvidia_driver(path='/proc/driver/nvidia/version'):
    """The version of the NVIDIA kernel driver loaded here ('535.104.05'), or None."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    found = re.search(r'Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)', text)
    return found[1] if found else None


def has_kernels(capability, arch_list):
    """Whether a build for arch_list ('sm_75', 'compute_90', ...) runs on a GPU of capability (major, minor): a
    binary of the same major and a minor at most the GPU's, or PTX of a capability at most the GPU's."""
    for arch in arch_list:
        kind, _, number = arch.partition('_')
        digits = re.match(r'\d+', number)
        if digits:
            built = divmod(int(digits[0]), 10)  # sm_86 -> (8, 6), sm_120 -> (12, 0)
            if kind == 'sm' and built[0] == capability[0] and built[1] <= capability[1] or \
                    kind == 'compute' and built <= tuple(capability):
                return True
    return False


# PyTorch's CUDA 12.6 wheels: they run on NVIDIA drivers from R525 on and hold V100 (sm_70) kernels
CUDA12_INDEX = 'https://download.pytorch.org/whl/cu126'


def cuda12_install():
    """The pip command that installs this torch and torchvision release as PyTorch's CUDA 12.6 build."""
    pins = []
    for package in ('torch', 'torchvision'):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            pins.append(f"{package}=={importlib.metadata.version(package).split('+')[0]}")
    return f"pip install {' '.join(pins)} --index-url {CUDA12_INDEX}"


def no_cuda_message(flag):
    """Why CUDA is not usable although NVIDIA devices are here, and the fix."""
    devices, driver = nvidia_devices(), nvidia_driver()
    found = f"{len(devices)} NVIDIA GPU(s) are here ({devices[0]}" + (', ...)' if len(devices) > 1 else ')')
    cause = f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None else (
        f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, which needs a newer NVIDIA driver than "
        f"{f'this one ({driver})' if driver else 'the one loaded'} (CUDA 13 needs R580 or later, CUDA 12 R525)")
    return (f"--device={flag}: {found} but this PyTorch cannot use them: {cause}; install PyTorch's CUDA 12 build: "
            f"{cuda12_install()}; or pass --device=cpu to run on the CPU")
