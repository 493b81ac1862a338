"""One source of truth for every setting: a flat dataclass, presets, and the --key=value parser; and the
mechanisms every command shares: the atomic file writer, the process-group set-up and the checkpoint home.

Precedence: dataclass default < model preset < dataset recipe < method preset < explicit flag.
Paper recipes follow recipe §5.1 (Fini et al., TMLR 2023, "CLIP 🚀").
"""
import argparse
import dataclasses
import difflib
import errno
import json
import math
import os
import pathlib
import pickle
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
class Config:
    # --- presets ---
    dataset: str = _f('demo', 'dataset recipe: demo, cc3m, cc12m, yfcc15m, merged29m, csv, wds')
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
    barlip_hidden_dim: int = _f(3000, 'BarLIP projector hidden width')
    barlip_proj_dim: int = _f(8192, 'BarLIP projector output width')
    siamlip_hidden_dim: int = _f(2048, 'SiamLIP/BYOLIP projector and predictor hidden width')
    siamlip_proj_dim: int = _f(128, 'SiamLIP/BYOLIP projector output width')
    logit_scale_init: float = _f(math.log(1 / 0.07), 'initial log logit scale of the global CLIP loss')
    l2l_logit_scale_init: float = _f(math.log(1 / 0.1), 'initial log logit scale of the local loss')
    logit_bias_init: float = _f(-10.0, 'initial logit bias of the SigLIP terms (siglip, rocket_siglip)')
    logit_scale_max: float = _f(100.0, 'logit scales are clamped to [1, this] after every step')

    # --- objective ---
    num_augs: int = _f(2, 'A: strong image/caption views per sample (0 = plain CLIP)')
    label_smoothing: float = _f(0.1, 'label smoothing of the local (strong-view) contrastive pairs; the global '
                                     'pair never has it, except with --method=clip, where it applies to '
                                     'the only (global) term')
    loss_reduction: str = _f('avg', "'avg' (half the sum) or 'sum' of the image->text and text->image terms: "
                                    "sum doubles every contrastive term, plain CLIP's too (not the SigLIP, SLIP, "
                                    "BarLIP, SiamLIP or SwALIP terms)")
    gather_with_grad: bool = _f(True, 'with several ranks, the full gradient through gathered embeddings (false = '
                                      'the paper: constants); also scales BarLIP\'s gradient: W ranks x the paper\'s '
                                      'when true; SLIP\'s SimCLR and the SigLIP terms always gather with gradient')
    slip_scale: float = _f(1.0, 'weight of the SLIP SimCLR loss')
    slip_temperature: float = _f(0.1, 'temperature of the SLIP SimCLR loss')
    barlip_lambda: float = _f(5e-3, 'BarLIP off-diagonal weight')
    barlip_scale: float = _f(0.025, 'BarLIP loss scale')
    momentum_tau: float = _f(0.99, 'EMA rate of the BYOLIP momentum model')
    swalip_weight: float = _f(0.2, 'weight of the SwALIP swapped-prediction loss')
    sk_epsilon: float = _f(0.05, 'Sinkhorn-Knopp entropy epsilon (SwALIP)')
    sk_iters: int = _f(3, 'Sinkhorn-Knopp iterations (SwALIP)')

    # --- image augmentation ---
    image_size: int = _f(64, 'global (weak) crop and evaluation size (224 in the paper)')
    local_crop_size: int = _f(64, 'strong (local) crop size (224; 192 for the 29M recipe)')
    weak_min_scale: float = _f(0.5, 'RandomResizedCrop min scale of the weak view')
    strong_min_scale: float = _f(0.08, 'RandomResizedCrop min scale of the strong views')
    strong_max_scale: float = _f(1.0, 'RandomResizedCrop max scale of the strong views')
    color_jitter_prob: float = _f(0.8, 'probability of colour jitter (0.4, 0.4, 0.4, 0.1) on strong views')
    grayscale_prob: float = _f(0.2, 'probability of grayscale on strong views')
    blur_prob: float = _f(0.5, 'probability of Gaussian blur (sigma in [0.1, 2]) on strong views')
    solarize_prob: float = _f(0.0, 'probability of solarize on strong views')
    byol_augment: bool = _f(False, 'asymmetric BYOL strong pipelines (needs num_augs=2)')
    augment_device: str = _f('cpu', "where the views' crops, the strong views' colour, blur, flip and all "
                             "normalisation run: cpu (data workers, per sample) or cuda (the training device, "
                             "batched; workers decode, draw and send the uint8 pixels the crops cover)")
    image_mean: list = _f([0.485, 0.456, 0.406], 'normalisation mean (ImageNet statistics)')
    image_std: list = _f([0.229, 0.224, 0.225], 'normalisation std (ImageNet statistics)')
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
    metadata: str = _f('', 'metadata file: .npy (cc3m/cc12m), .pkl (yfcc15m), .csv/.tsv (csv), shard pattern (wds)')
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
    precision: str = _f('auto', 'auto (bf16 on supported GPUs, fp32 on CPU), fp32, bf16 or fp16')
    grad_checkpointing: bool = _f(False, 'recompute activations in the backward pass to save memory')
    channels_last: bool = _f(False, 'channels_last memory format for the ResNet')
    compile: bool = _f(False, 'torch.compile the model')

    # --- evaluation ---
    eval_datasets: str = _f('', 'comma-separated zero-shot sets (empty = demo tasks for demo, else imagenet)')
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


# --- presets ---
_TEXT_512 = dict(text_width=512, text_heads=8, text_layers=12, embed_dim=256, mlp_hidden_dim=4096)
MODELS = {
    # tiny trains on a laptop CPU in minutes on the demo data; 16-pixel patches (a 4x4 grid at 64 px) learn its
    # shapes far faster than 8-pixel ones (a supervised probe: 93% against 24% after 200 steps)
    'tiny': dict(vision='vit', vision_width=128, vision_layers=4, vision_heads=4, patch_size=16,
                 text_width=128, text_heads=4, text_layers=3, embed_dim=64, mlp_hidden_dim=512),
    'resnet50': dict(vision='resnet50', **_TEXT_512),
    'vit_s16': dict(vision='vit', vision_width=384, vision_layers=12, vision_heads=6, patch_size=16, **_TEXT_512),
    'vit_s16_12h': dict(vision='vit', vision_width=384, vision_layers=12, vision_heads=12, patch_size=16, **_TEXT_512),
    'vit_s32': dict(vision='vit', vision_width=384, vision_layers=12, vision_heads=6, patch_size=32, **_TEXT_512),
    'vit_b32': dict(vision='vit', vision_width=768, vision_layers=12, vision_heads=12, patch_size=32, **_TEXT_512),
    'vit_b16': dict(vision='vit', vision_width=768, vision_layers=12, vision_heads=12, patch_size=16, **_TEXT_512),
    'vit_l16': dict(vision='vit', vision_width=1024, vision_layers=24, vision_heads=16, patch_size=16, **_TEXT_512),
    'vit_l14': dict(vision='vit', vision_width=1024, vision_layers=24, vision_heads=16, patch_size=14, **_TEXT_512),
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
    # your own data with the paper's optimisation settings (lr 3e-3 ...), so with the batch they were tuned for
    'csv': dict(image_size=224, local_crop_size=224, global_batch=PAPER_BATCH, chunk=128),
    'wds': dict(image_size=224, local_crop_size=224, global_batch=PAPER_BATCH, chunk=128),
}
DATASETS = tuple(RECIPES)
PAPER_RECIPES = ('cc3m', 'cc12m', 'yfcc15m', 'merged29m')  # the start line warns when one runs at another batch


def dataset_recipe(dataset, model, method):
    """The paper's settings for a dataset; a method's row may add to them, for any model or for one (recipe §5.1)."""
    extra = METHODS[method].recipes
    return {**RECIPES[dataset], **extra.get((dataset, None), {}), **extra.get((dataset, model), {})}


def method_preset(method):
    """Settings a method implies (its row's preset and fixed settings)."""
    return {**METHODS[method].preset, **METHODS[method].fixed}


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
        rank = int(os.environ.get('RANK', '0'))
        if rank == 0 or not getattr(e, 'every_rank', False):
            message = ' '.join(str(e).split())  # always one line
            print(f"error: {'' if rank == 0 else f'rank {rank}: '}{message}", file=sys.stderr, flush=True)
        dist = sys.modules.get('torch.distributed')
        if dist is not None and dist.is_available() and dist.is_initialized():
            sys.stdout.flush()
            os._exit(e.exit_code)  # tearing a gloo process group down at interpreter exit can abort (SIGABRT)
        sys.exit(e.exit_code)


def _convert(name, raw):
    kind = type(_FIELDS[name].default) if _FIELDS[name].default is not dataclasses.MISSING else list
    if kind is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ConfigError(f"--{name}: expected true/false/1/0, got {raw!r}")
    try:
        if kind is list:
            return [float(x) for x in raw.split(',')]
        return kind(raw) if kind is not int else int(raw)
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
    _check(cfg.dataset in DATASETS, f"--dataset={cfg.dataset}: choose one of {', '.join(DATASETS)}")
    _check(cfg.model in MODELS, f"--model={cfg.model}: choose one of {', '.join(MODELS)}")
    _check(cfg.method in METHODS, f"--method={cfg.method}: choose one of {', '.join(METHODS)}")
    for name, choices in CHOICES.items():
        value = getattr(cfg, name)
        _check(value in choices or name == 'device' and value.startswith('cuda:'),
               f"--{name}={value}: choose {', '.join(choices[:-1])} or {choices[-1]}")
    _check(set(filter(None, cfg.report_to.split(','))) <= {'tensorboard', 'wandb'},
           f"--report_to={cfg.report_to}: choose tensorboard, wandb or both (comma-separated)")
    for name in ('lr', 'lr_start', 'lr_end', 'weight_decay', 'eps', 'warmup_epochs', 'text_dropout',
                 'slip_scale', 'barlip_lambda', 'barlip_scale', 'swalip_weight', 'bad_sample_threshold',
                 'synonym_prob', 'swap_prob', 'deletion_prob', 'identity_prob', 'max_image_pixels'):
        _check(getattr(cfg, name) >= 0, f"--{name}={getattr(cfg, name)}: must be >= 0")
    for name in ('batch_size', 'global_batch', 'eval_batch_size', 'epochs', 'update_freq', 'image_size',
                 'local_crop_size', 'vision_width', 'vision_layers', 'vision_heads', 'patch_size', 'text_width',
                 'text_heads', 'text_layers', 'context_length', 'embed_dim', 'mlp_hidden_dim', 'sk_iters', 'keep_last',
                 'max_nonfinite', 'log_every'):
        _check(getattr(cfg, name) >= 1, f"--{name}={getattr(cfg, name)}: must be >= 1")
    _check(cfg.workers >= -1, f"--workers={cfg.workers}: must be >= 0, or -1 to choose from the cores available")
    for name in ('chunk', 'num_augs', 'threads', 'max_steps', 'save_every', 'eval_every', 'vocab_size',
                 'demo_train_size', 'demo_val_size', 'bad_sample_min'):
        _check(getattr(cfg, name) >= 0, f"--{name}={getattr(cfg, name)}: must be >= 0")
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
                 'momentum_tau', 'weak_min_scale', 'strong_min_scale', 'strong_max_scale'):
        _check(0 <= getattr(cfg, name) <= 1, f"--{name}={getattr(cfg, name)}: must be in [0, 1]")
    _check(cfg.strong_min_scale <= cfg.strong_max_scale,
           f"--strong_min_scale={cfg.strong_min_scale} is above --strong_max_scale={cfg.strong_max_scale}")
    _check(cfg.synonym_prob + cfg.swap_prob + cfg.deletion_prob + cfg.identity_prob > 0 or not cfg.text_augment,
           "--text_augment needs one of synonym/swap/deletion/identity_prob > 0")
    _check(cfg.sk_epsilon > 0, f"--sk_epsilon={cfg.sk_epsilon}: must be > 0")
    _check(cfg.slip_temperature > 0, f"--slip_temperature={cfg.slip_temperature}: must be > 0")
    _check(cfg.logit_scale_max >= 1, f"--logit_scale_max={cfg.logit_scale_max}: must be >= 1")
    _check(len(cfg.image_mean) == 3 and len(cfg.image_std) == 3 and min(cfg.image_std) > 0,
           "--image_mean/--image_std: give three numbers each, std > 0, e.g. --image_std=0.229,0.224,0.225")
    method = METHODS[cfg.method]
    for name, value in method.fixed.items():
        _check(getattr(cfg, name) == value, f"--method={cfg.method} needs --{name}={value:g} (it trains only with it)")
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


def cpu_split(workers, threads, device_type, local_world_size=1):
    """(loader workers, torch threads) of one process; -1 / 0 split this rank's share of the cores it may use, never
    more in all: on a GPU the workers take all but one core, on a CPU one worker per 4 cores feeds the threads."""
    cores = max(1, len(os.sched_getaffinity(0)) // max(1, local_world_size))
    if workers < 0:
        workers = 0 if cores == 1 else cores - 1 if device_type == 'cuda' else max(1, cores // 4)
    if threads <= 0:
        threads = max(1, cores - workers)
    return workers, threads


def help_text(cfg=None):
    """Every flag with its help and its value in cfg (the config the other flags resolve to; default: Config())."""
    cfg = cfg or Config()
    lines = ['usage: python train.py [--key=value ...]   (also --key value; dashes or underscores)', '',
             f"values for --dataset={cfg.dataset} --model={cfg.model} --method={cfg.method}, "
             f"{cfg.global_batch // cfg.batch_size} process(es) (WORLD_SIZE) and the flags given:"]
    for f in fields(Config):
        lines.append(f"  --{f.name:<24} {f.metadata['help']} (here: {getattr(cfg, f.name)})")
    lines.append('')
    lines.append(f"precedence: default < model preset < dataset recipe ({', '.join(DATASETS)}) < method < flag")
    return '\n'.join(lines)


def resolve(flags, verbose=True):
    """Build a Config from explicit flags ({key: raw string}) with presets filled in underneath them."""
    values = {k: _convert(k, v) for k, v in flags.items()}
    base = Config()
    dataset, method = values.get('dataset', base.dataset), values.get('method', base.method)
    _check(dataset in DATASETS, f"--dataset={dataset}: choose one of {', '.join(DATASETS)}")
    _check(method in METHODS, f"--method={method}: choose one of {', '.join(METHODS)}")
    recipe = dataset_recipe(dataset, values.get('model', RECIPES[dataset].get('model', base.model)), method)
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
        _check(explicit.get('global_batch', b * world) == b * world,
               f"--global_batch={global_batch} and --batch_size={b} disagree on {world} process(es) ({b} x {world} = "
               f"{b * world}): give one of them")
        return {'global_batch': b * world}
    _check(global_batch >= 1, f"--global_batch={global_batch}: must be >= 1")
    _check(global_batch % world == 0,
           f"--global_batch={global_batch} does not split over {world} processes: run a number of processes that "
           f"divides it, or pass --global_batch={world * max(1, round(global_batch / world))}")
    return {'batch_size': global_batch // world}


def parse_args(argv=None):
    """Parse --key=value flags into a Config; bad input exits with status 2 and one line."""
    argv = sys.argv[1:] if argv is None else argv
    rank0 = int(os.environ.get('RANK', '0')) == 0  # under torchrun every rank parses the same flags: rank 0 speaks
    try:
        if '-h' in argv or '--help' in argv:  # the values the other flags resolve to: presets included
            if rank0:
                print(help_text(resolve(_split_flags([a for a in argv if a not in ('-h', '--help')]), False)))
            sys.exit(0)
        return resolve(_split_flags(argv), verbose=rank0)
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


# --- Processes ---
def setup_distributed(cfg):
    """Join torchrun's process group (NCCL on GPU, gloo on CPU) and split the cores between loader workers and
    torch threads (cfg.workers, cfg.threads); returns (rank, world_size, device). Used by training and evaluation."""
    rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    if cfg.device == 'cpu' or (cfg.device == 'auto' and not torch.cuda.is_available()):
        device = torch.device('cpu')
    elif not torch.cuda.is_available():
        raise ConfigError(f"--device={cfg.device} but CUDA is not available here; use --device=cpu")
    elif cfg.device.startswith('cuda:') and world_size == 1:
        device = torch.device(cfg.device)
    else:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision('high')  # TF32 for fp32 matmuls on Ampere and later
    # never oversubscribe the cores: loader workers + torch threads fit this rank's share of them
    cfg.workers, cfg.threads = cpu_split(cfg.workers, cfg.threads, device.type,
                                         int(os.environ.get('LOCAL_WORLD_SIZE', 1)))
    torch.set_num_threads(cfg.threads)
    if world_size > 1:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                device_id=device if device.type == 'cuda' else None)
    return rank, world_size, device


# --- Checkpoints ---
# One file format for training, resume, evaluation and import: a dict with 'format': FORMAT, the run's 'config',
# the 'model' weights and the tokenizer's 'bpe_merges'; train.py adds the optimizer, scaler, RNG and data position.
FORMAT = 'rocket-clip/1'
STALE_TMP = re.compile(r'\.checkpoint(_\d+)?\.pt\.\d+\.tmp')  # TMP_NAME of a checkpoint whose save was killed


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


def save_checkpoint(ckpt, output_dir, keep_last):
    """checkpoint.pt and a step-numbered copy in output_dir, keeping the last keep_last copies; a full disk raises
    one line saying what still loads."""
    out, step, saved = Path(output_dir), ckpt['step'], False
    try:
        atomic_save(ckpt, out / 'checkpoint.pt')
        saved = True

        def copy_into(f):
            with open(out / 'checkpoint.pt', 'rb') as src:
                shutil.copyfileobj(src, f, 1 << 24)
        # an independent file, not a hard link: damage done in place to checkpoint.pt (a truncating copy, a bad
        # block) must leave its numbered twin loadable, for the --resume that the corrupt-checkpoint error names
        atomic_write(out / f'checkpoint_{step:08d}.pt', copy_into, os.path.getsize(out / 'checkpoint.pt'))
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        good = (f"{out}/checkpoint.pt holds step {step}" if saved else f"{out}/checkpoint.pt is unchanged and still "
                f"loads" if (out / 'checkpoint.pt').exists() else "no checkpoint was saved before")
        raise UserError(f"step {step}: {e.strerror}; {good}; free some space, then continue with "
                        f"--resume=auto") from None
    for old in sorted(out.glob('checkpoint_*.pt'))[:-keep_last]:
        old.unlink()


def find_resume(out, resume):
    """The checkpoint that --resume names (auto: out/checkpoint.pt if there is one), or None to start fresh."""
    if resume == 'auto':
        numbered = sorted(out.glob('checkpoint_*.pt'))
        if not (out / 'checkpoint.pt').exists() and numbered:  # starting over would delete them
            raise UserError(f"--resume=auto: {out} has no checkpoint.pt but holds {len(numbered)} numbered "
                            f"checkpoint(s); continue from the newest with --resume={numbered[-1]}")
        return out / 'checkpoint.pt' if (out / 'checkpoint.pt').exists() else None
    if resume and not Path(resume).is_file():
        raise UserError(f"--resume={resume}: no such checkpoint; give a checkpoint.pt path or auto")
    return Path(resume) if resume else None


def _describe(obj):
    """A few words on what a non-rocket-clip checkpoint file holds."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    if 'format' in obj:
        return f"format={obj['format']!r}"
    if obj and all(torch.is_tensor(v) for v in obj.values()):
        return f"a raw state_dict of {len(obj)} tensors (e.g. {next(iter(obj))!r})"
    return f"a dict with keys {sorted(map(str, obj))[:6]}"


def read_checkpoint(path, overrides=None, defaults=None):
    """Load a checkpoint written by train.py (weights_only), or import a released SLIP / CLIP 🚀 / open_clip one
    (import_checkpoint); missing, corrupt or foreign files raise one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; pass a .pt file written by train.py")
    try:
        ckpt = load_weights_file(path)
    except Exception as e:  # truncated zip, bad pickle: "not loadable"; foreign pickled classes: refused
        found = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
        if isinstance(e, pickle.UnpicklingError) and found:  # junk bytes also fail weights_only, naming no global
            raise UserError(f"checkpoint {path} was refused as unsafe: it pickles {found[1]} "
                            f"beyond tensors and plain data, which torch.load(weights_only=True) never runs; if you "
                            f"trust the file, load it with weights_only=False and torch.save its tensors alone") \
                from None
        raise UserError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {first_line(e)}); "
                        f"re-copy it or pick another epoch") from None
    if not isinstance(ckpt, dict) or ckpt.get('format') != FORMAT:
        ckpt = import_checkpoint(ckpt, path, overrides, defaults)
    return ckpt


def read_resume(path):
    """The checkpoint dict at `path`; when it does not load, one line naming the newest numbered copy that does."""
    try:
        return read_checkpoint(path)
    except (ValueError, UserError) as e:  # read_checkpoint's one-line refusals
        error = e
    for numbered in sorted(Path(path).parent.glob('checkpoint_*.pt'), reverse=True):
        try:
            step = read_checkpoint(numbered)['step']
        except (ValueError, UserError):
            continue
        if numbered.resolve() != Path(path).resolve():
            raise UserError(f"{error}; the newest numbered checkpoint that loads is step {step}: continue "
                            f"from it with --resume={numbered}") from None
    raise UserError(f"{error}; no numbered checkpoint beside it loads either: start over with --overwrite "
                    f"or another --output_dir") from None


def first_line(e, limit=160):
    """An exception's first line, cut at a word boundary."""
    line = (str(e).strip().splitlines() or [''])[0]
    return line if len(line) <= limit else line[:limit].rsplit(' ', 1)[0] + ' ...'


IMPORT_FLAGS = ('vision_heads', 'text_heads', 'vision_act', 'text_act', 'bpe_path', 'image_mean', 'image_std',
                'guess_heads')
CLIP_BPE = 'bpe_simple_vocab_16e6.txt.gz'


def import_overrides(flags):
    """The IMPORT_FLAGS among flags, typed as the Config fields they set; a bad value raises ConfigError."""
    out = {k: _convert(k, flags[k]) for k in IMPORT_FLAGS if k in flags and k != 'guess_heads'}
    for k in ('image_mean', 'image_std'):
        _check(len(out.get(k, 'abc')) == 3, f"--{k}={flags.get(k)}: expected three comma-separated numbers, "
                                              f"e.g. 0.485,0.456,0.406")
    if 'guess_heads' in flags:
        out['guess_heads'] = flags['guess_heads'].lower() in ('', 'true', '1')
    return out


def open_clip_config(path):
    """Config fields of the open_clip_config.json beside an open_clip weights file (open_clip's local-dir layout):
    head counts, activations and image statistics; {} when there is none."""
    config = Path(path).parent / 'open_clip_config.json'
    if not config.is_file():
        return {}
    try:
        found = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"open_clip config {config} is unreadable ({type(e).__name__}); give a JSON file") from None
    model_cfg, preprocess = (found.get(k) or {} for k in ('model_cfg', 'preprocess_cfg'))
    vision, text = model_cfg.get('vision_cfg', {}), model_cfg.get('text_cfg', {})
    act = 'quickgelu' if model_cfg.get('quick_gelu') else 'gelu'
    fields = dict(vision_heads=vision.get('width', 768) // vision.get('head_width', 64), text_heads=text.get('heads', 8),
                  vision_act=act, text_act=act)
    fields.update({f'image_{k}': preprocess[k] for k in ('mean', 'std') if k in preprocess})
    return fields


def import_checkpoint(obj, path, overrides=None, defaults=None):
    """A released SLIP / CLIP 🚀 / open_clip checkpoint as one of ours, in memory, and one line saying what was found;
    overrides (IMPORT_FLAGS) beat what is found, defaults give the head counts of a file without a model name."""
    try:
        imported = convert_weights(obj)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    if imported is None:
        raise UserError(f"{path} is not a rocket-clip checkpoint: found {_describe(obj)}, expected a dict with "
                         f"format={FORMAT!r} as written by train.py, or a released SLIP, CLIP 🚀 or open_clip one")
    overrides, arch = dict(overrides or {}), imported['arch']
    guess = overrides.pop('guess_heads', False)
    what = {'slip': 'SLIP', 'rocket': 'CLIP 🚀', 'open_clip': 'open_clip'}[imported['format']]
    beside = open_clip_config(path) if imported['format'] == 'open_clip' else {}
    heads = ['text_heads'] + (['vision_heads'] if arch['vision'] == 'vit' else [])
    guessed = {k: arch[k.replace('heads', 'width')] // 64 for k in heads} if guess else {}  # OpenAI's rule
    fields = {**(defaults or {}), **guessed, **arch, **beside, **overrides}
    missing = [k for k in heads if k not in fields]
    if missing:
        raise UserError(f"{path}: a {what} checkpoint without an official model name or open_clip_config.json, so "
                         f"its head counts are unknown (no shape shows them): pass "
                         f"{' '.join(f'--{k}=N' for k in missing)} (or --guess_heads for OpenAI's width / 64)")
    args = obj.get('args')  # SLIP's and CLIP 🚀's argparse.Namespace; CLIP 🚀's names its merges file
    found = [p for p in (Path(getattr(args, 'bpe_path', None) or CLIP_BPE), Path(path).parent / CLIP_BPE,
                         Path(CLIP_BPE)) if p.is_file()]
    fields.setdefault('bpe_path', str(found[0].resolve()) if found else CLIP_BPE)
    dataset = getattr(args, 'dataset', None)
    cfg = Config.from_dict({**fields, 'dataset': dataset if dataset in DATASETS else 'csv'})
    source = ('the flags' if any(k in overrides for k in heads) else imported['heads_from']
              if all(k in arch for k in heads) else f'{Path(path).parent.name}/open_clip_config.json' if beside
              else "OpenAI's rule (width / 64, --guess_heads)" if guess else 'the run config')
    tower = (f"ViT width {cfg.vision_width}, {cfg.vision_layers} layers, {cfg.vision_heads} heads, patch "
             f"{cfg.patch_size}, {cfg.image_size} px, {cfg.vit_style} style, {cfg.vision_act}"
             if cfg.vision == 'vit' else 'ResNet-50')
    local = ['h'] if 'image_heads.h.0.weight' in imported['state'] else []
    projections = ['z', *local, *sorted({k.split('.')[0] for k in imported['extra']})]
    epoch = '' if imported['epoch'] is None else f", epoch {imported['epoch']}"
    line = (f"{path}: {what} checkpoint {imported['name'] or '(no model name)'}{epoch}: "
            f"{tower}; text width {cfg.text_width}, {cfg.text_layers} layers, {cfg.text_heads} heads, "
            f"{cfg.text_act}; embedding {cfg.embed_dim}; projections {', '.join(projections)}; head counts from "
            f"{source}")
    if any(k not in {**overrides, **beside} for k in imported['assumed']):
        line += "; activations assumed QuickGELU as in OpenAI's weights (LAION's GELU models: --vision_act=gelu " \
                "--text_act=gelu)"
    if imported['ignored']:
        line += f"; not imported: {', '.join(sorted({k.split('.')[0] for k in imported['ignored']}))}"
    if int(os.environ.get('RANK', 0)) == 0:
        print(line)
    return {'format': FORMAT, 'config': cfg.to_dict(), 'model': imported['state'],
            'extra_heads': imported['extra'], 'epoch': imported['epoch'], 'source': line}


# Released weights.
# The checkpoints of SLIP and CLIP 🚀 (their main.py's dict: an `args` Namespace and a DDP state_dict) and open_clip
# state dicts of OpenAI-architecture ViTs, renamed onto this model. Widths and depths come from the tensors; head
# counts, which no shape shows, from the official builder named in args.model (for open_clip files: the caller's).
OFFICIAL_HEADS = {  # (format, backbone in args.model) -> (vision heads, text heads) of the official builders
    ('slip', 'VITS16'): (12, 8), ('slip', 'VITB16'): (12, 8), ('slip', 'VITL16'): (16, 8),  # SLIP's ViT-S: 12 heads
    ('rocket', 'R50'): (None, 8), ('rocket', 'VITS16MOCO'): (12, 8), ('rocket', 'VITS16'): (6, 8),
    ('rocket', 'VITS32'): (6, 8), ('rocket', 'VITB32'): (12, 8), ('rocket', 'VITB16'): (12, 8),
    ('rocket', 'VITL16'): (16, 8),
}
OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
_MLP_INDEX = {'layer1': 0, 'bn1': 1, 'layer2': 3, 'bn2': 4, 'layer3': 6}  # official 3-layer MLP names -> mlp()
_RENAMES = [  # (pattern, replacement), applied in turn to every key: the official name -> ours
    (r'^visual\.cls_token$', 'visual.class_embedding'), (r'^visual\.pos_embed$', 'visual.positional_embedding'),
    (r'^visual\.patch_embed\.proj\.', 'visual.conv1.'), (r'^visual\.blocks\.', 'visual.transformer.resblocks.'),
    (r'^visual\.norm\.', 'visual.ln_post.'), (r'\.norm1\.', '.ln_1.'), (r'\.norm2\.', '.ln_2.'),
    (r'\.attn\.qkv\.', '.attn.in_proj.'), (r'\.attn\.proj\.', '.attn.out_proj.'),
    (r'\.attn\.in_proj_(weight|bias)$', r'.attn.in_proj.\1'),
    (r'\.mlp\.fc1\.', '.mlp.c_fc.'), (r'\.mlp\.fc2\.', '.mlp.c_proj.'),
    (r'^(text\.)?(token_embedding|positional_embedding|transformer|ln_final)\b', r'text.\2'),
    (r'^image_projector\.', 'image_heads.z.'), (r'^text_projector\.', 'text_heads.z.'),
    (r'^l2l_image_projector\.', 'image_heads.h.'), (r'^l2l_text_projector\.', 'text_heads.h.'),
    (r'^image_mlp\.', 'slip_image.'),
    (r'^(image_heads\.h|text_heads\.h|slip_image)\.(layer[123]|bn[12])\.', lambda m: f'{m[1]}.{_MLP_INDEX[m[2]]}.'),
    # CLIP 🚀's non-contrastive heads: the '_global' modules (the '_local' ones are the same modules unless
    # --separate-proj-child, which this model does not have)
    (r'^barlip_(image|text)_projector_global\.', r'barlip_\1.'),
    (r'^siamlip_(image|text)_projector_global\.0\.', r'siam_proj_\1.'),
    (r'^siamlip_(image|text)_projector_global\.1\.', r'siam_proj_\1.4.'),  # the affine-free last BN
    (r'^image_text_predictor_global\.', 'siam_pred_image.'), (r'^text_image_predictor_global\.', 'siam_pred_text.'),
]
_CORE = ('visual.', 'text.', 'image_heads.', 'text_heads.', 'logit_scale', 'l2l_logit_scale')
_EXTRA = ('slip_image.', 'barlip_image.', 'barlip_text.', 'siam_proj_', 'siam_pred_')


def load_weights_file(path):
    """torch.load(weights_only=True) admitting only the argparse.Namespace (and the pathlib paths inside it) that
    SLIP and CLIP 🚀 save as `args`: an explicit allow-list, never a full unpickle."""
    allowed = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath]
    if pathlib.PosixPath.__module__ != 'pathlib':  # Python 3.13 moved it; older files name it pathlib.PosixPath
        allowed += [(pathlib.PosixPath, 'pathlib.PosixPath'), (pathlib.WindowsPath, 'pathlib.WindowsPath')]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location='cpu', weights_only=True)


def _rename(key):
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def _count(state, prefix):
    """Number of blocks under prefix (keys prefix + '<i>.')."""
    return len({k[len(prefix):].split('.')[0] for k in state if k.startswith(prefix)})


def _source_format(sd):
    """'slip', 'rocket' or 'open_clip' from the keys; None for an unknown dict; raises for unsupported models."""
    if 'visual.attnpool.positional_embedding' in sd:
        raise ValueError("OpenAI's modified ResNet-50 (attention pooling) is out of scope: only OpenAI's ViTs and "
                         "CLIP 🚀's standard ResNet-50 are supported")
    if 'token_embedding.weight' not in sd and 'text.token_embedding.weight' not in sd:
        if 'image_mlp.layer1.weight' in sd:
            raise ValueError("a SLIP SimCLR checkpoint: an image tower without text tower or projection, so no "
                             "zero-shot classifier; use one of SLIP's CLIP or SLIP files")
        return None
    if 'image_projection' in sd:
        return 'slip'
    if 'image_projector.weight' in sd or 'image_projector.layer1.weight' in sd:
        return 'rocket'
    if 'visual.proj' in sd and 'visual.class_embedding' in sd:
        return 'open_clip'
    return None


def _arch(fmt, name, state, extra):
    """(Config fields of the weights, the fields among them that are assumed, where the head counts come from)."""
    text_width = state['text.ln_final.weight'].shape[0]
    arch = dict(text_width=text_width, text_layers=_count(state, 'text.transformer.resblocks.'),
                context_length=state['text.positional_embedding'].shape[0],
                embed_dim=state['image_heads.z.weight'].shape[0], method='clip', num_augs=0)
    if 'visual.class_embedding' in state:
        width, _, patch, _ = state['visual.conv1.weight'].shape
        size = math.isqrt(state['visual.positional_embedding'].shape[1] - 1) * patch
        arch.update(vision='vit', vision_width=width, vision_layers=_count(state, 'visual.transformer.resblocks.'),
                    patch_size=patch, image_size=size, local_crop_size=size,
                    vit_style='openai' if fmt == 'open_clip' else 'timm')
    else:
        arch.update(vision='resnet50', image_size=224, local_crop_size=224)
    if 'image_heads.h.0.weight' in state:
        arch.update(method='rocket', num_augs=2, mlp_hidden_dim=state['image_heads.h.0.weight'].shape[0])
    elif 'slip_image.0.weight' in extra:
        arch['mlp_hidden_dim'] = extra['slip_image.0.weight'].shape[0]
    if fmt == 'open_clip':  # OpenAI's weights were trained with QuickGELU, some LAION ones with GELU: not in the file
        arch.update(image_mean=OPENAI_MEAN, image_std=OPENAI_STD, vision_act='quickgelu', text_act='quickgelu')
        return arch, ['vision_act', 'text_act'], None  # nor are the head counts: no name, no shape shows them
    arch.update(vision_act='gelu', text_act='quickgelu')
    backbone = name.split('_')[1] if name and '_' in name else None
    heads = OFFICIAL_HEADS.get((fmt, backbone))
    if heads is None:
        return arch, [], None
    if heads[0] is not None and arch['vision'] == 'vit':
        arch['vision_heads'] = heads[0]
    arch['text_heads'] = heads[1]
    return arch, [], f"the official builder {name}"


def convert_weights(obj):
    """A released checkpoint in our names: {format, name, epoch, arch (its Config fields), assumed, heads_from, state,
    extra (method heads), ignored (keys left out)}; None for a foreign dict, ValueError for an unsupported model."""
    if not isinstance(obj, dict):
        return None
    wrapped = isinstance(obj.get('state_dict'), dict)  # main.py's dict (or open_clip's) around the state_dict
    sd = obj['state_dict'] if wrapped else obj
    if not sd:
        return None
    if all(k.startswith('module.') for k in sd):  # saved from a DistributedDataParallel model
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k not in ('input_resolution', 'context_length', 'vocab_size')}  # OpenAI's
    if not all(torch.is_tensor(v) for v in sd.values()):
        return None
    fmt = _source_format(sd)
    if fmt is None:
        return None
    if 'image_projector.layer1.weight' in sd:
        raise ValueError("a CLIP 🚀 checkpoint with MLP global projectors (--clip-proj-type mlp), which this model "
                         "does not have; only the paper's linear ones are supported")
    state, ignored = {}, []
    for key, value in sd.items():
        if key in ('image_projection', 'visual.proj', 'text_projection', 'text.text_projection'):
            # used as x @ P: our Linear weight is P^T
            state['text_heads.z.weight' if 'text' in key else 'image_heads.z.weight'] = value.t()
            continue
        new = _rename(key)
        if new.startswith(_CORE + _EXTRA):
            state[new] = value
        else:
            ignored.append(key)
    if fmt == 'open_clip':  # class token (D,) and position embedding (L, D) -> ours, with batch axes
        state['visual.class_embedding'] = state['visual.class_embedding'].reshape(1, 1, -1)
        state['visual.positional_embedding'] = state['visual.positional_embedding'].unsqueeze(0)
    if state.get('image_heads.h.weight') is not None:  # a linear local head
        if 'l2l_logit_scale' in state:
            raise ValueError("a CLIP 🚀 checkpoint with linear local projectors (--cl2l-img-proj-type linear), "
                             "which this model does not have; only the paper's MLP ones are supported")
        # without --separate-proj the local head is the global one, saved a second time: keep it once
        ignored += [k for k in sd if k.startswith('l2l_')]
        state = {k: v for k, v in state.items() if not k.startswith(('image_heads.h.', 'text_heads.h.'))}
    extra = {k: state.pop(k) for k in list(state) if k.startswith(_EXTRA)}
    name = getattr(obj.get('args'), 'model', None)
    arch, assumed, heads_from = _arch(fmt, name, state, extra)
    return {'format': fmt, 'name': name, 'epoch': obj.get('epoch') if wrapped else None, 'arch': arch,
            'assumed': assumed, 'heads_from': heads_from, 'state': state, 'extra': extra, 'ignored': ignored}


# Export to open_clip.
# The inverse of the import renames: every plain rename of _RENAMES (a literal name, no group) turned around gives
# timm's ViT names from ours, so one table serves both ways. open_clip's own towers keep OpenAI's names.
_INVERSE = [(re.escape(new).join(['^' * p.startswith('^'), '$' * p.endswith('$')]), p.strip('^$').replace('\\.', '.'))
            for p, new in reversed(_RENAMES) if isinstance(new, str) and '\\' not in new
            and re.escape(p.strip('^$').replace('\\.', '.')) == p.strip('^$')]  # literal renames only
_PACKED_QKV = (r'\.attn\.in_proj\.(weight|bias)$', r'.attn.in_proj_\1')  # open_clip's nn.MultiheadAttention
# (width, layers, heads, patch, image size) of our timm-style ViT -> timm's registered ViT of that shape
TIMM_VITS = {(192, 12, 3, 16, 224): 'vit_tiny_patch16_224', (384, 12, 6, 16, 224): 'vit_small_patch16_224',
             (384, 12, 6, 32, 224): 'vit_small_patch32_224', (768, 12, 12, 16, 224): 'vit_base_patch16_224',
             (768, 12, 12, 32, 224): 'vit_base_patch32_224', (1024, 24, 16, 16, 224): 'vit_large_patch16_224'}


def _timm_name(key):
    """Our ViT key -> timm's (the import's _RENAMES run backwards)."""
    for pattern, replacement in _INVERSE:
        key = re.sub(pattern, replacement, key)
    return key


def _vision_tower(cfg, state):
    """(open_clip vision_cfg, {open_clip key: tensor}) of our image encoder: the ResNet-50 and a timm-style ViT of
    timm's shapes through open_clip's timm tower (exact GELU whatever the text's), other ViTs as open_clip's own. Raises ValueError for a tower open_clip cannot represent exactly."""
    visual = {k[len('visual.'):]: v for k, v in state.items() if k.startswith('visual.')}
    head = {'head.proj.weight': state['image_heads.z.weight']}  # the timm tower's Linear(width, embed_dim)
    if cfg.vision == 'resnet50':  # our names are timm's
        vision_cfg = dict(timm_model_name='resnet50', timm_pool='avg', timm_proj='linear', image_size=cfg.image_size)
        return vision_cfg, {**{f'trunk.{k}': v for k, v in visual.items()}, **head}
    shape = (cfg.vision_width, cfg.vision_layers, cfg.vision_heads, cfg.patch_size, cfg.image_size)
    if cfg.vit_style == 'timm' and cfg.vision_act == 'gelu' and shape in TIMM_VITS:
        vision_cfg = dict(timm_model_name=TIMM_VITS[shape], timm_pool='token', timm_proj='linear',
                          image_size=cfg.image_size)
        return vision_cfg, {**{'trunk.' + _timm_name(f'visual.{k}')[len('visual.'):]: v for k, v in visual.items()},
                            **head}
    if cfg.vision_act != cfg.text_act:  # open_clip's quick_gelu sets both of its own towers
        timm = f"; timm's shapes {sorted(TIMM_VITS.values())} export through its timm tower" \
            if cfg.vit_style == 'timm' and cfg.vision_act == 'gelu' else ''
        raise ValueError(f"--vision_act={cfg.vision_act} with --text_act={cfg.text_act}: open_clip's own ViT takes "
                         f"the text tower's activation{timm}")
    out = {re.sub(*_PACKED_QKV, k): v for k, v in visual.items() if k != 'conv1.bias'}
    out['class_embedding'] = visual['class_embedding'].reshape(-1)  # (1, 1, D) -> (D,)
    out['positional_embedding'] = visual['positional_embedding'][0].clone()  # (1, 1+N, D) -> (1+N, D)
    if 'conv1.bias' in visual:  # open_clip's patch conv has no bias: it is a constant on every patch position
        out['positional_embedding'][1:] += visual['conv1.bias']
    out['proj'] = state['image_heads.z.weight'].t()  # used as x @ proj
    vision_cfg = dict(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
                      layers=cfg.vision_layers, head_width=cfg.vision_width // cfg.vision_heads)
    if cfg.vit_style == 'timm':
        vision_cfg.update(no_ln_pre=True, norm_kwargs={'eps': 1e-6})
    return vision_cfg, out


def export_open_clip(cfg, state, vocab_size):
    """Our weights in open_clip's names: (model_cfg, preprocess_cfg, state_dict, modules left out: every head but z
    has no place in open_clip's CLIP); ValueError for a model open_clip cannot represent exactly."""
    vision_cfg, visual = _vision_tower(cfg, state)
    text = {re.sub(*_PACKED_QKV, k[len('text.'):]): v for k, v in state.items() if k.startswith('text.')}
    out = {**{f'visual.{k}': v for k, v in visual.items()}, **text,
           'text_projection': state['text_heads.z.weight'].t(), 'logit_scale': state['logit_scale']}
    model_cfg = dict(embed_dim=cfg.embed_dim, quick_gelu=cfg.text_act == 'quickgelu', vision_cfg=vision_cfg,
                     text_cfg=dict(context_length=cfg.context_length, vocab_size=vocab_size, width=cfg.text_width,
                                   heads=cfg.text_heads, layers=cfg.text_layers))
    preprocess_cfg = dict(size=cfg.image_size, mode='RGB', mean=list(cfg.image_mean), std=list(cfg.image_std),
                          interpolation='bilinear', resize_mode='shortest', fill_color=0)
    left_out = sorted({'.'.join(k.split('.')[:2 if k.startswith(('image_heads.', 'text_heads.')) else 1])
                       for k in state if k != 'logit_scale'
                       and not k.startswith(('visual.', 'text.', 'image_heads.z.', 'text_heads.z.'))})
    return model_cfg, preprocess_cfg, {k: v.contiguous() for k, v in out.items()}, left_out
