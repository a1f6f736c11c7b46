//! Fused CPU kernels for the velocity network of METHOD.md section 4, each one node of burn's
//! autodiff graph with a hand-written backward pass.
//!
//! burn's `flex` backend runs the network as dozens of separate single-threaded element-wise
//! passes (LayerNorm alone is about eight under autodiff). Here each AdaLN block, the final layer
//! and the time MLP are one operation: the matrix products through the gemm crate, the
//! element-wise work in a few passes split over the cores, vectorised for the widest instruction
//! set the CPU has ([`kernels::isa`], chosen at run time). They compute the same functions as the
//! plain tensor code in `flow/model.rs` (up to float rounding order) and only run where they
//! apply: the flex device, f32 tensors; every other device and dtype takes the plain path.
//!
//! Setting `FLOWALIGN_FUSED=0` turns them off (for comparisons); `FLOWALIGN_ISA=avx2|baseline`
//! caps the instruction set.

pub mod adam;
pub mod kernels;
mod ops;

use std::sync::atomic::{AtomicU8, Ordering};

use burn::backend::Dispatch;
use burn::prelude::*;
use burn::tensor::DType;

use ops::FusedOps;

/// 0: not read yet; 1: off; 2: on.
static ENABLED: AtomicU8 = AtomicU8::new(0);

/// Whether the fused operations are switched on (they are unless `FLOWALIGN_FUSED=0` or
/// [`set_enabled`] said otherwise).
pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("FLOWALIGN_FUSED").map_or(true, |v| v != "0");
            ENABLED.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        v => v == 2,
    }
}

/// Switches the fused operations on or off for the whole process (benchmarks compare both).
pub fn set_enabled(on: bool) {
    ENABLED.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Whether the fused operations can run on tensors of `dtype` on `device`: burn's flex CPU
/// device (with or without autodiff) and f32.
pub fn supports(device: &Device, dtype: DType) -> bool {
    enabled() && dtype == DType::F32 && *device == Device::flex()
}

/// The parameters of one linear layer `y = x w + b` (burn's `[d_in, d_out]` weight).
#[derive(Clone, Debug)]
pub struct Affine {
    pub weight: Tensor<2>,
    pub bias: Tensor<1>,
}

/// One AdaLN block (METHOD.md section 4): with `(shift, scale, gate) = s wm + bm`,
/// `h = (LN(x) * gamma + beta) * (1 + scale) + shift`, and the output
/// `x + gate * (silu(h w1 + b1) w2 + b2)`.
///
/// # Shapes
/// - `x`: `[batch, C]`; `s` (the condition after SiLU): `[batch, C]` or `[1, C]` shared by all rows
/// - `modulation`: `[C, 3C]`, `[3C]`; `gamma`, `beta`: `[C]`; `fc1`, `fc2`: `[C, C]`, `[C]`
/// - output: `[batch, C]`
pub fn adaln_block(
    x: Tensor<2>,
    s: Tensor<2>,
    modulation: Affine,
    norm: (Tensor<1>, Tensor<1>),
    fc1: Affine,
    fc2: Affine,
) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::adaln_block(
        x.into_dispatch(),
        s.into_dispatch(),
        modulation.weight.into_dispatch(),
        modulation.bias.into_dispatch(),
        norm.0.into_dispatch(),
        norm.1.into_dispatch(),
        fc1.weight.into_dispatch(),
        fc1.bias.into_dispatch(),
        fc2.weight.into_dispatch(),
        fc2.bias.into_dispatch(),
    ))
}

/// The final layer (METHOD.md section 4): with `(shift, scale) = s wm + bm`,
/// `(LN(x) * (1 + scale) + shift) wout + bout`, LayerNorm without affine parameters.
///
/// # Shapes
/// - `x`: `[batch, C]`; `s`: `[batch, C]` or `[1, C]`; `modulation`: `[C, 2C]`, `[2C]`;
///   `out`: `[C, d]`, `[d]`
/// - output: `[batch, d]`
pub fn adaln_final(x: Tensor<2>, s: Tensor<2>, modulation: Affine, out: Affine) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::adaln_final(
        x.into_dispatch(),
        s.into_dispatch(),
        modulation.weight.into_dispatch(),
        modulation.bias.into_dispatch(),
        out.weight.into_dispatch(),
        out.bias.into_dispatch(),
    ))
}

/// [`adaln_block`] with the modulation `(shift, scale, gate)` of each row read from a table of
/// time instead of computed from the condition: `table` holds it at `k + 1` evenly spaced times
/// over [0, 1] and one more step beyond each end (`(j - 1) / k` in row `j`), and each row's is the
/// cubic through the four table rows around its time ([`kernels::table_rows`]). The table gets a
/// gradient (when it takes one: in training), `t` none; every `t` must lie in [0, 1].
///
/// # Shapes
/// - `x`: `[batch, C]`; `t`: `[batch]`; `table`: `[k + 3, 3C]`; the rest as in [`adaln_block`]
/// - output: `[batch, C]`
pub fn adaln_block_tabulated(
    x: Tensor<2>,
    t: Tensor<1>,
    table: Tensor<2>,
    norm: (Tensor<1>, Tensor<1>),
    fc1: Affine,
    fc2: Affine,
) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::adaln_block_tabulated(
        x.into_dispatch(),
        t.into_dispatch(),
        table.into_dispatch(),
        norm.0.into_dispatch(),
        norm.1.into_dispatch(),
        fc1.weight.into_dispatch(),
        fc1.bias.into_dispatch(),
        fc2.weight.into_dispatch(),
        fc2.bias.into_dispatch(),
    ))
}

/// [`adaln_final`] with the modulation `(shift, scale)` read from a table of time, as in
/// [`adaln_block_tabulated`].
///
/// # Shapes
/// - `x`: `[batch, C]`; `t`: `[batch]`; `table`: `[k + 3, 2C]`; `out`: `[C, d]`, `[d]`
/// - output: `[batch, d]`
pub fn adaln_final_tabulated(
    x: Tensor<2>,
    t: Tensor<1>,
    table: Tensor<2>,
    out: Affine,
) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::adaln_final_tabulated(
        x.into_dispatch(),
        t.into_dispatch(),
        table.into_dispatch(),
        out.weight.into_dispatch(),
        out.bias.into_dispatch(),
    ))
}

/// The condition every modulation reads (METHOD.md section 4):
/// `silu(silu(emb w1 + b1) w2 + b2)`.
///
/// # Shapes
/// - `emb`: `[batch, 256]`; `fc1`: `[256, C]`, `[C]`; `fc2`: `[C, C]`, `[C]`
/// - output: `[batch, C]`
pub fn time_condition(emb: Tensor<2>, fc1: Affine, fc2: Affine) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::time_condition(
        emb.into_dispatch(),
        fc1.weight.into_dispatch(),
        fc1.bias.into_dispatch(),
        fc2.weight.into_dispatch(),
        fc2.bias.into_dispatch(),
    ))
}

#[cfg(test)]
mod tests;
