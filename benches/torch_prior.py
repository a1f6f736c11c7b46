#!/usr/bin/env python3
"""PyTorch peer of `flowalign bench prior`: one training step of the stage-1 feature prior
(METHOD.md section 6) timed the same way, so the two can be compared side by side.

The step: AdaLN MLP velocity field (METHOD.md section 4), `batch` feature vectors each repeated `mc`
times with fresh (t, eps), mean-reduced flow-matching loss, backward, global grad-norm clip 1.0,
AdamW (0.9, 0.95, eps 1e-8, weight decay 1e-4), EMA 0.9999 of the weights.

Prints one line `BENCH {json}` with vectors/s.
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def time_embedding(t, dim=256):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], 1)


class Block(nn.Module):
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


class Mlp(nn.Module):
    def __init__(self, d, c, depth):
        super().__init__()
        self.input_proj = nn.Linear(d, c)
        self.time_fc1 = nn.Linear(256, c)
        self.time_fc2 = nn.Linear(c, c)
        self.blocks = nn.ModuleList([Block(c) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(c, 2 * c)
        self.out = nn.Linear(c, d)

    def forward(self, z, t):
        cond = self.time_fc2(F.silu(self.time_fc1(time_embedding(t))))
        c_act = F.silu(cond)
        x = self.input_proj(z)
        for b in self.blocks:
            x = b(x, c_act)
        shift, scale = self.final_modulation(c_act).chunk(2, -1)
        return self.out(self.final_norm(x) * (1 + scale) + shift)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--mc", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    net = Mlp(a.dim, a.width, a.depth).to(dev)
    ema = Mlp(a.dim, a.width, a.depth).to(dev)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4)
    table = torch.randn(100_000, a.dim, device=dev)

    def step():
        x = table[torch.randint(0, table.shape[0], (a.batch,), device=dev)].repeat(a.mc, 1)
        t = torch.rand(x.shape[0], device=dev)
        eps = torch.randn_like(x)
        z = t[:, None] * x + (1 - t[:, None]) * eps
        loss = (net(z, t) - (x - eps)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.mul_(0.9999).add_(p, alpha=1 - 0.9999)
        return loss.item()

    step()  # warm-up
    steps, start, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        step()
        steps += 1
        el = time.perf_counter() - start
        if el >= a.seconds and steps >= 2:
            break
    cpu = time.process_time() - cpu
    params = sum(p.numel() for p in net.parameters())
    print("BENCH " + json.dumps({
        "vectors_per_sec": steps * a.batch / el,
        "vectors_per_cpu_sec": steps * a.batch / max(cpu, 1e-9),
        "steps_per_sec": steps / el,
        "steps": steps,
        "params": params,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
