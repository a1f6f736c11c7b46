#!/usr/bin/env python3
"""PyTorch peer of the 2D toy (METHOD.md sections 4 and 5), for `flowalign bench toy` and for
end-to-end comparisons: the same AdaLN MLP, the same flow-matching step, the same alignment step and
the same L_align heatmap, timed the same way.

    pip install torch numpy                      # not needed by flowalign's tests or CI
    python3 benches/torch_toy.py --bench --threads 2          # one line: BENCH {json}
    python3 benches/torch_toy.py --target mog --prior-steps 400 --align-steps 200 --threads 2
                                                              # one line: RESULT {json}

`--bench` measures prior training steps/s at each `--bench-batches`, alignment steps/s of 1,000
latents, and L_align heatmap evaluations/s (grid points x t values), with the keys `flowalign bench
toy` uses, so the two compare key by key. The run mode trains a prior and aligns latents at the given
settings and reports steps/s of each stage and the heatmap Pearson correlation with the target's NLL
(mog and grid: the analytic mixture density), for a user-level comparison with `flowalign toy`.
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


# --- The velocity network (METHOD.md section 4) -------------------------------------------------

def time_embedding(t, dim=256):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    a = t[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], 1)


class AdaLnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(c, c), nn.Linear(c, c)
        self.modulation = nn.Linear(c, 3 * c)

    def forward(self, x, c_act):
        shift, scale, gate = self.modulation(c_act).chunk(3, -1)
        h = self.norm(x) * (1 + scale) + shift
        return x + gate * self.fc2(F.silu(self.fc1(h)))


class VelocityMlp(nn.Module):
    def __init__(self, dim=2, width=512, depth=4):
        super().__init__()
        self.input_proj = nn.Linear(dim, width)
        self.time_fc1, self.time_fc2 = nn.Linear(256, width), nn.Linear(width, width)
        self.blocks = nn.ModuleList(AdaLnBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.final_mod = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in (self.time_fc1, self.time_fc2):
            nn.init.normal_(m.weight, std=0.02)
        for m in [b.modulation for b in self.blocks] + [self.final_mod, self.out]:
            nn.init.zeros_(m.weight)

    def forward(self, z, t):
        c = F.silu(self.time_fc2(F.silu(self.time_fc1(time_embedding(t)))))
        x = self.input_proj(z)
        for b in self.blocks:
            x = b(x, c)
        shift, scale = self.final_mod(c).chunk(2, -1)
        return self.out(self.final_norm(x) * (1 + scale) + shift)


def fm_loss(net, x):
    """The mean-reduced flow-matching loss of rows x, one (t, eps) each (METHOD.md section 1)."""
    t = torch.rand(x.shape[0])
    eps = torch.randn_like(x)
    z = (1 - t[:, None]) * eps + t[:, None] * x
    return ((net(z, t) - (x - eps)) ** 2).mean()


def align_heatmap(net, pts, ts):
    """Mean over t of the sum-reduced squared error, one eps per (point, t) (METHOD.md section 5)."""
    with torch.no_grad():
        acc = torch.zeros(pts.shape[0])
        for t in ts:
            eps = torch.randn_like(pts)
            tt = torch.full((pts.shape[0],), float(t))
            z = (1 - t) * eps + t * pts
            acc += ((net(z, tt) - (pts - eps)) ** 2).sum(1)
        return acc / len(ts)


# --- Targets with an analytic density (METHOD.md section 5) -------------------------------------

def mixture(name):
    if name == "mog":
        ang = torch.arange(5) * 2 * math.pi / 5
        return torch.stack([3 * torch.cos(ang), 3 * torch.sin(ang)], 1), 0.3
    if name == "grid":
        c = torch.linspace(-1.5, 1.5, 4)
        gx, gy = torch.meshgrid(c, c, indexing="ij")
        return torch.stack([gx, gy], -1).reshape(-1, 2), 0.1
    raise SystemExit(f"--target {name}: the run mode has the analytic targets mog and grid")


class Target:
    def __init__(self, name):
        self.means, self.sigma = mixture(name)
        # One scalar over all coordinates of the raw mixture (no centring).
        self.scale = math.sqrt((self.means ** 2).mean().item() + self.sigma ** 2)

    def sample(self, n):
        idx = torch.randint(0, self.means.shape[0], (n,))
        return (self.means[idx] + self.sigma * torch.randn(n, 2)) / self.scale

    def nll(self, x):
        m, s = self.means / self.scale, self.sigma / self.scale
        d2 = ((x[:, None, :] - m[None]) ** 2).sum(-1)
        lp = torch.logsumexp(-d2 / (2 * s * s), 1) - math.log(m.shape[0]) - math.log(2 * math.pi * s * s)
        return -lp


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# --- Modes ----------------------------------------------------------------------------------------

def timed(fn, seconds):
    """Calls per wall-clock second and per CPU second (all threads) of fn, over at least `seconds`
    and 5 calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        fn()
        n += 1
        el = time.perf_counter() - start
        if el >= seconds and n >= 5:
            return n / el, n / max(time.process_time() - cpu, 1e-9)


def bench(a):
    out = {}
    for batch in a.bench_batches:
        net = VelocityMlp(2, a.width, a.depth)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, eps=1e-8)
        x = torch.randn(batch, 2)

        def step():
            opt.zero_grad(set_to_none=True)
            fm_loss(net, x).backward()
            opt.step()

        out[f"train_b{batch}_steps_per_sec"], out[f"train_b{batch}_steps_per_cpu_sec"] = timed(step, a.bench_seconds)
    net = VelocityMlp(2, a.width, a.depth).requires_grad_(False)
    out["params"] = sum(p.numel() for p in net.parameters())
    y = torch.randn(1000, 2).requires_grad_(True)
    opt = torch.optim.Adam([y], lr=1e-2, eps=1e-8)

    def astep():
        opt.zero_grad(set_to_none=True)
        fm_loss(net, y).backward()
        opt.step()

    out["align_n1000_steps_per_sec"], out["align_n1000_steps_per_cpu_sec"] = timed(astep, a.bench_seconds)
    axis = torch.linspace(-3, 3, 200)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    ts = torch.linspace(0.1, 0.9, 2)
    align_heatmap(net, pts[:8192], ts[:1])
    start, cpu = time.perf_counter(), time.process_time()
    align_heatmap(net, pts, ts)
    out["heatmap_evals_per_sec"] = pts.shape[0] * len(ts) / (time.perf_counter() - start)
    out["heatmap_evals_per_cpu_sec"] = pts.shape[0] * len(ts) / max(time.process_time() - cpu, 1e-9)
    out["threads"] = torch.get_num_threads()
    out["torch"] = torch.__version__
    print("BENCH " + json.dumps(out), flush=True)


def run(a):
    torch.manual_seed(a.seed)
    target = Target(a.target)
    net = VelocityMlp(2, a.width, a.depth)
    opt = torch.optim.Adam(net.parameters(), lr=a.prior_lr, eps=1e-8)
    start = time.perf_counter()
    for _ in range(a.prior_steps):
        opt.zero_grad(set_to_none=True)
        fm_loss(net, target.sample(a.batch)).backward()
        opt.step()
    prior_s = time.perf_counter() - start
    net.requires_grad_(False)
    y = torch.randn(a.n_latents, 2).requires_grad_(True)
    nll_init = float(target.nll(y.detach()).mean())
    opt = torch.optim.Adam([y], lr=a.align_lr, eps=1e-8)
    start = time.perf_counter()
    for _ in range(a.align_steps):
        opt.zero_grad(set_to_none=True)
        fm_loss(net, y).backward()
        opt.step()
        # The NLL of y every step, as flowalign's curves record it.
        float(target.nll(y.detach()).mean())
    align_s = time.perf_counter() - start
    ref = target.sample(5000)
    lo, hi = ref.min(0).values, ref.max(0).values
    pad = 0.2 * (hi - lo)
    xs = torch.linspace(float(lo[0] - pad[0]), float(hi[0] + pad[0]), a.grid)
    ys = torch.linspace(float(lo[1] - pad[1]), float(hi[1] + pad[1]), a.grid)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    heat = align_heatmap(net, pts, torch.linspace(0.1, 0.9, a.t_values))
    result = {
        "target": a.target,
        "prior_steps_per_sec": a.prior_steps / max(prior_s, 1e-9),
        "align_steps_per_sec": a.align_steps / max(align_s, 1e-9),
        "pearson": pearson(heat, target.nll(pts)),
        "nll_init": nll_init,
        "nll_final": float(target.nll(y.detach()).mean()),
        "threads": torch.get_num_threads(),
    }
    print("RESULT " + json.dumps(result), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", action="store_true", help="the throughput figures (BENCH line)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--bench-batches", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--bench-seconds", type=float, default=8.0)
    ap.add_argument("--target", default="mog", help="run mode: mog or grid")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prior-steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prior-lr", type=float, default=1e-4)
    ap.add_argument("--n-latents", type=int, default=1000)
    ap.add_argument("--align-steps", type=int, default=500)
    ap.add_argument("--align-lr", type=float, default=1e-2)
    ap.add_argument("--grid", type=int, default=50)
    ap.add_argument("--t-values", type=int, default=20)
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    bench(a) if a.bench else run(a)


if __name__ == "__main__":
    main()
