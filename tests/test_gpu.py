"""CUDA paths (SDPA kernels, bf16 autocast, single-GPU training with torch.compile, gradient caching with the CUDA
RNG and fp16, and on two GPUs NCCL with SyncBatchNorm and fused AdamW); run by bench/gpu_check.sh on a GPU machine.
Skipped without CUDA."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
from model import build_model, compute_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]
ROOT = Path(__file__).resolve().parents[1]
TINY = ['--vision_layers=2', '--text_layers=2', '--demo_train_size=512', '--batch_size=32', '--workers=2']


def tiny_cfg(*flags):
    return config.resolve(config._split_flags(list(flags)), verbose=False)


def test_bf16_cuda_forward_matches_fp32_cpu():
    cfg = tiny_cfg('--method=rocket')
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=1000).eval()
    images = torch.randn(4, 3, cfg.image_size, cfg.image_size)
    tokens = torch.randint(1, 998, (4, cfg.context_length))
    tokens[:, 10] = 999  # EOT = the largest id
    ref_i, ref_t = model.encode_image(images), model.encode_text(tokens)
    model.cuda()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out_i, out_t = model.encode_image(images.cuda()), model.encode_text(tokens.cuda())
    cos = torch.nn.functional.cosine_similarity
    assert cos(out_i.float().cpu(), ref_i).min() > 0.99
    assert cos(out_t.float().cpu(), ref_t).min() > 0.99


def test_bf16_loss_and_grads_are_finite_on_cuda():
    cfg = tiny_cfg('--method=swalip')
    model = build_model(cfg, vocab_size=1000).cuda().train()
    B, A, S = 8, cfg.num_augs, cfg.image_size
    tokens = torch.randint(1, 998, (B, 1 + A, cfg.context_length), device='cuda')
    tokens[..., 12] = 999
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = model(torch.randn(B, 3, S, S, device='cuda'), tokens,
                    [torch.randn(B, 3, S, S, device='cuda') for _ in range(A)])
        loss = compute_loss(out, cfg)['loss']
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def train_losses(command, out):
    """Run a training command; its logged training losses, in order."""
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(l)['loss'] for l in (out / 'log.jsonl').read_text().splitlines()
            if json.loads(l)['type'] == 'train']


def test_tiny_training_with_compile_lowers_the_loss(tmp_path):
    losses = train_losses([sys.executable, 'train.py', *TINY, '--compile', '--device=cuda', '--max_steps=40',
                           '--eval_every=0', '--log_every=10', f'--output_dir={tmp_path}'], tmp_path)
    assert losses[-1] < losses[0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='NCCL needs two GPUs (one rank per device)')
def test_two_gpu_nccl_training_with_sync_batchnorm(tmp_path):
    """torchrun on two GPUs: NCCL gathers and all-reduces, SyncBatchNorm in the rocket MLP heads, fused AdamW."""
    losses = train_losses([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           'train.py', *TINY, '--device=cuda', '--max_steps=40', '--eval_every=0', '--log_every=10',
                           f'--output_dir={tmp_path}'], tmp_path)
    assert losses[-1] < losses[0]


def test_gradient_caching_replays_the_cuda_draws():
    """--chunk on a GPU: patch and text dropout drawn from the CUDA generator are replayed in the second pass (the
    cached step equals encoding each chunk once with a graph under the same RNG)."""
    from test_gradient_caching import assert_same, build, cfg_of, inputs_of, reference, step
    cfg = cfg_of('rocket', chunk=2, text_dropout=0.3, patch_dropout_weak=0.25, patch_dropout_strong=0.5)
    net = build(cfg)[0].cuda()
    weak, tokens, strong = inputs_of(cfg)
    inputs = (weak.cuda(), tokens.cuda(), [s.cuda() for s in strong])
    torch.manual_seed(5)
    ref = reference(cfg, net, None, inputs)
    torch.manual_seed(5)
    cached = step(cfg, net, None, inputs)
    assert_same(cached[1], ref[1], tol=1e-4)


def test_chunked_fp16_training_lowers_the_loss(tmp_path):
    """The GradScaler's scale travels through the cached feature gradients once: fp16 training in chunks learns."""
    losses = train_losses([sys.executable, 'train.py', *TINY, '--device=cuda', '--chunk=8', '--precision=fp16',
                           '--max_steps=40', '--eval_every=0', '--log_every=10', f'--output_dir={tmp_path}'], tmp_path)
    assert losses[-1] < losses[0]
