"""Reading checkpoints (ours, or released SLIP / CLIP 🚀 / open_clip ones), zero-shot classification and image-text
retrieval (recipe §6), and the linear probe.

    python evaluate.py ckpt.pt [more.pt ...] [--datasets=imagenet,cifar10] [--data_root=DIR] [--catalog=paths.json]
        [--labels=labels.json] [--templates=templates.json] [--retrieval=pairs.csv] [--out=results.json]
        [--batch_size=N] [--workers=N] [--precision=fp32|bf16|fp16] [--bpe_path=FILE] [--device=cpu|cuda]
        [--linear_probe [--probe_heads] [--probe_seed=0]]
    python evaluate.py --check_data --data_root=DIR [--catalog=paths.json]   # which sets are there; no model
    python evaluate.py --convert released.pt --out ours.pt [--vision_heads=N --text_heads=N | --guess_heads]
        [--vision_act=gelu|quickgelu] [--text_act=...] [--image_mean=a,b,c] [--image_std=a,b,c] [--bpe_path=FILE]
    python evaluate.py --export ckpt.pt --out DIR    # open_clip's local-dir layout, for open_clip and clip_benchmark

Rebuilds each model from its checkpoint alone (config, weights, the tokenizer's merges), runs every evaluation
set (EVAL_SETS) found under --data_root (<data_root>/<name>, or the paths of a --catalog {name: path} JSON file;
layouts in docs/datasets.md), the demo held-out tasks and retrieval for demo models, and prints a table row per
checkpoint. Metrics go to <ckpt>_eval.json beside each checkpoint, or all of them as a list to --out, rewritten as
each dataset finishes. Data-parallel under torchrun. --linear_probe fits a logistic-regression probe on frozen image
features of each dataset's train split instead (features cached in <ckpt>_features/, results in <ckpt>_probe.json).
"""
import collections
import csv
import dataclasses
import difflib
import functools
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageFile

from augment import eval_transform, full_fp32_matmul
from config import (_FALSE, _TRUE, Config, ConfigError, UserError, _check, _convert, atomic_save,
                    atomic_write, first_line, parse_flags, run_cli, setup_distributed)
from model import FORMAT, CLIPModel, autocast_dtype, build_model, convert_weights, export_open_clip, load_weights_file
from data import (READERS, Tokenizer, build_eval_loader, build_tokenizer, checkpoint_merges, demo_eval_tasks,
                  demo_probe_train, demo_retrieval, load_image, merges_text)

ASSETS = Path(__file__).resolve().parent / 'assets'
ENSEMBLE_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # w * sim_z + (1 - w) * sim_h
RECALL_KS = (1, 5, 10)


# --- Checkpoints ---
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
            raise UserError(f"checkpoint {path} was refused as unsafe: it pickles {found[1]} beyond tensors and plain "
                            f"data, which torch.load(weights_only=True) never runs; if you trust the file, load it "
                            f"with weights_only=False and torch.save its tensors alone") from None
        raise UserError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {first_line(e)}); "
                        f"re-copy it or pick another epoch") from None
    if not isinstance(ckpt, dict) or ckpt.get('format') != FORMAT:
        ckpt = import_checkpoint(ckpt, path, overrides, defaults)
    return ckpt


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
    cfg = Config.from_dict({**fields, 'dataset': dataset if dataset in READERS else 'csv'})
    source = ('the flags' if any(k in overrides for k in heads) else imported['heads_from']
              if all(k in arch for k in heads) else f'{Path(path).parent.name}/open_clip_config.json' if beside
              else "OpenAI's rule (width / 64, --guess_heads)" if guess else 'the run config')
    tower = (f"ViT width {cfg.vision_width}, {cfg.vision_layers} layers, {cfg.vision_heads} heads, patch "
             f"{cfg.patch_size}, {cfg.image_size} px, {cfg.vit_style} style, {cfg.vision_act}"
             if cfg.vision == 'vit' else 'ResNet-50')
    local = ['h'] if 'image_heads.h.0.weight' in imported['state'] else []
    projections = ['z', *local, *sorted({k.split('.')[0] for k in imported['extra']})]
    epoch = '' if imported['epoch'] is None else f", epoch {imported['epoch']}"
    line = (f"{path}: {what} checkpoint {imported['name'] or '(no model name)'}{epoch}: {tower}; text width "
            f"{cfg.text_width}, {cfg.text_layers} layers, {cfg.text_heads} heads, {cfg.text_act}; embedding "
            f"{cfg.embed_dim}; projections {', '.join(projections)}; head counts from {source}")
    if any(k not in {**overrides, **beside} for k in imported['assumed']):
        line += "; activations assumed QuickGELU as in OpenAI's weights (LAION's GELU models: --vision_act=gelu " \
                "--text_act=gelu)"
    if imported['ignored']:
        line += f"; not imported: {', '.join(sorted({k.split('.')[0] for k in imported['ignored']}))}"
    if int(os.environ.get('RANK', 0)) == 0:
        print(line)
    return {'format': FORMAT, 'config': cfg.to_dict(), 'model': imported['state'],
            'extra_heads': imported['extra'], 'epoch': imported['epoch'], 'source': line}


def load_model(path, device='cpu', bpe_path=None):
    """Rebuild (cfg, model in eval mode, tokenizer) from a checkpoint alone."""
    return model_from_checkpoint(read_checkpoint(path), path, device, bpe_path)


def checkpoint_tokenizer(ckpt, cfg, path, bpe_path=None):
    """The checkpoint's tokenizer: from bpe_path (--bpe_path) if given, else the merges the checkpoint carries,
    else its config's bpe_path (a checkpoint that carries no merges)."""
    if not bpe_path and ckpt.get('bpe_merges') is not None:
        try:
            return Tokenizer(ckpt['bpe_merges'], cfg.context_length)
        except ValueError as e:
            raise UserError(f"{path}: its BPE merges are unreadable ({first_line(e)}); pass --bpe_path=FILE, "
                            f"the merges file it was trained with") from None
    cfg.bpe_path = bpe_path or cfg.bpe_path
    try:
        return build_tokenizer(cfg)
    except (OSError, ValueError, UserError) as e:
        hint = '' if bpe_path else ("; this checkpoint carries no merges: pass --bpe_path=FILE, the merges "
                                    "file it was trained with")
        raise UserError(f"{path}: {first_line(e, 240)}{hint}") from None


def model_from_checkpoint(ckpt, path, device, bpe_path=None):
    """(cfg, model, tokenizer) from an already-read checkpoint dict; path only names it in errors."""
    try:
        cfg = Config.from_dict(ckpt['config'])
    except (KeyError, TypeError, ConfigError) as e:
        raise UserError(f"{path}: the saved config is missing or invalid ({e})") from None
    tokenizer = checkpoint_tokenizer(ckpt, cfg, path, bpe_path)
    model = build_model(cfg, tokenizer.vocab_size, verbose=int(os.environ.get('RANK', 0)) == 0)  # rank 0 speaks
    try:
        model.load_state_dict(ckpt.get('model', {}))
    except RuntimeError as e:
        hint = f"; --bpe_path={bpe_path} gives {tokenizer.vocab_size} tokens" if bpe_path else ''
        raise UserError(f"{path}: weights do not fit the model built from its own config "
                        f"({_state_dict_problems(e)}){hint}") from None
    return cfg, model.to(device).eval(), tokenizer


def _state_dict_problems(e, lines=3, width=300):
    """torch's load_state_dict problems (tensor names and shapes), the first few, each cut after a name."""
    problems = [p.strip() for p in str(e).strip().splitlines()[1:] if p.strip()] or [first_line(e)]
    short = [p if len(p) <= width else p[:width].rsplit(', ', 1)[0] + ', ...' for p in problems[:lines]]
    return '; '.join(short) + (f'; and {len(problems) - lines} more' if len(problems) > lines else '')


# --- Zero-shot classification ---
@torch.no_grad()
def class_embeddings(model, tokenizer, classnames, templates, device):
    """{head: (C, D)} prompt ensembles: normalise each prompt embedding, average, renormalise (recipe §6.1)."""
    rows = {head: [] for head in model.heads}
    for name in classnames:
        synonyms = name if isinstance(name, list) else [name]  # every template x every synonym
        tokens = tokenizer([t.format(s) for s in synonyms for t in templates]).to(device)
        for head, emb in model.encode_text_heads(tokens).items():  # one text-encoder pass serves every head
            prompts = F.normalize(emb.float(), dim=-1)  # (T*S, D)
            rows[head].append(F.normalize(prompts.mean(0), dim=0))
    return {head: torch.stack(r) for head, r in rows.items()}


def similarities(model, images, classifiers):
    """Cosine similarity (no logit scale) per head, plus the z/h ensembles: {key: (B, C)}."""
    emb = model.encode_image_heads(images)
    sims = {head: F.normalize(emb[head].float(), dim=-1) @ classes.T for head, classes in classifiers.items()}
    if 'h' in sims:
        sims.update({f'ens{w}': w * sims['z'] + (1 - w) * sims['h'] for w in ENSEMBLE_WEIGHTS})
    return sims


@torch.no_grad()
def zero_shot(model, tokenizer, cfg, dataset, classnames, templates, metric, rank=0, world_size=1):
    """Top-1/top-5 (and mean per-class or ROC-AUC) of every head and ensemble, exact over the unpadded set, plus
    'images' (evaluated) and 'skipped' (undecodable: a negative label from ImageList)."""
    device, num_classes = next(model.parameters()).device, len(classnames)
    keys = list(model.heads) + ([f'ens{w}' for w in ENSEMBLE_WEIGHTS] if 'h' in model.heads else [])  # as similarities
    counts = torch.zeros(len(keys), 3, num_classes, dtype=torch.long, device=device)
    undecoded, margins, targets = [], [], []  # binary sets keep sim[:, 1] - sim[:, 0] of every key, for ROC-AUC
    with _autocast(cfg, device):
        classifiers = class_embeddings(model, tokenizer, classnames, templates, device)
        for images, labels in decoded_batches(dataset, cfg, rank, world_size, undecoded):
            labels = labels.to(device)
            sims = similarities(model, images.to(device), classifiers)
            counts += torch.stack([class_counts(sims[k], labels, num_classes) for k in keys])
            if metric == 'roc_auc':
                margins.append(torch.stack([sims[k][:, 1] - sims[k][:, 0] for k in keys], 1).cpu())  # (B, K)
                targets.append(labels.cpu())
    if world_size > 1:
        dist.all_reduce(counts)
    undecoded, images = _gather(undecoded, world_size), int(counts[0, 2].sum())
    if images == 0:
        raise UserError(f"no image of the {len(undecoded)} in the split could be decoded" if len(undecoded) else
                        "the split holds no images")
    out = {}
    for i, key in enumerate(keys):
        out.update(accuracy_metrics(counts[i], key, per_class=metric == 'mean_per_class'))
    if metric == 'roc_auc':
        margins, targets = _gather(margins, world_size, torch.zeros(0, len(keys))), _gather(targets, world_size)
        out.update({f'roc_auc_{key}': roc_auc_percent(margins[:, i], targets) for i, key in enumerate(keys)})
        if out[f'roc_auc_{keys[0]}'] is None:
            out['note'] = 'roc_auc is undefined (null): the split holds images of one class only'
    return {**out, 'images': images, **_skipped(dataset, undecoded)}


def decoded_batches(dataset, cfg, rank, world_size, undecoded):
    """This rank's (images, labels) batches less the samples ImageList could not decode, indices put in undecoded."""
    for images, labels in build_eval_loader(dataset, cfg, rank, world_size):
        decoded = labels >= 0
        undecoded.append(-1 - labels[~decoded])
        if decoded.any():
            yield images[decoded], labels[decoded]


def _skipped(dataset, indices, shown=5):
    """{'skipped': count} and, when there are some, the first few files by path (for the user to look at)."""
    paths = getattr(dataset, 'images', None)
    files = [str(paths[i]) for i in sorted(indices.tolist())[:shown]] if isinstance(paths, list) else []
    return {'skipped': len(indices), **({'skipped_files': files} if files else {})}


def _autocast(cfg, device):
    """Autocast to cfg.precision (model.autocast_dtype); evaluate() sets it, fp32 unless asked otherwise."""
    dtype = autocast_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@torch.no_grad()
def embeddings(model, cfg, dataset, keys, encode, rank=0, world_size=1, to_first=False):
    """({key: (N, D)} of encode(inputs) -> {key: (B, D)}, labels (N,), undecodable indices) of (input, label) pairs,
    float32 on the CPU: the ranks' slices gathered unpadded on every rank (to_first: on rank 0, the others get None)."""
    device, parts, labels, undecoded = next(model.parameters()).device, {k: [] for k in keys}, [], []
    with _autocast(cfg, device):
        for inputs, y in decoded_batches(dataset, cfg, rank, world_size, undecoded):
            for k, emb in encode(inputs.to(device)).items():
                parts[k].append(emb.float().cpu())
            labels.append(y)
    gather = _gather_to_first if to_first else _gather
    empty = torch.zeros(0)  # a rank with an empty slice still joins the gathers; cat skips 1-D empty tensors
    return ({k: gather(parts[k], world_size, empty) for k in keys}, gather(labels, world_size),
            gather(undecoded, world_size))


# --- Metrics ---
def class_counts(sim, labels, num_classes):
    """(3, C) long: per true class, top-1 hits, top-5 hits and samples."""
    top = sim.topk(min(5, num_classes), dim=1).indices  # (B, k)
    hits = torch.stack([top[:, 0] == labels, (top == labels[:, None]).any(1), torch.ones_like(top[:, 0], dtype=bool)])
    return torch.zeros(3, num_classes, dtype=torch.long, device=sim.device).index_add_(1, labels, hits.long())


def accuracy_metrics(counts, key, per_class):
    """Percent top-1/top-5 from exact counts; mean per-class = mean over classes of diagonal / row sum."""
    top1, top5, total = counts.double()
    out = {f'acc1_{key}': 100 * (top1.sum() / total.sum()).item(),
           f'acc5_{key}': 100 * (top5.sum() / total.sum()).item()}
    if per_class:
        present = total > 0  # a class absent from the eval split has no row to average
        out[f'mean_per_class_{key}'] = 100 * (top1[present] / total[present]).mean().item()
    return out


def roc_auc(scores, labels):
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counted 1/2 (rank form)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float('nan')
    _, group, sizes = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(sizes) - (sizes - 1) / 2)[group]  # 1-based ranks, tied scores share their average rank
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc_percent(scores, labels):
    """roc_auc in percent; None (JSON null) where it is undefined: labels of one class only."""
    auc = roc_auc(scores, labels)
    return None if np.isnan(auc) else 100 * auc


def _gather(parts, world_size, empty=torch.zeros(0, dtype=torch.long)):
    """This rank's parts concatenated (`empty` when it has none), then every rank's, on the CPU."""
    x = torch.cat(parts or [empty]).cpu()
    if world_size == 1:
        return x
    gathered = [None] * world_size  # shards may differ in length
    dist.all_gather_object(gathered, x)
    return torch.cat(gathered)


GATHER_CHUNK_BYTES = 64 << 20  # per rank and round of _gather_to_first: its bound on device memory


def _gather_to_first(parts, world_size, empty=torch.zeros(0, dtype=torch.long)):
    """_gather's concatenation on rank 0 alone (None on the others), as tensors sent in rounds of at most
    GATHER_CHUNK_BYTES per rank (through the GPU under NCCL): neither every rank nor the device holds the whole set."""
    x = torch.cat(parts or [empty]).cpu()
    if world_size == 1:
        return x
    shapes = [None] * world_size  # (rows, row shape, dtype) of every rank; an empty rank's row shape is unknown
    dist.all_gather_object(shapes, (len(x), x.shape[1:], x.dtype))
    rows, (_, row, dtype) = [s[0] for s in shapes], max(shapes, key=lambda s: s[0])
    device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else torch.device('cpu')
    step = max(1, GATHER_CHUNK_BYTES // max(1, row.numel() * dtype.itemsize))
    first, offsets = dist.get_rank() == 0, [sum(rows[:r]) for r in range(world_size)]
    out = torch.empty((sum(rows), *row), dtype=dtype) if first and sum(rows) else x[:0]
    for start in range(0, max(rows), step):
        piece = torch.zeros((step, *row), dtype=dtype, device=device)
        mine = x[start:start + step]
        piece[:len(mine)] = mine.reshape(-1, *row)
        received = [torch.empty_like(piece) for _ in range(world_size)] if first else None
        dist.gather(piece, received, dst=0)
        for r, chunk in enumerate(received or []):
            rows_here = max(0, min(step, rows[r] - start))
            out[offsets[r] + start:offsets[r] + start + rows_here] = chunk[:rows_here]
    return out if first else None


# --- Retrieval ---
def recall_at_k(sim, image_ids, text_ids, ks=RECALL_KS):
    """Recall@k in percent, image->text (any of its captions in the top k) and text->image; sim (N images, M texts)."""
    # rank = non-matching candidates scoring at least as high as the best match: a tie with a wrong candidate goes
    # against the hit (index order is arbitrary; counting ties as hits would reward a model scoring all equal)
    match = image_ids[:, None] == text_ids[None, :]  # (N, M)
    best_caption = sim.masked_fill(~match, float('-inf')).max(1).values  # (N,)
    i2t_rank = ((sim >= best_caption[:, None]) & ~match).sum(1)
    own_image = sim.masked_fill(~match, float('-inf')).max(0).values  # (M,)
    t2i_rank = ((sim >= own_image[None, :]) & ~match).sum(0)
    out = {f'i2t_r{k}': 100 * (i2t_rank < k).double().mean().item() for k in ks}
    out.update({f't2i_r{k}': 100 * (t2i_rank < k).double().mean().item() for k in ks})
    return out


@torch.no_grad()
def retrieval(model, tokenizer, cfg, images, captions, caption_ids, rank=0, world_size=1):
    """Recall@1/5/10 per head; images yields (image, image_id), captions[j] describes image caption_ids[j].
    An undecodable image (a negative id from ImageList) is skipped with its captions and counted."""
    heads = list(model.heads)
    image_emb, image_ids, undecoded = embeddings(model, cfg, images, heads, model.encode_image_heads, rank, world_size)
    texts = torch.utils.data.TensorDataset(tokenizer(captions), torch.as_tensor(caption_ids, dtype=torch.long))
    text_emb, text_ids, _ = embeddings(model, dataclasses.replace(cfg, workers=0), texts, heads,
                                       model.encode_text_heads, rank, world_size)  # tokens need no loader workers
    if not len(image_ids):
        raise UserError(f"no image of the {len(undecoded)} could be decoded" if len(undecoded) else "no images")
    kept = torch.isin(text_ids, image_ids)  # the captions of skipped images have nothing to find
    out = {}
    for h in heads:
        sim = F.normalize(image_emb[h], dim=-1) @ F.normalize(text_emb[h][kept], dim=-1).T  # (N images, M captions)
        out.update({f'{k}_{h}': v for k, v in recall_at_k(sim, image_ids, text_ids[kept]).items()})
    return {**out, 'images': len(image_ids), 'captions': int(kept.sum()), **_skipped(images, undecoded)}


def read_retrieval_csv(path, transform):
    """(images dataset, captions, caption image ids) from a CSV with columns image, caption; paths relative to it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"retrieval CSV {path} not found; give a CSV with columns image,caption")
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows or not {'image', 'caption'} <= rows[0].keys():
        raise UserError(f"retrieval CSV {path}: needs a header with columns image,caption and at least one row")
    index = {image: i for i, image in enumerate(dict.fromkeys(r['image'] for r in rows))}  # in first-seen order
    paths = [p if os.path.isabs(p) else str(path.parent / p) for p in index]
    return ImageList(paths, list(range(len(paths))), transform), [r['caption'] for r in rows], \
        [index[r['image']] for r in rows]


# --- Datasets ---
def decode_image(source):
    """A loaded PIL image from a file path or an (H, W[, 3]) uint8 array; truncated files load as far as their data
    goes, as in the official evaluation (set only around this decode: training keeps skipping them)."""
    if isinstance(source, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(source))
    previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
    try:
        img = load_image(source)  # upright by its EXIF orientation, as in training
        img.load()
        return img
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


class ImageList(torch.utils.data.Dataset):
    """(image, label) pairs from image paths or an (N, H, W[, 3]) uint8 array; a file that does not decode gives
    (a blank image, -1 - i), which the evaluation loops drop and count instead of ending the run."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        try:
            img = decode_image(self.images[i])
        except Exception:  # Pillow raises many types on broken files (OSError, SyntaxError, struct.error, ...)
            return self.transform(Image.new('RGB', (1, 1))), -1 - i
        return self.transform(img), self.labels[i]


def read_json(path, what):
    """A JSON file's content; an unreadable file raises one line naming it as `what`."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{what} {path} is unreadable ({type(e).__name__}); give a JSON file") from None


def _read_split_file(name, path):
    """Bytes of one file of a torchvision-format split (or of its .gz), or one line naming it."""
    for candidate in (path, path.with_name(path.name + '.gz')):
        if candidate.is_file():
            data = candidate.read_bytes()
            return gzip.decompress(data) if candidate.suffix == '.gz' else data
    raise UserError(f"{name}: expected {path} (the test files of torchvision's layout; see docs/datasets.md)")


def read_idx(name, path, ndim):
    """An IDX array (MNIST's format): magic 0x08 0x<ndim> for unsigned bytes, ndim big-endian sizes, the data."""
    data = _read_split_file(name, path)
    head = 4 + 4 * ndim
    if len(data) < head or struct.unpack('>I', data[:4])[0] != 0x800 + ndim:
        raise UserError(f"{name}: {path} is not an IDX file of {ndim}-D unsigned bytes; re-download it")
    shape = struct.unpack(f'>{ndim}I', data[4:head])
    if len(data) - head != np.prod(shape):
        raise UserError(f"{name}: {path} holds {len(data) - head} bytes for shape {shape}; re-download it")
    return np.frombuffer(data, np.uint8, offset=head).reshape(shape)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's batches (lists, strings, numpy arrays), refusing other globals: a crafted file runs no code."""
    ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
               ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(name, path, label_key):
    """(N, 32, 32, 3) images and labels of a CIFAR python-version batch file."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(_read_split_file(name, path)), encoding='latin1').load()
        images = np.asarray(batch['data'], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, H, W, C)
        labels = list(batch[label_key])
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{name}: {path} is not a CIFAR python batch ({type(e).__name__}: {first_line(e)}); "
                        f"re-download it") from None
    if len(images) != len(labels):
        raise UserError(f"{name}: {path} has {len(images)} images but {len(labels)} labels; re-download it")
    return images, labels


def image_folder(name, folder, allow_empty=False):
    """torchvision's ImageFolder at folder (one sub-folder of images per class); a wrong layout raises one line."""
    if not folder.is_dir():
        raise UserError(f"{name}: expected {folder}/ with one sub-folder of images per class (ImageFolder layout)")
    try:
        return torchvision.datasets.ImageFolder(folder, allow_empty=allow_empty)
    except (FileNotFoundError, OSError) as e:  # no class folders, or a class folder without images
        raise UserError(f"{name}: {folder}/ needs one sub-folder of images per class ({first_line(e)})") from None


# The readers of the evaluation sets' layouts (docs/datasets.md): split `split` of set `name` stored at root as
# (images: paths or an (N, H, W[, 3]) uint8 array, labels, number of classes in the data). The torchvision-format
# ones read that split's files alone: the test files, or the train files for the probe.
def read_folder(name, root, split, classnames):
    found = image_folder(name, root / split)
    return [p for p, _ in found.samples], found.targets, len(found.classes)


def read_mnist(name, root, split, classnames):
    raw, prefix = root / 'MNIST' / 'raw', 'train' if split == 'train' else 't10k'
    return (read_idx(name, raw / f'{prefix}-images-idx3-ubyte', 3),
            read_idx(name, raw / f'{prefix}-labels-idx1-ubyte', 1).tolist(), 10)


def read_cifar10(name, root, split, classnames):
    files = [f'data_batch_{i}' for i in range(1, 6)] if split == 'train' else ['test_batch']
    parts = [read_cifar_batch(name, root / 'cifar-10-batches-py' / f, 'labels') for f in files]
    return np.concatenate([p[0] for p in parts]), [y for p in parts for y in p[1]], 10


def read_cifar100(name, root, split, classnames):
    return (*read_cifar_batch(name, root / 'cifar-100-python' / split, 'fine_labels'), 100)  # files 'train', 'test'


def read_stl10(name, root, split, classnames):
    """<split>_X.bin / <split>_y.bin: column-major (N, C, W, H) planes, 1-based labels."""
    folder = root / 'stl10_binary'
    pixels = np.frombuffer(_read_split_file(name, folder / f'{split}_X.bin'), np.uint8)
    labels = np.frombuffer(_read_split_file(name, folder / f'{split}_y.bin'), np.uint8).astype(int) - 1
    if pixels.size != len(labels) * 3 * 96 * 96:
        raise UserError(f"{name}: {folder}/{split}_X.bin holds {pixels.size} bytes for {len(labels)} labels of "
                        f"3x96x96 images; re-download it")
    return pixels.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1), labels.tolist(), 10  # -> (N, H, W, C)


def read_filelist(name, root, split, classnames):
    """<split>_images.npy and <split>_labels.npy, arrays of strings; labels 'count_10', 'count_3', ... (§6.2)."""
    try:
        paths, labels = np.load(root / f'{split}_images.npy'), np.load(root / f'{split}_labels.npy')
    except (OSError, ValueError):
        raise UserError(f"{name}: expected {root}/{split}_images.npy and {split}_labels.npy "
                        f"(arrays of strings)") from None
    index = {f'count_{c}': i for i, c in enumerate(classnames)}
    unknown = sorted(set(map(str, labels)) - index.keys())
    if unknown:
        raise UserError(f"{name}: labels {unknown[:3]} are not among {list(index)}; check labels.json")
    if len(paths) != len(labels):
        raise UserError(f"{name}: {len(paths)} image paths but {len(labels)} labels in {root}")
    paths = [p if os.path.isabs(p) else str(root / p) for p in map(str, paths)]
    return paths, [index[str(y)] for y in labels], len(classnames)


EvalSet = collections.namedtuple('EvalSet', 'read split metric classnames templates',
                                 defaults=('labels.json', 'templates.json'))


def with_lists(sets):
    """{name: EvalSet} of the rows, class names and templates as lists (an asset file's entry where a row names the
    file); a row without them, or with a template without one {} for the class name, raises."""
    files = {}
    for name, row in sets.items():
        row = EvalSet(*row)
        for file in {f for f in row[3:] if isinstance(f, str)} - files.keys():
            files[file] = read_json(ASSETS / file, 'asset file')
        classnames, templates = (files[f].get(name) if isinstance(f, str) else f for f in row[3:])
        if not classnames or not templates or any(t.count('{}') != 1 for t in templates):
            raise TypeError(f"evaluation set {name!r} needs class names and templates (one {{}} each): lists, or "
                            f"assets/ files with an entry {name!r}, not {row.classnames!r:.40}, {row.templates!r:.40}")
        sets[name] = row._replace(classnames=classnames, templates=templates)
    return sets


# name: (reader, eval split, metric[, class names, templates]), in the paper's order (recipe §6.2). Class names and
# templates are lists, or the name of an assets/ JSON file whose entry for the set holds them (by default the paper's
# labels.json and templates.json); at import every row becomes an EvalSet of lists, and one without them raises.
EVAL_SETS = with_lists({
    'imagenet': (read_folder, 'val', 'acc'), 'mnist': (read_mnist, 'test', 'acc'),
    'food101': (read_folder, 'test', 'acc'), 'cifar10': (read_cifar10, 'test', 'acc'),
    'cifar100': (read_cifar100, 'test', 'acc'), 'cub200': (read_folder, 'val', 'acc'),
    'cars': (read_folder, 'test', 'acc'), 'aircraft': (read_folder, 'test', 'mean_per_class'),
    'dtd': (read_folder, 'test', 'acc'), 'pets': (read_folder, 'test', 'mean_per_class'),
    'caltech101': (read_folder, 'test', 'mean_per_class'), 'flowers': (read_folder, 'test', 'mean_per_class'),
    'stl10': (read_stl10, 'test', 'acc'), 'eurosat': (read_folder, 'val', 'acc'),
    'resisc45': (read_folder, 'test', 'acc'), 'gtsrb': (read_folder, 'test', 'acc'),
    'kitti_distance': (read_folder, 'val', 'acc'), 'country211': (read_folder, 'test', 'acc'),
    'patch_camelyon': (read_folder, 'val', 'acc'), 'ucf101_frames': (read_folder, 'val', 'acc'),
    'clevr_counts': (read_filelist, 'val', 'acc'), 'hateful_memes': (read_folder, 'dev', 'roc_auc'),
    'rendered_sst2': (read_folder, 'test', 'acc')})


def build_dataset(name, root, transform, classnames, split=None):
    """The eval split (or `split`: 'train' for the probe) of evaluation set `name` at root, as an ImageList."""
    split = split or EVAL_SETS[name].split
    images, labels, n = EVAL_SETS[name].read(name, Path(root), split, classnames)
    if n != len(classnames):
        raise UserError(f"{name}: the data has {n} classes but {len(classnames)} class names are given; fix the "
                        f"class names (its row of EVAL_SETS, or --labels) or the dataset folder")
    if not len(labels):
        raise UserError(f"{name}: the {split} split under {root} holds no images")
    if min(labels) < 0 or max(labels) >= n:
        raise UserError(f"{name}: labels outside 0..{n - 1} under {root}; re-download it")
    return ImageList(images, labels, transform)


FOLDER = 'folder:'  # --datasets=folder:PATH: a user's own ImageFolder set
FOLDER_TEMPLATES = ['a photo of a {}.']


def _listed(given, default, what):
    """A list given as such or as a file of one entry a line; the default file when none is given (None if absent)."""
    if isinstance(given, list):
        return given
    path = Path(given) if given else default
    if not path.is_file():
        if given:
            raise UserError(f"{what} file {path} not found; give a text file with one entry a line")
        return None
    return [line.strip() for line in path.read_text(encoding='utf-8').splitlines() if line.strip()]


def read_custom_set(name, entry, transform):
    """(ImageList, class names, templates) of a user's own ImageFolder set, entry {"path": ..., "classnames": ...,
    "templates": ...} (a file or a list each; optional): every class folder is a candidate, with images or not."""
    root = Path(entry['path'])
    found = image_folder(name, root, allow_empty=True)
    classnames = (_listed(entry.get('classnames'), root / 'classnames.txt', 'classnames')  # in sorted folder order
                  or [c.replace('_', ' ') for c in found.classes])  # or the folder names, '_' read as a space
    if len(classnames) != len(found.classes):
        raise UserError(f"{root}: {len(found.classes)} class folders but {len(classnames)} class names; give one name "
                        f"per folder, in sorted folder order")
    templates = _listed(entry.get('templates'), root / 'templates.txt', 'templates') or FOLDER_TEMPLATES
    if not all('{}' in t for t in templates):
        raise UserError(f"{root}: every template needs {{}} where the class name goes, e.g. 'a photo of a {{}}.'")
    if not found.samples:
        raise UserError(f"{root}: its class folders hold no images")
    return ImageList([p for p, _ in found.samples], found.targets, transform), classnames, templates


# --- Linear probe ---
# Frozen image features -> L2-regularised multinomial logistic regression, CLIP's protocol: the strength is
# chosen on a validation split held out of the training split, then the classifier is refit on all of it.
# coarse strengths, strongest first (warm starts); below 1e-8 (features of unit total variance) the penalty no
# longer binds before max_iter does: at 50k x 512 those fits ran to max_iter and took 80% of the probe's time
PROBE_GRID = tuple(10.0 ** k for k in range(0, -9, -1))
PROBE_REFINE = (-0.75, -0.5, -0.25, 0.25, 0.5, 0.75)  # log10 offsets tried around the best coarse strength
PROBE_VAL_FRACTION = 0.2
PROBE_SWEEP_TOL = 1e-5  # max |gradient| of the sweep's fits, in float64: they only rank strengths on validation


def fit_logistic(x, y, l2, num_classes, init=None, max_iter=1000, tol=1e-6):
    """(W (D, C), b (C,), iterations) minimising mean cross-entropy(x W + b, y) + l2 / 2 ||W||^2 (b unpenalised) by
    full-batch L-BFGS in x's dtype, from init (W, b) or zeros, until max |gradient| <= tol."""
    n, d = x.shape
    xt = x.T.contiguous()  # (D, n), a no-op for x = xt.T of a contiguous xt: both products below are then fast
    w = (init[0].T.to(x.dtype, copy=True) if init else x.new_zeros(num_classes, d)).requires_grad_()  # (C, D)
    b = (init[1].to(x.dtype, copy=True) if init else x.new_zeros(num_classes)).requires_grad_()
    cols = torch.arange(n, device=x.device)

    def closure():  # loss and gradient in closed form: no autograd graph over the n x D features
        with torch.no_grad():
            logits = torch.addmm(b[:, None], w, xt)  # (C, n)
            lse = logits.logsumexp(0)
            loss = (lse - logits[y, cols]).mean() + l2 / 2 * w.square().sum()
            residual = (logits - lse).exp_()  # softmax - one_hot = n * d loss / d logits
            residual[y, cols] -= 1
            w.grad = residual @ xt.T / n + l2 * w  # (C, D)
            b.grad = residual.mean(1)
        return loss

    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tol,
                            tolerance_change=0, history_size=100, line_search_fn='strong_wolfe')
    opt.step(closure)
    return w.detach().T, b.detach(), opt.state[w]['n_iter']


def fit_present(x, y, l2, num_classes, init=None, tol=1e-6):
    """fit_logistic over the classes present in y (an absent class's unpenalised bias would run to -inf), as
    (W (D, num_classes), b) with -inf bias for the absent classes; init: a previous (W, b) to start from."""
    present = torch.unique(y)
    if init is not None:
        init = init[0][:, present], init[1][present].nan_to_num(0, 0, 0)  # a class absent before starts at 0
    w, b, _ = fit_logistic(x, torch.searchsorted(present, y), l2, len(present), init, tol=tol)
    full_w, full_b = x.new_zeros(x.shape[1], num_classes), x.new_full((num_classes,), float('-inf'))
    full_w[:, present], full_b[present] = w, b
    return full_w, full_b


def probe_metrics(logits, labels, metric, key):
    """Top-1 (and mean per class or ROC-AUC where that is the dataset's metric) of classifier logits (N, C)."""
    out = accuracy_metrics(class_counts(logits, labels, logits.shape[1]), key, per_class=metric == 'mean_per_class')
    del out[f'acc5_{key}']  # top-1 is the probe's protocol
    if metric == 'roc_auc':
        out[f'roc_auc_{key}'] = roc_auc_percent((logits[:, 1] - logits[:, 0]).cpu(), labels.cpu())
    return out


def select_strength(fit_and_score):
    """(best strength, {strength: validation score}, best solution) of fit_and_score(l2, init) -> (score, solution)
    over PROBE_GRID, then PROBE_REFINE around the best; ties go to the stronger regularisation."""
    # the whole coarse grid, strongest first, each fit starting from the last; no early stop: the score need not be
    # unimodal (overfitting nuisance dimensions can come before a weak signal is fit)
    scores, solutions = {}, {}
    best = lambda: max(scores, key=lambda l2: (scores[l2], l2))  # noqa: E731
    for i, l2 in enumerate(PROBE_GRID):
        scores[l2], solutions[l2] = fit_and_score(l2, solutions[PROBE_GRID[i - 1]] if i else None)
    coarse = best()
    for step in PROBE_REFINE:
        l2 = coarse * 10 ** step
        scores[l2], solutions[l2] = fit_and_score(l2, solutions[coarse])
    return best(), scores, solutions[best()]


def standardise(x, *others):
    """x and others centred by x's mean and scaled by one number to x's total variance 1 (the units of l2;
    centring only moves the unpenalised bias, and speeds up L-BFGS)."""
    mean = x.mean(0)
    scale = (x - mean).square().sum(1).mean().sqrt().clamp_min(1e-30)
    return [(t - mean) / scale for t in (x, *others)]


def linear_probe(train_x, train_y, test_x, test_y, num_classes, metric, key='trunk', seed=0, device='cpu',
                 sweep_dtype=torch.float32):
    """Metrics of the linear probe on one feature set (standardised in float64): l2 chosen on PROBE_VAL_FRACTION of
    the train split held out (seeded), the classifier refit on all of it and scored on the test split."""
    x, test_x = standardise(train_x.to(device, torch.float64), test_x.to(device, torch.float64))
    train_y, test_y = train_y.to(device), test_y.to(device)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(device)
    n_val = min(len(x) - 1, max(1, round(PROBE_VAL_FRACTION * len(x))))
    val_x, val_y, fit_y = x[order[:n_val]], train_y[order[:n_val]], train_y[order[n_val:]]
    xt = x[order[n_val:]].T.contiguous()  # (D, n): fit_logistic's layout, made once for every fit of the sweep
    xt_sweep, score_key = xt.to(sweep_dtype), f"{'acc1' if metric == 'acc' else metric}_{key}"

    def fit_and_score(l2, init):
        # in sweep_dtype (float32: half the memory traffic of these memory-bound products) to fit_logistic's
        # tolerance, then in float64 to PROBE_SWEEP_TOL: one evaluation where float32 got there, more where its
        # rounding left the fit short (float64 max |gradient| up to ~4e-5 seen)
        w, b = fit_present(xt_sweep.T, fit_y, l2, num_classes, init)
        w, b = fit_present(xt.T, fit_y, l2, num_classes, (w, b), PROBE_SWEEP_TOL)
        return probe_metrics(val_x @ w + b, val_y, metric, key)[score_key], (w, b)

    l2, scores, solution = select_strength(fit_and_score)
    w, b = fit_present(x, train_y, l2, num_classes, solution)  # to fit_logistic's tolerance, in float64
    return {**probe_metrics(test_x @ w + b, test_y, metric, key), f'l2_{key}': l2, f'val_{key}': scores[l2]}


def data_identity(dataset):
    """The feature cache's key to a dataset: type, size, plain attributes (root, split, ...), ends of its file lists."""
    fields = {k: str(v) for k, v in vars(dataset).items() if isinstance(v, (str, int, float, bool, Path))}
    fields.update({k: str((len(v), v[0], v[-1])) for k, v in vars(dataset).items()
                   if k in ('paths', 'samples') and isinstance(v, list) and v})
    return f"{type(dataset).__name__}[{len(dataset)}]{sorted(fields.items())}"


def image_features(model, cfg, dataset, heads=False, rank=0, world_size=1):
    """({'trunk': (N, width)} plus {head: (N, embed_dim)} when heads, labels (N,)): the image encoder's output before
    the heads (and after them), on the CPU in float32, undecodable images left out; on rank 0 (None on the others)."""
    def encode(images):
        trunk = model.visual(images)
        return {'trunk': trunk, **({h: project(trunk) for h, project in model.image_heads.items()} if heads else {})}

    keys = ['trunk'] + (list(model.heads) if heads else [])
    return embeddings(model, cfg, dataset, keys, encode, rank, world_size, to_first=True)[:2]


def cached_count(path, key):
    """The number of images whose features the cache file `path` holds under `key`; None if it holds no such key."""
    try:  # mmap: comparing the key and counting the labels do not read the features
        cache = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        return len(cache['labels']) if cache.get('key') == key else None
    except Exception:  # no file, a truncated or a foreign one: a miss, overwritten by the extraction
        return None


def probe_features(model, cfg, name, train, test, classnames, metric, probe, rank=0, world_size=1):
    """Phase 1 of the probe for one dataset (all ranks): train and test features into the cache (rank 0 checks and
    writes it, atomically), keyed by the checkpoint's content, the data, transform, precision and features kept."""
    paths = {split: probe['cache'] / f'{name}_{split}.pt' for split in ('train', 'test')}
    device, images = next(model.parameters()).device, 0
    for split, dataset in (('train', train), ('test', test)):
        key = {'checkpoint_sha256': probe['sha256'], 'dataset': name, 'split': split, 'data': data_identity(dataset),
               'transform': repr(getattr(dataset, 'transform', None)), 'precision': str(autocast_dtype(cfg, device)),
               'heads': probe['heads']}
        count = [cached_count(paths[split], key) if rank == 0 else None]
        if world_size > 1:
            dist.broadcast_object_list(count, src=0)
        if count[0] is None:
            features, labels = image_features(model, cfg, dataset, probe['heads'], rank, world_size)  # on rank 0
            if rank == 0:
                probe['cache'].mkdir(parents=True, exist_ok=True)
                atomic_write(paths[split], lambda f: torch.save(dict(key=key, features=features, labels=labels), f))
                count[0] = len(labels)
        images += count[0] or 0  # rank 0's count (the others' results are dropped)
    return {'paths': paths, 'num_classes': len(classnames), 'metric': metric, 'images': images,
            'skipped': len(train) + len(test) - images}


def probe_settings(path, flags, device, rank=0):
    """The probe's settings for checkpoint `path`, None without --linear_probe. Features are cached in
    <checkpoint stem>_features/ beside it, keyed by the SHA-256 of its bytes (computed on rank 0)."""
    if not switch(flags, 'linear_probe'):
        return None
    path, sha256 = Path(path), None
    if rank == 0:  # 0.6 GB/s on a busy CPU, once a run
        with open(path, 'rb') as f:
            sha256 = hashlib.file_digest(f, 'sha256').hexdigest()
    return {'cache': path.with_name(path.stem + '_features'), 'sha256': sha256, 'heads': switch(flags, 'probe_heads'),
            'seed': int(flags.get('probe_seed', 0)), 'device': device}


PROBE_COPIES = 3.6  # the fit's peak memory: ~3.5 float64 copies of the (n, D) train features (bench/README.md)


def probe_device(device, n, n_test, dim, say=print):
    """Where a probe of n train and n_test test features of dim fits: device, or the CPU where that GPU has less free
    memory than the fit's peak, 8 x dim x (PROBE_COPIES x n + n_test) bytes (one line says so)."""
    device = torch.device(device)
    if device.type != 'cuda':
        return device
    need, free = 8 * dim * (PROBE_COPIES * n + n_test), torch.cuda.mem_get_info(device)[0]
    if need <= free:
        return device
    say(f"probe: its fit needs ~{need / 2**30:.1f} GiB, {device} has {free / 2**30:.1f} GiB free: fitting on the CPU")
    return torch.device('cpu')


def fit_probes(jobs, probe, say=print):
    """Phase 2 (one process): {dataset: metrics} of the linear probe on every cached feature set of every job."""
    results = {}
    with full_fp32_matmul():  # TF32 products would leave the float32 sweep far from its tolerance
        for name, job in jobs.items():
            if 'error' in job:  # the dataset failed in phase 1 (its line is printed): keep the reason
                results[name] = job
                continue
            start = time.time()
            train, test = (torch.load(job['paths'][s], map_location='cpu', weights_only=True)
                           for s in ('train', 'test'))
            results[name] = metrics = {}
            for key in train['features']:
                device = probe_device(probe['device'], len(train['labels']), len(test['labels']),
                                      train['features'][key].shape[-1], say)
                metrics.update(linear_probe(train['features'][key], train['labels'], test['features'][key],
                                            test['labels'], job['num_classes'], job['metric'], key, probe['seed'],
                                            device))
            say(f"probe {name}: {len(train['labels'])} train / {len(test['labels'])} test, " + ', '.join(
                f"{k} {metrics[next(iter(headline(metrics))).replace('trunk', k)]:.2f} (l2 {metrics['l2_' + k]:.1e})"
                for k in train['features']) + f", {time.time() - start:.1f}s")
    return results


# --- Evaluation tasks ---
# A task is one entry of the results: a classification set (read(split) -> its dataset; split None: the eval split,
# 'train': the probe's), a folder set (read() -> dataset, class names, templates) or a retrieval set (read() -> images,
# captions, caption ids). The task reads its data itself: a wrong layout is its result, not the end of the run.
Task = collections.namedtuple('Task', 'name kind read classnames templates metric', defaults=(None, None, None))
Evaluation = collections.namedtuple('Evaluation', 'model tokenizer cfg rank world_size probe say')  # shared by tasks


def score_zero_shot(ev, task):
    return zero_shot(ev.model, ev.tokenizer, ev.cfg, task.read(None), task.classnames, task.templates, task.metric,
                     ev.rank, ev.world_size)


def score_folder(ev, task):
    """zero_shot on a folder set, with 'classes': the number of candidate classes."""
    dataset, classnames, templates = task.read()
    return {**zero_shot(ev.model, ev.tokenizer, ev.cfg, dataset, classnames, templates, 'acc', ev.rank, ev.world_size),
            'classes': len(classnames)}


def score_retrieval(ev, task):
    return retrieval(ev.model, ev.tokenizer, ev.cfg, *task.read(), ev.rank, ev.world_size)


def score_probe(ev, task):  # phase 1 of the linear probe: evaluate fits the probes once every task has run
    return probe_features(ev.model, ev.cfg, task.name, task.read('train'), task.read(None), task.classnames,
                          task.metric, ev.probe, ev.rank, ev.world_size)


# what each kind of task runs, zero-shot and with --linear_probe; a kind a mode lacks is skipped with a line
ZERO_SHOT = {'classification': score_zero_shot, 'folder': score_folder, 'retrieval': score_retrieval}
PROBE = {'classification': score_probe}


def _dataset_path(name, data_root, catalog):
    if name in catalog:
        entry = catalog[name]
        return Path(entry['path'] if isinstance(entry, dict) else entry)  # SLIP's {"path": ...} entries also work
    return Path(data_root) / name if data_root else None


def check_datasets(names, catalog=None):
    """Raise ConfigError naming the first that is neither 'demo', in EVAL_SETS, folder:PATH nor in the --catalog."""
    for name in names:
        if name != 'demo' and name not in EVAL_SETS and not name.startswith(FOLDER) and name not in (catalog or {}):
            close = difflib.get_close_matches(name, list(EVAL_SETS), n=1)
            raise ConfigError(f"unknown dataset {name!r}" + (f"; did you mean {close[0]}?" if close else
                                                            f"; choose from demo, {', '.join(EVAL_SETS)}") +
                              "; a set of your own: folder:PATH (an ImageFolder) or an entry of --catalog")
    return names


def default_datasets(cfg):
    """Per-epoch evaluation: cfg.eval_datasets, else the demo tasks for demo data, else ImageNet."""
    if cfg.eval_datasets:
        return [d.strip() for d in cfg.eval_datasets.split(',') if d.strip()]
    return ['demo'] if cfg.dataset == 'demo' else ['imagenet']


def demo_dataset(cfg, task, split):
    return demo_probe_train(cfg, task) if split == 'train' else task.dataset


def dataset_tasks(name, cfg, catalog, labels, templates, transform, say):
    """The tasks of one --datasets entry: the demo tasks, a folder set or an evaluation set (with labels' / templates'
    lists, else its row's); none for a set without a root (evaluate names those in one line) or (with a line) data."""
    if name == 'demo':
        return [*(Task(f'demo_{t.name}', 'classification', functools.partial(demo_dataset, cfg, t), t.classnames,
                       t.templates, t.metric) for t in demo_eval_tasks(cfg)),
                Task('demo_retrieval', 'retrieval', functools.partial(demo_retrieval, cfg))]
    if name not in EVAL_SETS:  # a user's own set: folder:PATH or a --catalog entry
        entry = {'path': name[len(FOLDER):]} if name.startswith(FOLDER) else catalog[name]
        entry = {'path': '', **entry} if isinstance(entry, dict) else {'path': entry}
        shown = Path(entry['path']).name if name.startswith(FOLDER) else name
        return [Task(shown, 'folder', functools.partial(read_custom_set, shown, entry, transform))]
    root = _dataset_path(name, cfg.data_root, catalog)
    if root is None:
        return []
    if not root.exists():
        say(f"skip {name}: no data at {root}")
        return []
    row = EVAL_SETS[name]
    classnames = labels.get(name, row.classnames)
    return [Task(name, 'classification', functools.partial(build_dataset, name, root, transform, classnames),
                 classnames, templates.get(name, row.templates), row.metric)]


def tasks_of(names, cfg, catalog, labels, templates, transform, say):
    """The tasks of the --datasets names (dataset_tasks); those without data are skipped with a line, the catalogue
    sets without a root in one."""
    rootless = [n for n in names if n in EVAL_SETS and _dataset_path(n, cfg.data_root, catalog) is None]
    if rootless:
        say(f"skip {', '.join(rootless)}: no --data_root (cfg.data_root) or catalogue entry")
    return [t for name in names for t in dataset_tasks(name, cfg, catalog, labels, templates, transform, say)]


def epoch_datasets(cfg, say=print):
    """The per-epoch evaluation's datasets (default_datasets) that have data, for train.py: a set without data is said
    once here, not every epoch, and so is an evaluation left with nothing."""
    names = [n for n in check_datasets(default_datasets(cfg)) if tasks_of([n], cfg, {}, {}, {}, None, say)]
    if not names:
        say("train: no zero-shot evaluation during training: give --eval_datasets=folder:PATH (an ImageFolder, one "
            "sub-folder of images per class) or --data_root=DIR (the sets of docs/datasets.md under it), or "
            "--eval_every=0")
    return names


def run_task(ev, score, task):
    """score(ev, task) between a start and a done line; a UserError is the result, as {'error': its one line}."""
    ev.say(f"{task.name}: start", flush=True)
    start = time.perf_counter()
    try:
        out = score(ev, task)
    except UserError as e:
        reason = ' '.join(str(e).split()).removeprefix(f'{task.name}: ')
        ev.say(f"{task.name}: failed: {reason}", flush=True)
        return {'error': f'{task.name}: {reason}'}
    seconds = max(time.perf_counter() - start, 1e-6)
    shown = ''.join(f", {k} {'null' if out[k] is None else f'{out[k]:.2f}'}" for k in headline(out))
    skipped = f", {out['skipped']} undecodable images skipped" if out['skipped'] else ''
    skipped += f" (e.g. {out['skipped_files'][0]})" if out.get('skipped_files') else ''
    ev.say(f"{task.name}: done, {out['images']} images in {seconds:.1f} s ({out['images'] / seconds:.1f} images/s)"
           f"{shown}{skipped}", flush=True)
    return out


def evaluate(model, tokenizer, cfg, rank=0, world_size=1, datasets=None, catalog=None, labels=None, templates=None,
             retrieval_csv=None, on_result=None, precision='fp32', probe=None):
    """{dataset: {metric: value}} of the named datasets (default_datasets), {'error': reason} for a failing one;
    on_result(results) follows each. probe (probe_settings): the linear probe instead, its results on rank 0 only."""
    model, catalog = getattr(model, 'module', model), catalog or {}  # a DDP-wrapped model from train.py
    was_training = model.training
    model.eval()
    # fp32 like the official evaluation, whatever the training run's, so that train.py's table and evaluate.py agree
    cfg = dataclasses.replace(cfg, precision=precision)
    say = print if rank == 0 else (lambda *a, **k: None)
    labels, templates = labels or {}, templates or {}
    transform = eval_transform(cfg)  # any PIL mode -> RGB, resize, centre crop, normalise
    names = check_datasets(datasets or default_datasets(cfg), catalog)
    tasks = tasks_of(names, cfg, catalog, labels, templates, transform, say)
    if retrieval_csv:
        tasks.append(Task('retrieval', 'retrieval', functools.partial(read_retrieval_csv, retrieval_csv, transform)))
    ev, results = Evaluation(model, tokenizer, cfg, rank, world_size, probe, say), {}
    scorers = PROBE if probe else ZERO_SHOT
    for task in tasks:
        if task.kind not in scorers:
            say(f"skip {task.name}: zero-shot only (the linear probe needs a labelled train split)")
            continue
        results[task.name] = run_task(ev, scorers[task.kind], task)
        if on_result:
            on_result(results)
    if probe is not None:  # fits after the last collective, so no rank waits in one while rank 0 fits
        results = fit_probes(results, probe, say) if rank == 0 else {}
    model.train(was_training)
    return results


def check_data(data_root, catalog, labels):
    """{name: status}, printed a line per evaluation set: found, missing or malformed (why); no decoding: seconds."""
    print(f"{'dataset':<16}{'split':<6}{'status':<11}{'images':>8}{'classes':>8}  path or problem")
    statuses = {}
    for name, row in EVAL_SETS.items():
        root = _dataset_path(name, data_root, catalog)
        statuses[name], count, classes, detail = data_status(name, root, labels.get(name, row.classnames))
        print(f"{name:<16}{row.split:<6}{statuses[name]:<11}{count:>8}{classes:>8}  {detail}")
    print(', '.join(f"{list(statuses.values()).count(s)} {s}" for s in ('found', 'missing', 'malformed')) +
          " (layouts: docs/datasets.md)")
    return statuses


def data_status(name, root, classnames):
    """(status, images, classes, path or problem) of one evaluation set stored at root (None: no root)."""
    if root is None or not root.exists():
        return 'missing', '-', '-', str(root) if root else 'no --data_root or catalogue entry'
    try:
        return 'found', len(build_dataset(name, root, None, classnames)), len(classnames), str(root)
    except UserError as e:
        return 'malformed', '-', '-', ' '.join(str(e).split()).removeprefix(f'{name}: ')


# --- Command line ---
FLAGS = ('datasets', 'data_root', 'catalog', 'labels', 'templates', 'retrieval', 'out', 'batch_size', 'workers',
         'precision', 'device', 'check_data', 'linear_probe', 'probe_heads', 'probe_seed', *IMPORT_FLAGS)
SWITCHES = ('check_data', 'linear_probe', 'probe_heads', 'guess_heads')  # may stand alone: a bare --flag means true
PRECISIONS = ('fp32', 'bf16', 'fp16', 'auto')
# flag: (whether a value is valid, what to give instead)
FLAG_CHECKS = {'batch_size': (lambda v: v.isdigit() and int(v) >= 1, 'expected an integer >= 1'),
               'workers': (str.isdigit, 'expected an integer >= 0'),
               'precision': (lambda v: v in PRECISIONS, f"choose {', '.join(PRECISIONS)}"),
               'device': (lambda v: v.split(':')[0] in ('cpu', 'cuda'), 'choose cpu or cuda'),
               'probe_seed': (str.isdigit, 'expected a non-negative integer'),
               **{k: (lambda v: v.lower() in _TRUE + _FALSE, f'expected true or false (or a bare --{k})')
                  for k in SWITCHES}}
# what the table shows of one dataset: the first group whose first key its metrics hold, {key: column suffix};
# R@1 both ways, the probe's trunk metric and strength, or the z head's recipe §6.2 metric
HEADLINES = ({'i2t_r1_z': ' i2t@1', 't2i_r1_z': ' t2i@1'}, {'roc_auc_trunk': ' auc', 'l2_trunk': ' l2'},
             {'mean_per_class_trunk': ' mpc', 'l2_trunk': ' l2'}, {'acc1_trunk': '', 'l2_trunk': ' l2'},
             {'roc_auc_z': ' auc'}, {'mean_per_class_z': ' mpc'}, {'acc1_z': ''})
USAGE = ("usage: python evaluate.py ckpt.pt [more.pt ...] [--datasets=a,b] [--data_root=DIR] [--out=results.json], "
         "or python evaluate.py --check_data --data_root=DIR (see the module docstring)")


def switch(flags, key):
    """A switch's value, False when absent (parse_argv checked it)."""
    return flags.get(key, 'false').lower() in _TRUE


def parse_argv(argv):
    """(checkpoint paths, {flag: value}, the --catalog's {name: path}); bad flags raise ConfigError with one line."""
    paths, flags = parse_flags(argv, FLAGS, SWITCHES, positional=True)
    empty = [k for k, v in flags.items() if not v]
    if empty:
        raise ConfigError(f"--{empty[0]} needs a value: --{empty[0]}=VALUE")
    if 'check_data' in flags:
        if flags['check_data'].lower() not in _TRUE or paths:
            raise ConfigError("--check_data takes no value and no checkpoint: python evaluate.py --check_data "
                              "--data_root=DIR")
        if 'data_root' not in flags and 'catalog' not in flags:
            raise ConfigError("--check_data needs --data_root=DIR (or --catalog=paths.json)")
    elif not paths:
        raise ConfigError(USAGE)
    for key, (valid, expected) in FLAG_CHECKS.items():
        if key in flags and not valid(flags[key]):
            raise ConfigError(f"--{key}={flags[key]}: {expected}")
    catalog = read_json(flags['catalog'], 'catalogue') if 'catalog' in flags else {}
    check_datasets(flags['datasets'].split(',') if 'datasets' in flags else [], catalog)
    if (switch(flags, 'probe_heads') or 'probe_seed' in flags) and not switch(flags, 'linear_probe'):
        raise ConfigError("--probe_heads and --probe_seed set up the linear probe; add --linear_probe")
    return paths, flags, catalog


def headline(metrics):
    """{key: column suffix} of the HEADLINES a table shows of one dataset's metrics; none for a failed one."""
    return next((group for group in HEADLINES if next(iter(group)) in metrics), {})


def print_table(records):
    """One row per checkpoint, one column per dataset: z-head top-1, or its mean per-class / ROC-AUC / R@1."""
    shown = {(d, k): d + suffix for r in records for d, m in r['results'].items() for k, suffix in headline(m).items()}
    columns, names = list(shown), list(shown.values())
    print(f"{'checkpoint':<28}{'epoch':>6}" + ''.join(f"  {n:>{max(len(n), 6)}}" for n in names))
    for r in records:
        values = [r['results'].get(d, {}).get(k) for d, k in columns]
        print(f"{Path(r['checkpoint']).name[-28:]:<28}{str(r['epoch']):>6}" + ''.join(
            f"  {'-' if v is None else f'{v:.0e}' if k.startswith('l2_') else f'{v:.2f}':>{max(len(n), 6)}}"
            for n, v, (_, k) in zip(names, values, columns)))


def evaluate_checkpoint(path, flags, inputs, records, cores, rank, world_size, device):
    """Evaluate one checkpoint into a record appended to records and written (rank 0) after each dataset, so that
    finished results survive a crash: all records to --out, else this one beside it. Returns the path written."""
    ckpt = read_checkpoint(path, import_overrides(flags))
    cfg, model, tokenizer = model_from_checkpoint(ckpt, path, device, flags.get('bpe_path'))
    cfg.data_root = flags.get('data_root', cfg.data_root)
    cfg.eval_batch_size = int(flags.get('batch_size', cfg.eval_batch_size))
    cfg.workers, cfg.device = cores.workers, device.type
    probe = probe_settings(path, flags, device, rank)
    record = {'checkpoint': str(path), 'epoch': ckpt.get('epoch'), 'step': ckpt.get('step'), 'results': {}}
    if probe:
        record['linear_probe'] = {'seed': probe['seed'], 'val_fraction': PROBE_VAL_FRACTION}
    records.append(record)
    suffix = '_probe.json' if probe else '_eval.json'
    out = Path(flags['out']) if 'out' in flags else Path(path).with_name(Path(path).stem + suffix)

    def save(results):
        record['results'] = results
        if rank == 0:  # strict JSON: an undefined metric is null, so a NaN here is a bug
            text = json.dumps(records if 'out' in flags else record, indent=2, allow_nan=False)
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out, lambda f: f.write(text.encode()))

    datasets = (flags['datasets'].split(',') if 'datasets' in flags else
                list(EVAL_SETS) + (['demo'] if cfg.dataset == 'demo' else []))
    save(evaluate(model, tokenizer, cfg, rank, world_size, datasets, **inputs, on_result=None if probe else save,
                  precision=flags.get('precision', 'fp32'), probe=probe))
    return out


def report(records, written, rank, world_size):
    """The table and the files written (rank 0), then one line naming the datasets that failed, if any."""
    if rank == 0:
        print_table(records)
        for out in dict.fromkeys(written):
            print(f"wrote {out}")
    if world_size > 1:
        dist.destroy_process_group()
    failed = sorted({d for r in records for d, m in r['results'].items() if 'error' in m})
    if failed and rank == 0:
        raise UserError(f"{', '.join(failed)} failed (reasons above and in the JSON); the other results are written")
    if failed:
        sys.exit(1)  # every rank saw the same failures; rank 0 has said so once
    return records


def _run(argv):
    if '-h' in argv or '--help' in argv:
        print(__doc__.strip() + f"\n\noptions: {' '.join('--' + f for f in FLAGS)}")
        return None
    command = {'--convert': convert, '--export': export}.get(argv[0].partition('=')[0] if argv else '')
    if command:
        return command(argv)
    paths, flags, catalog = parse_argv(argv)
    labels = read_json(flags['labels'], 'labels file') if 'labels' in flags else {}
    if 'check_data' in flags:
        return check_data(flags.get('data_root', ''), catalog, labels)
    templates = read_json(flags['templates'], 'templates file') if 'templates' in flags else {}
    inputs = {'catalog': catalog, 'labels': labels, 'templates': templates, 'retrieval_csv': flags.get('retrieval')}
    # the cores are split as in training: same thread count, same float results
    cores = Config(device=flags.get('device', 'auto'), workers=int(flags.get('workers', -1)), threads=0)
    rank, world_size, device = setup_distributed(cores)
    torch.set_float32_matmul_precision('highest')  # --precision=fp32 means fp32, as officially: no TF32
    records = []
    written = [evaluate_checkpoint(path, flags, inputs, records, cores, rank, world_size, device) for path in paths]
    return report(records, written, rank, world_size)


def command_flags(argv, known, usage):
    """{flag: value} of a --convert or --export command line; anything else raises `usage`."""
    try:
        return parse_flags(argv, known, ('guess_heads',))[1]
    except ConfigError:
        raise usage from None


def convert(argv):
    """python evaluate.py --convert IN --out OUT [--vision_heads=N ...]: a released checkpoint (import_checkpoint)
    written as one of ours with the tokenizer's merges, atomically; OUT must not exist yet."""
    usage = ConfigError("usage: python evaluate.py --convert IN --out OUT [--vision_heads=N] [--text_heads=N] "
                        "[--vision_act=gelu|quickgelu] [--text_act=gelu|quickgelu] [--bpe_path=FILE]")
    flags = command_flags(argv, {'convert', 'out', *IMPORT_FLAGS}, usage)
    if not flags.get('convert') or not flags.get('out'):
        raise usage
    out = Path(flags['out'])
    if out.exists():
        raise UserError(f"--out={out} already exists; give a new path (nothing is overwritten)")
    ckpt = read_checkpoint(flags['convert'], import_overrides(flags))
    if 'source' not in ckpt:
        raise UserError(f"{flags['convert']} is already a rocket-clip checkpoint; nothing to convert")
    with torch.device('meta'):  # the weights must fit the model of the new config exactly
        model = CLIPModel(Config.from_dict(ckpt['config']), ckpt['model']['text.token_embedding.weight'].shape[0])
    try:
        model.load_state_dict(ckpt['model'], assign=True)
    except RuntimeError as e:
        raise UserError(f"{flags['convert']}: the weights do not fit the model of their config "
                         f"({str(e).strip().splitlines()[0][:160]})") from None
    bpe_path = Config.from_dict(ckpt['config']).bpe_path
    try:  # the merges travel with the weights, as in a trained checkpoint: no --bpe_path needed to evaluate it
        ckpt['bpe_merges'] = checkpoint_merges(bpe_path)
    except UserError as e:
        raise UserError(f"{flags['convert']}: {first_line(e, 240)}; pass --bpe_path=FILE, the merges the model "
                        f"was trained with (CLIP's {CLIP_BPE}), so that the converted file carries them") from None
    vocab = Tokenizer(ckpt['bpe_merges']).vocab_size
    if vocab != model.text.token_embedding.num_embeddings:
        raise UserError(f"{flags['convert']}: --bpe_path={bpe_path} gives {vocab} tokens but the weights have "
                        f"{model.text.token_embedding.num_embeddings}; pass the merges the model was trained with")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(ckpt, out)
    print(f"wrote {out}")
    return ckpt


CLIP_MERGES_SHA256 = '9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a'  # merges_text of CLIP's
EXPORT_USAGE = "usage: python evaluate.py --export CKPT --out DIR"


def export(argv):
    """python evaluate.py --export CKPT --out DIR: a checkpoint in open_clip's local-dir layout (open_clip_config.json,
    open_clip_pytorch_model.bin; the merges too for a vocabulary other than CLIP's), for
    open_clip.create_model_and_transforms('local-dir:DIR') and clip_benchmark. DIR must not exist yet."""
    flags = command_flags(argv, {'export', 'out'}, ConfigError(EXPORT_USAGE))
    if set(flags) != {'export', 'out'} or not all(flags.values()):
        raise ConfigError(EXPORT_USAGE)
    path, out = flags['export'], Path(flags['out'])
    if out.exists():
        raise UserError(f"--out={out} already exists; give a new folder (nothing is overwritten)")
    cfg, model, tokenizer = load_model(path)
    try:
        model_cfg, preprocess_cfg, state, left_out = export_open_clip(cfg, model.state_dict(), tokenizer.vocab_size)
    except ValueError as e:
        raise UserError(f"{path}: open_clip cannot represent this model exactly ({e})") from None
    tmp = out.with_name(out.name + '.tmp')
    if tmp.exists():
        shutil.rmtree(tmp)  # a previous export that stopped half-way
    tmp.mkdir(parents=True)
    merges = merges_text(tokenizer.merges)
    note = ''
    if hashlib.sha256(merges).hexdigest() != CLIP_MERGES_SHA256:  # open_clip's tokenizer reads a gzipped merges file
        # no final newline: open_clip reads a short file's trailing empty line as one more token
        merges = gzip.compress(merges.rstrip(b'\n'), mtime=0)
        atomic_write(tmp / 'bpe_merges.txt.gz', lambda f: f.write(merges))
        model_cfg['text_cfg']['tokenizer_kwargs'] = {'bpe_path': str(out.resolve() / 'bpe_merges.txt.gz')}
        note = "; its own vocabulary, in bpe_merges.txt.gz, named by absolute path in open_clip_config.json"
    config_json = json.dumps({'model_cfg': model_cfg, 'preprocess_cfg': preprocess_cfg}, indent=2).encode()
    atomic_write(tmp / 'open_clip_config.json', lambda f: f.write(config_json))
    atomic_write(tmp / 'open_clip_pytorch_model.bin', lambda f: torch.save(state, f))
    os.replace(tmp, out)
    print(f"wrote {out} (open_clip local-dir: z projections{note}); not exported, open_clip's CLIP has no place for "
          f"them: {', '.join(left_out) or 'nothing'}")
    return out


def main(argv=None):
    """CLI entry; bad input exits with one line: status 2 for usage errors, 1 for bad files or data."""
    return run_cli(_run, argv)


if __name__ == '__main__':
    main()
