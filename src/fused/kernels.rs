//! Row kernels over f32 slices for the fused operations of [`super`]: the adaptive LayerNorm, bias +
//! SiLU, gate + residual of METHOD.md section 4, their backward passes, and the matrix products
//! between them.
//!
//! Every kernel reads and writes whole rows. A tensor is split into blocks of [`BLOCK_ROWS`] rows
//! that run on rayon's threads; column sums (bias, LayerNorm and modulation gradients) are summed
//! per block and then over blocks in block order, and inside a row in 16 fixed lanes, so results do
//! not depend on the number of threads or on the instruction set.

use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;

/// Rows per parallel task; fixed so that sums do not depend on the thread count.
pub const BLOCK_ROWS: usize = 16;
/// Below this many elements a kernel runs on the calling thread (rayon's hand-off costs more).
const PARALLEL_MIN: usize = 1 << 14;
/// Lanes of every in-row sum (two AVX2 or one AVX-512 register).
const LANES: usize = 16;
/// LayerNorm epsilon (METHOD.md section 4).
pub const LN_EPS: f32 = 1e-6;

/// The widest vector instruction set the element-wise kernels use, chosen once at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// x86-64 AVX-512F (with AVX2 and FMA).
    Avx512,
    /// x86-64 AVX2 and FMA.
    Avx2,
    /// Whatever the binary was compiled for (SSE2 on x86-64).
    Baseline,
}

impl Isa {
    /// The name `FLOWALIGN_ISA` accepts and benchmarks report.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Baseline => "baseline",
        }
    }
}

/// The instruction set of this CPU the kernels use: the widest it has, or a narrower one named by
/// the environment variable `FLOWALIGN_ISA` (`avx2`, `baseline`) to check the fallbacks.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let widest = widest_isa();
        match std::env::var("FLOWALIGN_ISA").as_deref() {
            Ok("baseline") => Isa::Baseline,
            Ok("avx2") if widest != Isa::Baseline => Isa::Avx2,
            _ => widest,
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn widest_isa() -> Isa {
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
    {
        Isa::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Isa::Avx2
    } else {
        Isa::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn widest_isa() -> Isa {
    Isa::Baseline
}

/// Compiles the body once per instruction set and calls the one [`isa`] picked. The body is
/// written as plain loops that LLVM vectorises to the enabled width; it must not multiply-add
/// through `mul_add`, so every version computes the same rounded values.
macro_rules! multiversion {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) { generic($($arg),*) }
                match $crate::fused::kernels::isa() {
                    // SAFETY: `isa()` returns Avx512 only when the CPU reports these features.
                    $crate::fused::kernels::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: `isa()` returns Avx2 only when the CPU reports AVX2 and FMA.
                    $crate::fused::kernels::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::fused::kernels::Isa::Baseline => {}
                }
            }
            generic($($arg),*)
        }
    };
}

pub(crate) use multiversion;

// ---------------------------------------------------------------------------------------------
// Scalar building blocks (inlined into every kernel).

/// `e^x` to about 2 ulp for x in [-87, 88] (clamped outside; NaN stays NaN): Cody-Waite range
/// reduction and Cephes' polynomial, branch-free so loops over it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let y = p * (r * r) + r + 1.0;
    let scale = f32::from_bits(((n_int + 127) << 23) as u32);
    y * scale
}

/// The logistic function, written as burn's (`1 / (1 + e^-x)` for x >= 0, `e^x / (1 + e^x)` below).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    let e = exp(-x.abs());
    if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

/// The sum of `v` in 16 lanes, then over the lanes, then the tail.
#[inline(always)]
fn sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for ch in chunks {
        for j in 0..LANES {
            acc[j] += ch[j];
        }
    }
    fold_lanes(acc) + tail.iter().sum::<f32>()
}

/// `sum((v - mean)^2)` in 16 lanes.
#[inline(always)]
fn sum_sq_centered(v: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for ch in chunks {
        for j in 0..LANES {
            let d = ch[j] - mean;
            acc[j] += d * d;
        }
    }
    fold_lanes(acc) + tail.iter().map(|&x| (x - mean) * (x - mean)).sum::<f32>()
}

/// `(sum(a), sum(a * b))` in 16 lanes.
#[inline(always)]
fn sum_and_dot(a: &[f32], b: &[f32]) -> (f32, f32) {
    let mut s = [0f32; LANES];
    let mut d = [0f32; LANES];
    let n = a.len() / LANES * LANES;
    for (ca, cb) in a[..n].chunks_exact(LANES).zip(b[..n].chunks_exact(LANES)) {
        for j in 0..LANES {
            s[j] += ca[j];
            d[j] += ca[j] * cb[j];
        }
    }
    let (mut s_tail, mut d_tail) = (0.0, 0.0);
    for (&x, &y) in a[n..].iter().zip(&b[n..]) {
        s_tail += x;
        d_tail += x * y;
    }
    (fold_lanes(s) + s_tail, fold_lanes(d) + d_tail)
}

/// Pairwise sum of 16 lanes.
#[inline(always)]
fn fold_lanes(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for j in 0..width {
            acc[j] += acc[j + width];
        }
        width /= 2;
    }
    acc[0]
}

// ---------------------------------------------------------------------------------------------
// Parallel row blocks.

/// An element of a buffer that is written before it is read (see [`Fresh`]).
pub type Out = MaybeUninit<f32>;

/// A buffer of `f32` whose every element a kernel writes before anything reads it, so it needs no
/// zeroing (a pass over memory that showed as 4 % of a training step).
pub struct Fresh(Vec<Out>);

impl Fresh {
    pub fn new(len: usize) -> Self {
        let mut v = Vec::with_capacity(len);
        // SAFETY: `MaybeUninit` elements need no initialisation.
        unsafe { v.set_len(len) };
        Fresh(v)
    }

    pub fn out(&mut self) -> &mut [Out] {
        &mut self.0
    }

    /// The values.
    ///
    /// # Safety
    /// Every element must have been written.
    pub unsafe fn assume_init(self) -> Vec<f32> {
        let mut v = std::mem::ManuallyDrop::new(self.0);
        // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and the caller promises every element
        // is initialised; the allocation is handed over unchanged.
        unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
    }
}

/// A mutable slice that parallel tasks write in disjoint row ranges.
pub struct Disjoint<'a, T = f32> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: tasks only touch disjoint ranges (see `Disjoint::range`), so sharing the pointer across
// threads is as safe as splitting the slice.
unsafe impl<T: Send> Send for Disjoint<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for Disjoint<'_, T> {}

impl<'a, T> Disjoint<'a, T> {
    pub fn new(slice: &'a mut [T]) -> Self {
        Disjoint {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
            _borrow: PhantomData,
        }
    }

    /// The elements `range`.
    ///
    /// # Safety
    /// No other live reference may overlap `range`: each task asks only for its own rows.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, range: Range<usize>) -> &'a mut [T] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (checked above); exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

/// Runs `task(block, rows)` for every block of [`BLOCK_ROWS`] rows of an `n`-row tensor with
/// `work` elements in all, in parallel when the tensor is large.
pub fn for_blocks(n: usize, work: usize, task: impl Fn(usize, Range<usize>) + Sync) {
    let blocks = n.div_ceil(BLOCK_ROWS);
    let rows = |b: usize| b * BLOCK_ROWS..((b + 1) * BLOCK_ROWS).min(n);
    if work >= PARALLEL_MIN && rayon::current_num_threads() > 1 {
        (0..blocks).into_par_iter().for_each(|b| task(b, rows(b)));
    } else {
        (0..blocks).for_each(|b| task(b, rows(b)));
    }
}

/// The number of row blocks of an `n`-row tensor.
pub fn blocks(n: usize) -> usize {
    n.div_ceil(BLOCK_ROWS)
}

/// Sums the per-block partial rows `[blocks, width]` in block order.
pub fn sum_partials(partials: &[f32], width: usize) -> Vec<f32> {
    let mut out = vec![0f32; width];
    for part in partials.chunks_exact(width) {
        add_assign(&mut out, part);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tables of a function of time.

/// Where `t` in [0, 1] falls in a table of `k >= 1` intervals whose row `j` holds the function at
/// `(j - 1) / k` (`k + 3` rows: one step beyond each end of [0, 1]): the first of the four rows
/// around `t`, and their weights in the cubic through those four points (Lagrange form).
#[inline]
pub fn table_stencil(t: f32, k: usize) -> (usize, [f32; 4]) {
    let x = t * k as f32;
    let i = (x.floor().max(0.0) as usize).min(k - 1);
    let u = x - i as f32;
    // The four points sit at u = -1, 0, 1, 2.
    let (a, b, c, d) = (u + 1.0, u, u - 1.0, u - 2.0);
    (
        i,
        [
            -b * c * d / 6.0,
            a * c * d / 2.0,
            -a * b * d / 2.0,
            a * b * c / 6.0,
        ],
    )
}

multiversion! {
    /// `out = w[0] r0 + w[1] r1 + w[2] r2 + w[3] r3`, element by element.
    pub fn combine4(r0: &[f32], r1: &[f32], r2: &[f32], r3: &[f32], w: [f32; 4], out: &mut [Out]) {
        for ((((o, &a), &b), &c), &d) in out.iter_mut().zip(r0).zip(r1).zip(r2).zip(r3) {
            o.write(w[0] * a + w[1] * b + w[2] * c + w[3] * d);
        }
    }
}

/// The rows of a table of `k` intervals (see [`table_stencil`]) interpolated at each of `t`, into
/// `out` (`[t.len(), width]`, every element written).
pub fn table_rows(table: &[f32], k: usize, t: &[f32], out: &mut [Out]) {
    let width = table.len() / (k + 3);
    assert_eq!(table.len(), (k + 3) * width, "a table has k + 3 rows");
    assert_eq!(out.len(), t.len() * width, "one output row per time");
    let oo = Disjoint::new(out);
    for_blocks(t.len(), t.len() * width, |_, rows| {
        // SAFETY: each block writes only its own rows.
        let out = unsafe { oo.range(rows.start * width..rows.end * width) };
        for (o, &t) in out.chunks_exact_mut(width).zip(&t[rows]) {
            let (i, w) = table_stencil(t, k);
            let row = |j: usize| &table[(i + j) * width..(i + j + 1) * width];
            combine4(row(0), row(1), row(2), row(3), w, o);
        }
    });
}

/// The transpose of [`table_rows`]: the gradient of a table of `k` intervals (`[k + 3, width]`)
/// from the gradient `d` (`[t.len(), width]`) of the rows interpolated at `t`. Each table row
/// gets the rows of `d` weighted by its stencil weights, as one product with the (mostly zero)
/// `[t.len(), k + 3]` interpolation matrix, so the sum runs in a fixed order on every core count.
pub fn table_rows_grad(k: usize, t: &[f32], d: &[f32]) -> Vec<f32> {
    let (n, rows) = (t.len(), k + 3);
    assert_eq!(d.len() % n.max(1), 0, "one gradient row per time");
    let width = d.len().checked_div(n).unwrap_or(0);
    let mut p = vec![0f32; n * rows];
    for (r, &t) in p.chunks_exact_mut(rows).zip(t) {
        let (i, w) = table_stencil(t, k);
        r[i..i + 4].copy_from_slice(&w);
    }
    matmul(Mat::new(&p, n, rows).t(), Mat::new(d, n, width))
}

multiversion! {
    /// `acc += v`.
    pub fn add_assign(acc: &mut [f32], v: &[f32]) {
        for (a, &x) in acc.iter_mut().zip(v) {
            *a += x;
        }
    }
}

multiversion! {
    /// Adds every row of `rows` (width `row.len()`) to `acc`, in row order.
    pub fn add_rows(acc: &mut [f32], rows: &[f32]) {
        for r in rows.chunks_exact(acc.len()) {
            for (a, &x) in acc.iter_mut().zip(r) {
                *a += x;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forward kernels (one block of rows each).

/// Where the modulation of a block of rows lives: rows of `m` with `stride` elements each (0 when
/// one row is shared by every row), and the columns of each part.
#[derive(Clone, Copy)]
pub struct ModRows<'a> {
    pub m: &'a [f32],
    pub stride: usize,
}

impl<'a> ModRows<'a> {
    /// `len` values at column `col` of row `row` (relative to the block).
    #[inline(always)]
    pub fn part(&self, row: usize, col: usize, len: usize) -> &'a [f32] {
        let start = row * self.stride + col;
        &self.m[start..start + len]
    }
}

multiversion! {
    /// For each row: LayerNorm statistics, `xhat = (x - mean) / sqrt(var + eps)`,
    /// `y = xhat * gamma + beta` (affine when given) and `h = y * (1 + scale) + shift`, with
    /// shift and scale the modulation columns `[0, c)` and `[c, 2c)` (METHOD.md section 4).
    pub fn ln_modulate(
        x: &[f32],
        c: usize,
        affine: Option<(&[f32], &[f32])>,
        m: ModRows<'_>,
        xhat: &mut [Out],
        h: &mut [Out],
        denom: &mut [Out],
    ) {
        for (i, ((xr, (xh, hr)), d)) in x
            .chunks_exact(c)
            .zip(xhat.chunks_exact_mut(c).zip(h.chunks_exact_mut(c)))
            .zip(denom.iter_mut())
            .enumerate()
        {
            let mean = sum(xr) / c as f32;
            let var = sum_sq_centered(xr, mean) / c as f32;
            let dn = (var + LN_EPS).sqrt();
            d.write(dn);
            let shift = m.part(i, 0, c);
            let scale = m.part(i, c, c);
            match affine {
                Some((gamma, beta)) => {
                    for j in 0..c {
                        let n = (xr[j] - mean) / dn;
                        xh[j].write(n);
                        hr[j].write((n * gamma[j] + beta[j]) * (scale[j] + 1.0) + shift[j]);
                    }
                }
                None => {
                    for j in 0..c {
                        let n = (xr[j] - mean) / dn;
                        xh[j].write(n);
                        hr[j].write(n * (scale[j] + 1.0) + shift[j]);
                    }
                }
            }
        }
    }
}

multiversion! {
    /// `z += bias` row by row, then `a = silu(z) = z * sigmoid(z)`.
    pub fn bias_silu(z: &mut [f32], bias: &[f32], a: &mut [Out]) {
        let c = bias.len();
        for (zr, ar) in z.chunks_exact_mut(c).zip(a.chunks_exact_mut(c)) {
            for j in 0..c {
                let v = zr[j] + bias[j];
                zr[j] = v;
                ar[j].write(v * sigmoid(v));
            }
        }
    }
}

multiversion! {
    /// `z += bias` row by row, then `out = x + gate * z` with gate the modulation columns
    /// `[2c, 3c)`.
    pub fn bias_gate_residual(z: &mut [f32], bias: &[f32], x: &[f32], m: ModRows<'_>, out: &mut [Out]) {
        let c = bias.len();
        for (i, ((zr, xr), o)) in z
            .chunks_exact_mut(c)
            .zip(x.chunks_exact(c))
            .zip(out.chunks_exact_mut(c))
            .enumerate()
        {
            let gate = m.part(i, 2 * c, c);
            for j in 0..c {
                let v = zr[j] + bias[j];
                zr[j] = v;
                o[j].write(xr[j] + gate[j] * v);
            }
        }
    }
}

multiversion! {
    /// Fills every row of `out` with `bias`.
    pub fn fill_rows(out: &mut [Out], bias: &[f32]) {
        for r in out.chunks_exact_mut(bias.len()) {
            for (o, &b) in r.iter_mut().zip(bias) {
                o.write(b);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward kernels (one block of rows each).

multiversion! {
    /// Backward of `out = x + gate * z`: `dz = g * gate` and `dgate = g * z` (written to the
    /// modulation gradient's columns `[2c, 3c)`, row stride `3c`); adds the column sums of `dz` to
    /// `dbias` and of `dgate` to `dgate_sum`.
    pub fn gate_residual_bwd(
        g: &[f32],
        z: &[f32],
        m: ModRows<'_>,
        dz: &mut [Out],
        dm: Option<&mut [Out]>,
        dbias: &mut [f32],
        dgate_sum: Option<&mut [f32]>,
    ) {
        let c = dbias.len();
        for (i, (gr, dzr)) in g.chunks_exact(c).zip(dz.chunks_exact_mut(c)).enumerate() {
            let gate = m.part(i, 2 * c, c);
            for j in 0..c {
                let d = gr[j] * gate[j];
                dzr[j].write(d);
                dbias[j] += d;
            }
        }
        if let (Some(dm), Some(dgs)) = (dm, dgate_sum) {
            for ((gr, zr), dmr) in g.chunks_exact(c).zip(z.chunks_exact(c)).zip(dm.chunks_exact_mut(3 * c)) {
                let dg = &mut dmr[2 * c..3 * c];
                for j in 0..c {
                    let v = gr[j] * zr[j];
                    dg[j].write(v);
                    dgs[j] += v;
                }
            }
        }
    }
}

multiversion! {
    /// Backward of `a = silu(z)` in place: `d <- d * silu'(z)`; adds the column sums of the result
    /// to `dbias`.
    pub fn silu_bwd(d: &mut [f32], z: &[f32], dbias: &mut [f32]) {
        let c = dbias.len();
        for (dr, zr) in d.chunks_exact_mut(c).zip(z.chunks_exact(c)) {
            for j in 0..c {
                let v = zr[j];
                let s = sigmoid(v);
                let r = dr[j] * (s * (1.0 + v * (1.0 - s)));
                dr[j] = r;
                dbias[j] += r;
            }
        }
    }
}

multiversion! {
    /// Backward of [`ln_modulate`] for each row, given `dh`:
    /// `dshift = dh`, `dscale = dh * y`, `dy = dh * (1 + scale)`, `dgamma += dy * xhat`,
    /// `dbeta += dy`, and `dx = g + (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / denom`
    /// with `dxhat = dy * gamma` (`g` the residual's gradient, when there is one). `dm` receives
    /// dshift and dscale in its columns `[0, 2c)` (row stride `dm_stride`); `dmod_sum` their column
    /// sums; `scratch` holds two rows.
    pub fn ln_modulate_bwd(
        dh: &[f32],
        xhat: &[f32],
        denom: &[f32],
        c: usize,
        affine: Option<(&[f32], &[f32])>,
        m: ModRows<'_>,
        g: Option<&[f32]>,
        dx: Option<&mut [Out]>,
        dm: Option<(&mut [Out], usize)>,
        daffine: Option<(&mut [f32], &mut [f32])>,
        dmod_sum: Option<&mut [f32]>,
        scratch: &mut [f32],
    ) {
        let rows = denom.len();
        let mut dx = dx;
        let mut dm = dm;
        let mut daffine = daffine;
        let mut dmod_sum = dmod_sum;
        for i in 0..rows {
            let dhr = &dh[i * c..(i + 1) * c];
            let xh = &xhat[i * c..(i + 1) * c];
            let scale = m.part(i, c, c);
            // dy = dh * (1 + scale), then dxhat = dy * gamma (kept in scratch).
            match (&mut daffine, affine) {
                (Some((dgamma, dbeta)), Some((gamma, _))) => {
                    for j in 0..c {
                        let dy = dhr[j] * (scale[j] + 1.0);
                        dgamma[j] += dy * xh[j];
                        dbeta[j] += dy;
                        scratch[j] = dy * gamma[j];
                    }
                }
                (None, Some((gamma, _))) => {
                    for j in 0..c {
                        scratch[j] = dhr[j] * (scale[j] + 1.0) * gamma[j];
                    }
                }
                _ => {
                    for j in 0..c {
                        scratch[j] = dhr[j] * (scale[j] + 1.0);
                    }
                }
            }
            if let Some((dm, stride)) = &mut dm {
                let row = &mut dm[i * *stride..i * *stride + 2 * c];
                let (dshift, dscale) = row.split_at_mut(c);
                for j in 0..c {
                    dshift[j].write(dhr[j]);
                }
                // dscale = dh * y, kept in `y` for the sums below.
                let y = &mut scratch[c..2 * c];
                match affine {
                    Some((gamma, beta)) => {
                        for j in 0..c {
                            y[j] = dhr[j] * (xh[j] * gamma[j] + beta[j]);
                        }
                    }
                    None => {
                        for j in 0..c {
                            y[j] = dhr[j] * xh[j];
                        }
                    }
                }
                for j in 0..c {
                    dscale[j].write(y[j]);
                }
                if let Some(sums) = &mut dmod_sum {
                    let (s_shift, s_scale) = sums.split_at_mut(c);
                    for j in 0..c {
                        s_shift[j] += dhr[j];
                        s_scale[j] += y[j];
                    }
                }
            }
            if let Some(dx) = &mut dx {
                let (s, d) = sum_and_dot(&scratch[..c], xh);
                let m1 = s / c as f32;
                let m2 = d / c as f32;
                let dn = denom[i];
                let out = &mut dx[i * c..(i + 1) * c];
                match g {
                    Some(g) => {
                        let gr = &g[i * c..(i + 1) * c];
                        for j in 0..c {
                            out[j].write(gr[j] + (scratch[j] - m1 - xh[j] * m2) / dn);
                        }
                    }
                    None => {
                        for j in 0..c {
                            out[j].write((scratch[j] - m1 - xh[j] * m2) / dn);
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Matrix products (the gemm crate burn's CPU backend uses, with its own dispatch to FMA or AVX-512).

/// A row-major or transposed view of a matrix held in a slice.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    /// Element `(r, c)` is at `r * rs + c * cs`.
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `[rows, cols]` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix data too short");
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (a view).
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn max_index(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs
        }
    }
}

/// `dst += lhs * rhs` with `dst` row-major `[lhs.rows, rhs.cols]`.
pub fn matmul_add(dst: &mut [f32], lhs: Mat<'_>, rhs: Mat<'_>) {
    assert!(dst.len() >= lhs.rows * rhs.cols, "destination too short");
    gemm_into(
        dst.as_mut_ptr(),
        lhs,
        rhs,
        true,
        rayon::current_num_threads(),
    );
}

/// `lhs * rhs` as a new row-major `[lhs.rows, rhs.cols]` buffer.
pub fn matmul(lhs: Mat<'_>, rhs: Mat<'_>) -> Vec<f32> {
    matmul_on(lhs, rhs, rayon::current_num_threads())
}

/// Two independent products, `(a.0 * a.1, b.0 * b.1)`, each skipped when `None`, computed at
/// the same time on two halves of the cores.
///
/// A layer's backward pass needs its weight gradient `x^T dy` and its input gradient `dy w^T`,
/// which cost the same arithmetic. Split over the cores one after the other, the weight gradient
/// is gemm's worst case: its inner dimension is the batch, and gemm's threads meet at a barrier
/// for every block of the inner dimension. Side by side, each product runs whole on its own
/// cores (on two cores: on one core each, with no synchronisation inside either).
#[allow(clippy::type_complexity)]
pub fn matmul_pair(
    a: Option<(Mat<'_>, Mat<'_>)>,
    b: Option<(Mat<'_>, Mat<'_>)>,
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let threads = rayon::current_num_threads();
    match (a, b) {
        (Some(a), Some(b)) if threads > 1 => {
            let half = threads / 2;
            let (x, y) = rayon::join(
                || matmul_on(a.0, a.1, half),
                || matmul_on(b.0, b.1, threads - half),
            );
            (Some(x), Some(y))
        }
        (a, b) => (a.map(|(l, r)| matmul(l, r)), b.map(|(l, r)| matmul(l, r))),
    }
}

/// `lhs * rhs` as a new buffer, split over at most `threads` cores.
fn matmul_on(lhs: Mat<'_>, rhs: Mat<'_>, threads: usize) -> Vec<f32> {
    let len = lhs.rows * rhs.cols;
    let mut dst = Fresh::new(len);
    if lhs.cols == 0 {
        dst.out().iter_mut().for_each(|o| {
            o.write(0.0);
        });
    } else {
        gemm_into(
            dst.out().as_mut_ptr().cast::<f32>(),
            lhs,
            rhs,
            false,
            threads,
        );
    }
    // SAFETY: gemm wrote every element (or the loop above did).
    unsafe { dst.assume_init() }
}

/// Rows per band, at least, when a product is split over the cores by rows.
const ROW_BAND: usize = 64;
/// Products smaller than this (m * n * k) run on one core.
const SPLIT_MIN: usize = 64 * 64 * 64;

/// `dst = lhs * rhs`, or `dst += lhs * rhs` when `accumulate`, for a `dst` of at least
/// `lhs.rows * rhs.cols` elements (only read when accumulating), on at most `threads` cores.
fn gemm_into(dst: *mut f32, lhs: Mat<'_>, rhs: Mat<'_>, accumulate: bool, threads: usize) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(k, rhs.rows, "inner dimensions differ");
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(lhs.max_index() < lhs.data.len() && rhs.max_index() < rhs.data.len());
    let large = m * n * k >= 192 * 192 * 192;
    // Below gemm's own threading, a product with enough rows still splits into one band of rows
    // per core (the toy's [512, 96] x [96, 96] would otherwise leave a core idle).
    let parts = threads.min(m / ROW_BAND);
    if !large && parts > 1 && m * n * k >= SPLIT_MIN {
        let band = m.div_ceil(parts);
        let out = dst as usize;
        (0..parts).into_par_iter().for_each(|i| {
            let (r0, r1) = (i * band, ((i + 1) * band).min(m));
            if r0 >= r1 {
                return;
            }
            let sub = Mat {
                data: &lhs.data[r0 * lhs.rs..],
                rows: r1 - r0,
                ..lhs
            };
            // Disjoint bands of `dst`'s rows, one per task.
            let band_dst = (out as *mut f32).wrapping_add(r0 * n);
            gemm_raw(band_dst, sub, rhs, accumulate, gemm::Parallelism::None);
        });
        return;
    }
    let parallelism = if large && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm_raw(dst, lhs, rhs, accumulate, parallelism);
}

/// One gemm call: `dst (+)= lhs * rhs` on operands [`gemm_into`] checked.
fn gemm_raw(
    dst: *mut f32,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    // SAFETY: every index gemm reads is inside the operand slices (checked above); it writes the
    // `m * n` elements of `dst` (the callers' promise), which do not alias the operands (they
    // come from a mutable borrow or a fresh allocation), and reads them only when accumulating.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_std() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.001_7;
        }
        assert!(worst < 4.0 * f32::EPSILON, "worst relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(-1000.0), (-87.0f32).exp().max(exp(-87.0)));
    }

    #[test]
    fn the_table_gradient_is_the_transpose_of_the_interpolation() {
        // <interp(T), D> = <T, grad(D)> for any table T and row gradients D.
        let (k, width) = (5, 3);
        let t = [0.0f32, 0.13, 0.2, 0.5, 0.51, 0.9, 0.999, 1.0, 0.37];
        let table: Vec<f32> = (0..(k + 3) * width)
            .map(|i| (i as f32 * 0.71).sin())
            .collect();
        let d: Vec<f32> = (0..t.len() * width)
            .map(|i| (i as f32 * 1.37).cos())
            .collect();
        let mut rows = Fresh::new(t.len() * width);
        table_rows(&table, k, &t, rows.out());
        // SAFETY: `table_rows` writes every element.
        let rows = unsafe { rows.assume_init() };
        let grad = table_rows_grad(k, &t, &d);
        assert_eq!(grad.len(), table.len());
        let lhs: f32 = rows.iter().zip(&d).map(|(a, b)| a * b).sum();
        let rhs: f32 = table.iter().zip(&grad).map(|(a, b)| a * b).sum();
        assert!(
            (lhs - rhs).abs() < 1e-5 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
        // A row at a grid time reaches only the table row at that time.
        let g = table_rows_grad(k, &[0.2], &[1.0]);
        let want = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{g:?}");
        }
    }

    #[test]
    fn a_table_reproduces_cubics_of_time_exactly_up_to_rounding() {
        // Two columns: a cubic and a line in t, on 8 intervals (rows at t = -1/8 ... 9/8).
        let k = 8;
        let f = |t: f32| [2.0 * t * t * t - t * t + 0.5 * t - 0.25, 3.0 * t + 1.0];
        let table: Vec<f32> = (0..k + 3)
            .flat_map(|j| f((j as f32 - 1.0) / k as f32))
            .collect();
        let t = [0.0f32, 0.03, 0.125, 0.5, 0.77, 0.999, 1.0];
        let mut out = Fresh::new(t.len() * 2);
        table_rows(&table, k, &t, out.out());
        // SAFETY: `table_rows` writes every element.
        let out = unsafe { out.assume_init() };
        for (row, &t) in out.chunks_exact(2).zip(&t) {
            let want = f(t);
            for (a, b) in row.iter().zip(want) {
                assert!((a - b).abs() < 1e-6, "t = {t}: {a} vs {b}");
            }
        }
        for t in [0.0f32, 0.3, 1.0] {
            let (i, w) = table_stencil(t, k);
            assert!(i + 3 < k + 3);
            assert!(
                (w.iter().sum::<f32>() - 1.0).abs() < 1e-6,
                "weights sum to 1"
            );
        }
    }

    #[test]
    fn sigmoid_matches_burns_formula() {
        for i in -400..400 {
            let x = i as f32 * 0.05;
            let reference = if x >= 0.0 {
                1.0 / (1.0 + (-x).exp())
            } else {
                x.exp() / (1.0 + x.exp())
            };
            assert!((sigmoid(x) - reference).abs() <= 2.0 * f32::EPSILON * reference.max(1e-30));
        }
    }

    #[test]
    fn lane_sums_match_sequential_sums() {
        let v: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let seq: f64 = v.iter().map(|&x| x as f64).sum();
        assert!((sum(&v) as f64 - seq).abs() < 1e-4);
        let mean = sum(&v) / v.len() as f32;
        let var: f64 = v.iter().map(|&x| ((x - mean) as f64).powi(2)).sum();
        assert!((sum_sq_centered(&v, mean) as f64 - var).abs() < 1e-3);
    }

    #[test]
    fn matmul_matches_a_naive_product_with_transposes() {
        // A tiny product on one core, and one split into bands of rows over the cores.
        for (m, k, n) in [(7, 5, 3), (517, 96, 40)] {
            matmul_case(m, k, n);
        }
    }

    fn matmul_case(m: usize, k: usize, n: usize) {
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.1 - 1.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.7).cos()).collect();
        let mut c = vec![1.0f32; m * n];
        matmul_add(&mut c, Mat::new(&a, m, k), Mat::new(&b, k, n));
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum::<f32>();
                assert!((c[i * n + j] - want).abs() < 1e-4 * (1.0 + want.abs()));
            }
        }
        // (a^T)^T b through a transposed view of a stored transpose.
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let c2 = matmul(Mat::new(&at, k, m).t(), Mat::new(&b, k, n));
        for (x, y) in c.iter().zip(&c2) {
            assert!((x - 1.0 - y).abs() < 1e-4 * (1.0 + y.abs()));
        }
    }

    #[test]
    fn a_pair_of_products_equals_the_two_products_one_after_the_other() {
        // A backward pass's pair at a size gemm splits over the cores, and a small one.
        for (n, c, o) in [(512, 192, 160), (70, 9, 5)] {
            let x: Vec<f32> = (0..n * c).map(|i| (i as f32 * 0.37).sin()).collect();
            let dy: Vec<f32> = (0..n * o).map(|i| (i as f32 * 0.11).cos()).collect();
            let w: Vec<f32> = (0..c * o).map(|i| (i as f32 * 0.53).sin()).collect();
            let dw = || (Mat::new(&x, n, c).t(), Mat::new(&dy, n, o));
            let dx = || (Mat::new(&dy, n, o), Mat::new(&w, c, o).t());
            let (a, b) = matmul_pair(Some(dw()), Some(dx()));
            let close = |got: Vec<f32>, want: Vec<f32>| {
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
                }
            };
            close(a.unwrap(), matmul(dw().0, dw().1));
            close(b.unwrap(), matmul(dx().0, dx().1));
            let (a, b) = matmul_pair(None, Some(dx()));
            assert!(a.is_none());
            close(b.unwrap(), matmul(dx().0, dx().1));
            assert_eq!(matmul_pair(None, None), (None, None));
        }
    }
}
