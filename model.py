"""CLIP 🚀 model (recipe §1): ResNet-50 and ViT image encoders, the CLIP text transformer, every method's projectors
and losses, the METHODS table, and the model's weights in and out (released formats, their renames, export to
open_clip). build_model(cfg, vocab_size) -> CLIPModel; model(weak, tokens, strong) -> dict of embeddings,
= model.project(*model.trunks(weak, tokens, strong)) (features, then heads: the split gradient caching needs);
model.encode_image/encode_text (one head), model.encode_image_heads/encode_text_heads (all heads from one trunk
pass)."""
import argparse
import math
import pathlib
import re
from collections import OrderedDict, namedtuple
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# --- Gradient checkpointing ---
@contextmanager
def restore_buffers(module):
    """Put the module's buffers (BN running statistics) back as they were once the block exits: a recomputation (in
    the backward pass, or gradient caching's second forward) must not count the same batch twice."""
    saved = [(b, b.clone()) for b in module.buffers()]
    try:  # the recomputation may stop early with an exception, once it has what the backward needs
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def maybe_checkpoint(module, enabled, *args):
    """module(*args); with `enabled` (and autograd recording) its activations are recomputed in the backward pass
    instead of stored. Outputs, gradients, RNG draws (dropout) and BN running statistics are unchanged."""
    if not (enabled and torch.is_grad_enabled()):
        return module(*args)
    if next(module.buffers(), None) is None or torch.compiler.is_compiling():
        # nothing to restore; torch.compile takes no context_fn (its recomputation updates BN statistics again)
        return checkpoint(module, *args, use_reentrant=False)
    return checkpoint(module, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), restore_buffers(module)))


# --- ResNet-50 ---
class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 -> 3x3 (stride here) -> 1x1 (x4 channels), projection shortcut on shape change."""

    def __init__(self, in_channels, width, stride):
        super().__init__()
        out_channels = 4 * width
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None if stride == 1 and in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet50(nn.Module):
    """Standard (torchvision/timm) ResNet-50 v1.5 trunk, no fc: (B, 3, H, W) -> (B, 2048) (recipe §1.2). Other
    stage widths and depths give the same family (the importer's tests use a shrunk one)."""

    def __init__(self, widths=(64, 128, 256, 512), depths=(3, 4, 6, 3)):
        super().__init__()
        self.width = 4 * widths[-1]
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, in_channels = [], 64
        for width, blocks, stride in zip(widths, depths, (1, 2, 2, 2)):
            stages.append(nn.Sequential(*[Bottleneck(in_channels if i == 0 else 4 * width, width, stride if i == 0 else 1)
                                          for i in range(blocks)]))
            in_channels = 4 * width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.grad_checkpointing = False  # per stage, as timm's checkpoint_seq
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, Bottleneck):  # zero-init the last BN: every residual block starts as the identity
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x):  # (B, 3, H, W)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = maybe_checkpoint(stage, self.grad_checkpointing, x)
        return x.mean((2, 3))  # global average pool of (B, 2048, H/32, W/32) -> (B, 2048)


# --- Transformer ---
class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype (safe under autocast)."""

    def forward(self, x):
        return super().forward(x.float()).type_as(x)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI CLIP's text transformer."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with a packed qkv projection, biases zero-initialised (as nn.MultiheadAttention),
    through scaled_dot_product_attention (flash / memory-efficient kernels on GPU; scale 1/sqrt(head_dim))."""

    def __init__(self, width, heads, causal):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        for proj in (self.in_proj, self.out_proj):  # every encoder's init (timm, OpenAI text and ViT) zeroes them
            nn.init.zeros_(proj.bias)

    def forward(self, x, index=None):  # (B, L, D) -> (B, L, D); with index (B,): (B, 1, D), those queries only
        B, L, D = x.shape
        q, k, v = self.in_proj(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, Dh)
        mask = None
        if index is not None:
            q = q[torch.arange(B, device=x.device), :, index].unsqueeze(2)  # (B, H, 1, Dh)
            if self.causal:  # is_causal aligns a single query with the first key; mask keys after the query
                mask = (torch.arange(L, device=x.device) <= index[:, None])[:, None, None]  # (B, 1, 1, L)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and index is None)
        return self.out_proj(x.transpose(1, 2).reshape(B, -1, D))  # (B, H, L', Dh) -> (B, L', D)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)), MLP ratio 4."""

    def __init__(self, width, heads, act, eps, causal):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, causal)
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), act=act(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, index=None):  # (B, L, D) -> (B, L, D); with index (B,): (B, 1, D) at those positions
        skip = x if index is None else x[torch.arange(x.shape[0], device=x.device), index].unsqueeze(1)
        x = skip + self.attn(self.ln_1(x), index)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks, checkpointed per block when grad_checkpointing is on."""

    def __init__(self, width, layers, heads, act, eps, causal):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, act, eps, causal) for _ in range(layers)])
        self.grad_checkpointing = False

    def forward(self, x, dropout=0.0, index=None):
        """(B, L, D) -> (B, L, D); with index (B,) -> (B, 1, D), the features at those positions: the encoders
        pool one token, so the last block runs its query, out-projection and MLP on that token alone."""
        for i, block in enumerate(self.resblocks):
            # recipe §1.3 'local' mode: the residual stream itself is dropped at the start of every block
            x = F.dropout(x, dropout, self.training)
            x = maybe_checkpoint(block, self.grad_checkpointing, x, index if i == len(self.resblocks) - 1 else None)
        return x


# --- ViT ---
def patch_dropout(x, keep):
    """FLIP's patch dropout: (B, 1+N, D) -> (B, 1+keep, D), the CLS token and a uniformly random subset of `keep`
    patches per sample in raster order, drawn from torch's global RNG on x's device (so checkpoints carry it)."""
    B, L, _ = x.shape
    index = 1 + torch.rand(B, L - 1, device=x.device).topk(keep, dim=1).indices.sort(dim=1).values  # (B, keep)
    index = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=x.device), index], dim=1)  # CLS first
    return x[torch.arange(B, device=x.device)[:, None], index]


class VisionTransformer(nn.Module):
    """timm-style ViT trunk (recipe §1.2): conv patches, CLS token, learned position embedding, pre-norm blocks (LN
    eps 1e-6, exact GELU), final LN, CLS output: (B, 3, H, W) -> (B, width), any multiple of the patch. style='openai':
    OpenAI CLIP's ViT (patch conv without bias, LN before the transformer, eps 1e-5); act: the MLP's activation."""

    def __init__(self, image_size, patch_size, width, layers, heads, style='timm', act=nn.GELU):
        super().__init__()
        openai = style == 'openai'
        eps = 1e-5 if openai else 1e-6
        self.width, self.patch_size, self.grid = width, patch_size, image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=not openai)  # PyTorch's default init (as timm)
        self.class_embedding = nn.Parameter(torch.empty(1, 1, width))
        self.positional_embedding = nn.Parameter(torch.empty(1, 1 + self.grid ** 2, width))
        self.ln_pre = LayerNorm(width, eps=eps) if openai else nn.Identity()
        self.transformer = Transformer(width, layers, heads, act, eps=eps, causal=False)
        self.ln_post = LayerNorm(width, eps=eps)
        (init_openai_vit if openai else init_timm_vit)(self)

    def no_weight_decay(self):
        """Names of parameters that take no weight decay whatever their shape: OpenAI's 1-D class token (open_clip
        leaves it undecayed); timm's (1, 1, D) one is decayed, as in the official code (recipe §5.2)."""
        return {'class_embedding'} if isinstance(self.ln_pre, LayerNorm) else set()

    def interpolate_pos_embed(self, h, w):
        """Position embeddings (1, 1+h*w, D) for an h x w grid: the trained grid resampled bicubically, or itself."""
        if (h, w) == (self.grid, self.grid):
            return self.positional_embedding
        cls, patches = self.positional_embedding[:, :1], self.positional_embedding[:, 1:]
        patches = patches.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        patches = F.interpolate(patches, size=(h, w), mode='bicubic', align_corners=False)  # (1, D, h, w)
        return torch.cat([cls, patches.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x, patch_drop=0.0):  # (B, 3, H, W)
        """CLS features; in training, `patch_drop` > 0 encodes a random (1 - patch_drop) of the patches per sample."""
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of the ViT patch size {self.patch_size}; "
                             f"resize or crop the images to a multiple of it")
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, N, D), N = H/p * W/p
        x = torch.cat([self.class_embedding.expand(B, -1, -1), x], dim=1)  # (B, 1+N, D)
        x = x + self.interpolate_pos_embed(H // self.patch_size, W // self.patch_size)
        if self.training and patch_drop > 0:
            x = patch_dropout(x, max(1, int((x.shape[1] - 1) * (1 - patch_drop))))  # (B, 1+keep, D)
        x = self.ln_pre(x)  # identity unless style='openai'
        cls = torch.zeros(B, dtype=torch.long, device=x.device)
        return self.ln_post(self.transformer(x, index=cls)[:, 0])  # (B, D); LN is per token


def init_timm_vit(vit):
    """timm's ViT init (the official code's, recipe §1.2): every Linear of the blocks trunc-normal 0.02 with zero
    biases, position embedding trunc-normal 0.02, class token std 1e-6; the patch conv keeps PyTorch's default."""
    nn.init.normal_(vit.class_embedding, std=1e-6)
    nn.init.trunc_normal_(vit.positional_embedding, std=0.02)
    for m in vit.transformer.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


def init_openai_vit(vit):
    """OpenAI CLIP's ViT init (open_clip's too, recipe §1.2): embeddings N(0, 1/width), nn.MultiheadAttention's xavier
    in-projection, else PyTorch's Linear default. At small widths it learns far faster than timm's 0.02."""
    nn.init.normal_(vit.class_embedding, std=vit.width ** -0.5)
    nn.init.normal_(vit.positional_embedding, std=vit.width ** -0.5)
    for block in vit.transformer.resblocks:
        nn.init.xavier_uniform_(block.attn.in_proj.weight)


# --- Text transformer ---
class TextTransformer(nn.Module):
    """OpenAI CLIP's text encoder (recipe §1.3): causal pre-norm transformer with QuickGELU and fp32 LN, final
    LN, pooled at the EOT token (the largest id): (B, L) token ids -> (B, width). No projection inside."""

    def __init__(self, vocab_size, context_length, width, layers, heads, act=QuickGELU):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, act, eps=1e-5, causal=True)
        self.ln_final = LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:  # the MLP biases keep PyTorch's default init
            nn.init.normal_(block.attn.in_proj.weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, tokens, dropout=0.0):  # (B, L)
        """Features at the EOT token; `dropout` > 0 is the 'local' mode, active only in training (recipe §1.3)."""
        L = tokens.shape[1]
        if L > self.context_length:
            raise ValueError(f"tokens have {L} positions but the text transformer takes at most "
                             f"{self.context_length}; tokenize with context_length={self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:L]  # (B, L, D)
        # the causal mask makes the EOT feature independent of the padding after it; LN is per token
        return self.ln_final(self.transformer(x, dropout, index=tokens.argmax(dim=-1))[:, 0])  # (B, D)


# --- Projectors and heads ---
def linear_projection(in_dim, out_dim):
    """Bias-free linear head of the global CLIP loss, N(0, 1/in_dim) init (recipe §1.5)."""
    proj = nn.Linear(in_dim, out_dim, bias=False)
    nn.init.normal_(proj.weight, std=in_dim ** -0.5)
    return proj


def mlp(dims, hidden_bias=True, last_bias=True, last_bn=None):
    """[Linear -> BN -> ReLU] for every hidden width of dims, then a Linear; last_bn=True/False appends a BN with
    / without affine parameters. PyTorch's default init. The h, BarLIP, SiamLIP and SLIP heads (recipe §1.5)."""
    layers = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(d_in, d_out, bias=hidden_bias), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
    if last_bn is not None:
        layers.append(nn.BatchNorm1d(dims[-1], affine=last_bn))
    return nn.Sequential(*layers)


# --- CLIP 🚀 model ---
ACTIVATIONS = {'gelu': nn.GELU, 'quickgelu': QuickGELU}  # cfg.vision_act / cfg.text_act


class CLIPModel(nn.Module):
    """Image and text encoders with the heads of cfg.method's row in METHODS: the global linear heads z
    always; the local MLP heads h and l2l_logit_scale when the row lists 'h' and num_augs > 0; its other parts."""

    def __init__(self, cfg, vocab_size):
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size}: pass the tokenizer's vocab_size (> 0)")
        parts, self.text_dropout = METHODS[cfg.method].heads, cfg.text_dropout
        self.patch_dropout = {'weak': cfg.patch_dropout_weak, 'strong': cfg.patch_dropout_strong}
        self.visual = (ResNet50() if cfg.vision == 'resnet50' else
                       VisionTransformer(cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_layers,
                                         cfg.vision_heads, cfg.vit_style, ACTIVATIONS[cfg.vision_act]))
        self.text = TextTransformer(vocab_size, cfg.context_length, cfg.text_width, cfg.text_layers, cfg.text_heads,
                                    ACTIVATIONS[cfg.text_act])
        v, t, d, hidden = self.visual.width, cfg.text_width, cfg.embed_dim, cfg.mlp_hidden_dim
        self.image_heads = nn.ModuleDict({'z': linear_projection(v, d)})
        self.text_heads = nn.ModuleDict({'z': linear_projection(t, d)})
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        local = 'h' in parts and cfg.num_augs > 0  # the local heads project the strong views only
        if local:
            self.image_heads['h'] = mlp([v, hidden, hidden, d])
            self.text_heads['h'] = mlp([t, hidden, hidden, d])
            self.l2l_logit_scale = nn.Parameter(torch.tensor(float(cfg.l2l_logit_scale_init)))
        if 'bias' in parts:  # SigLIP's learned logit bias, one per scale
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.logit_bias_init)))
            if local:
                self.l2l_logit_bias = nn.Parameter(torch.tensor(float(cfg.logit_bias_init)))
        self.barlip = 'barlip' in parts
        if self.barlip:
            dims = [cfg.barlip_hidden_dim, cfg.barlip_hidden_dim, cfg.barlip_proj_dim]
            self.barlip_image, self.barlip_text = mlp([v, *dims], last_bn=True), mlp([t, *dims], last_bn=True)
        self.siam = 'siam' in parts
        if self.siam:
            hs, ps = cfg.siamlip_hidden_dim, cfg.siamlip_proj_dim
            self.siam_proj_image = mlp([v, hs, ps], hidden_bias=False, last_bias=False, last_bn=False)
            self.siam_proj_text = mlp([t, hs, ps], hidden_bias=False, last_bias=False, last_bn=False)
            self.siam_pred_image = mlp([ps, hs, ps], hidden_bias=False)  # the official image_text_predictor
            self.siam_pred_text = mlp([ps, hs, ps], hidden_bias=False)   # text_image_predictor
        self.slip = 'slip' in parts
        if self.slip:
            self.slip_image = mlp([v, hidden, hidden, 256])  # SLIP's SimCLR image MLP (recipe §2.8)

    @property
    def heads(self):
        """The heads encode_image / encode_text offer: ('z',) or ('z', 'h')."""
        return tuple(self.image_heads)

    def _head(self, heads, head):
        if head not in heads:
            raise ValueError(f"head {head!r} is not in this model's heads {self.heads}; the local head 'h' exists "
                             f"for the methods with local heads (METHODS) with num_augs > 0")
        return heads[head]

    def encode_image(self, images, head='z'):
        """(B, 3, H, W) -> (B, embed_dim) through head 'z' or 'h'; not normalised."""
        return self._head(self.image_heads, head)(self.visual(images))

    def encode_text(self, tokens, head='z'):
        """(B, L) token ids -> (B, embed_dim) through head 'z' or 'h' (global mode: no dropout); not normalised."""
        return self._head(self.text_heads, head)(self.text(tokens))

    def encode_image_heads(self, images):
        """{head: (B, embed_dim)} for every head from one backbone pass (evaluation scores all heads)."""
        features = self.visual(images)
        return {head: project(features) for head, project in self.image_heads.items()}

    def encode_text_heads(self, tokens):
        """{head: (B, embed_dim)} for every head from one text-encoder pass (global mode)."""
        features = self.text(tokens)
        return {head: project(features) for head, project in self.text_heads.items()}

    def _image_features(self, views, kind):
        """Backbone features of a list of views. The ResNet sees each view as its own BN batch (recipe §1.7, 8.9);
        the ViT has no BN: one call on them all, dropping patch_dropout[kind] of the patches in training."""
        if isinstance(self.visual, ResNet50):
            return [self.visual(view) for view in views]
        if not views:
            return []
        x = views[0] if len(views) == 1 else torch.cat(views)  # the weak view alone: no copy of the batch
        return list(self.visual(x, self.patch_dropout[kind]).chunk(len(views)))

    def _local_text_features(self, tokens):  # (B, A, L) -> A x (B, text_width)
        """Caption rows 1..A in local mode (residual-stream dropout); one call, as the text tower has no BN."""
        A, rows = tokens.shape[1], tokens.transpose(0, 1).flatten(0, 1)  # (A*B, L), by view
        return list(self.text(rows, self.text_dropout).chunk(A)) if A else []

    def forward(self, weak, tokens, strong):
        """Training forward (recipe §1.7): weak (B, 3, S, S), tokens (B, 1+A, L), strong A x (B, 3, R, R) ->
        dict of raw embeddings named as in the contract; A = 0 is the same path."""
        return self.project(*self.trunks(weak, tokens, strong))

    def trunks(self, weak, tokens, strong):
        """The encoders' features of a batch, before any head: (images, texts), 1+A x (B, width) each (the weak view
        and caption row 0, then the A strong views and rows); the weak pair alone for plain CLIP."""
        if tokens.dim() != 3 or tokens.shape[1] != 1 + len(strong):
            raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not match {len(strong)} strong views: "
                             f"expected (B, 1+A, L) with A = len(strong) = {len(strong)}")
        local = 'h' in self.image_heads  # plain CLIP never looks at the strong views
        f_image = self._image_features([weak], 'weak') + (self._image_features(strong, 'strong') if local else [])
        f_text = [self.text(tokens[:, 0])] + (self._local_text_features(tokens[:, 1:]) if local else [])
        return f_image, f_text

    def project(self, f_image, f_text):
        """Every head on the trunks' features (trunks' output) -> the dict of raw embeddings. The heads' BN sees
        what it is given as one batch: gradient caching hands it a rank's whole batch."""
        out = {'z_image': self.image_heads['z'](f_image[0]), 'z_text': self.text_heads['z'](f_text[0]),
               'logit_scale': self.logit_scale.exp()}
        if 'h' in self.image_heads:  # one head call per view: each view is its own BN batch in the MLP heads
            out['h_image'] = [self.image_heads['h'](f) for f in f_image[1:]]
            out['h_text'] = [self.text_heads['h'](f) for f in f_text[1:]]
            out['l2l_logit_scale'] = self.l2l_logit_scale.exp()
        out.update({name: getattr(self, name) for name in ('logit_bias', 'l2l_logit_bias') if hasattr(self, name)})
        if self.barlip:
            out['barlip_image'] = [self.barlip_image(f) for f in f_image]
            out['barlip_text'] = [self.barlip_text(f) for f in f_text]
        if self.siam:
            out['siam_proj_image'] = [self.siam_proj_image(f) for f in f_image]
            out['siam_proj_text'] = [self.siam_proj_text(f) for f in f_text]
            out['siam_pred_image'] = [self.siam_pred_image(p) for p in out['siam_proj_image']]
            out['siam_pred_text'] = [self.siam_pred_text(p) for p in out['siam_proj_text']]
        if self.slip:
            out['slip_image'] = [self.slip_image(f) for f in f_image[1:]]
        return out

    def set_grad_checkpointing(self, flag=True):
        """Recompute activations in the backward pass: per block for transformers, per stage for the ResNet."""
        for m in self.modules():
            if hasattr(m, 'grad_checkpointing'):
                m.grad_checkpointing = flag


def build_model(cfg, vocab_size, verbose=True):
    """The model of cfg (recipe §1) for a vocabulary of vocab_size tokens; prints each part's parameter count."""
    model = CLIPModel(cfg, vocab_size)
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in model.named_children()}
    counts['logit scales'] = sum(p.numel() for name, p in model.named_parameters(recurse=False))
    if verbose:
        print(f"model: {cfg.method} with {cfg.vision} image encoder, parameters: "
              + ', '.join(f'{name} {n:,}' for name, n in counts.items()) + f"; total {sum(counts.values()):,}")
    return model


# --- Mixed precision ---
def autocast_dtype(cfg, device):
    """'auto' = bf16 autocast on GPUs with native bf16 (Ampere on; no GradScaler needed), fp16 on older ones (V100,
    T4: bf16 there is emulated, several times slower; train.py adds a GradScaler), fp32 on CPU."""
    if cfg.precision == 'auto':
        if device.type != 'cuda':
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}[cfg.precision]


# --- Distributed gather ---
def _world():
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(x):
    parts = [torch.empty_like(x) for _ in range(_world()[1])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _all_reduce(x):
    """The sum of x over ranks, in a new tensor."""
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x)
    return x


class _AllGather(torch.autograd.Function):
    """all_gather whose backward is its exact adjoint: sum every rank's gradient, keep this rank's slice. Each rank's
    loss is a mean over its B rows and DDP divides by W: the gradient of the mean over all W*B rows, no extra W."""

    @staticmethod
    def forward(ctx, x):
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad):  # (W*B, ...)
        rank, world = _world()
        return _all_reduce(grad).chunk(world)[rank]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the gradient over ranks too (exact when every rank uses the result)."""

    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


def gather(x, with_grad, dim=0):
    """Every rank's x in rank order, concatenated along dim (B -> W*B, recipe §2.1). with_grad: the exact gradient
    (W x B == 1 x W*B); else the paper's, a constant (gradient via anchors only), but at W = 1 the identity (§8.5)."""
    if _world()[1] == 1:
        return x
    x = x.transpose(0, dim)
    return (_AllGather.apply(x) if with_grad else _all_gather(x.detach())).transpose(0, dim)


def all_reduce_mean(x, with_grad):
    """Mean of x over ranks. with_grad=True: exact (2 ranks x B == 1 rank x 2B). False: the paper's, other
    ranks' terms are constants so the gradient reaching x is scaled by 1/W (recipe §2.4, 8.6)."""
    world = _world()[1]
    if world == 1:
        return x
    return (_AllReduceSum.apply(x) if with_grad else x + (_all_reduce(x.detach()) - x.detach())) / world


def _positives(batch_size, device):
    """Column of each local row's positive in the gathered matrix: rank*B + r."""
    return _world()[0] * batch_size + torch.arange(batch_size, device=device)


# --- Losses ---
def _similarities(anchors, candidates):
    """Anchors (V, B, D) x candidates (U, N, D) -> (V, U, B, N) in one matmul, fp32 (the matmul may run in bf16)."""
    return torch.einsum('vbd,und->vubn', anchors, candidates).float()


def _info_nce(anchors, candidates, scale, label_smoothing):
    """Mean over the V x U view pairs and the B rows of CE_eps(scale * cosines, rank*B + r); top-1 acc in %."""
    logits = scale * _similarities(anchors, candidates)               # (V, U, B, N)
    labels = _positives(anchors.shape[1], anchors.device).expand(logits.shape[:-1])  # (V, U, B)
    loss = F.cross_entropy(logits.flatten(0, 2), labels.flatten(), label_smoothing=label_smoothing)
    acc = 100 * (logits.argmax(-1) == labels).float().mean()
    return loss, acc


def clip_loss(image, text, logit_scale, label_smoothing=0.0, reduction='avg', with_grad=True):
    """Symmetric InfoNCE over the global batch, ½(L_I + L_T) ('avg') or L_I + L_T ('sum') (recipe §2.2). image, text:
    (B, D), or (V, B, D) averaged over the V x V view pairs (the local term, §2.3). logit_scale: exponentiated."""
    image = F.normalize(image.float(), dim=-1).reshape(-1, *image.shape[-2:])   # (V, B, D)
    text = F.normalize(text.float(), dim=-1).reshape(-1, *text.shape[-2:])
    image_loss, image_acc = _info_nce(image, gather(text, with_grad, dim=1), logit_scale, label_smoothing)
    text_loss, text_acc = _info_nce(text, gather(image, with_grad, dim=1), logit_scale, label_smoothing)
    factor = {'avg': 0.5, 'sum': 1.0}[reduction]
    return {'loss': factor * (image_loss + text_loss), 'image_loss': image_loss, 'text_loss': text_loss,
            'image_acc': image_acc, 'text_acc': text_acc}


def rocket_loss(z_image, z_text, h_image, h_text, logit_scale, l2l_logit_scale, label_smoothing=0.1,
                reduction='avg', with_grad=True):
    """CL2L (recipe §2.3): (G + A*Lc) / (1+A) per direction, G the global z pair without label smoothing,
    Lc the mean over the A x A strong h pairs with smoothing and l2l_logit_scale. A = 0 is clip_loss."""
    g = clip_loss(z_image, z_text, logit_scale, 0.0, reduction, with_grad)
    A = len(h_image)
    losses = {'loss': g['loss'], 'global_loss': g['loss'], 'global_acc': g['image_acc']}
    if A > 0:
        local = clip_loss(torch.stack(h_image), torch.stack(h_text), l2l_logit_scale, label_smoothing, reduction,
                          with_grad)
        # linear in the directions, so combining the symmetric averages equals ½(C_I + C_T)
        losses.update(loss=(g['loss'] + A * local['loss']) / (1 + A), local_loss=local['loss'],
                      local_acc=local['image_acc'])
    return losses


def slip_loss(image1, image2, temperature=0.1):
    """SimCLR NT-Xent between two strong image views as in SLIP (recipe §2.8): row r of each view against
    the other view's N gathered rows (positive: the same sample) and its own view's N - 1 others."""
    q = F.normalize(torch.stack([image1, image2]).float(), dim=-1)   # (2, B, D)
    k = gather(q, with_grad=True, dim=1)                             # (2, N, D); SLIP gathers with gradient
    B, N = q.shape[1], k.shape[1]
    labels = _positives(B, q.device)
    logits = _similarities(q, k) / temperature                       # (2, 2, B, N): view v rows, view u columns
    same_row = labels[:, None] == torch.arange(N, device=q.device)    # (B, N)
    own = torch.eye(2, dtype=torch.bool, device=q.device)[:, :, None, None] & same_row  # (2, 2, B, N)
    logits = logits.masked_fill(own, float('-inf')).transpose(1, 2).reshape(2 * B, 2 * N)  # rows (v, r), cols (u, n)
    target = torch.cat([labels + N, labels])                        # view 0's positive sits in view 1's columns
    return {'loss': F.cross_entropy(logits, target), 'slip_acc': 100 * (logits.argmax(-1) == target).float().mean()}


def _view_pairs(A):
    """The global pair (0, 0) and the A x A local pairs of 1+A views (no global-local cross pairs)."""
    return [(0, 0)] + [(a, b) for a in range(1, A + 1) for b in range(1, A + 1)]


def barlow_twins(x, y, lambd, with_grad=True):
    """Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij² with C = x^T y / B the global-batch cross-correlation (recipe §2.4)."""
    with torch.autocast(x.device.type, enabled=False):  # recipe §8.6: the correlation in fp32
        c = x.float().t() @ y.float() / x.shape[0]         # (Db, Db) on this rank
        # equal B on every rank: the global-batch correlation. with_grad=True deviates from the paper, whose
        # BarLIP gradient is scaled by 1/W after DDP averaging (recipe §2.4); here W x B == 1 x W*B exactly.
        c = all_reduce_mean(c, with_grad)
        diag = c.diagonal()
        return (1 - diag).pow(2).sum() + lambd * (c.pow(2).sum() - diag.pow(2).sum())


def barlip_loss(image, text, lambd=5e-3, scale=0.025, with_grad=True):
    """BarLIP (recipe §2.4): scale * mean of barlow_twins over the global and A x A local pairs of 1+A (B, Db) views."""
    pairs = _view_pairs(len(image) - 1)
    return {'loss': scale * sum(barlow_twins(image[a], text[b], lambd, with_grad) for a, b in pairs) / len(pairs)}


def _neg_cosine(p, v):
    """D(p, v) = 2 - 2 mean_r cos(p_r, sg(v_r))."""
    return 2 - 2 * (F.normalize(p.float(), dim=-1) * F.normalize(v.detach().float(), dim=-1)).sum(-1).mean()


def siamlip_loss(pred_image, pred_text, proj_image, proj_text):
    """SiamLIP / BYOLIP (recipe §2.5): cross-modal D(p, v) both ways over the global and A x A local pairs, / (2 + 2A²).
    Lists of 1+A (B, Ds); proj_* the momentum model's for BYOLIP. Per-rank mean: DDP's averaging makes it global."""
    pairs = _view_pairs(len(pred_image) - 1)
    total = sum(_neg_cosine(pred_image[a], proj_text[b]) + _neg_cosine(pred_text[a], proj_image[b]) for a, b in pairs)
    return {'loss': total / (2 * len(pairs))}


@torch.no_grad()
def sinkhorn(scores, epsilon=0.05, iters=3):
    """Sinkhorn-Knopp in fp32 log domain (recipe §2.6): (..., B, K) cosines of this rank's samples with K prototypes
    -> assignments (..., B, K), rows sum to 1, each prototype ~B*W/K over all ranks."""
    # as the official steps: their divisions by constants (total, K, B*W, last *B*W) are shifts the row step cancels
    log_q = scores.float() / epsilon
    for _ in range(iters):
        col = torch.logsumexp(log_q, dim=-2, keepdim=True)           # (..., 1, K) over this rank's samples
        log_q = log_q - torch.logsumexp(gather(col[None], False), dim=0)  # over every rank's samples
        log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
    return log_q.exp()


def swalip_loss(h_image, h_text, l2l_logit_scale, epsilon=0.05, iters=3, with_grad=True):
    """SwALIP (recipe §2.6): prototypes = the other modality's gathered h; pair (a, b) is trained toward the Sinkhorn
    assignment of pair (a+1, b+1) mod A: the paper's 'other' pair at A = 2, a derangement at A > 1, itself at A = 1."""
    image = F.normalize(torch.stack(h_image).float(), dim=-1)    # (A, B, D)
    text = F.normalize(torch.stack(h_text).float(), dim=-1)
    loss = 0
    for anchors, prototypes in ((image, text), (text, image)):  # ½ H(Q_I, p_I) + ½ H(Q_T, p_T)
        s = _similarities(anchors, gather(prototypes, with_grad, dim=1))  # (A, A, B, N) S^(ab)
        q = sinkhorn(s, epsilon, iters).roll((-1, -1), dims=(0, 1))       # q[a, b] = Q^(ā b̄)
        loss = loss - 0.5 * (q * F.log_softmax(l2l_logit_scale * s, dim=-1)).sum(-1).mean()
    return {'loss': loss}


def siglip_loss(z_image, z_text, logit_scale, logit_bias):
    """SigLIP (Zhai et al., 2023; recipe §2.9): Σ over the B x N pairs of -log σ(±(t <x, y> + b)), + on the positives,
    / B. z_*: (B, D) or (V, B, D), averaged over the V x U view pairs. logit_scale: t, exponentiated."""
    # Exact under DDP: this rank's B images against every rank's texts, gathered with gradient (one all-gather, as
    # clip_loss; the mean over ranks of B-row losses is the W*B-row loss). The paper's ring of W - 1 chunk
    # exchanges gives the same numbers and only saves memory at batches far above ours (B x N logits here).
    image = F.normalize(z_image.float(), dim=-1).reshape(-1, *z_image.shape[-2:])   # (V, B, D)
    text = F.normalize(z_text.float(), dim=-1).reshape(-1, *z_text.shape[-2:])      # (U, B, D)
    logits = logit_scale * _similarities(image, gather(text, with_grad=True, dim=1)) + logit_bias  # (V, U, B, N)
    B, N = logits.shape[-2:]
    labels = 2 * (_positives(B, logits.device)[:, None] == torch.arange(N, device=logits.device)).float() - 1  # (B, N)
    return {'loss': -F.logsigmoid(labels * logits).sum(-1).mean()}


def cl2l_siglip_loss(z_image, z_text, h_image, h_text, logit_scale, l2l_logit_scale, logit_bias, l2l_logit_bias):
    """CL2L (recipe §2.3) with SigLIP as its pair term: (G + A*Lc) / (1+A), G the sigmoid loss of the global z pair,
    Lc its mean over the A x A strong h pairs with the local scale and bias. A = 0 is siglip_loss."""
    g = siglip_loss(z_image, z_text, logit_scale, logit_bias)['loss']
    A = len(h_image)
    if A == 0:
        return {'loss': g, 'global_loss': g}
    local = siglip_loss(torch.stack(h_image), torch.stack(h_text), l2l_logit_scale, l2l_logit_bias)['loss']
    return {'loss': (g + A * local) / (1 + A), 'global_loss': g, 'local_loss': local}


# --- Objectives ---
# A method's row in METHODS (below) holds its contrastive term and the term added to it: these functions, which
# hand each loss above its inputs from the model's output dict (out) and the config.
def clip_term(out, cfg):
    """Plain CLIP (recipe §2.2): label smoothing, if any, on its only (global) pair."""
    return clip_loss(out['z_image'], out['z_text'], out['logit_scale'], cfg.label_smoothing, cfg.loss_reduction,
                     cfg.gather_with_grad)


def cl2l_term(out, cfg):
    """CLIP 🚀's CL2L loss (recipe §2.3); without strong views, the global pair alone."""
    return rocket_loss(out['z_image'], out['z_text'], out.get('h_image', []), out.get('h_text', []), out['logit_scale'],
                       out.get('l2l_logit_scale'), cfg.label_smoothing, cfg.loss_reduction, cfg.gather_with_grad)


def siglip_term(out, cfg):
    return siglip_loss(out['z_image'], out['z_text'], out['logit_scale'], out['logit_bias'])


def cl2l_siglip_term(out, cfg):
    return cl2l_siglip_loss(out['z_image'], out['z_text'], out.get('h_image', []), out.get('h_text', []),
                            out['logit_scale'], out.get('l2l_logit_scale'), out['logit_bias'],
                            out.get('l2l_logit_bias'))


def slip_term(out, cfg, target):
    return slip_loss(out['slip_image'][0], out['slip_image'][1], cfg.slip_temperature)


def barlip_term(out, cfg, target):
    return barlip_loss(out['barlip_image'], out['barlip_text'], cfg.barlip_lambda, cfg.barlip_scale,
                       cfg.gather_with_grad)


def siamlip_term(out, cfg, target):
    """SiamLIP's targets are the model's own projections; BYOLIP's the momentum model's (target)."""
    return siamlip_loss(out['siam_pred_image'], out['siam_pred_text'], target['siam_proj_image'],
                        target['siam_proj_text'])


def swalip_term(out, cfg, target):
    return swalip_loss(out['h_image'], out['h_text'], out['l2l_logit_scale'], cfg.sk_epsilon, cfg.sk_iters,
                       cfg.gather_with_grad)


# --- Methods ---
# A method's own hyperparameter: config makes it a Config field and a --flag (rows that share one declare it alike)
# and keeps it within `bound`, an interval such as '[0, 1]' or '(0, inf)'
Param = namedtuple('Param', 'name default help bound', defaults=('(-inf, inf)',))


@dataclass(frozen=True)
class Method:
    """One objective (recipe §2): its loss, its own hyperparameters, the model parts and strong views it needs, the
    settings it implies. config, model and train read these columns; nothing else looks at a method's name."""
    loss: Callable            # its contrastive term (above): (out, cfg) -> {'loss', ...}
    extra: Callable = None    # the term added to it (above): (out, cfg, target) -> {'loss', ...}
    weight: str = ''          # the config field that weights the extra term (none: 1)
    params: tuple = ()        # its own hyperparameters (Param), read by its terms as cfg.<name>
    heads: tuple = ()         # parts beyond the global z heads: 'h' (local MLPs, when num_augs > 0), 'bias' (SigLIP
    #                           logit biases), 'slip', 'barlip', 'siam' (projectors and predictors)
    views: int | None = 0     # the fewest strong views (--num_augs) it trains with; None: never looks (config.PLAIN)
    momentum: bool = False    # its extra term's targets come from a momentum copy of the model (BYOLIP)
    preset: dict = field(default_factory=dict)   # settings it implies, below the explicit flags
    fixed: dict = field(default_factory=dict)    # settings it trains only with: preset, and validate refuses others
    recipes: dict = field(default_factory=dict)  # {(dataset, model or None): settings} on top of that dataset's recipe


_SIGLIP = dict(logit_scale_init=math.log(10.0), l2l_logit_scale_init=math.log(10.0))  # t = exp(t') = 10 (Zhai et al.)
_BIAS = (Param('logit_bias_init', -10.0, 'initial logit bias of the SigLIP terms'),)
_NONCONTRASTIVE = {('cc12m', None): dict(text_dropout=0.1)}  # recipe §5.1
_SIAM = (Param('siamlip_hidden_dim', 2048, 'SiamLIP/BYOLIP projector and predictor hidden width', '[1, inf)'),
         Param('siamlip_proj_dim', 128, 'SiamLIP/BYOLIP projector output width', '[1, inf)'))
METHODS = {
    'clip': Method(clip_term, views=None),
    'rocket': Method(cl2l_term, heads=('h',), recipes={('yfcc15m', 'resnet50'): dict(remove_stopwords_prob=0.9)}),
    'slip': Method(cl2l_term, slip_term, 'slip_scale', heads=('h', 'slip'), views=2, params=(
        Param('slip_scale', 1.0, 'weight of the SLIP SimCLR loss', '[0, inf)'),
        Param('slip_temperature', 0.1, 'temperature of the SLIP SimCLR loss', '(0, inf)'))),
    'barlip': Method(cl2l_term, barlip_term, heads=('h', 'barlip'), views=1, recipes=_NONCONTRASTIVE, params=(
        Param('barlip_lambda', 5e-3, 'BarLIP off-diagonal weight', '[0, inf)'),
        Param('barlip_scale', 0.025, "BarLIP loss scale (--gather_with_grad: W x the paper's gradient)", '[0, inf)'),
        Param('barlip_hidden_dim', 3000, 'BarLIP projector hidden width', '[1, inf)'),
        Param('barlip_proj_dim', 8192, 'BarLIP projector output width', '[1, inf)'))),
    'siamlip': Method(cl2l_term, siamlip_term, heads=('h', 'siam'), views=1, recipes=_NONCONTRASTIVE, params=_SIAM),
    'byolip': Method(cl2l_term, siamlip_term, heads=('h', 'siam'), views=1, momentum=True, recipes=_NONCONTRASTIVE,
                     params=(*_SIAM, Param('momentum_tau', 0.99, 'EMA rate of the BYOLIP momentum model', '[0, 1]'))),
    'swalip': Method(cl2l_term, swalip_term, 'swalip_weight', heads=('h',), views=1, fixed=dict(label_smoothing=0.0),
                     recipes=_NONCONTRASTIVE, params=(  # recipe §2.6
        Param('swalip_weight', 0.2, 'weight of the SwALIP swapped-prediction loss', '[0, inf)'),
        Param('sk_epsilon', 0.05, 'Sinkhorn-Knopp entropy epsilon (SwALIP)', '(0, inf)'),
        Param('sk_iters', 3, 'Sinkhorn-Knopp iterations (SwALIP)', '[1, inf)'))),
    'siglip': Method(siglip_term, heads=('bias',), views=None, preset=_SIGLIP, fixed=dict(label_smoothing=0.0),
                     params=_BIAS),
    'rocket_siglip': Method(cl2l_siglip_term, heads=('h', 'bias'), preset=_SIGLIP, fixed=dict(label_smoothing=0.0),
                            params=_BIAS),
}


def compute_loss(out, cfg, target=None):
    """The objective of cfg.method's row (recipe §2): its contrastive term plus its weighted extra term, if any.
    target: the momentum model's output dict (a row with momentum). Returns {'loss', components, accuracies}."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    method = METHODS[cfg.method]
    if method.momentum and target is None:
        raise ValueError(f"method {cfg.method} needs target=<the momentum model's output dict>")
    losses = method.loss(out, cfg)
    if method.extra:
        extra = method.extra(out, cfg, target if method.momentum else out)
        weight = getattr(cfg, method.weight) if method.weight else 1.0
        total = losses['loss'] + weight * extra['loss']
        losses = {**losses, **extra, f'{cfg.method}_loss': extra['loss'], 'loss': total}
    losses.update({k: out[k] for k in ('logit_scale', 'l2l_logit_scale', 'logit_bias', 'l2l_logit_bias') if k in out})
    # everything but the loss is for logging: detached, so that keeping it does not keep the graph alive
    return {k: v if k == 'loss' else v.detach() for k, v in losses.items()}


# --- Weights in and out ---
# One file format for training, resume, evaluation and import (train.py writes it, evaluate.py reads it): a dict of
# 'format': FORMAT, the run's 'config', the 'model' weights, the tokenizer's 'bpe_merges'; train.py adds its state.
FORMAT = 'rocket-clip/1'


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


def _rename(key, table=_RENAMES):
    for pattern, replacement in table:
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
    return _rename(key, _INVERSE)


def _vision_tower(cfg, state):
    """(open_clip vision_cfg, {open_clip key: tensor}) of our image encoder: the ResNet-50 and timm-shaped timm-style
    ViTs via open_clip's timm tower (exact GELU whatever the text's), other ViTs as its own; ValueError if inexact."""
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
