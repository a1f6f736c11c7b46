#!/usr/bin/env python3
"""PyTorch peer of `flowalign bench ae`: the stage-2 autoencoder's training step (METHOD.md
section 6), plain PyTorch on the CPU, so flowalign's step can be compared side by side.

The step, as `flowalign bench ae` times it by default (`cli::bench::ae` -> `ae::train::ae_step`
on the trainer of `ae::train::new_trainer`, config `AeConfig::preset(Paper)` with `--model`):
- a fixed batch of `batch` random images [batch, 3, S, S], N(0, 1) clamped to [-1, 1] (the same
  batch every step, as the Rust bench);
- encoder: patchify into (channel, row, col) patches of side 16, Linear(3*16*16, C) ++ [CLS]
  + position embedding [1, 1 + P, C], then 64 latent tokens (+ their own position embedding)
  appended; `depth` DINOv2-layout blocks: pre-norm LayerNorm (eps 1e-6) -> multi-head attention
  (q, k, v, out Linear(C, C) with bias, softmax(q k^T / sqrt(C / heads)), no dropout, no qk-norm)
  -> LayerScale (a learnable [C], init 1) -> residual; LayerNorm -> Linear(C, 4C) -> exact (erf)
  GELU -> Linear(4C, C) -> LayerScale -> residual; final LayerNorm over all tokens; the 64 latent
  tokens' outputs -> Linear(C, 32): latents z [batch, 64, 32]. No noise, no KL, no quantisation:
  the preset applies no regularisation between encoder and decoder;
- decoder: Linear(32, C)(z) + latent position embedding; P copies of a mask token + position
  embedding [1, P, C]; sequence [mask tokens ++ latents] through `depth` blocks as above, final
  LayerNorm, the P mask-token outputs -> Linear(C, 3*16*16) -> unpatchify to [batch, 3, S, S];
- loss = 1.0 * mean((rec - x)^2) + 0.01 * L_align. LPIPS and the adversarial term are off: the
  bench passes `lpips: None, dino: None` and no discriminator, so `ae_step` adds neither;
- L_align (`align::align_loss_with`, Reduction::Mean, mc 4): the batch x 64 latent tokens
  [n, 32] repeated 4 times (copy-major), t ~ U[0, 1) and eps ~ N(0, I) per row (fresh each step),
  z_t = (1 - t) eps + t y, residual v(z_t, t) - (y - eps), squared, summed over the 32 dims / 32,
  mean over rows; gradient reaches y through both the network input and the target;
- v is the frozen prior `VelocityMlpConfig::new(32, 1024, 6)`, freshly initialised as the bench
  does (AdaLN MLP: input Linear(32, 1024); time: 256 sinusoids [cos, sin] of the raw t,
  freqs exp(-ln(1e4) i / 128), Linear(256, 1024) -> SiLU -> Linear(1024, 1024), then SiLU;
  6 blocks x + gate * Linear(SiLU(Linear(LN(x) (1 + scale) + shift))), modulation Linear(C, 3C);
  final affine-free LN (eps 1e-6) modulated by Linear(C, 2C) -> Linear(C, 32)). Its parameters
  take no gradient; the step backpropagates through it to the latents only;
- backward, global gradient-norm clip 1.0 (PyTorch's `clip_grad_norm_` formula, as flowalign),
  AdamW (0.9, 0.95, eps 1e-8) with decoupled weight decay 1e-4 on the parameters of rank >= 2
  only (`DecayRule::matrices`: weights, [CLS], mask token, latent tokens and every position
  embedding; not biases, LayerNorm, LayerScale), learning rate 1e-4 on the cosine schedule
  (linear warm-up 2,500 steps of 50,000, floor 0.1), EMA of every parameter with decay 0.9999
  warmed up as diffusers' `min(decay, (1 + n) / (10 + n))`.
Initialisation mirrors flowalign's (Xavier-uniform weights, zero biases, N(0, 0.02^2) tokens and
position embeddings, LayerScale 1; the prior's modulation and output layers zero, so v = 0).

Where this differs from flowalign (same shapes, parameters and arithmetic otherwise):
- q, k and v are one Linear(C, 3C) (one matrix product; the same parameters as burn's three);
- attention is `F.scaled_dot_product_attention` (`--attention sdpa`, PyTorch's fused CPU kernel)
  unless `--attention math` asks for the explicit matmul-softmax-matmul burn runs;
- AdamW is PyTorch's default implementation on the CPU (`--adam foreach|fused` for the others);
  flowalign runs its own fused one-pass Adam;
- the random draws come from torch's generator, not flowalign's.

Prints one line `BENCH {json}`: the mean and median step time in ms after 3 warm-up steps
(`step_ms_mean`, `step_ms_median`), process CPU time per step, the peak RSS in MiB, the
autoencoder's parameter count `params` (to check against flowalign's `model.params`) and the
prior's `prior_params`, and `flops_per_step`: matrix-product FLOPs, 2 m n k per product. The
autoencoder's part counts every forward product (patch embedding, q/k/v/out, the two attention
products, MLP, to/from latent, to pixels) x 3 for forward + backward, as flowalign's
`cli::peak::vit_ae_train_flops` does (so it includes the patch embedding's input gradient, which
autograd skips); the frozen prior's part is its forward per row plus the input gradients through
its blocks' MLPs, output layer and input projection (no weight gradients, and none through the
time path: flowalign's `MlpFlops::align`), over batch x 64 x 4 rows. `--count-flops` also runs
one untimed step under `torch.utils.flop_counter.FlopCounterMode` and reports its count.
"""
import argparse
import json
import math
import resource
import statistics
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# `VitSize::dims()` (src/ae/model.rs): (layers, width, heads), by clap's value names.
SIZES = {"tiny": (2, 64, 2), "vit-s": (12, 384, 6), "vit-b": (12, 768, 12), "vit-l": (24, 1024, 16)}
ALIASES = {"s": "vit-s", "b": "vit-b", "l": "vit-l", "vits": "vit-s", "vitb": "vit-b", "vitl": "vit-l"}


def dense(d_in, d_out):
    """flowalign's `dense`: Xavier-uniform weight, zero bias."""
    layer = nn.Linear(d_in, d_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def embedding(n, c):
    """A [1, n, c] parameter from N(0, 0.02^2)."""
    return nn.Parameter(torch.randn(1, n, c) * 0.02)


class Block(nn.Module):
    """DINOv2's layer: pre-norm attention and MLP, each scaled by a LayerScale."""

    def __init__(self, c, heads, attention):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.norm1 = nn.LayerNorm(c, eps=1e-6)
        self.qkv = dense(c, 3 * c)
        self.proj = dense(c, c)
        self.ls1 = nn.Parameter(torch.ones(c))
        self.norm2 = nn.LayerNorm(c, eps=1e-6)
        self.fc1 = dense(c, 4 * c)
        self.fc2 = dense(4 * c, c)
        self.ls2 = nn.Parameter(torch.ones(c))

    def attn(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.attention == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = ((q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)).softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, n, c))

    def forward(self, x):
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)))) * self.ls2


def patchify(x, p):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x, p, s):
    b, g = x.shape[0], s // p
    return x.reshape(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, s, s)


class Encoder(nn.Module):
    def __init__(self, a, depth, c, heads):
        super().__init__()
        n, pp = (a.image_size // a.patch) ** 2, 3 * a.patch ** 2
        self.patch = a.patch
        self.patch_embed = dense(pp, c)
        self.cls_token = embedding(1, c)
        self.pos_embed = embedding(1 + n, c)
        self.latent_tokens = embedding(a.latent_tokens, c)
        self.latent_pos = embedding(a.latent_tokens, c)
        self.blocks = nn.ModuleList([Block(c, heads, a.attention) for _ in range(depth)])
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.to_latent = dense(c, a.latent_dim)

    def forward(self, images):
        b = images.shape[0]
        x = self.patch_embed(patchify(images, self.patch))
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1) + self.pos_embed
        lat = (self.latent_tokens + self.latent_pos).expand(b, -1, -1)
        k = lat.shape[1]
        x = torch.cat([x, lat], 1)
        for blk in self.blocks:
            x = blk(x)
        return self.to_latent(self.norm(x)[:, -k:])


class Decoder(nn.Module):
    def __init__(self, a, depth, c, heads):
        super().__init__()
        n, pp = (a.image_size // a.patch) ** 2, 3 * a.patch ** 2
        self.patch, self.size, self.n = a.patch, a.image_size, n
        self.from_latent = dense(a.latent_dim, c)
        self.latent_pos = embedding(a.latent_tokens, c)
        self.mask_token = embedding(1, c)
        self.pos_embed = embedding(n, c)
        self.blocks = nn.ModuleList([Block(c, heads, a.attention) for _ in range(depth)])
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.to_pixels = dense(c, pp)

    def forward(self, z):
        b = z.shape[0]
        z = self.from_latent(z) + self.latent_pos
        masks = (self.mask_token.expand(-1, self.n, -1) + self.pos_embed).expand(b, -1, -1)
        x = torch.cat([masks, z], 1)
        for blk in self.blocks:
            x = blk(x)
        return unpatchify(self.to_pixels(self.norm(x)[:, : self.n]), self.patch, self.size)


class Autoencoder(nn.Module):
    def __init__(self, a, depth, c, heads):
        super().__init__()
        self.encoder = Encoder(a, depth, c, heads)
        self.decoder = Decoder(a, depth, c, heads)


def time_embedding(t, dim=256):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    a = t[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], 1)


def prior_linear(d_in, d_out, init):
    layer = nn.Linear(d_in, d_out)
    if init == "xavier":
        nn.init.xavier_uniform_(layer.weight)
    elif init == "zeros":
        nn.init.zeros_(layer.weight)
    else:
        nn.init.normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer


class AdaLnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1 = prior_linear(c, c, "xavier")
        self.fc2 = prior_linear(c, c, "xavier")
        self.modulation = prior_linear(c, 3 * c, "zeros")

    def forward(self, x, c_act):
        shift, scale, gate = self.modulation(c_act).chunk(3, -1)
        h = self.norm(x) * (1 + scale) + shift
        return x + gate * self.fc2(F.silu(self.fc1(h)))


class VelocityMlp(nn.Module):
    """flowalign's `VelocityMlp` (src/flow/model.rs)."""

    def __init__(self, d, c, depth):
        super().__init__()
        self.input_proj = prior_linear(d, c, "xavier")
        self.time_fc1 = prior_linear(256, c, "normal")
        self.time_fc2 = prior_linear(c, c, "normal")
        self.blocks = nn.ModuleList([AdaLnBlock(c) for _ in range(depth)])
        self.final_modulation = prior_linear(c, 2 * c, "zeros")
        self.out = prior_linear(c, d, "zeros")

    def forward(self, z, t):
        c_act = F.silu(self.time_fc2(F.silu(self.time_fc1(time_embedding(t)))))
        x = self.input_proj(z)
        for blk in self.blocks:
            x = blk(x, c_act)
        shift, scale = self.final_modulation(c_act).chunk(2, -1)
        return self.out(F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift)


def cosine_lr(lr, step, total, warmup, final_frac):
    """`train::Schedule::Cosine` at 0-based `step`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def flops(a, depth, c, batch):
    """Matrix-product FLOPs of one step: (autoencoder, prior); see the module docstring."""
    p = (a.image_size // a.patch) ** 2
    pp, k, dz = 3 * a.patch ** 2, a.latent_tokens, a.latent_dim

    def block(t):
        return 2 * t * c * 3 * c + 4 * t * t * c + 2 * t * c * c + 16 * t * c * c

    enc = 2 * p * pp * c + depth * block(1 + p + k) + 2 * k * c * dz
    dec = 2 * k * dz * c + depth * block(k + p) + 2 * p * c * pp
    ae = 3 * batch * (enc + dec)
    d, w, l = dz, a.prior_width, a.prior_depth
    fwd = 2 * d * w + 2 * 256 * w + 2 * w * w + l * (2 * w * 3 * w + 4 * w * w) + 2 * w * 2 * w + 2 * w * d
    prior = (fwd + l * 4 * w * w + 2 * w * d + 2 * d * w) * batch * k * a.mc
    return ae, prior


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit-l", choices=sorted(SIZES) + sorted(ALIASES),
                    help="flowalign's `--model` (VitSize): tiny, vit-s, vit-b, vit-l (or s, b, l)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--latent-tokens", type=int, default=64)
    ap.add_argument("--latent-dim", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--mc", type=int, default=4, help="(t, eps) draws per latent token")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.01, help="weight of L_align")
    ap.add_argument("--prior-width", type=int, default=1024)
    ap.add_argument("--prior-depth", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=2500)
    ap.add_argument("--total-steps", type=int, default=50_000, help="the schedule's length")
    ap.add_argument("--ema", type=float, default=0.9999)
    ap.add_argument("--attention", choices=["sdpa", "math"], default="sdpa")
    ap.add_argument("--adam", choices=["default", "foreach", "fused"], default="default")
    ap.add_argument("--steps", type=int, default=5, help="timed steps, after 3 warm-up steps")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--count-flops", action="store_true",
                    help="also count one step's FLOPs with torch's FlopCounterMode")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model_name = ALIASES.get(a.model, a.model)
    depth, c, heads = SIZES[model_name]
    b, s, k, dz = a.batch, a.image_size, a.latent_tokens, a.latent_dim

    model = Autoencoder(a, depth, c, heads)
    prior = VelocityMlp(dz, a.prior_width, a.prior_depth).requires_grad_(False)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    kw = {"foreach": True} if a.adam == "foreach" else {"fused": True} if a.adam == "fused" else {}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, **kw)
    x = torch.randn(b, 3, s, s).clamp_(-1.0, 1.0)
    state = {"step": 0}

    def step():
        n = state["step"]
        lr = cosine_lr(a.lr, n, a.total_steps, a.warmup, 0.1)
        for g in opt.param_groups:
            g["lr"] = lr
        z = model.encoder(x)  # [b, k, dz]
        rec = model.decoder(z)
        l2 = (rec - x).pow(2).mean()
        y = z.reshape(b * k, dz).repeat(a.mc, 1)  # copy-major, as repeat_dim(0, mc)
        t = torch.rand(y.shape[0])
        eps = torch.randn_like(y)
        z_t = (1 - t[:, None]) * eps + t[:, None] * y
        r = prior(z_t, t) - (y - eps)
        l_align = (r * r).sum(1).div(dz).mean()
        loss = 1.0 * l2 + a.lam * l_align
        l2.item(), l_align.item(), loss.item()  # flowalign reads all three back
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(a.ema, (1 + n) / (10 + n))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        state["step"] += 1

    for _ in range(3):
        step()
    times = []
    cpu = time.process_time()
    for _ in range(a.steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000.0)
    cpu = time.process_time() - cpu
    counted = None
    if a.count_flops:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc:
            step()
        counted = fc.get_total_flops()
    ae_flops, prior_flops = flops(a, depth, c, b)
    out = {
        "step_ms_mean": statistics.mean(times),
        "step_ms_median": statistics.median(times),
        "step_cpu_ms_mean": cpu * 1000.0 / a.steps,
        "steps": a.steps,
        "batch": b,
        "image_size": s,
        "model": {"size": model_name, "depth": depth, "width": c, "heads": heads, "patch": a.patch,
                  "latent_tokens": k, "latent_dim": dz},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "params": sum(p.numel() for p in params),
        "prior_params": sum(p.numel() for p in prior.parameters()),
        "flops_per_step": ae_flops + prior_flops,
        "flops_ae": ae_flops,
        "flops_prior": prior_flops,
        "attention": a.attention,
        "adam": a.adam,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if counted is not None:
        out["flops_counted"] = counted
    print("BENCH " + json.dumps(out))


if __name__ == "__main__":
    main()
