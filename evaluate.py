"""Zero-shot classification and image-text retrieval (SPEC.md section 6).

    python evaluate.py ckpt.pt [more.pt ...] [--datasets=imagenet,cifar10] [--data_root=DIR] [--catalog=paths.json]
        [--labels=labels.json] [--templates=templates.json] [--retrieval=pairs.csv] [--out=results.json]
        [--batch_size=N] [--device=cpu|cuda]

Rebuilds each model from its checkpoint's config, runs every catalogue dataset found under --data_root
(<data_root>/<name>, or the per-dataset paths of a {name: path} JSON catalogue), the demo held-out tasks
and retrieval for demo models, and prints one table row per checkpoint. Metrics go to <ckpt>_eval.json
beside each checkpoint, or all of them as a list to --out. Data-parallel under torchrun.
"""
import csv
import difflib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision

from augment import eval_transform
from config import DATASETS, Config, ConfigError
from model import CLIPModel, autocast_dtype, build_model, convert_weights, load_weights_file
from data import build_eval_loader, build_tokenizer, demo_eval_tasks, demo_retrieval, load_image

ASSETS = Path(__file__).resolve().parent / 'assets'
FORMAT = 'rocket-clip/1'
ENSEMBLE_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # w * sim_z + (1 - w) * sim_h
RECALL_KS = (1, 5, 10)

# name: (reader, eval split, metric), in catalogue order (SPEC.md 6.2)
CATALOGUE = {
    'imagenet': ('folder', 'val', 'acc'), 'mnist': ('MNIST', 'test', 'acc'), 'food101': ('folder', 'test', 'acc'),
    'cifar10': ('CIFAR10', 'test', 'acc'), 'cifar100': ('CIFAR100', 'test', 'acc'),
    'cub200': ('folder', 'val', 'acc'), 'cars': ('folder', 'test', 'acc'),
    'aircraft': ('folder', 'test', 'mean_per_class'), 'dtd': ('folder', 'test', 'acc'),
    'pets': ('folder', 'test', 'mean_per_class'), 'caltech101': ('folder', 'test', 'mean_per_class'),
    'flowers': ('folder', 'test', 'mean_per_class'), 'stl10': ('STL10', 'test', 'acc'),
    'eurosat': ('folder', 'val', 'acc'), 'resisc45': ('folder', 'test', 'acc'), 'gtsrb': ('folder', 'test', 'acc'),
    'kitti_distance': ('folder', 'val', 'acc'), 'country211': ('folder', 'test', 'acc'),
    'patch_camelyon': ('folder', 'val', 'acc'), 'ucf101_frames': ('folder', 'val', 'acc'),
    'clevr_counts': ('filelist', 'val', 'acc'), 'hateful_memes': ('folder', 'dev', 'roc_auc'),
    'rendered_sst2': ('folder', 'test', 'acc'),
}


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
        raise FileNotFoundError(f"checkpoint {path} not found; pass a .pt file written by train.py")
    try:
        ckpt = load_weights_file(path)
    except Exception as e:  # truncated zip, bad pickle, foreign pickled classes: all mean "not loadable"
        first = (str(e).strip().splitlines() or [''])[0]
        first = first if len(first) <= 160 else first[:160].rsplit(' ', 1)[0] + ' ...'  # whole words
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {first}); "
                         f"re-copy it or pick another epoch") from None
    if not isinstance(ckpt, dict) or ckpt.get('format') != FORMAT:
        ckpt = import_checkpoint(ckpt, path, overrides, defaults)
    return ckpt


IMPORT_FLAGS = ('vision_heads', 'text_heads', 'vision_act', 'text_act', 'bpe_path')
CLIP_BPE = 'bpe_simple_vocab_16e6.txt.gz'


def import_overrides(flags):
    """The IMPORT_FLAGS among flags, typed; a bad head count raises ConfigError."""
    out = {k: flags[k] for k in IMPORT_FLAGS if k in flags}
    for k in ('vision_heads', 'text_heads'):
        if k in out and not str(out[k]).isdigit():
            raise ConfigError(f"--{k}={out[k]}: expected a positive integer")
        if k in out:
            out[k] = int(out[k])
    return out


def import_checkpoint(obj, path, overrides=None, defaults=None):
    """A released SLIP / CLIP 🚀 / open_clip checkpoint as one of ours, in memory (model.convert_weights), and one
    line saying what was recognised. overrides (IMPORT_FLAGS) beat what the importer finds; defaults give the head
    counts of a file without an official model name."""
    try:
        imported = convert_weights(obj)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if imported is None:
        raise ValueError(f"{path} is not a rocket-clip checkpoint: found {_describe(obj)}, expected a dict with "
                         f"format={FORMAT!r} as written by train.py, or a released SLIP, CLIP 🚀 or open_clip one")
    overrides, arch = overrides or {}, imported['arch']
    what = {'slip': 'SLIP', 'rocket': 'CLIP 🚀', 'open_clip': 'open_clip'}[imported['format']]
    fields = {**(defaults or {}), **arch, **overrides}
    heads = ['text_heads'] + (['vision_heads'] if arch['vision'] == 'vit' else [])
    missing = [k for k in heads if k not in fields]
    if missing:
        raise ValueError(f"{path}: a {what} checkpoint without an official model name, so its head counts are "
                         f"unknown (no shape shows them): pass {' '.join(f'--{k}=N' for k in missing)}")
    args = obj.get('args')  # SLIP's and CLIP 🚀's argparse.Namespace; CLIP 🚀's names its merges file
    found = [p for p in (Path(getattr(args, 'bpe_path', None) or CLIP_BPE), Path(path).parent / CLIP_BPE,
                         Path(CLIP_BPE)) if p.is_file()]
    fields.setdefault('bpe_path', str(found[0].resolve()) if found else CLIP_BPE)
    dataset = getattr(args, 'dataset', None)
    cfg = Config.from_dict({**fields, 'dataset': dataset if dataset in DATASETS else 'csv'})
    source = ('the flags' if any(k in overrides for k in heads) else imported['heads_from']
              if all(k in arch for k in heads) else 'the run config')
    tower = (f"ViT width {cfg.vision_width}, {cfg.vision_layers} layers, {cfg.vision_heads} heads, patch "
             f"{cfg.patch_size}, {cfg.image_size} px, {cfg.vit_style} style, {cfg.vision_act}"
             if cfg.vision == 'vit' else 'ResNet-50')
    projections = ['z'] + ['h'] * (cfg.method != 'clip') + sorted({k.split('.')[0] for k in imported['extra']})
    epoch = '' if imported['epoch'] is None else f", epoch {imported['epoch']}"
    line = (f"{path}: {what} checkpoint {imported['name'] or '(no model name)'}{epoch}: "
            f"{tower}; text width {cfg.text_width}, {cfg.text_layers} layers, {cfg.text_heads} heads, "
            f"{cfg.text_act}; embedding {cfg.embed_dim}; projections {', '.join(projections)}; head counts from "
            f"{source}")
    if any(k not in overrides for k in imported['assumed']):
        line += "; activations assumed QuickGELU as in OpenAI's weights (LAION's GELU models: --vision_act=gelu " \
                "--text_act=gelu)"
    if imported['ignored']:
        line += f"; not imported: {', '.join(sorted({k.split('.')[0] for k in imported['ignored']}))}"
    if int(os.environ.get('RANK', 0)) == 0:
        print(line)
    return {'format': FORMAT, 'config': cfg.to_dict(), 'model': imported['state'],
            'extra_heads': imported['extra'], 'epoch': imported['epoch'], 'source': line}


def load_model(path, device='cpu'):
    """Rebuild (cfg, model in eval mode, tokenizer) from a checkpoint's config and weights alone."""
    return model_from_checkpoint(read_checkpoint(path), path, device)


def model_from_checkpoint(ckpt, path, device):
    """(cfg, model, tokenizer) from an already-read checkpoint dict; path only names it in errors."""
    try:
        cfg = Config.from_dict(ckpt['config'])
    except (KeyError, TypeError, ConfigError) as e:
        raise ValueError(f"{path}: the saved config is missing or invalid ({e})") from None
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer.vocab_size)
    try:
        model.load_state_dict(ckpt.get('model', {}))
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the model built from its own config "
                         f"({str(e).strip().splitlines()[0][:160]})") from None
    return cfg, model.to(device).eval(), tokenizer


# --- Zero-shot classification ---
@torch.no_grad()
def class_embeddings(model, tokenizer, classnames, templates, device):
    """{head: (C, D)} prompt ensembles: normalise each prompt embedding, average, renormalise (SPEC.md 6.1);
    one text-encoder pass per class serves every head."""
    rows = {head: [] for head in model.heads}
    for name in classnames:
        synonyms = name if isinstance(name, list) else [name]  # every template x every synonym
        tokens = tokenizer([t.format(s) for s in synonyms for t in templates]).to(device)
        for head, emb in model.encode_text_heads(tokens).items():
            prompts = F.normalize(emb.float(), dim=-1)  # (T*S, D)
            rows[head].append(F.normalize(prompts.mean(0), dim=0))
    return {head: torch.stack(r) for head, r in rows.items()}


def score_keys(heads):
    """Every classifier scored: the heads, then the ensembles when the model has the local head h."""
    return list(heads) + ([f'ens{w}' for w in ENSEMBLE_WEIGHTS] if 'h' in heads else [])


def similarities(model, images, classifiers):
    """Cosine similarity (no logit scale) per head, plus the z/h ensembles: {key: (B, C)}."""
    embeddings = model.encode_image_heads(images)
    sims = {head: F.normalize(embeddings[head].float(), dim=-1) @ classes.T for head, classes in classifiers.items()}
    if 'h' in sims:
        sims.update({f'ens{w}': w * sims['z'] + (1 - w) * sims['h'] for w in ENSEMBLE_WEIGHTS})
    return sims


@torch.no_grad()
def zero_shot(model, tokenizer, cfg, dataset, classnames, templates, metric, rank=0, world_size=1):
    """Top-1/top-5 (and mean per-class or ROC-AUC) of every head and ensemble, exact over the unpadded set."""
    device, keys, num_classes = next(model.parameters()).device, score_keys(model.heads), len(classnames)
    counts = torch.zeros(len(keys), 3, num_classes, dtype=torch.long, device=device)
    scores, targets = [], []  # binary sets only: score sim[:, 1] - sim[:, 0] of every key, and the labels
    with _autocast(cfg, device):
        classifiers = class_embeddings(model, tokenizer, classnames, templates, device)
        for images, labels in build_eval_loader(dataset, cfg, rank, world_size):
            labels = labels.to(device)
            sims = similarities(model, images.to(device), classifiers)
            counts += torch.stack([class_counts(sims[k], labels, num_classes) for k in keys])
            if metric == 'roc_auc':
                scores.append(torch.stack([sims[k][:, 1] - sims[k][:, 0] for k in keys], 1).cpu())  # (B, K)
                targets.append(labels.cpu())
    if world_size > 1:
        dist.all_reduce(counts)
    out = {}
    for i, key in enumerate(keys):
        out.update(accuracy_metrics(counts[i], key, per_class=metric == 'mean_per_class'))
    if metric == 'roc_auc':
        scores = _gather(torch.cat(scores or [torch.zeros(0, len(keys))]), world_size)
        targets = _gather(torch.cat(targets or [torch.zeros(0, dtype=torch.long)]), world_size)
        out.update({f'roc_auc_{key}': 100 * roc_auc(scores[:, i], targets) for i, key in enumerate(keys)})
    return out


def _autocast(cfg, device):
    """The training run's precision (model.autocast_dtype), so evaluate.py reproduces its table."""
    dtype = autocast_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


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


def _gather(x, world_size):
    """Concatenate each rank's rows (shards may differ in length), on the CPU."""
    if world_size == 1:
        return x.cpu()
    parts = [None] * world_size
    dist.all_gather_object(parts, x.cpu())
    return torch.cat(parts)


# --- Retrieval ---
def recall_at_k(sim, image_ids, text_ids, ks=RECALL_KS):
    """Recall@k in percent both ways; sim (N images, M texts); a pair matches when the ids are equal.

    image->text: an image is correct when any of its captions is in its top k; text->image: the caption's
    image is in its top k. Rank = number of candidates scoring strictly higher (ties count as correct).
    """
    match = image_ids[:, None] == text_ids[None, :]  # (N, M)
    best_caption = sim.masked_fill(~match, float('-inf')).max(1).values  # (N,)
    i2t_rank = (sim > best_caption[:, None]).sum(1)
    own_image = sim.masked_fill(~match, float('-inf')).max(0).values  # (M,)
    t2i_rank = (sim > own_image[None, :]).sum(0)
    out = {f'i2t_r{k}': 100 * (i2t_rank < k).double().mean().item() for k in ks}
    out.update({f't2i_r{k}': 100 * (t2i_rank < k).double().mean().item() for k in ks})
    return out


@torch.no_grad()
def retrieval(model, tokenizer, cfg, images, captions, caption_ids, rank=0, world_size=1):
    """Recall@1/5/10 per head; images yields (image, image_id), captions[j] describes image caption_ids[j]."""
    device, heads = next(model.parameters()).device, list(model.heads)
    image_emb, image_ids, text_emb = {h: [] for h in heads}, [], {h: [] for h in heads}
    mine = list(range(rank, len(captions), world_size))  # this rank's captions; the gathers bring back all
    with _autocast(cfg, device):
        for x, ids in build_eval_loader(images, cfg, rank, world_size):
            for h, emb in model.encode_image_heads(x.to(device)).items():
                image_emb[h].append(F.normalize(emb.float(), dim=-1).cpu())
            image_ids.append(torch.as_tensor(ids))
        for i in range(0, len(mine), cfg.eval_batch_size):
            tokens = tokenizer([captions[j] for j in mine[i:i + cfg.eval_batch_size]]).to(device)
            for h, emb in model.encode_text_heads(tokens).items():
                text_emb[h].append(F.normalize(emb.float(), dim=-1).cpu())
    empty = torch.zeros(0, cfg.embed_dim)  # a rank with an empty shard still joins the gathers
    image_ids = _gather(torch.cat(image_ids or [torch.zeros(0, dtype=torch.long)]), world_size)
    text_ids = _gather(torch.as_tensor([caption_ids[j] for j in mine], dtype=torch.long), world_size)
    out = {}
    for h in heads:
        sim = _gather(torch.cat(image_emb[h] or [empty]), world_size) @ \
            _gather(torch.cat(text_emb[h] or [empty]), world_size).T  # (N images, M captions)
        out.update({f'{k}_{h}': v for k, v in recall_at_k(sim, image_ids, text_ids).items()})
    return out


def read_retrieval_csv(path, transform):
    """(images dataset, captions, caption image ids) from a CSV with columns image, caption; paths relative to it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"retrieval CSV {path} not found")
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows or not {'image', 'caption'} <= rows[0].keys():
        raise ValueError(f"retrieval CSV {path}: needs a header with columns image,caption and at least one row")
    index = {}
    for row in rows:
        index.setdefault(row['image'], len(index))
    paths = [p if os.path.isabs(p) else str(path.parent / p) for p in index]
    return ImageList(paths, list(range(len(paths))), transform), [r['caption'] for r in rows], \
        [index[r['image']] for r in rows]


# --- Datasets ---
class ImageList(torch.utils.data.Dataset):
    """(image, label) pairs from a list of image paths."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(load_image(self.paths[i])), self.labels[i]


def read_json(path, what):
    """A JSON file's content; an unreadable file raises one line naming it as `what`."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path} is unreadable ({type(e).__name__}); give a JSON file") from None


def build_dataset(name, root, transform, classnames):
    """The eval split of catalogue dataset `name` stored at root; wrong layouts raise one line."""
    reader, split, _ = CATALOGUE[name]
    root = Path(root)
    if reader in ('MNIST', 'CIFAR10', 'CIFAR100', 'STL10'):
        split_arg = {'split': 'test'} if reader == 'STL10' else {'train': False}
        try:
            dataset = getattr(torchvision.datasets, reader)(root, transform=transform, download=False, **split_arg)
        except RuntimeError:
            raise ValueError(f"{name}: {root} does not hold torchvision's {reader} test set "
                             f"(the layout torchvision.datasets.{reader}(root, download=True) writes)") from None
        n = len(dataset.classes)
    elif reader == 'filelist':
        try:
            paths, labels = np.load(root / f'{split}_images.npy'), np.load(root / f'{split}_labels.npy')
        except (OSError, ValueError):
            raise ValueError(f"{name}: expected {root}/{split}_images.npy and {split}_labels.npy "
                             f"(arrays of strings)") from None
        index = {f'count_{c}': i for i, c in enumerate(classnames)}  # SPEC.md 6.2: labels 'count_10', 'count_3', ...
        unknown = sorted(set(map(str, labels)) - index.keys())
        if unknown:
            raise ValueError(f"{name}: labels {unknown[:3]} are not among {list(index)}; check labels.json")
        if len(paths) != len(labels):
            raise ValueError(f"{name}: {len(paths)} image paths but {len(labels)} labels in {root}")
        paths = [p if os.path.isabs(p) else str(root / p) for p in map(str, paths)]
        dataset, n = ImageList(paths, [index[str(y)] for y in labels], transform), len(classnames)
    else:
        folder = root / split
        try:
            dataset = torchvision.datasets.ImageFolder(folder, transform=transform, loader=load_image)
        except (FileNotFoundError, OSError):
            raise ValueError(f"{name}: expected {folder}/ with one sub-folder of images per class "
                             f"(ImageFolder layout)") from None
        n = len(dataset.classes)
    if n != len(classnames):
        raise ValueError(f"{name}: the data has {n} classes but the labels file lists {len(classnames)}; "
                         f"fix the labels file or the dataset folder")
    return dataset


# --- Main ---
def _dataset_path(name, cfg, catalog):
    if name in catalog:
        entry = catalog[name]
        return Path(entry['path'] if isinstance(entry, dict) else entry)  # SLIP's {"path": ...} entries also work
    return Path(cfg.data_root) / name if cfg.data_root else None


def check_datasets(names):
    """Raise ConfigError naming the first dataset that is neither 'demo' nor in the catalogue."""
    for name in names:
        if name != 'demo' and name not in CATALOGUE:
            close = difflib.get_close_matches(name, list(CATALOGUE), n=1)
            raise ConfigError(f"unknown dataset {name!r}" + (f"; did you mean {close[0]}?" if close else
                                                            f"; choose from demo, {', '.join(CATALOGUE)}"))
    return names


def default_datasets(cfg):
    """Per-epoch evaluation: cfg.eval_datasets, else the demo tasks for demo data, else ImageNet."""
    if cfg.eval_datasets:
        return [d.strip() for d in cfg.eval_datasets.split(',') if d.strip()]
    return ['demo'] if cfg.dataset == 'demo' else ['imagenet']


def evaluate(model, tokenizer, cfg, rank=0, world_size=1, datasets=None, catalog=None, labels=None, templates=None,
             retrieval_csv=None):
    """{dataset: {metric: value}} for the named datasets (default: default_datasets); absent ones skip with a line.

    catalog maps names to folders (default <cfg.data_root>/<name>); labels/templates default to assets/.
    """
    model = getattr(model, 'module', model)  # a DDP-wrapped model from train.py
    was_training = model.training
    model.eval()
    say = print if rank == 0 else (lambda *a: None)
    labels = labels or read_json(ASSETS / 'labels.json', 'labels file')
    templates = templates or read_json(ASSETS / 'templates.json', 'templates file')
    transform = eval_transform(cfg)  # any PIL mode -> RGB, resize, centre crop, normalise
    results, no_root = {}, []
    for name in check_datasets(datasets or default_datasets(cfg)):
        if name == 'demo':
            for task in demo_eval_tasks(cfg):
                results[f'demo_{task.name}'] = zero_shot(model, tokenizer, cfg, task.dataset, task.classnames,
                                                         task.templates, task.metric, rank, world_size)
            results['demo_retrieval'] = retrieval(model, tokenizer, cfg, *demo_retrieval(cfg), rank, world_size)
            continue
        root = _dataset_path(name, cfg, catalog or {})
        if root is None:
            no_root.append(name)
            continue
        if not root.exists():
            say(f"skip {name}: no data at {root}")
            continue
        if name not in labels or name not in templates:
            say(f"skip {name}: no entry for it in the labels or templates file")
            continue
        try:
            dataset = build_dataset(name, root, transform, labels[name])
        except ValueError as e:
            say(f"skip {e}")
            continue
        results[name] = zero_shot(model, tokenizer, cfg, dataset, labels[name], templates[name], CATALOGUE[name][2],
                                  rank, world_size)
    if no_root:
        say(f"skip {', '.join(no_root)}: no --data_root (cfg.data_root) or catalogue entry")
    if retrieval_csv:
        results['retrieval'] = retrieval(model, tokenizer, cfg, *read_retrieval_csv(retrieval_csv, transform),
                                         rank, world_size)
    model.train(was_training)
    return results


FLAGS = ('datasets', 'data_root', 'catalog', 'labels', 'templates', 'retrieval', 'out', 'batch_size', 'device',
         *IMPORT_FLAGS)
HEADLINES = {'acc1_z': '', 'mean_per_class_z': ' mpc', 'roc_auc_z': ' auc', 'i2t_r1_z': ' i2t@1', 't2i_r1_z': ' t2i@1'}


def parse_argv(argv):
    """(checkpoint paths, {flag: value}); bad flags raise ConfigError with one line."""
    paths, flags = [], {}
    for arg in argv:
        if not arg.startswith('--'):
            paths.append(arg)
            continue
        key, eq, value = arg[2:].partition('=')
        key = key.replace('-', '_')
        if key not in FLAGS:
            close = difflib.get_close_matches(key, FLAGS, n=1)
            raise ConfigError(f"unknown option --{key}" + (f"; did you mean --{close[0]}?" if close else
                                                            f"; options: {', '.join('--' + f for f in FLAGS)}"))
        if not eq or not value:
            raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
        flags[key] = value
    if not paths:
        raise ConfigError("usage: python evaluate.py ckpt.pt [more.pt ...] [--datasets=a,b] [--data_root=DIR] "
                          "[--out=results.json] (see the module docstring)")
    if not flags.get('batch_size', '1').isdigit() or int(flags.get('batch_size', '1')) < 1:
        raise ConfigError(f"--batch_size={flags['batch_size']}: expected a positive integer")
    if flags.get('device', 'cpu').split(':')[0] not in ('cpu', 'cuda'):
        raise ConfigError(f"--device={flags['device']}: choose cpu or cuda")
    check_datasets(flags['datasets'].split(',') if 'datasets' in flags else [])
    return paths, flags


def headline(metrics):
    """The metric keys a table shows for one dataset: its SPEC.md 6.2 metric of the z head, or R@1 both ways."""
    if 'i2t_r1_z' in metrics:
        return ['i2t_r1_z', 't2i_r1_z']
    return [next(k for k in ('roc_auc_z', 'mean_per_class_z', 'acc1_z') if k in metrics)]


def print_table(records):
    """One row per checkpoint, one column per dataset: z-head top-1, or its mean per-class / ROC-AUC / R@1."""
    columns = list(dict.fromkeys((d, k) for r in records for d, m in r['results'].items() for k in headline(m)))
    names = [d + HEADLINES[k] for d, k in columns]
    print(f"{'checkpoint':<28}{'epoch':>6}" + ''.join(f"  {n:>{max(len(n), 6)}}" for n in names))
    for r in records:
        values = [r['results'].get(d, {}).get(k) for d, k in columns]
        print(f"{Path(r['checkpoint']).name[-28:]:<28}{str(r['epoch']):>6}" + ''.join(
            f"  {'-' if v is None else f'{v:.2f}':>{max(len(n), 6)}}" for n, v in zip(names, values)))


def _run(argv):
    if argv and argv[0].partition('=')[0] == '--convert':
        return convert(argv)
    paths, flags = parse_argv(argv)
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    device = torch.device(flags.get('device') or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError("--device=cuda: no CUDA device is visible; use --device=cpu")
    if world_size > 1:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        if device.type == 'cuda':
            device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
            torch.cuda.set_device(device)
    rank = dist.get_rank() if world_size > 1 else 0
    catalog = read_json(flags['catalog'], 'catalogue') if 'catalog' in flags else {}
    labels = read_json(flags['labels'], 'labels file') if 'labels' in flags else None
    templates = read_json(flags['templates'], 'templates file') if 'templates' in flags else None
    records = []
    for path in paths:
        ckpt = read_checkpoint(path, import_overrides(flags))
        cfg, model, tokenizer = model_from_checkpoint(ckpt, path, device)
        cfg.data_root = flags.get('data_root', cfg.data_root)
        cfg.eval_batch_size = int(flags.get('batch_size', cfg.eval_batch_size))
        datasets = (flags['datasets'].split(',') if 'datasets' in flags else
                    list(CATALOGUE) + (['demo'] if cfg.dataset == 'demo' else []))
        results = evaluate(model, tokenizer, cfg, rank, world_size, datasets, catalog, labels, templates,
                           flags.get('retrieval'))
        records.append({'checkpoint': str(path), 'epoch': ckpt.get('epoch'), 'step': ckpt.get('step'),
                        'results': results})
        if rank == 0 and 'out' not in flags:
            _write_json(records[-1], Path(path).with_name(Path(path).stem + '_eval.json'))
    if rank == 0:
        print_table(records)
        if 'out' in flags:
            _write_json(records, Path(flags['out']))
    if world_size > 1:
        dist.destroy_process_group()
    return records


def convert(argv):
    """python evaluate.py --convert IN --out OUT [--vision_heads=N ...]: a released checkpoint (import_checkpoint)
    written as one of ours, atomically; OUT must not exist yet."""
    flags, args = {}, list(argv)
    while args:
        key, eq, value = args.pop(0).partition('=')
        if not eq and args and not args[0].startswith('--'):
            value = args.pop(0)
        flags[key[2:].replace('-', '_')] = value
    if not set(flags) <= {'convert', 'out', *IMPORT_FLAGS} or not flags.get('convert') or not flags.get('out'):
        raise ConfigError("usage: python evaluate.py --convert IN --out OUT [--vision_heads=N] [--text_heads=N] "
                          "[--vision_act=gelu|quickgelu] [--text_act=gelu|quickgelu] [--bpe_path=FILE]")
    out = Path(flags['out'])
    if out.exists():
        raise ValueError(f"--out={out} already exists; give a new path (nothing is overwritten)")
    ckpt = read_checkpoint(flags['convert'], import_overrides(flags))
    if 'source' not in ckpt:
        raise ValueError(f"{flags['convert']} is already a rocket-clip checkpoint; nothing to convert")
    with torch.device('meta'):  # the weights must fit the model of the new config exactly
        model = CLIPModel(Config.from_dict(ckpt['config']), ckpt['model']['text.token_embedding.weight'].shape[0])
    try:
        model.load_state_dict(ckpt['model'], assign=True)
    except RuntimeError as e:
        raise ValueError(f"{flags['convert']}: the weights do not fit the model of their config "
                         f"({str(e).strip().splitlines()[0][:160]})") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + '.tmp')
    torch.save(ckpt, tmp)
    os.replace(tmp, out)
    print(f"wrote {out}")
    return ckpt


def _write_json(obj, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w') as f:
        json.dump(obj, f, indent=2)
    print(f"wrote {path}")


def main(argv=None):
    """CLI entry; bad input exits with one line: status 2 for usage errors, 1 for bad files or data."""
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
