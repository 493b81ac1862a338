"""What the training step asks of its device (bench/dispatch.py's counter, on the 'meta' device that takes a GPU's code
paths): augment.finish_views in a fixed set of batched ops that never block or sync, equal to the per-sample views;
train.train_step syncing the host once per optimizer step, never inside the gradient accumulation."""
import contextlib
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as tnf
from PIL import Image

import augment
import config
import data as D
import train
from bench.dispatch import count
from config import Config
from test_train import TINY_FLAGS


def photo(seed, size):
    """A smooth colour field with noise."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    noisy = np.asarray(field, dtype=np.int16) + rng.integers(-20, 21, (size[1], size[0], 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def step_batch(cfg, images):
    """A batch as the loader makes it (SampleMaker, collate), from PIL images."""
    make = D.SampleMaker(cfg, lambda texts: torch.zeros(len(texts), 77, dtype=torch.long))
    return D.collate([make(img, ('a',), 0, i, 0) for i, img in enumerate(images)])


MIXED = dict(color_jitter_prob=0.5, grayscale_prob=0.5, blur_prob=0.5, solarize_prob=0.5)  # every op on and off


# --- finish_views: a fixed set of ops, no blocking copy, no sync ---
@pytest.mark.parametrize('views,most', [(dict(image_size=224, local_crop_size=224, num_augs=2), 200),  # cc3m recipe
                                        (dict(image_size=64, local_crop_size=32, num_augs=2, **MIXED), 250),
                                        (dict(image_size=32, local_crop_size=32, num_augs=0), 80)],
                         ids=['cc3m', 'smaller-strong', 'clip'])
def test_finish_views_takes_the_same_few_ops_at_any_batch_size(views, most):
    """A fixed set of ops whatever the batch: ~200 for the cc3m recipe's 3 views; a second view size (29M's 192 px
    strong views) adds a second resize."""
    cfg = Config(augment_device='cuda', **views)
    images = [photo(i, (60 + 7 * i % 50, 45 + 11 * i % 40)) for i in range(48)]
    counts = []
    for n in (16, 48):
        batch = step_batch(cfg, images[:n])
        augment.finish_views(batch, cfg, torch.device('meta'))  # constants are made once per device, before
        with count('meta') as c:
            weak, strong = augment.finish_views(batch, cfg, torch.device('meta'))
        assert weak.shape == (n, 3, cfg.image_size, cfg.image_size) and len(strong) == cfg.num_augs
        assert (c.copies, c.blocking_copies, c.syncs) == (3, 0, 0)  # pixels, crops, columns: pinned, not blocking
        counts.append(c.ops)
    assert counts[0] == counts[1] and sum(counts[0].values()) <= most, counts[0]


def test_views_from_the_workers_are_normalised_on_the_device_in_a_few_ops():
    cfg = Config(image_size=32, local_crop_size=32, num_augs=2)
    batch = step_batch(cfg, [photo(i, (50, 40)) for i in range(8)])
    assert batch['weak'].dtype == torch.uint8 and all(s.dtype == torch.uint8 for s in batch['strong'])
    with count('meta') as c:
        augment.finish_views(batch, cfg, torch.device('meta'))
    assert (c.copies, c.blocking_copies, c.syncs) == (3, 0, 0) and c.device_ops <= 5 * 3


# --- finish_views batched == per sample ---
def resize_in_float(crop, size):
    """(3, h, w) uint8 -> (3, size, size) uint8, torch's float kernel: width, then height, each pass rounded and
    clamped (the step's resize off the CPU, crop by crop)."""
    out = crop[None].float()
    for shape in ((crop.shape[-2], size), (size, size)):
        out = tnf.interpolate(out, size=shape, mode='bicubic', antialias=True, align_corners=False)
        out = out.round_().clamp_(0, 255)
    return out[0].to(torch.uint8)


def same_but_rare_levels(got, want, rare=1e-2):
    """uint8 crops equal but for a level at rare exact halves (float summation order)."""
    diff = (got.int() - want.int()).abs()
    return diff.max() <= 1 and diff.bool().float().mean() < rare


@pytest.mark.parametrize('sizes', [(24, 24), (24, 16)])
def test_batched_views_equal_views_finished_one_by_one(sizes, monkeypatch):
    """The GPU's batched kernels (run here on the CPU) on a batch mixing crop boxes, image sizes, a large image that
    ships its views and every photometric op on and off, against each sample's crops resized one by one in float and
    its strong views finished alone (the workers' path), from the same crops."""
    monkeypatch.setattr(augment, 'batched_kernels', lambda device: True)
    cfg = Config(augment_device='cuda', image_size=sizes[0], local_crop_size=sizes[1], num_augs=2, **MIXED)
    views = augment.ImageViews(cfg)
    images = [photo(i, (30 + 5 * i, 20 + (7 * i) % 40)) for i in range(15)] + [photo(99, (96, 72))]
    drawn = [views.draw_for_step(img, torch.Generator().manual_seed(i)) for i, img in enumerate(images)]
    assert {len(parts) for parts, _, _ in drawn} == {1, 3}  # regions, and the large image's views
    batch = D.collate([{'images': parts, 'boxes': boxes, 'photometric': columns, 'tokens': torch.zeros(3, 5)}
                       for parts, boxes, columns in drawn])
    weak, strong = augment.finish_views(batch, cfg, torch.device('cpu'))
    n, stats = len(drawn), (cfg.image_mean, cfg.image_std)
    crops = [augment.resize_crops(batch['pixels'], batch['crops'][:, v * n:(v + 1) * n],
                                  batch['crops'][:, v * n:(v + 1) * n], size)
             for v, size in enumerate(augment.view_sizes(cfg))]  # (B, 3, size, size) per view, as the step makes them
    for b, (parts, boxes, columns) in enumerate(drawn):
        for (i, t, left, h, w), size, crop in zip(boxes.tolist(), augment.view_sizes(cfg), crops):
            assert same_but_rare_levels(augment.to_uint8(crop[b]), resize_in_float(parts[i][:, t:t + h, left:left + w],
                                                                                   size))
        assert torch.equal(weak[b], augment.standardize_(crops[0][b].clone(), *stats))
        for v, crop in enumerate(crops[1:]):
            one = columns[v][:, None]
            want = augment.finish_strong(crop[b:b + 1].clone(), one, augment.active_columns(one))[0]
            torch.testing.assert_close(strong[v][b], augment.standardize_(want, *stats), atol=2e-6, rtol=0)


def test_batched_resize_is_torchs_float_resize(monkeypatch):
    """Per-crop bicubic weights in two bmm passes against interpolate crop by crop, shrinking and enlarging: the
    same rounding up to float summation order (a level at the rare exact halves)."""
    monkeypatch.setattr(augment, 'batched_kernels', lambda device: True)
    g = torch.Generator().manual_seed(0)
    images, boxes = [], []
    for h, w in torch.randint(20, 160, (24, 2), generator=g).tolist():
        x = torch.randint(0, 256, (1, 3, h, w), generator=g).float()
        images.append([tnf.avg_pool2d(x, 3, 1, 1)[0].round().to(torch.uint8)])  # some smoothness, as photos have
        bh, bw = (int(torch.randint(4, n + 1, (1,), generator=g)) for n in (h, w))
        boxes.append([(0, int(torch.randint(0, h - bh + 1, (1,), generator=g)),
                       int(torch.randint(0, w - bw + 1, (1,), generator=g)), bh, bw)])
    packed = augment.pack_views(images, torch.tensor(boxes), torch.zeros(24, 0, len(augment.IDENTITY)))
    for size in (17, 48, 96):
        got = augment.to_uint8(augment.resize_crops(packed['pixels'], packed['crops'], packed['crops'], size))
        want = torch.stack([resize_in_float(x[0][:, t:t + h, left:left + w], size)
                            for x, [(_, t, left, h, w)] in zip(images, boxes)])
        assert same_but_rare_levels(got, want, rare=1e-3)  # of 24 crops' pixels


def test_blur_as_convolutions_equals_the_shifted_adds():
    sigmas = [0.1, 0.5, 1.2, 1.9, None]  # None: not blurred (identity taps)
    taps = torch.tensor([augment.blur_taps(s, augment.BLUR_WIDTH) if s else augment.IDENTITY[augment.TAPS:]
                         for s in sigmas])
    img = torch.rand(len(sigmas), 3, 13, 17, generator=torch.Generator().manual_seed(0))
    want = augment.gaussian_blur(img, taps)  # the CPU's path
    torch.testing.assert_close(augment.box_passes(img, taps), want, atol=1e-6, rtol=0)
    assert torch.equal(want[-1], img[-1])


# --- train_step: one sync per optimizer step, none inside the accumulation ---
@pytest.mark.parametrize('augment_device', ['cpu', 'cuda'])
def test_a_step_of_four_micro_batches_syncs_once_and_never_blocks(augment_device):
    cfg = config.resolve({**TINY_FLAGS, 'update_freq': '4', 'augment_device': augment_device}, verbose=False)
    tokenizer = D.build_tokenizer(cfg)
    batches = iter(list(D.build_train_loader(cfg, tokenizer))[:8])
    device = torch.device('meta')
    model, momentum_model, optimizer, scaler = train.build_training(cfg, tokenizer.vocab_size, device, 0, 1)
    loop = train.Loop(log=train.new_sums(device), epoch_sums=train.new_sums(device))
    step = (cfg, model, model, momentum_model, optimizer, scaler, contextlib.nullcontext(), batches, 1e-3, loop, 1)
    with count('meta'):  # the first step makes the constants
        train.train_step(*step)
    with count('meta') as c:
        assert train.train_step(*step) is False
    assert loop.step == 2 and loop.batch == 8
    # per micro-batch: the views (3 tensors either way), the tokens and the skipped counts
    assert (c.copies, c.blocking_copies, c.syncs) == (4 * 5, 0, 1)


def _two_ranks(rank, init_file, results):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = config.resolve({**TINY_FLAGS, 'update_freq': '4', 'batch_size': '2'}, verbose=False)
    tokenizer = D.build_tokenizer(cfg)
    batches = iter(list(D.build_train_loader(cfg, tokenizer, rank, 2))[:8])
    device = torch.device('cpu')
    model, momentum_model, _, scaler = train.build_training(cfg, tokenizer.vocab_size, device, rank, 2)
    # SGD reads no step counters on the host (AdamW reads its CPU ones here; fused on a GPU, it reads none)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = train.Loop(log=train.new_sums(device), epoch_sums=train.new_sums(device))
    step = [cfg, train.wrap_model(model, cfg, device, 2), model, momentum_model, optimizer, scaler,
            contextlib.nullcontext(), batches, 0.1, loop, 2]
    train.train_step(*step)  # DDP's first step builds its buckets
    marks = []
    with count('cpu') as c:
        def marked():  # what was counted when each micro-batch is asked for
            for batch in batches:
                marks.append((c.syncs, dict(c.collectives)))
                yield batch
        step[7] = marked()
        train.train_step(*step)
    torch.save({'marks': marks, 'syncs': c.syncs, 'collectives': dict(c.collectives)}, f'{results}.{rank}')
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_sync_once_after_the_last_micro_batch(tmp_path):
    """Under gloo (on the CPU, the host's reads of values count as syncs): no read until the last micro-batch, then
    one, for the agreement. The collectives inside the accumulation are the forward's and backward's own (the loss's
    feature gathers; asynchronous on NCCL), the same at every micro-batch; the last adds the gradients' all-reduce and
    the agreement."""
    mp.spawn(_two_ranks, args=(str(tmp_path / 'init'), str(tmp_path / 'res')), nprocs=2)
    for rank in range(2):
        res = torch.load(tmp_path / f'res.{rank}')
        marks = res['marks']
        assert len(marks) == 4 and all(syncs == 0 for syncs, _ in marks) and res['syncs'] == 1
        micro = [Counter(b) - Counter(a) for (_, a), (_, b) in zip(marks, marks[1:])]  # micro-batches 0, 1, 2
        assert micro[1] == micro[2] and res['collectives']['allreduce_'] >= 4 * micro[1]['allreduce_'] + 2
