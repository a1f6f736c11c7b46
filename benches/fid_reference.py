#!/usr/bin/env python3
"""PyTorch reference for `flowalign::metrics::inception` and `flowalign::metrics::fid`: builds pytorch-fid's own
FID Inception-v3 (`pytorch_fid.inception.InceptionV3`, with its FIDInceptionA/C/E_1/E_2 blocks) from
deterministic weights, and writes its pool3 features of two fixed sets of 8 images plus their FID.

The weights cannot be downloaded here, so they are drawn by a counter-based hash (splitmix64 of the
tensor's torchvision name and the element index) that `tests/common/mod.rs::write_inception`
reproduces bit for bit: conv weights He-uniform, batch-norm gamma in [0.8, 1.2), beta and running
mean in [-0.1, 0.1), running variance in [0.6, 1.4). pytorch-fid's loader is handed these weights
instead of its download, so the network is exactly pytorch-fid's.

Needs: pip install pytorch-fid scipy safetensors (torchvision comes with pytorch-fid).

    python3 benches/fid_reference.py --out /tmp/fidref [--speed]

writes
    inception-fid.safetensors   InceptionV3().state_dict() (the pytorch-fid layout)
    inception-tv.safetensors    the same weights under torchvision's names (like pt_inception-2015-12-05)
    reference.safetensors       images_a/b [8, 3, 64, 64] in [0, 1]; features_a/b (float32 network) and
                                features_a64/b64 (the float64 network) [8, 2048]
and prints the FID by pytorch-fid's calculate_frechet_distance (scipy sqrtm) and by a float64
eigen-decomposition, the float32-vs-float64 feature error of PyTorch itself, and the values
tests/inception_reference.rs embeds. Compare the Rust features with
    FLOWALIGN_FID_REFERENCE=/tmp/fidref cargo test --release --test inception_reference -- --nocapture
"""
import argparse
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

import pytorch_fid.inception as pfi
from pytorch_fid.fid_score import calculate_frechet_distance
from scipy import linalg

M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def fnv1a(name: str) -> np.uint64:
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return np.uint64(h)


def uniform(name: str, n: int) -> np.ndarray:
    """n values in [-0.5, 0.5), exact multiples of 2^-24, from splitmix64(fnv1a(name) + i)."""
    with np.errstate(over="ignore"):
        z = fnv1a(name) + np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24) - np.float32(0.5)


def deterministic_weights(template: dict) -> dict:
    """Values for every tensor of torchvision's Inception3 state dict (names as in the .pth)."""
    out = {}
    for name, t in template.items():
        shape = tuple(t.shape)
        n = int(np.prod(shape)) if shape else 1
        if name.endswith("num_batches_tracked"):
            out[name] = np.zeros(shape, dtype=np.int64)
            continue
        u = uniform(name, n)
        if name.endswith("conv.weight") or name == "fc.weight":
            fan_in = int(np.prod(shape[1:]))
            v = u * np.float32(2.0 * math.sqrt(6.0 / fan_in))
        elif name.endswith("bn.weight"):
            v = (u + np.float32(0.5)) * np.float32(0.4) + np.float32(0.8)
        elif name.endswith("bn.running_var"):
            v = (u + np.float32(0.5)) * np.float32(0.8) + np.float32(0.6)
        else:  # bn.bias, bn.running_mean, fc.bias
            v = u * np.float32(0.2)
        out[name] = v.reshape(shape).astype(np.float32)
    return out


def images(kind: str) -> np.ndarray:
    """8 images [3, 64, 64] in [0, 1] from integer patterns (exactly reproducible)."""
    i, c, y, x = np.meshgrid(np.arange(8), np.arange(3), np.arange(64), np.arange(64), indexing="ij")
    if kind == "a":
        v = (x * (3 + i) + y * (5 + 2 * c) + 17 * i) % 256
    else:
        v = (x * (4 + i) + y * (6 + c) + 11 * i + 40 * c) % 256
    return (v.astype(np.float32) / np.float32(255.0)).astype(np.float32)


def exact_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID in float64 by the symmetric eigen route (the maths of flowalign::metrics::fid)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = linalg.eigh(s1)
    tol = len(w) * np.finfo(np.float64).eps * np.abs(w).max()
    a = (v * np.where(w > tol, np.sqrt(np.clip(w, 0, None)), 0.0)) @ v.T
    m = a @ s2 @ a
    m = (m + m.T) / 2
    w2 = linalg.eigvalsh(m)
    tol2 = len(w2) * np.finfo(np.float64).eps * np.abs(w2).max()
    tr = np.where(w2 > tol2, np.sqrt(np.clip(w2, 0, None)), 0.0).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--speed", action="store_true", help="also time the network at batch 1, 8, 32")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_grad_enabled(False)

    # torchvision's Inception3 as fid_inception_v3() builds it, for the names and shapes.
    template = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    template.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    template.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    template.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    template.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    template.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    template.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    template.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    template.Mixed_7b = pfi.FIDInceptionE_1(1280)
    template.Mixed_7c = pfi.FIDInceptionE_2(2048)
    tv = deterministic_weights(template.state_dict())

    # pytorch-fid's own constructor, with our weights in place of its download.
    pfi.load_state_dict_from_url = lambda *a, **k: {n: torch.from_numpy(v) for n, v in tv.items()}
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    save_file({n: v.contiguous().numpy() for n, v in model.state_dict().items()},
              os.path.join(args.out, "inception-fid.safetensors"))
    save_file(tv, os.path.join(args.out, "inception-tv.safetensors"))

    ims = {k: images(k) for k in "ab"}
    feats = {}
    for k, im in ims.items():
        x = torch.from_numpy(im)
        feats[k] = model(x)[0].reshape(8, 2048).numpy()
        feats[k + "64"] = model.double()(x.double())[0].reshape(8, 2048).numpy()
        model.float()
    save_file(
        {
            "images_a": ims["a"], "images_b": ims["b"],
            "features_a": feats["a"], "features_b": feats["b"],
            "features_a64": feats["a64"], "features_b64": feats["b64"],
        },
        os.path.join(args.out, "reference.safetensors"),
    )

    err32 = max(np.abs(feats[k] - feats[k + "64"]).max() for k in "ab")
    scale = max(np.abs(feats[k + "64"]).max() for k in "ab")
    print(f"features: mean {feats['a64'].mean():.5f}, max |f| {scale:.5f}; "
          f"PyTorch float32 vs float64: max abs diff {err32:.3e} ({err32 / scale:.3e} of max |f|)")

    fa, fb = feats["a64"].astype(np.float64), feats["b64"].astype(np.float64)
    try:
        fid_scipy = calculate_frechet_distance(fa.mean(0), np.cov(fa, rowvar=False),
                                               fb.mean(0), np.cov(fb, rowvar=False))
    except ValueError as e:  # pytorch-fid refuses large imaginary parts
        fid_scipy = float("nan")
        print(f"pytorch-fid calculate_frechet_distance failed: {e}")
    fid_exact = exact_fid(fa, fb)
    fid_self = exact_fid(fa, fa)
    print(f"FID(a, b) of the float64 features: pytorch-fid (scipy sqrtm) {fid_scipy:.6f}, "
          f"eigen route {fid_exact:.6f}; FID(a, a) {fid_self:.3e}")

    # The values the Rust test embeds: per image sum, sum of squares and four features.
    picks = [0, 257, 1023, 2047]
    rows = []
    for k in "ab":
        for f in feats[k + "64"]:
            rows.append([float(f.sum()), float((f * f).sum())] + [float(f[j]) for j in picks])
    summary = {"fid_scipy": fid_scipy, "fid_eigen": fid_exact, "picks": picks, "rows": rows}
    with open(os.path.join(args.out, "reference.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print("const PICKS: [usize; 4] = " + str(picks) + ";")
    print("const REFERENCE: [[f64; 6]; 16] = [")
    for r in rows:
        print("    [" + ", ".join(f"{v:.6e}" for v in r) + "],")
    print("];")
    print(f"const FID_AB: f64 = {fid_exact:.6e};")

    if args.speed:
        import time
        for batch in (1, 8, 32):
            x = torch.rand(batch, 3, 256, 256)
            model(x)  # warm-up
            start = time.time()
            model(x)
            print(f"PyTorch ({torch.get_num_threads()} threads) Inception forward, batch {batch}: "
                  f"{batch / (time.time() - start):.2f} images/s")


if __name__ == "__main__":
    main()
