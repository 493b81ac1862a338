"""Zero-shot classification and image-text retrieval (SPEC.md section 6), and the linear probe.

    python evaluate.py ckpt.pt [more.pt ...] [--datasets=imagenet,cifar10] [--data_root=DIR] [--catalog=paths.json]
        [--labels=labels.json] [--templates=templates.json] [--retrieval=pairs.csv] [--out=results.json]
        [--batch_size=N] [--device=cpu|cuda] [--linear_probe [--probe_heads] [--probe_seed=0]]

Rebuilds each model from its checkpoint's config, runs every catalogue dataset found under --data_root
(<data_root>/<name>, or the per-dataset paths of a {name: path} JSON catalogue), the demo held-out tasks
and retrieval for demo models, and prints one table row per checkpoint. Metrics go to <ckpt>_eval.json
beside each checkpoint, or all of them as a list to --out. Data-parallel under torchrun.
--linear_probe fits a logistic-regression probe on frozen image features of each dataset's train split instead
(features cached in <ckpt>_features/, results in <ckpt>_probe.json); see the Linear probe section.
"""
import csv
import difflib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image

from augment import eval_transform
from config import Config, ConfigError
from model import autocast_dtype, build_model
from data import build_eval_loader, build_tokenizer, demo_eval_tasks, demo_probe_train, demo_retrieval

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


def read_checkpoint(path):
    """Load a checkpoint written by train.py (weights_only); missing, corrupt or foreign files raise one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; pass a .pt file written by train.py")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, foreign pickled classes: all mean "not loadable"
        first = (str(e).strip().splitlines() or [''])[0][:120]
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {first}); "
                         f"re-copy it or pick another epoch") from None
    if not isinstance(ckpt, dict) or ckpt.get('format') != FORMAT:
        raise ValueError(f"{path} is not a rocket-clip checkpoint: found {_describe(ckpt)}, "
                         f"expected a dict with format={FORMAT!r} as written by train.py")
    return ckpt


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
        with Image.open(self.paths[i]) as img:
            return self.transform(img), self.labels[i]


def read_json(path, what):
    """A JSON file's content; an unreadable file raises one line naming it as `what`."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path} is unreadable ({type(e).__name__}); give a JSON file") from None


def build_dataset(name, root, transform, classnames, split=None):
    """The eval split (or split='train') of catalogue dataset `name` stored at root; wrong layouts raise one line."""
    reader, eval_split, _ = CATALOGUE[name]
    root, split = Path(root), split or eval_split
    if reader in ('MNIST', 'CIFAR10', 'CIFAR100', 'STL10'):
        split_arg = {'split': split} if reader == 'STL10' else {'train': split == 'train'}
        try:
            dataset = getattr(torchvision.datasets, reader)(root, transform=transform, download=False, **split_arg)
        except RuntimeError:
            raise ValueError(f"{name}: {root} does not hold torchvision's {reader} {split} set "
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
            dataset = torchvision.datasets.ImageFolder(folder, transform=transform)
        except (FileNotFoundError, OSError):
            raise ValueError(f"{name}: expected {folder}/ with one sub-folder of images per class "
                             f"(ImageFolder layout)") from None
        n = len(dataset.classes)
    if n != len(classnames):
        raise ValueError(f"{name}: the data has {n} classes but the labels file lists {len(classnames)}; "
                         f"fix the labels file or the dataset folder")
    return dataset


# --- Linear probe ---
# Frozen image features -> L2-regularised multinomial logistic regression, CLIP's protocol: the strength is
# chosen on a validation split held out of the training split, then the classifier is refit on all of it.
# coarse strengths, strongest first (warm starts); below 1e-8 (features of unit total variance) the penalty no
# longer binds before max_iter does: at 50k x 512 those fits ran to max_iter and took 80% of the probe's time
PROBE_GRID = tuple(10.0 ** k for k in range(0, -9, -1))
PROBE_REFINE = (-0.75, -0.5, -0.25, 0.25, 0.5, 0.75)  # log10 offsets tried around the best coarse strength
PROBE_VAL_FRACTION = 0.2


def fit_logistic(x, y, l2, num_classes, init=None, max_iter=1000, tol=1e-6):
    """(W (D, C), b (C,), iterations) minimising mean cross-entropy(x W + b, y) + l2 / 2 ||W||^2 (b unpenalised)
    by full-batch L-BFGS in x's dtype, from init (W, b) or zeros, until max |gradient| <= tol."""
    n, d = x.shape
    w = (init[0].clone() if init else x.new_zeros(d, num_classes)).requires_grad_()
    b = (init[1].clone() if init else x.new_zeros(num_classes)).requires_grad_()
    rows = torch.arange(n, device=x.device)

    def closure():  # loss and gradient in closed form: no autograd graph over the n x D features
        with torch.no_grad():
            logits = torch.addmm(b, x, w)  # (n, C)
            lse = logits.logsumexp(1)
            loss = (lse - logits[rows, y]).mean() + l2 / 2 * w.square().sum()
            residual = (logits - lse[:, None]).exp_()  # softmax - one_hot = n * d loss / d logits
            residual[rows, y] -= 1
            # (r.T @ x).T, not x.T @ r: the transposed-left product runs several times slower on CPU
            w.grad = ((residual.T @ x).T / n + l2 * w).contiguous()
            b.grad = residual.mean(0)
        return loss

    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tol,
                            tolerance_change=0, history_size=20, line_search_fn='strong_wolfe')
    opt.step(closure)
    return w.detach(), b.detach(), opt.state[w]['n_iter']


def fit_present(x, y, l2, num_classes, init=None):
    """fit_logistic over the classes present in y (an absent class's unpenalised bias would run to -inf), as
    (W (D, num_classes), b) with -inf bias for the absent classes; init: a previous (W, b) to start from."""
    present = torch.unique(y)
    if init is not None:
        init = init[0][:, present], init[1][present].nan_to_num(0, 0, 0)  # a class absent before starts at 0
    w, b, _ = fit_logistic(x, torch.searchsorted(present, y), l2, len(present), init)
    full_w, full_b = x.new_zeros(x.shape[1], num_classes), x.new_full((num_classes,), float('-inf'))
    full_w[:, present], full_b[present] = w, b
    return full_w, full_b


def probe_metrics(logits, labels, metric, key):
    """Top-1 (and mean per class or ROC-AUC where that is the dataset's metric) of classifier logits (N, C)."""
    counts = class_counts(logits, labels, logits.shape[1])
    out = accuracy_metrics(counts, key, per_class=metric == 'mean_per_class')
    del out[f'acc5_{key}']  # top-1 is the probe's protocol
    if metric == 'roc_auc':
        out[f'roc_auc_{key}'] = 100 * roc_auc((logits[:, 1] - logits[:, 0]).cpu(), labels.cpu())
    return out


def select_strength(fit_and_score):
    """(best strength, {strength: validation score}, best solution); fit_and_score(l2, init) -> (score, solution).
    The whole coarse PROBE_GRID, strongest first, each fit starting from the last (no early stop: the score need
    not be unimodal, overfitting nuisance dimensions can come before a weak signal is fit), then PROBE_REFINE
    around the best. Ties go to the stronger regularisation."""
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


def linear_probe(train_x, train_y, test_x, test_y, num_classes, metric, key='trunk', seed=0, device='cpu'):
    """Metrics of the linear probe on one feature set: the strength l2 chosen on PROBE_VAL_FRACTION of the train
    split held out (seeded), the classifier refit on the whole train split and scored on the test split.

    Features are standardised as a whole (standardise), in float64."""
    x, test_x = standardise(train_x.to(device, torch.float64), test_x.to(device, torch.float64))
    train_y, test_y = train_y.to(device), test_y.to(device)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(device)
    n_val = min(len(x) - 1, max(1, round(PROBE_VAL_FRACTION * len(x))))
    val, fit = order[:n_val], order[n_val:]
    score_key = f"{'acc1' if metric == 'acc' else metric}_{key}"

    def fit_and_score(l2, init):
        w, b = fit_present(x[fit], train_y[fit], l2, num_classes, init)
        return probe_metrics(x[val] @ w + b, train_y[val], metric, key)[score_key], (w, b)

    l2, scores, solution = select_strength(fit_and_score)
    w, b = fit_present(x, train_y, l2, num_classes, solution)
    return {**probe_metrics(test_x @ w + b, test_y, metric, key), f'l2_{key}': l2, f'val_{key}': scores[l2]}


def file_sha256(path):
    """Hex SHA-256 of a file's bytes: the feature cache's key to the checkpoint (0.6 GB/s on a busy CPU, once a run)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def data_identity(dataset):
    """What the feature cache knows of a dataset: its type, size, plain attributes (root, split, seed, ...), and
    the first and last of its file lists."""
    fields = {k: str(v) for k, v in vars(dataset).items() if isinstance(v, (str, int, float, bool, Path))}
    fields.update({k: str((len(v), v[0], v[-1])) for k, v in vars(dataset).items()
                   if k in ('paths', 'samples') and isinstance(v, list) and v})
    return f"{type(dataset).__name__}[{len(dataset)}]{sorted(fields.items())}"


@torch.no_grad()
def image_features(model, cfg, dataset, heads=False, rank=0, world_size=1):
    """({'trunk': (N, width)} plus {head: (N, embed_dim)} when heads, labels (N,)) on the CPU in float32: the image
    encoder's output before the heads; each rank encodes its slice, the gathers concatenate them unpadded."""
    device = next(model.parameters()).device
    keys = ['trunk'] + (list(model.heads) if heads else [])
    parts, labels = {k: [] for k in keys}, []
    with _autocast(cfg, device):
        for images, y in build_eval_loader(dataset, cfg, rank, world_size):
            trunk = model.visual(images.to(device))
            out = {'trunk': trunk, **({h: project(trunk) for h, project in model.image_heads.items()} if heads else {})}
            for k in keys:
                parts[k].append(out[k].float().cpu())
            labels.append(torch.as_tensor(y))
    empty = torch.zeros(0)  # a rank with an empty slice still joins the gathers; cat skips 1-D empty tensors
    return ({k: _gather(torch.cat(parts[k] or [empty]), world_size) for k in keys},
            _gather(torch.cat(labels or [torch.zeros(0, dtype=torch.long)]), world_size))


def cached_features(model, cfg, dataset, path, key, heads, rank=0, world_size=1):
    """Extract a dataset's features into the cache file `path` unless it already holds them under `key`
    (rank 0 decides and writes, atomically; all ranks extract)."""
    hit = [False]
    if rank == 0 and path.is_file():
        try:  # mmap: comparing the key does not read the features
            hit[0] = torch.load(path, map_location='cpu', weights_only=True, mmap=True).get('key') == key
        except Exception:  # a truncated or foreign file is a miss; it is overwritten below
            pass
    if world_size > 1:
        dist.broadcast_object_list(hit, src=0)
    if hit[0]:
        return
    features, labels = image_features(model, cfg, dataset, heads, rank, world_size)
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + '.tmp')
        torch.save({'key': key, 'features': features, 'labels': labels}, tmp)
        os.replace(tmp, path)


def probe_features(model, cfg, name, train, test, classnames, metric, probe, rank=0, world_size=1):
    """Phase 1 of the probe for one dataset (all ranks): train and test features into the cache beside the
    checkpoint, keyed by its content, the data, the transform, the precision and the features kept. Returns the
    job fit_probes runs."""
    paths = {split: probe['cache'] / f'{name}_{split}.pt' for split in ('train', 'test')}
    device = next(model.parameters()).device
    for split, dataset in (('train', train), ('test', test)):
        key = {'checkpoint_sha256': probe['sha256'], 'dataset': name, 'split': split, 'data': data_identity(dataset),
               'transform': repr(getattr(dataset, 'transform', None)), 'precision': str(autocast_dtype(cfg, device)),
               'heads': probe['heads']}
        cached_features(model, cfg, dataset, paths[split], key, probe['heads'], rank, world_size)
    return {'paths': paths, 'num_classes': len(classnames), 'metric': metric}


def _true(flags, key):
    return flags.get(key, 'false').lower() in ('true', '1')


def check_probe_flags(flags):
    """Raise ConfigError for a bad --linear_probe, --probe_heads or --probe_seed."""
    for key in SWITCHES:
        if flags.get(key, 'false').lower() not in ('true', 'false', '1', '0'):
            raise ConfigError(f"--{key}={flags[key]}: expected true or false (or a bare --{key})")
    if not flags.get('probe_seed', '0').isdigit():
        raise ConfigError(f"--probe_seed={flags['probe_seed']}: expected a non-negative integer")
    if (_true(flags, 'probe_heads') or 'probe_seed' in flags) and not _true(flags, 'linear_probe'):
        raise ConfigError("--probe_heads and --probe_seed set up the linear probe; add --linear_probe")


def probe_settings(path, flags, device, rank=0):
    """The probe's settings for checkpoint `path`, None without --linear_probe. Features are cached in
    <checkpoint stem>_features/ beside it, keyed by the SHA-256 of its bytes (computed on rank 0)."""
    if not _true(flags, 'linear_probe'):
        return None
    path = Path(path)
    return {'cache': path.with_name(path.stem + '_features'), 'sha256': file_sha256(path) if rank == 0 else None,
            'heads': _true(flags, 'probe_heads'), 'seed': int(flags.get('probe_seed', 0)), 'device': device}


def fit_probes(jobs, probe, say=print):
    """Phase 2 (one process): {dataset: metrics} of the linear probe on every cached feature set of every job."""
    results = {}
    for name, job in jobs.items():
        start = time.time()
        train, test = (torch.load(job['paths'][s], map_location='cpu', weights_only=True) for s in ('train', 'test'))
        results[name] = {}
        for key in train['features']:
            results[name].update(linear_probe(train['features'][key], train['labels'], test['features'][key],
                                              test['labels'], job['num_classes'], job['metric'], key, probe['seed'],
                                              probe['device']))
        metrics = results[name]
        say(f"probe {name}: {len(train['labels'])} train / {len(test['labels'])} test, " + ', '.join(
            f"{k} {metrics[headline(metrics)[0].replace('trunk', k)]:.2f} (l2 {metrics['l2_' + k]:.1e})"
            for k in train['features']) + f", {time.time() - start:.1f}s")
    return results


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
             retrieval_csv=None, probe=None):
    """{dataset: {metric: value}} for the named datasets (default: default_datasets); absent ones skip with a line.

    catalog maps names to folders (default <cfg.data_root>/<name>); labels/templates default to assets/.
    probe (probe_settings): the linear probe instead of zero-shot; its results are on rank 0 only.
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
                                                         task.templates, task.metric, rank, world_size) \
                    if probe is None else probe_features(model, cfg, f'demo_{task.name}', demo_probe_train(cfg, task),
                                                         task.dataset, task.classnames, task.metric, probe, rank,
                                                         world_size)
            if probe is None:
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
            train = build_dataset(name, root, transform, labels[name], 'train') if probe else None
        except ValueError as e:
            say(f"skip {e}")
            continue
        results[name] = zero_shot(model, tokenizer, cfg, dataset, labels[name], templates[name], CATALOGUE[name][2],
                                  rank, world_size) if probe is None else \
            probe_features(model, cfg, name, train, dataset, labels[name], CATALOGUE[name][2], probe, rank, world_size)
    if no_root:
        say(f"skip {', '.join(no_root)}: no --data_root (cfg.data_root) or catalogue entry")
    if retrieval_csv and probe is None:
        results['retrieval'] = retrieval(model, tokenizer, cfg, *read_retrieval_csv(retrieval_csv, transform),
                                         rank, world_size)
    if probe is not None:  # fits after the last collective, so no rank waits in one while rank 0 fits
        results = fit_probes(results, probe, say) if rank == 0 else {}
    model.train(was_training)
    return results


FLAGS = ('datasets', 'data_root', 'catalog', 'labels', 'templates', 'retrieval', 'out', 'batch_size', 'device',
         'linear_probe', 'probe_heads', 'probe_seed')
SWITCHES = ('linear_probe', 'probe_heads')  # a bare --flag means true
HEADLINES = {'acc1_z': '', 'mean_per_class_z': ' mpc', 'roc_auc_z': ' auc', 'i2t_r1_z': ' i2t@1', 't2i_r1_z': ' t2i@1',
             'acc1_trunk': '', 'mean_per_class_trunk': ' mpc', 'roc_auc_trunk': ' auc', 'l2_trunk': ' l2'}


def parse_argv(argv):
    """(checkpoint paths, {flag: value}); bad flags raise ConfigError with one line."""
    paths, flags = [], {}
    for arg in argv:
        if not arg.startswith('--'):
            paths.append(arg)
            continue
        key, eq, value = arg[2:].partition('=')
        key = key.replace('-', '_')
        eq, value = ('=', 'true') if key in SWITCHES and not eq else (eq, value)
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
    check_probe_flags(flags)
    return paths, flags


def headline(metrics):
    """The metric keys a table shows for one dataset: its SPEC.md 6.2 metric of the z head, or R@1 both ways."""
    if 'i2t_r1_z' in metrics:
        return ['i2t_r1_z', 't2i_r1_z']
    if 'l2_trunk' in metrics:  # linear probe: the trunk features' metric and the chosen strength
        return [next(k for k in ('roc_auc_trunk', 'mean_per_class_trunk', 'acc1_trunk') if k in metrics), 'l2_trunk']
    return [next(k for k in ('roc_auc_z', 'mean_per_class_z', 'acc1_z') if k in metrics)]


def print_table(records):
    """One row per checkpoint, one column per dataset: z-head top-1, or its mean per-class / ROC-AUC / R@1."""
    columns = list(dict.fromkeys((d, k) for r in records for d, m in r['results'].items() for k in headline(m)))
    names = [d + HEADLINES[k] for d, k in columns]
    print(f"{'checkpoint':<28}{'epoch':>6}" + ''.join(f"  {n:>{max(len(n), 6)}}" for n in names))
    for r in records:
        values = [r['results'].get(d, {}).get(k) for d, k in columns]
        print(f"{Path(r['checkpoint']).name[-28:]:<28}{str(r['epoch']):>6}" + ''.join(
            f"  {'-' if v is None else f'{v:.0e}' if k.startswith('l2_') else f'{v:.2f}':>{max(len(n), 6)}}"
            for n, v, (_, k) in zip(names, values, columns)))


def _run(argv):
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
        ckpt = read_checkpoint(path)
        cfg, model, tokenizer = model_from_checkpoint(ckpt, path, device)
        cfg.data_root = flags.get('data_root', cfg.data_root)
        cfg.eval_batch_size = int(flags.get('batch_size', cfg.eval_batch_size))
        datasets = (flags['datasets'].split(',') if 'datasets' in flags else
                    list(CATALOGUE) + (['demo'] if cfg.dataset == 'demo' else []))
        probe = probe_settings(path, flags, device, rank)
        results = evaluate(model, tokenizer, cfg, rank, world_size, datasets, catalog, labels, templates,
                           flags.get('retrieval'), probe)
        records.append({'checkpoint': str(path), 'epoch': ckpt.get('epoch'), 'step': ckpt.get('step'),
                        'results': results})
        if probe:
            records[-1]['linear_probe'] = {'seed': probe['seed'], 'val_fraction': PROBE_VAL_FRACTION}
        if rank == 0 and 'out' not in flags:
            _write_json(records[-1], Path(path).with_name(Path(path).stem + ('_probe.json' if probe else '_eval.json')))
    if rank == 0:
        print_table(records)
        if 'out' in flags:
            _write_json(records, Path(flags['out']))
    if world_size > 1:
        dist.destroy_process_group()
    return records


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
