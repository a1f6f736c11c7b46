//! The fused multiply-add peak of this machine's cores, measured, and the FLOPs of the benchmarked
//! steps: the two halves of every benchmark's "fraction of peak".
//!
//! The peak is a loop of 12 independent FMA chains at the widest vector width the CPU has
//! (AVX-512 or AVX2, chosen at run time); the best of many short bursts is kept, so a loaded
//! machine understates it less, and the peak of all cores is that of one times their number. FLOPs count the matrix products only
//! (2 m n k each), as is usual; element-wise work is left out.

use std::time::Instant;

use serde_json::{Value, json};

/// FMA chains per loop: enough to cover the FMA latency on two pipes.
const CHAINS: usize = 12;
/// Loop iterations per burst (about 5 ms at 3 GHz with AVX2).
const ITERS: u64 = 1 << 19;

/// The measured peak.
#[derive(Debug, Clone, Copy)]
pub struct Peak {
    /// The vector width measured.
    pub isa: &'static str,
    /// f32 lanes per FMA instruction.
    pub lanes: usize,
    /// Cores (threads) run at once.
    pub cores: usize,
    /// Best single-core rate.
    pub core_gflops: f64,
    /// The peak of all cores: `cores` x the single-core rate (all cores are alike here, and a
    /// busy machine rarely gives every core at once).
    pub gflops: f64,
    /// Best rate measured with every core running at once.
    pub all_cores_measured_gflops: f64,
}

impl Peak {
    /// The peak as JSON, with the CPU's model name.
    pub fn json(&self) -> Value {
        json!({
            "cpu": cpu_name(),
            "isa": self.isa,
            "f32_lanes": self.lanes,
            "cores": self.cores,
            "core_gflops": self.core_gflops,
            "gflops": self.gflops,
            "all_cores_measured_gflops": self.all_cores_measured_gflops,
            "method": "12 independent FMA chains, best of 50 bursts of about 1 ms; peak = cores x one core's rate",
        })
    }
}

/// The kernel family the gemm crate picks on this CPU for f32 products: it is built with its
/// AVX-512 kernels (`x86-v4`) and chooses at run time by the same test, AVX-512 F first, then FMA.
pub fn gemm_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if is_x86_feature_detected!("fma") {
            return "fma";
        }
    }
    "scalar"
}

/// The CPU's model name from /proc/cpuinfo (Linux), else the architecture.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// One burst of `ITERS` loop iterations; returns (FLOPs, a value to keep the loop alive).
fn burst() -> (f64, f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU reports AVX-512F.
            let v = unsafe { x86::fma_avx512(ITERS) };
            return ((ITERS as usize * CHAINS * 16 * 2) as f64, v);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU reports AVX2 and FMA.
            let v = unsafe { x86::fma_avx2(ITERS) };
            return ((ITERS as usize * CHAINS * 8 * 2) as f64, v);
        }
    }
    let mut acc = [0f32; CHAINS];
    for _ in 0..ITERS / 16 {
        for a in &mut acc {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    ((ITERS / 16) as f64 * CHAINS as f64 * 2.0, acc.iter().sum())
}

fn isa() -> (&'static str, usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return ("avx512", 16);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return ("avx2+fma", 8);
        }
    }
    ("scalar", 1)
}

/// Best GFLOP/s of `threads` threads bursting at once, over `rounds` rounds.
fn best_rate(threads: usize, rounds: usize) -> f64 {
    let mut best = 0f64;
    for _ in 0..rounds {
        let barrier = std::sync::Barrier::new(threads);
        let start = Instant::now();
        let flops: f64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let (f, v) = burst();
                        std::hint::black_box(v);
                        f
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        best = best.max(flops / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Measures the peak of one core and of all `cores` cores (about a second).
pub fn measure(cores: usize) -> Peak {
    let (isa, lanes) = isa();
    let core_gflops = best_rate(1, 50);
    let all_cores_measured_gflops = best_rate(cores.max(1), 50);
    Peak {
        isa,
        lanes,
        cores,
        core_gflops,
        gflops: cores.max(1) as f64 * core_gflops,
        all_cores_measured_gflops,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::CHAINS;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_avx2(iters: u64) -> f32 {
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        let mut acc = [_mm256_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for v in &mut acc {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut out = [0f32; 8];
        let sum = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, v| _mm256_add_ps(s, *v));
        // SAFETY: `out` holds 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
        out.iter().sum()
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_avx512(iters: u64) -> f32 {
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for v in &mut acc {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        let sum = acc
            .iter()
            .fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v));
        _mm512_reduce_add_ps(sum)
    }
}

/// Matrix-product FLOPs of the velocity network (METHOD.md section 4) per row, for a forward pass
/// and for the backward passes a step needs.
#[derive(Debug, Clone, Copy)]
pub struct MlpFlops {
    pub dim: usize,
    pub width: usize,
    pub depth: usize,
}

impl MlpFlops {
    /// Forward FLOPs per row with a per-row time (the condition computed for every row).
    pub fn forward(&self) -> f64 {
        let (d, c, l) = (self.dim as f64, self.width as f64, self.depth as f64);
        2.0 * d * c
            + 2.0 * 256.0 * c
            + 2.0 * c * c
            + l * (2.0 * c * 3.0 * c + 4.0 * c * c)
            + 2.0 * c * 2.0 * c
            + 2.0 * c * d
    }

    /// Forward FLOPs per row when the condition is shared by all rows (heatmaps, ODE steps).
    pub fn forward_shared_time(&self) -> f64 {
        let (d, c, l) = (self.dim as f64, self.width as f64, self.depth as f64);
        2.0 * d * c + l * 4.0 * c * c + 2.0 * c * d
    }

    /// A training step per row: forward, every weight gradient, and the input gradients of all
    /// layers but the two that read the data and the time embedding.
    pub fn train(&self) -> f64 {
        let (d, c) = (self.dim as f64, self.width as f64);
        let fwd = self.forward();
        fwd + fwd + (fwd - 2.0 * d * c - 2.0 * 256.0 * c)
    }

    /// [`Self::train`] with the modulation read from a table of time of `k` intervals built for the
    /// step ([`flowalign::flow::frozen`]): the time MLP and the modulations no longer run per row,
    /// and each row adds its share of the table's gradient, a `[k + 3, rows] x [rows, 3CL + 2C]`
    /// product. The table's own rows (about `2k + 5` per step) are left out.
    pub fn train_tabulated(&self, k: usize) -> f64 {
        let (d, c, l) = (self.dim as f64, self.width as f64, self.depth as f64);
        3.0 * self.forward_shared_time() - 2.0 * d * c
            + 2.0 * (k as f64 + 3.0) * (3.0 * l * c + 2.0 * c)
    }

    /// An alignment step per row (frozen network): forward, then the input gradient through the
    /// blocks' MLPs, the output layer and the input projection.
    pub fn align(&self) -> f64 {
        let (d, c, l) = (self.dim as f64, self.width as f64, self.depth as f64);
        self.forward() + l * 4.0 * c * c + 2.0 * c * d + 2.0 * d * c
    }

    /// [`Self::align`] with the modulation read from a table of time ([`flowalign::flow::FrozenPrior`]):
    /// neither the time MLP nor the modulations run per row.
    pub fn align_tabulated(&self) -> f64 {
        let (c, l) = (self.width as f64, self.depth as f64);
        self.align() - (2.0 * 256.0 * c + 2.0 * c * c + l * 6.0 * c * c + 4.0 * c * c)
    }
}

/// The ViT autoencoder step's FLOPs (matrix products; METHOD.md section 6): encoder over patches
/// + [CLS] + latent tokens, decoder over latent + mask tokens, forward and backward (x 3).
pub fn vit_ae_train_flops(
    batch: usize,
    image: usize,
    patch: usize,
    width: usize,
    depth: usize,
    latent_tokens: usize,
    latent_dim: usize,
) -> f64 {
    let p = (image / patch).pow(2) as f64;
    let w = width as f64;
    let pp = (3 * patch * patch) as f64;
    let block =
        |t: f64| 2.0 * t * w * 3.0 * w + 4.0 * t * t * w + 2.0 * t * w * w + 16.0 * t * w * w;
    let enc_t = 1.0 + p + latent_tokens as f64;
    let dec_t = latent_tokens as f64 + p;
    let k = latent_tokens as f64;
    let encoder = 2.0 * p * pp * w + depth as f64 * block(enc_t) + 2.0 * k * w * latent_dim as f64;
    let decoder = 2.0 * k * latent_dim as f64 * w + depth as f64 * block(dec_t) + 2.0 * p * w * pp;
    3.0 * batch as f64 * (encoder + decoder)
}
