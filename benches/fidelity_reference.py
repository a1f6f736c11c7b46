#!/usr/bin/env python3
"""torch-fidelity reference for `flowalign::metrics`: runs torch-fidelity's own pipeline (its image
reading, uint8 input, TF1-style bilinear resize, `(x - 128) / 128`, its FeatureExtractorInceptionV3,
its FID / KID / IS / precision-recall maths) on two fixed sets of PNG images, with the deterministic
stand-in Inception weights of `benches/fid_reference.py` (the real ones cannot be downloaded here),
fc layer included, drawn by the same counter-based hash that `tests/common/mod.rs` reproduces.

Needs: pip install torch torch-fidelity pytorch-fid scipy safetensors pillow
(pytorch-fid only for its torchvision template of the network's names and shapes).

    python3 benches/fidelity_reference.py --out /tmp/fidelityref

writes
    generated/000.png ... 023.png   24 RGB images, 64 x 64   (the test draws the same pixels)
    reference/000.png ... 019.png   20 RGB images, 48 x 48
    inception-fidelity.pth          the weights in torch-fidelity's names (torchvision's, with fc)
    features.safetensors            torch-fidelity's pool3 and unbiased logits of both sets (float32
                                    network) and the float64 network's
    reference.json                  every number below
and prints the metrics of torch-fidelity's float32 network (its default, what the Rust test embeds)
and of its float64 network (how much float32 rounding moves each metric), the margin of the
precision/recall decisions, and the Rust constants of tests/generation_metrics.rs. Compare with
    FLOWALIGN_FIDELITY_REFERENCE=/tmp/fidelityref cargo test --release --test generation_metrics -- --nocapture
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file

import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pytorch_fid.inception as pfi  # noqa: E402
from fid_reference import deterministic_weights, exact_fid  # noqa: E402

N_GEN, SIZE_GEN = 24, 64
N_REF, SIZE_REF = 20, 48


def generated_image(i: int) -> np.ndarray:
    """Generated image i, uint8 [h, w, 3], from integer patterns (exactly reproducible).

    Two families: even images vary a lot in brightness and contrast (with the stand-in weights,
    similar images give nearly equal logits and an Inception Score of 1.00x, which would test
    little), odd ones are wrapped gradients with a checkerboard.
    """
    y, x, c = np.meshgrid(np.arange(SIZE_GEN), np.arange(SIZE_GEN), np.arange(3), indexing="ij")
    if i % 2 == 0:
        v = ((x * (3 + i % 7) + y * (5 + 2 * c + i % 3)) * (i % 5) // 4 + (i // 5) * 45 - 60
             + ((x // 8 + y // 8 + i) % 2) * 40 * (i % 3) - c * 20 * (i % 4))
        return np.clip(v, 0, 255).astype(np.uint8)
    v = (x * (3 + i % 7) + y * (5 + 2 * c + i % 3) + 17 * i + 40 * c
         + ((x // 8 + y // 8 + i) % 2) * 60 * (i % 4)) % 256
    return v.astype(np.uint8)


def reference_image(j: int) -> np.ndarray:
    """Reference image j, uint8 [h, w, 3]: the same two kinds of pattern in other proportions (one in
    three bright/contrasty), so that precision and recall are neither 0 nor 1."""
    y, x, c = np.meshgrid(np.arange(SIZE_REF), np.arange(SIZE_REF), np.arange(3), indexing="ij")
    if j % 3 == 0:
        v = ((x * (4 + j % 5) + y * (6 + c + j % 4)) * (j % 4 + 1) // 4 + (j // 4) * 25 - 10
             + (((x // 6) ^ (y // 6)) % 3) * 60 * (j % 3) - c * 25 * (j % 3))
        return np.clip(v, 0, 255).astype(np.uint8)
    v = (x * (4 + j % 5) + y * (6 + c + j % 4) + 11 * j + 30 * c
         + (((x // 6) ^ (y // 6)) % 3) * 50 * (j % 3)) % 256
    return v.astype(np.uint8)


def template_state_dict() -> dict:
    """torchvision's Inception3 as pytorch-fid's fid_inception_v3() builds it (1008 classes, fc
    included): the names and shapes of torch-fidelity's FeatureExtractorInceptionV3."""
    t = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    t.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    t.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    t.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    t.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    t.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    t.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    t.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    t.Mixed_7b = pfi.FIDInceptionE_1(1280)
    t.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return t.state_dict()


def features(weights: str, folder: str, dtype: str):
    """torch-fidelity's pool3 and unbiased logits of every PNG of `folder` (sorted, as it reads), by
    its float32 network or the same network in float64 (resize included)."""
    fe = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights)
    if dtype == "float64":
        # torch-fidelity 0.4.0 maps feature_extractor_internal_dtype="float64" to float32
        # (helpers.text_to_dtype), so the float64 network is set up by hand.
        fe.double()
        fe.feature_extractor_internal_dtype = torch.float64
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))
    ds = ImagesPathDataset(files)
    x = torch.stack([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        pool3, logits = fe(x)
    return pool3, logits


def prc_margin(f1: np.ndarray, f2: np.ndarray, k: int = 3) -> float:
    """The smallest relative gap |d - r| / r between a cross distance and a ball radius: how far the
    precision/recall decisions are from flipping."""
    def cdist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    r1 = np.sort(cdist(f1, f1), axis=1)[:, k]
    r2 = np.sort(cdist(f2, f2), axis=1)[:, k]
    d12 = cdist(f1, f2)
    return float(min((np.abs(d12 - r2[None, :]) / r2[None, :]).min(),
                     (np.abs(d12.T - r1[None, :]) / r1[None, :]).min()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    gen_dir, ref_dir = os.path.join(args.out, "generated"), os.path.join(args.out, "reference")
    os.makedirs(gen_dir, exist_ok=True)
    os.makedirs(ref_dir, exist_ok=True)
    for i in range(N_GEN):
        Image.fromarray(generated_image(i)).save(os.path.join(gen_dir, f"{i:03d}.png"))
    for j in range(N_REF):
        Image.fromarray(reference_image(j)).save(os.path.join(ref_dir, f"{j:03d}.png"))

    tv = deterministic_weights(template_state_dict())
    weights = os.path.join(args.out, "inception-fidelity.pth")
    torch.save({n: torch.from_numpy(v) for n, v in tv.items()}, weights)

    subset = min(1000, N_GEN, N_REF)
    # torch-fidelity end to end, its defaults but for: the KID subset size (capped by the set sizes,
    # which torch-fidelity refuses to do itself), no cache, and precision/recall on Inception pool3
    # (torch-fidelity >= 0.4 uses VGG16 fc2 for them by default; pool3 is ADM's evaluator's choice and
    # ours, and one call takes one feature extractor).
    common = dict(input1=gen_dir, input2=ref_dir, cuda=False, isc=True, fid=True, kid=True, prc=True,
                  feature_extractor="inception-v3-compat", feature_layer_prc="2048",
                  feature_extractor_weights_path=weights, kid_subset_size=subset, verbose=False,
                  cache=False, save_cpu_ram=True)
    m32 = torch_fidelity.calculate_metrics(**common)

    f = {}
    for dtype in ("float32", "float64"):
        for name, folder in (("gen", gen_dir), ("ref", ref_dir)):
            f[name, dtype] = features(weights, folder, dtype)
    save_file({f"{name}_{'pool3' if k == 0 else 'logits'}{'' if dt == 'float32' else '64'}":
               f[name, dt][k].numpy().astype(np.float32 if dt == "float32" else np.float64)
               for (name, dt) in f for k in (0, 1)},
              os.path.join(args.out, "features.safetensors"))

    def metrics_of(dtype):
        """torch-fidelity's metric functions on the features of one network: the maths of
        calculate_metrics, called piece by piece."""
        g, r = f["gen", dtype][0], f["ref", dtype][0]
        isc = isc_features_to_metric(f["gen", dtype][1])
        kid = kid_features_to_metric(g, r, kid_subsets=100, kid_subset_size=subset, verbose=False,
                                     kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                     kid_kernel_poly_coef0=1, rng_seed=2020)
        prc = prc_features_to_metric(g, r, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False,
                                     verbose=False)
        fid = fid_statistics_to_metric(fid_features_to_statistics(g), fid_features_to_statistics(r), False)
        return {**fid, **isc, **kid, **prc}

    pieces, m64 = metrics_of("float32"), metrics_of("float64")
    g32, r32 = f["gen", "float32"][0], f["ref", "float32"][0]
    fid_eigen = exact_fid(g32.numpy().astype(np.float64), r32.numpy().astype(np.float64))
    margin = prc_margin(g32.numpy().astype(np.float64), r32.numpy().astype(np.float64))
    err = (f["gen", "float32"][0] - f["gen", "float64"][0]).abs().max().item()

    keys = ["frechet_inception_distance", "inception_score_mean", "inception_score_std",
            "kernel_inception_distance_mean", "kernel_inception_distance_std", "precision", "recall", "f_score"]
    print(f"{'metric':34s} {'torch-fidelity f32':>20s} {'f64 network':>20s} {'from features':>20s}")
    for k in keys:
        print(f"{k:34s} {m32[k]:20.10g} {m64[k]:20.10g} {pieces[k]:20.10g}")
    print(f"FID of the f32 features by the symmetric eigen route: {fid_eigen:.10g}")
    print(f"precision/recall: smallest relative gap between a distance and a ball radius: {margin:.3e}")
    print(f"pool3: mean {g32.mean():.5f}, max {g32.max():.5f}; float32 vs float64 network: max abs diff "
          f"{err:.3e}; logits: spread over images {f['gen', 'float32'][1].std(0).mean():.4f}")

    with open(os.path.join(args.out, "reference.json"), "w") as fh:
        json.dump({"float32": {k: m32[k] for k in keys}, "float64": {k: m64[k] for k in keys},
                   "fid_eigen": fid_eigen, "prc_margin": margin, "kid_subset_size": subset}, fh, indent=1)

    print("// torch-fidelity's float32 network (its default):")
    for k, name in zip(keys, ["FID", "IS_MEAN", "IS_STD", "KID_MEAN", "KID_STD", "PRECISION", "RECALL", "F_SCORE"]):
        print(f"const {name}: f64 = {m32[k]:.9e};")


if __name__ == "__main__":
    main()
