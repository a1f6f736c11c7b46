#!/usr/bin/env python3
"""PyTorch peer of the stage-3 generator's training step (METHOD.md section 7): MAR-B with the flow
head, plain PyTorch on the CPU, so flowalign's step can be compared side by side.

The step, as flowalign's `gen::loss::mar_loss` + `Trainer::step_loss` compute it:
- latents [batch, 64, 32] x scale 1.7052, random labels of 1000 classes;
- mask ratio r ~ normal(1, 0.25) truncated to [0.7, 1] (one per batch), ceil(64 r) tokens hidden
  along a random order per sample, labels replaced by `fake_latent` with p 0.1;
- MAR encoder (buffer 64 class slots ++ visible tokens, hidden tokens dropped) and decoder (mask
  token at hidden positions): 12 + 12 timm blocks, width 768, 12 heads, MLP 4, LN eps 1e-6, qkv bias,
  exact GELU, attention/projection dropout 0.1, qk-norm (LayerNorm(64), eps 1e-5, shared by heads);
- flow head (AdaLN MLP 1024 x 6 + cond_embed Linear(768, 1024) added to the time condition) on the
  hidden tokens, 4 (t, noise) draws each, t = 1 is noise: x_t = (1 - t) x + t noise, target noise - x;
- backward, global grad-norm clip 3.0, AdamW (0.9, 0.95, eps 1e-8) with weight decay 0.02 except on
  1-D parameters, biases and the head, EMA 0.9999.

MAR runs the head on every token and masks the loss; like flowalign, this runs it on the hidden
tokens only (the same loss and gradients, less work).

Prints one line `BENCH {json}` with the mean and median step time in ms and the peak RSS in MiB.
"""
import argparse
import json
import math
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def time_embedding(t, dim=256):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    a = t[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], 1)


class Attention(nn.Module):
    def __init__(self, c, heads, attn_drop, proj_drop):
        super().__init__()
        self.heads = heads
        hd = c // heads
        self.qkv = nn.Linear(c, 3 * c, bias=True)
        self.q_norm = nn.LayerNorm(hd, eps=1e-5)
        self.k_norm = nn.LayerNorm(hd, eps=1e-5)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(c, c)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    def __init__(self, c, heads, mlp_ratio, drop):
        super().__init__()
        self.norm1 = nn.LayerNorm(c, eps=1e-6)
        self.attn = Attention(c, heads, drop, drop)
        self.norm2 = nn.LayerNorm(c, eps=1e-6)
        self.fc1 = nn.Linear(c, mlp_ratio * c)
        self.fc2 = nn.Linear(mlp_ratio * c, c)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.drop(self.fc2(self.drop(F.gelu(self.fc1(self.norm2(x))))))


class AdaLnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1 = nn.Linear(c, c)
        self.fc2 = nn.Linear(c, c)
        self.modulation = nn.Linear(c, 3 * c)

    def forward(self, x, c_act):
        shift, scale, gate = self.modulation(c_act).chunk(3, -1)
        h = self.norm(x) * (1 + scale) + shift
        return x + gate * self.fc2(F.silu(self.fc1(h)))


class FlowHead(nn.Module):
    def __init__(self, d, z_dim, c, depth):
        super().__init__()
        self.input_proj = nn.Linear(d, c)
        self.time_fc1 = nn.Linear(256, c)
        self.time_fc2 = nn.Linear(c, c)
        self.cond_embed = nn.Linear(z_dim, c)
        self.blocks = nn.ModuleList([AdaLnBlock(c) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(c, 2 * c)
        self.out = nn.Linear(c, d)

    def forward(self, x, t, z):
        cond = self.time_fc2(F.silu(self.time_fc1(time_embedding(t)))) + self.cond_embed(z)
        c_act = F.silu(cond)
        h = self.input_proj(x)
        for b in self.blocks:
            h = b(h, c_act)
        shift, scale = self.final_modulation(c_act).chunk(2, -1)
        return self.out(self.final_norm(h) * (1 + scale) + shift)


class Mar(nn.Module):
    def __init__(self, a):
        super().__init__()
        c, L, B = a.width, a.seq_len, a.buffer
        self.buffer = B
        self.class_emb = nn.Embedding(a.classes, c)
        self.fake_latent = nn.Parameter(torch.randn(1, c) * 0.02)
        self.z_proj = nn.Linear(a.token_dim, c)
        self.z_proj_ln = nn.LayerNorm(c, eps=1e-6)
        self.encoder_pos = nn.Parameter(torch.randn(1, B + L, c) * 0.02)
        self.encoder_blocks = nn.ModuleList(
            [Block(c, a.heads, 4, a.dropout) for _ in range(a.encoder_depth)])
        self.encoder_norm = nn.LayerNorm(c, eps=1e-6)
        self.decoder_embed = nn.Linear(c, c)
        self.mask_token = nn.Parameter(torch.randn(1, 1, c) * 0.02)
        self.decoder_pos = nn.Parameter(torch.randn(1, B + L, c) * 0.02)
        self.decoder_blocks = nn.ModuleList(
            [Block(c, a.heads, 4, a.dropout) for _ in range(a.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(c, eps=1e-6)
        self.head_pos = nn.Parameter(torch.randn(1, L, c) * 0.02)
        self.head = FlowHead(a.token_dim, c, a.head_width, a.head_depth)

    def forward(self, x, class_cond, mask):
        b, L, _ = x.shape
        B = self.buffer
        h = self.z_proj(x)
        c = h.shape[-1]
        h = torch.cat([class_cond[:, None].expand(b, B, c), h], 1)
        h = self.z_proj_ln(h + self.encoder_pos)
        keep = torch.cat([torch.ones(b, B, dtype=torch.bool), ~mask], 1)
        h = h[keep].reshape(b, -1, c)
        for blk in self.encoder_blocks:
            h = blk(h)
        h = self.decoder_embed(self.encoder_norm(h))
        full = self.mask_token.expand(b, B + L, c).clone()
        full[keep] = h.reshape(-1, c)
        h = full + self.decoder_pos
        for blk in self.decoder_blocks:
            h = blk(h)
        return self.decoder_norm(h)[:, B:] + self.head_pos


def mask_ratio(lo=0.7):
    while True:
        r = 1.0 - 0.25 * abs(torch.randn(()).item())
        if r >= lo:
            return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--encoder-depth", type=int, default=12)
    ap.add_argument("--decoder-depth", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--buffer", type=int, default=64)
    ap.add_argument("--head-width", type=int, default=1024)
    ap.add_argument("--head-depth", type=int, default=6)
    ap.add_argument("--batch-mul", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--token-dim", type=int, default=32)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Mar(a)
    ema = [p.detach().clone() for p in model.parameters()]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # MAR's add_weight_decay: no decay on 1-D parameters, biases and the head.
        (no_decay if p.ndim == 1 or name.endswith(".bias") or name.startswith("head.") else decay).append(p)
    lr = 1e-4 * a.batch / 256
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.02},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    latents = torch.randn(64, a.seq_len, a.token_dim)
    L, d = a.seq_len, a.token_dim

    def step():
        idx = torch.randint(0, latents.shape[0], (a.batch,))
        x = latents[idx] * 1.7052
        labels = torch.randint(0, a.classes, (a.batch,))
        n_hidden = math.ceil(L * mask_ratio())
        orders = torch.argsort(torch.rand(a.batch, L), 1)
        mask = torch.zeros(a.batch, L, dtype=torch.bool)
        mask.scatter_(1, orders[:, :n_hidden], True)
        drop = (torch.rand(a.batch) < 0.1).float()[:, None]
        class_cond = drop * model.fake_latent + (1 - drop) * model.class_emb(labels)
        z = model(x, class_cond, mask)
        zh = z[mask].repeat(a.batch_mul, 1)
        xh = x[mask].repeat(a.batch_mul, 1)
        t = torch.rand(zh.shape[0])
        noise = torch.randn_like(xh)
        x_t = (1 - t[:, None]) * xh + t[:, None] * noise
        loss = (model.head(x_t, t, zh) - (noise - xh)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema, model.parameters()):
                pe.mul_(0.9999).add_(p, alpha=1 - 0.9999)
        return loss.item()

    step()  # warm-up
    times = []
    for _ in range(a.steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000.0)
    params = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("BENCH " + json.dumps({
        "step_ms": statistics.mean(times),
        "step_ms_median": statistics.median(times),
        "steps": a.steps,
        "batch": a.batch,
        "peak_rss_mib": rss_mib,
        "params": params,
        "head_params": head,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
