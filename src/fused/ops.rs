//! The fused operations as a burn backend extension: forward passes on burn's `Flex` CPU backend
//! and hand-written backward passes for `Autodiff<Flex>` (METHOD.md section 4).
//!
//! burn 0.22's `#[backend_extension]` generates the runtime dispatch from a `Tensor`'s backend to
//! these impls; each operation is one node of the autodiff graph, whatever it computes inside.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use burn::tensor::TensorData;
use burn_flex::FlexTensor;

use super::kernels::{
    self, Disjoint, Fresh, Mat, ModRows, bias_gate_residual, bias_silu, blocks, fill_rows,
    for_blocks, gate_residual_bwd, ln_modulate, ln_modulate_bwd, matmul, matmul_add, matmul_pair,
    silu_bwd, sum_partials,
};

/// Operations the velocity network's fused path adds to a backend.
#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// One AdaLN block (see [`super::adaln_block`]).
    #[allow(clippy::too_many_arguments)]
    fn adaln_block(
        x: FloatTensor<Self>,
        s: FloatTensor<Self>,
        wm: FloatTensor<Self>,
        bm: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// The final layer (see [`super::adaln_final`]).
    fn adaln_final(
        x: FloatTensor<Self>,
        s: FloatTensor<Self>,
        wm: FloatTensor<Self>,
        bm: FloatTensor<Self>,
        wout: FloatTensor<Self>,
        bout: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// One AdaLN block whose modulation is read from a table of time (see
    /// [`super::adaln_block_tabulated`]).
    #[allow(clippy::too_many_arguments)]
    fn adaln_block_tabulated(
        x: FloatTensor<Self>,
        t: FloatTensor<Self>,
        table: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// The final layer with its modulation read from a table of time (see
    /// [`super::adaln_final_tabulated`]).
    fn adaln_final_tabulated(
        x: FloatTensor<Self>,
        t: FloatTensor<Self>,
        table: FloatTensor<Self>,
        wout: FloatTensor<Self>,
        bout: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// The time MLP and the SiLU after it (see [`super::time_condition`]).
    fn time_condition(
        emb: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

// ---------------------------------------------------------------------------------------------
// Flex tensors as slices.

/// `t` with a contiguous layout (a view when it already is).
fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The values of a contiguous f32 tensor.
fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("fused ops keep their tensors contiguous")
}

/// `[rows, cols]` of a matrix, `[1, len]` of a vector.
fn dims(t: &FlexTensor) -> (usize, usize) {
    match t.layout().shape().as_slice() {
        [n] => (1, *n),
        [r, c] => (*r, *c),
        other => panic!("fused ops take vectors and matrices, got shape {other:?}"),
    }
}

fn tensor(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

/// A gradient shaped like `like`.
fn grad_like(values: Vec<f32>, like: &FlexTensor) -> FlexTensor {
    tensor(values, like.layout().shape().as_slice())
}

/// The modulation rows of block `b`: its own rows, or the one shared row.
fn mod_rows<'a>(
    m: &'a [f32],
    shared: bool,
    width: usize,
    rows: std::ops::Range<usize>,
) -> ModRows<'a> {
    if shared {
        ModRows { m, stride: 0 }
    } else {
        ModRows {
            m: &m[rows.start * width..rows.end * width],
            stride: width,
        }
    }
}

/// `bias + s * w` for every row of `s`: the modulation `[rows of s, width]`.
fn modulation(s: &[f32], bs: usize, c: usize, w: &[f32], b: &[f32]) -> Vec<f32> {
    let width = b.len();
    let mut m = Fresh::new(bs * width);
    fill_rows(m.out(), b);
    // SAFETY: `fill_rows` wrote every row.
    let mut m = unsafe { m.assume_init() };
    matmul_add(&mut m, Mat::new(s, bs, c), Mat::new(w, c, width));
    m
}

/// The modulation `[n, width]` of `n` rows at times `t`, interpolated in `table`
/// (`[k + 3, width]`, see [`kernels::table_rows`]).
fn tabulated_modulation(t: &FlexTensor, table: &FlexTensor, width: usize) -> Vec<f32> {
    let t = values(t);
    let (rows, w) = dims(table);
    assert!(
        w == width && rows >= 4,
        "a modulation table of {rows} x {w} for width {width}"
    );
    let mut m = Fresh::new(t.len() * width);
    kernels::table_rows(values(table), rows - 3, t, m.out());
    // SAFETY: `table_rows` writes every element.
    unsafe { m.assume_init() }
}

/// LayerNorm and modulation of every row: `(xhat, h, denom)` (see [`kernels::ln_modulate`]).
fn ln_modulate_rows(
    x: &[f32],
    c: usize,
    affine: Option<(&[f32], &[f32])>,
    m: &[f32],
    shared: bool,
    width: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = x.len() / c;
    let (mut xhat, mut h, mut denom) = (Fresh::new(n * c), Fresh::new(n * c), Fresh::new(n));
    {
        let (xh, hh, dd) = (
            Disjoint::new(xhat.out()),
            Disjoint::new(h.out()),
            Disjoint::new(denom.out()),
        );
        for_blocks(n, n * c, |_, rows| {
            let span = rows.start * c..rows.end * c;
            // SAFETY: each block writes only its own rows.
            let (xh, hh, dd) = unsafe {
                (
                    xh.range(span.clone()),
                    hh.range(span.clone()),
                    dd.range(rows.clone()),
                )
            };
            ln_modulate(
                &x[span],
                c,
                affine,
                mod_rows(m, shared, width, rows),
                xh,
                hh,
                dd,
            );
        });
    }
    // SAFETY: the blocks cover every row, and `ln_modulate` writes all of each row.
    unsafe { (xhat.assume_init(), h.assume_init(), denom.assume_init()) }
}

/// `a = silu(z + bias)` over all rows, keeping `z + bias` in `z`.
fn bias_silu_rows(z: &mut [f32], bias: &[f32]) -> Vec<f32> {
    let c = bias.len();
    let n = z.len() / c;
    let mut a = Fresh::new(n * c);
    {
        let (zz, aa) = (Disjoint::new(z), Disjoint::new(a.out()));
        for_blocks(n, n * c, |_, rows| {
            let span = rows.start * c..rows.end * c;
            // SAFETY: each block writes only its own rows.
            let (zz, aa) = unsafe { (zz.range(span.clone()), aa.range(span)) };
            bias_silu(zz, bias, aa);
        });
    }
    // SAFETY: every row was written.
    unsafe { a.assume_init() }
}

/// `d <- d * silu'(z)` over all rows; returns the column sums of the result.
fn silu_bwd_rows(d: &mut [f32], z: &[f32], c: usize) -> Vec<f32> {
    let n = d.len() / c;
    let mut partials = vec![0f32; blocks(n) * c];
    let (dd, parts) = (Disjoint::new(d), Disjoint::new(&mut partials));
    for_blocks(n, n * c, |b, rows| {
        let span = rows.start * c..rows.end * c;
        // SAFETY: each block writes only its own rows and its own partial row.
        let (dd, part) = unsafe { (dd.range(span.clone()), parts.range(b * c..(b + 1) * c)) };
        silu_bwd(dd, &z[span], part);
    });
    sum_partials(&partials, c)
}

// ---------------------------------------------------------------------------------------------
// The AdaLN block.

/// Where a layer's modulation came from, as its backward pass needs it.
#[derive(Clone, Debug)]
pub enum ModSource {
    /// `s wm + bm`: the condition `s` and the weight `wm`.
    Linear { s: FlexTensor, wm: FlexTensor },
    /// Interpolated at times `t` in a table of `k` intervals ([`kernels::table_rows`]).
    Table { t: FlexTensor, k: usize },
}

impl ModSource {
    /// The gradients of the modulation's weight (or table) and of its condition from `dm`
    /// (`[bs, width]`), each only where asked for; a table's times get none.
    fn backward(
        &self,
        dm: &[f32],
        (bs, c, width): (usize, usize, usize),
        need_wm: bool,
        need_s: bool,
    ) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
        match self {
            ModSource::Linear { s, wm } => matmul_pair(
                need_wm.then(|| (Mat::new(values(s), bs, c).t(), Mat::new(dm, bs, width))),
                need_s.then(|| (Mat::new(dm, bs, width), Mat::new(values(wm), c, width).t())),
            ),
            ModSource::Table { t, k } => {
                assert!(!need_s, "the times of a modulation table take no gradient");
                (
                    need_wm.then(|| kernels::table_rows_grad(*k, values(t), dm)),
                    None,
                )
            }
        }
    }
}

/// What the block's backward pass reads.
#[derive(Clone, Debug)]
pub struct BlockState {
    n: usize,
    c: usize,
    /// Rows of the condition (1 when shared by every row).
    bs: usize,
    source: ModSource,
    m: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    w1: FlexTensor,
    w2: FlexTensor,
    xhat: FlexTensor,
    denom: FlexTensor,
    h: FlexTensor,
    z1: FlexTensor,
    a: FlexTensor,
    z2: FlexTensor,
}

/// The block on `[x, s, wm, bm, gamma, beta, w1, b1, w2, b2]`.
fn block_forward(inputs: [FlexTensor; 10]) -> (FlexTensor, BlockState) {
    let [x, s, wm, bm, gamma, beta, w1, b1, w2, b2] = inputs;
    let [x, s, wm, bm] = [x, s, wm, bm].map(contiguous);
    let (n, c) = dims(&x);
    let (bs, _) = dims(&s);
    assert!(
        bs == 1 || bs == n,
        "the condition has {bs} rows for {n} inputs"
    );
    let m = modulation(values(&s), bs, c, values(&wm), values(&bm)); // [bs, 3c]
    block_body(
        x,
        m,
        bs,
        ModSource::Linear { s, wm },
        [gamma, beta, w1, b1, w2, b2],
    )
}

/// The block after its modulation `m` (`[bs, 3c]`).
fn block_body(
    x: FlexTensor,
    m: Vec<f32>,
    bs: usize,
    source: ModSource,
    rest: [FlexTensor; 6],
) -> (FlexTensor, BlockState) {
    let [gamma, beta, w1, b1, w2, b2] = rest.map(contiguous);
    let (n, c) = dims(&x);
    let shared = bs == 1 && n != 1;
    let affine = Some((values(&gamma), values(&beta)));
    let (xhat, h, denom) = ln_modulate_rows(values(&x), c, affine, &m, shared, 3 * c);
    let mut z1 = matmul(Mat::new(&h, n, c), Mat::new(values(&w1), c, c));
    let a = bias_silu_rows(&mut z1, values(&b1));
    let mut z2 = matmul(Mat::new(&a, n, c), Mat::new(values(&w2), c, c));
    let mut out = Fresh::new(n * c);
    {
        let (xv, b2v) = (values(&x), values(&b2));
        let (zz, oo) = (Disjoint::new(&mut z2), Disjoint::new(out.out()));
        for_blocks(n, n * c, |_, rows| {
            let span = rows.start * c..rows.end * c;
            // SAFETY: each block writes only its own rows.
            let (zz, oo) = unsafe { (zz.range(span.clone()), oo.range(span.clone())) };
            bias_gate_residual(zz, b2v, &xv[span], mod_rows(&m, shared, 3 * c, rows), oo);
        });
    }
    // SAFETY: every row was written.
    let out = unsafe { out.assume_init() };
    let state = BlockState {
        n,
        c,
        bs,
        source,
        m: tensor(m, &[bs, 3 * c]),
        gamma,
        beta,
        w1,
        w2,
        xhat: tensor(xhat, &[n, c]),
        denom: tensor(denom, &[n]),
        h: tensor(h, &[n, c]),
        z1: tensor(z1, &[n, c]),
        a: tensor(a, &[n, c]),
        z2: tensor(z2, &[n, c]),
    };
    (tensor(out, &[n, c]), state)
}

/// Gradients of the block's ten inputs, `None` where `need` is false.
fn block_backward(st: &BlockState, g: FlexTensor, need: [bool; 10]) -> [Option<FlexTensor>; 10] {
    let [
        need_x,
        need_s,
        need_wm,
        need_bm,
        need_gamma,
        need_beta,
        need_w1,
        need_b1,
        need_w2,
        need_b2,
    ] = need;
    let (n, c, bs) = (st.n, st.c, st.bs);
    let shared = bs == 1 && n != 1;
    let g = contiguous(g);
    let gv = values(&g);
    let m = values(&st.m);
    let need_dm = need_s || need_wm || need_bm;
    let need_affine = need_gamma || need_beta;
    let need_dh = need_x || need_dm || need_affine;
    let need_da = need_dh || need_w1 || need_b1;
    // Per-block column sums: db2, db1, dgamma, dbeta, dm (3c).
    let width = 7 * c;
    let mut partials = vec![0f32; blocks(n) * width];
    // One row of dm per input row (with a shared condition, summed at the end): the gate's
    // columns written here, shift's and scale's by the LayerNorm's backward pass.
    let mut dm = Fresh::new(if need_dm { n * 3 * c } else { 0 });

    // Gate and residual: dz2 = g * gate, dgate = g * z2.
    let mut dz2 = Fresh::new(n * c);
    {
        let z2 = values(&st.z2);
        let (dz, parts, dmm) = (
            Disjoint::new(dz2.out()),
            Disjoint::new(&mut partials),
            Disjoint::new(dm.out()),
        );
        for_blocks(n, n * c, |b, rows| {
            let span = rows.start * c..rows.end * c;
            // SAFETY: each block writes only its own rows and its own partial row.
            let (dz, part) = unsafe {
                (
                    dz.range(span.clone()),
                    parts.range(b * width..(b + 1) * width),
                )
            };
            let (db2, rest) = part.split_at_mut(c);
            let dgate_sum = &mut rest[5 * c..6 * c];
            let dm_rows = need_dm.then(|| {
                // SAFETY: as above.
                unsafe { dmm.range(rows.start * 3 * c..rows.end * 3 * c) }
            });
            gate_residual_bwd(
                &gv[span.clone()],
                &z2[span],
                mod_rows(m, shared, 3 * c, rows),
                dz,
                dm_rows,
                db2,
                Some(dgate_sum),
            );
        });
    }
    // SAFETY: every row was written.
    let dz2 = unsafe { dz2.assume_init() };
    // fc2: dw2 = a^T dz2 beside da = dz2 w2^T.
    let (dw2, da) = matmul_pair(
        need_w2.then(|| (Mat::new(values(&st.a), n, c).t(), Mat::new(&dz2, n, c))),
        need_da.then(|| (Mat::new(&dz2, n, c), Mat::new(values(&st.w2), c, c).t())),
    );

    // SiLU: dz1 = da * silu'(z1).
    let mut dz1 = da.unwrap_or_default();
    if need_da {
        let z1 = values(&st.z1);
        let (dz, parts) = (Disjoint::new(&mut dz1), Disjoint::new(&mut partials));
        for_blocks(n, n * c, |b, rows| {
            let span = rows.start * c..rows.end * c;
            // SAFETY: each block writes only its own rows and its own partial row.
            let (dz, part) = unsafe {
                (
                    dz.range(span.clone()),
                    parts.range(b * width + c..b * width + 2 * c),
                )
            };
            silu_bwd(dz, &z1[span], part);
        });
    }
    drop(dz2);
    // fc1: dw1 = h^T dz1 beside dh = dz1 w1^T.
    let (dw1, dh) = matmul_pair(
        need_w1.then(|| (Mat::new(values(&st.h), n, c).t(), Mat::new(&dz1, n, c))),
        need_dh.then(|| (Mat::new(&dz1, n, c), Mat::new(values(&st.w1), c, c).t())),
    );

    // The modulated LayerNorm.
    let mut dx = Fresh::new(if need_x { n * c } else { 0 });
    if let Some(dh) = dh {
        let (xhat, denom) = (values(&st.xhat), values(&st.denom));
        let affine = Some((values(&st.gamma), values(&st.beta)));
        let (dxx, parts, dmm) = (
            Disjoint::new(dx.out()),
            Disjoint::new(&mut partials),
            Disjoint::new(dm.out()),
        );
        for_blocks(n, n * c, |b, rows| {
            let span = rows.start * c..rows.end * c;
            let mut scratch = vec![0f32; 2 * c];
            // SAFETY: each block writes only its own rows and its own partial row.
            let part = unsafe { parts.range(b * width + 2 * c..(b + 1) * width) };
            let (daff, dms) = part.split_at_mut(2 * c);
            let (dgamma, dbeta) = daff.split_at_mut(c);
            let dms = &mut dms[..2 * c];
            let dx_rows = need_x.then(|| {
                // SAFETY: as above.
                unsafe { dxx.range(span.clone()) }
            });
            let dm_rows = need_dm.then(|| {
                // SAFETY: as above.
                (
                    unsafe { dmm.range(rows.start * 3 * c..rows.end * 3 * c) },
                    3 * c,
                )
            });
            ln_modulate_bwd(
                &dh[span.clone()],
                &xhat[span.clone()],
                &denom[rows.clone()],
                c,
                affine,
                mod_rows(m, shared, 3 * c, rows),
                Some(&gv[span]),
                dx_rows,
                dm_rows,
                need_affine.then_some((dgamma, dbeta)),
                need_dm.then_some(dms),
                &mut scratch,
            );
        });
    }
    drop(dz1);
    // SAFETY: `need_dh` holds whenever `need_x` or `need_dm` does, and then the LayerNorm's
    // backward pass wrote every row of dx and (with the gate's pass) every column of dm.
    let (dx, dm) = unsafe { (dx.assume_init(), dm.assume_init()) };
    let sums = sum_partials(&partials, width);
    let (db2, rest) = sums.split_at(c);
    let (db1, rest) = rest.split_at(c);
    let (dgamma, rest) = rest.split_at(c);
    let (dbeta, dm_sum) = rest.split_at(c);

    // The modulation: dm -> dwm, dbm, ds.
    let (mut dwm, mut ds) = (None, None);
    if need_dm {
        let dm = if shared { dm_sum.to_vec() } else { dm };
        (dwm, ds) = st.source.backward(&dm, (bs, c, 3 * c), need_wm, need_s);
    }
    [
        need_x.then(|| tensor(dx, &[n, c])),
        ds.map(|d| tensor(d, &[bs, c])),
        dwm.map(|d| {
            let rows = d.len() / (3 * c);
            tensor(d, &[rows, 3 * c])
        }),
        need_bm.then(|| tensor(dm_sum.to_vec(), &[3 * c])),
        need_gamma.then(|| grad_like(dgamma.to_vec(), &st.gamma)),
        need_beta.then(|| grad_like(dbeta.to_vec(), &st.beta)),
        dw1.map(|d| grad_like(d, &st.w1)),
        need_b1.then(|| tensor(db1.to_vec(), &[c])),
        dw2.map(|d| grad_like(d, &st.w2)),
        need_b2.then(|| tensor(db2.to_vec(), &[c])),
    ]
}

// ---------------------------------------------------------------------------------------------
// The final layer.

/// What the final layer's backward pass reads.
#[derive(Clone, Debug)]
pub struct FinalState {
    n: usize,
    c: usize,
    d: usize,
    bs: usize,
    source: ModSource,
    m: FlexTensor,
    wout: FlexTensor,
    xhat: FlexTensor,
    denom: FlexTensor,
    h: FlexTensor,
}

/// The final layer on `[x, s, wm, bm, wout, bout]`.
fn final_forward(inputs: [FlexTensor; 6]) -> (FlexTensor, FinalState) {
    let [x, s, wm, bm, wout, bout] = inputs;
    let [x, s, wm, bm] = [x, s, wm, bm].map(contiguous);
    let (n, c) = dims(&x);
    let (bs, _) = dims(&s);
    assert!(
        bs == 1 || bs == n,
        "the condition has {bs} rows for {n} inputs"
    );
    let m = modulation(values(&s), bs, c, values(&wm), values(&bm)); // [bs, 2c]
    final_body(x, m, bs, ModSource::Linear { s, wm }, wout, bout)
}

/// The final layer after its modulation `m` (`[bs, 2c]`).
fn final_body(
    x: FlexTensor,
    m: Vec<f32>,
    bs: usize,
    source: ModSource,
    wout: FlexTensor,
    bout: FlexTensor,
) -> (FlexTensor, FinalState) {
    let [wout, bout] = [wout, bout].map(contiguous);
    let (n, c) = dims(&x);
    let (_, d) = dims(&wout);
    let shared = bs == 1 && n != 1;
    let (xhat, h, denom) = ln_modulate_rows(values(&x), c, None, &m, shared, 2 * c);
    let mut out = Fresh::new(n * d);
    fill_rows(out.out(), values(&bout));
    // SAFETY: `fill_rows` wrote every row.
    let mut out = unsafe { out.assume_init() };
    matmul_add(&mut out, Mat::new(&h, n, c), Mat::new(values(&wout), c, d));
    let state = FinalState {
        n,
        c,
        d,
        bs,
        source,
        m: tensor(m, &[bs, 2 * c]),
        wout,
        xhat: tensor(xhat, &[n, c]),
        denom: tensor(denom, &[n]),
        h: tensor(h, &[n, c]),
    };
    (tensor(out, &[n, d]), state)
}

/// Gradients of the final layer's six inputs, `None` where `need` is false.
fn final_backward(st: &FinalState, g: FlexTensor, need: [bool; 6]) -> [Option<FlexTensor>; 6] {
    let [need_x, need_s, need_wm, need_bm, need_wout, need_bout] = need;
    let (n, c, d, bs) = (st.n, st.c, st.d, st.bs);
    let shared = bs == 1 && n != 1;
    let g = contiguous(g);
    let gv = values(&g);
    let m = values(&st.m);
    let need_dm = need_s || need_wm || need_bm;
    // dwout = h^T g beside dh = g wout^T.
    let (dwout, dh) = matmul_pair(
        need_wout.then(|| (Mat::new(values(&st.h), n, c).t(), Mat::new(gv, n, d))),
        (need_x || need_dm).then(|| (Mat::new(gv, n, d), Mat::new(values(&st.wout), c, d).t())),
    );
    let dbout = need_bout.then(|| {
        let mut db = vec![0f32; d];
        kernels::add_rows(&mut db, gv);
        db
    });
    let width = 2 * c;
    let mut partials = vec![0f32; blocks(n) * width];
    let mut dm = Fresh::new(if need_dm { n * 2 * c } else { 0 });
    let mut dx = Fresh::new(if need_x { n * c } else { 0 });
    if let Some(dh) = dh {
        let (xhat, denom) = (values(&st.xhat), values(&st.denom));
        let (dxx, parts, dmm) = (
            Disjoint::new(dx.out()),
            Disjoint::new(&mut partials),
            Disjoint::new(dm.out()),
        );
        for_blocks(n, n * c, |b, rows| {
            let span = rows.start * c..rows.end * c;
            let mut scratch = vec![0f32; 2 * c];
            // SAFETY: each block writes only its own rows and its own partial row.
            let part = unsafe { parts.range(b * width..(b + 1) * width) };
            let dx_rows = need_x.then(|| {
                // SAFETY: as above.
                unsafe { dxx.range(span.clone()) }
            });
            let dm_rows = need_dm.then(|| {
                // SAFETY: as above.
                (
                    unsafe { dmm.range(rows.start * 2 * c..rows.end * 2 * c) },
                    2 * c,
                )
            });
            ln_modulate_bwd(
                &dh[span.clone()],
                &xhat[span],
                &denom[rows.clone()],
                c,
                None,
                mod_rows(m, shared, 2 * c, rows),
                None,
                dx_rows,
                dm_rows,
                None,
                need_dm.then_some(part),
                &mut scratch,
            );
        });
    }
    // SAFETY: when asked for, dx and dm were written in full above.
    let (dx, dm) = unsafe { (dx.assume_init(), dm.assume_init()) };
    let dm_sum = sum_partials(&partials, width);
    let (mut dwm, mut ds) = (None, None);
    if need_dm {
        let dm = if shared { dm_sum.clone() } else { dm };
        (dwm, ds) = st.source.backward(&dm, (bs, c, 2 * c), need_wm, need_s);
    }
    [
        need_x.then(|| tensor(dx, &[n, c])),
        ds.map(|v| tensor(v, &[bs, c])),
        dwm.map(|v| {
            let rows = v.len() / (2 * c);
            tensor(v, &[rows, 2 * c])
        }),
        need_bm.then(|| tensor(dm_sum, &[2 * c])),
        dwout.map(|v| grad_like(v, &st.wout)),
        dbout.map(|v| tensor(v, &[d])),
    ]
}

// ---------------------------------------------------------------------------------------------
// The block and the final layer with a tabulated modulation.

/// The block on `[x, t, table, gamma, beta, w1, b1, w2, b2]`.
fn block_tabulated_forward(inputs: [FlexTensor; 9]) -> (FlexTensor, BlockState) {
    let [x, t, table, gamma, beta, w1, b1, w2, b2] = inputs;
    let [x, t, table] = [x, t, table].map(contiguous);
    let (n, c) = dims(&x);
    assert_eq!(dims(&t).1, n, "one time per row");
    let m = tabulated_modulation(&t, &table, 3 * c);
    let k = dims(&table).0 - 3;
    block_body(
        x,
        m,
        n,
        ModSource::Table { t, k },
        [gamma, beta, w1, b1, w2, b2],
    )
}

/// The block's backward pass with the modulation's three inputs replaced by the time (which gets
/// no gradient) and the table (whose gradient takes the weight's place).
fn block_tabulated_backward(
    st: &BlockState,
    g: FlexTensor,
    need: [bool; 9],
) -> [Option<FlexTensor>; 9] {
    let [x, t, table, gamma, beta, w1, b1, w2, b2] = need;
    let need = [x, t, table, false, gamma, beta, w1, b1, w2, b2];
    let [gx, _, table, _, gamma, beta, w1, b1, w2, b2] = block_backward(st, g, need);
    [gx, None, table, gamma, beta, w1, b1, w2, b2]
}

/// The final layer on `[x, t, table, wout, bout]`.
fn final_tabulated_forward(inputs: [FlexTensor; 5]) -> (FlexTensor, FinalState) {
    let [x, t, table, wout, bout] = inputs;
    let [x, t, table] = [x, t, table].map(contiguous);
    let (n, c) = dims(&x);
    assert_eq!(dims(&t).1, n, "one time per row");
    let m = tabulated_modulation(&t, &table, 2 * c);
    let k = dims(&table).0 - 3;
    final_body(x, m, n, ModSource::Table { t, k }, wout, bout)
}

/// The final layer's backward pass, as [`block_tabulated_backward`].
fn final_tabulated_backward(
    st: &FinalState,
    g: FlexTensor,
    need: [bool; 5],
) -> [Option<FlexTensor>; 5] {
    let [x, t, table, wout, bout] = need;
    let [gx, _, table, _, gw, gb] = final_backward(st, g, [x, t, table, false, wout, bout]);
    [gx, None, table, gw, gb]
}

// ---------------------------------------------------------------------------------------------
// The time condition: silu(silu(emb w1 + b1) w2 + b2).

/// What the time condition's backward pass reads.
#[derive(Clone, Debug)]
pub struct TimeState {
    n: usize,
    f: usize,
    c: usize,
    emb: FlexTensor,
    w1: FlexTensor,
    w2: FlexTensor,
    z1: FlexTensor,
    a1: FlexTensor,
    z2: FlexTensor,
}

/// The time condition on `[emb, w1, b1, w2, b2]`.
fn time_forward(inputs: [FlexTensor; 5]) -> (FlexTensor, TimeState) {
    let [emb, w1, b1, w2, b2] = inputs;
    let [emb, w1, b1, w2, b2] = [emb, w1, b1, w2, b2].map(contiguous);
    let (n, f) = dims(&emb);
    let (_, c) = dims(&w1);
    let mut z1 = matmul(Mat::new(values(&emb), n, f), Mat::new(values(&w1), f, c));
    let a1 = bias_silu_rows(&mut z1, values(&b1));
    let mut z2 = matmul(Mat::new(&a1, n, c), Mat::new(values(&w2), c, c));
    let out = bias_silu_rows(&mut z2, values(&b2));
    let state = TimeState {
        n,
        f,
        c,
        emb,
        w1,
        w2,
        z1: tensor(z1, &[n, c]),
        a1: tensor(a1, &[n, c]),
        z2: tensor(z2, &[n, c]),
    };
    (tensor(out, &[n, c]), state)
}

fn time_backward(st: &TimeState, g: FlexTensor, need: [bool; 5]) -> [Option<FlexTensor>; 5] {
    let [need_emb, need_w1, need_b1, need_w2, need_b2] = need;
    let (n, f, c) = (st.n, st.f, st.c);
    let g = contiguous(g);
    let mut dz2 = values(&g).to_vec();
    let db2 = silu_bwd_rows(&mut dz2, values(&st.z2), c);
    let need_dz1 = need_emb || need_w1 || need_b1;
    let (dw2, dz1) = matmul_pair(
        need_w2.then(|| (Mat::new(values(&st.a1), n, c).t(), Mat::new(&dz2, n, c))),
        need_dz1.then(|| (Mat::new(&dz2, n, c), Mat::new(values(&st.w2), c, c).t())),
    );
    let (mut dw1, mut db1, mut demb) = (None, None, None);
    if let Some(mut dz1) = dz1 {
        db1 = Some(silu_bwd_rows(&mut dz1, values(&st.z1), c));
        (dw1, demb) = matmul_pair(
            need_w1.then(|| (Mat::new(values(&st.emb), n, f).t(), Mat::new(&dz1, n, c))),
            need_emb.then(|| (Mat::new(&dz1, n, c), Mat::new(values(&st.w1), f, c).t())),
        );
    }
    [
        demb.map(|v| tensor(v, &[n, f])),
        dw1.map(|v| grad_like(v, &st.w1)),
        db1.filter(|_| need_b1).map(|v| tensor(v, &[c])),
        dw2.map(|v| grad_like(v, &st.w2)),
        need_b2.then(|| tensor(db2, &[c])),
    ]
}

// ---------------------------------------------------------------------------------------------
// The backend impls.

impl FusedOps for Flex {
    fn adaln_block(
        x: FlexTensor,
        s: FlexTensor,
        wm: FlexTensor,
        bm: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        w1: FlexTensor,
        b1: FlexTensor,
        w2: FlexTensor,
        b2: FlexTensor,
    ) -> FlexTensor {
        block_forward([x, s, wm, bm, gamma, beta, w1, b1, w2, b2]).0
    }

    fn adaln_final(
        x: FlexTensor,
        s: FlexTensor,
        wm: FlexTensor,
        bm: FlexTensor,
        wout: FlexTensor,
        bout: FlexTensor,
    ) -> FlexTensor {
        final_forward([x, s, wm, bm, wout, bout]).0
    }

    fn adaln_block_tabulated(
        x: FlexTensor,
        t: FlexTensor,
        table: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        w1: FlexTensor,
        b1: FlexTensor,
        w2: FlexTensor,
        b2: FlexTensor,
    ) -> FlexTensor {
        block_tabulated_forward([x, t, table, gamma, beta, w1, b1, w2, b2]).0
    }

    fn adaln_final_tabulated(
        x: FlexTensor,
        t: FlexTensor,
        table: FlexTensor,
        wout: FlexTensor,
        bout: FlexTensor,
    ) -> FlexTensor {
        final_tabulated_forward([x, t, table, wout, bout]).0
    }

    fn time_condition(
        emb: FlexTensor,
        w1: FlexTensor,
        b1: FlexTensor,
        w2: FlexTensor,
        b2: FlexTensor,
    ) -> FlexTensor {
        time_forward([emb, w1, b1, w2, b2]).0
    }
}

/// One backward pass: consumes the operation's output gradient, computes the gradients of the
/// parents that need one with `backward`, and registers each for its parent.
fn run_backward<S, const N: usize>(
    ops: Ops<S, N>,
    grads: &mut Gradients,
    backward: fn(&S, FlexTensor, [bool; N]) -> [Option<FlexTensor>; N],
) {
    let g = grads.consume::<Flex>(&ops.node);
    let parents = ops
        .parents
        .each_ref()
        .map(|p| p.as_ref().map(|node| node.id));
    let found = backward(&ops.state, g, parents.map(|p| p.is_some()));
    for (parent, grad) in parents.into_iter().zip(found) {
        if let (Some(id), Some(grad)) = (parent, grad) {
            grads.register::<Flex>(id, grad);
        }
    }
}

/// A backward node of `$n` parents whose gradients `$grads` computes from the state `$state`.
macro_rules! backward_node {
    ($name:ident, $n:literal, $state:ty, $grads:path) => {
        #[derive(Debug)]
        struct $name;

        impl Backward<Flex, $n> for $name {
            type State = $state;

            fn backward(self, ops: Ops<$state, $n>, grads: &mut Gradients, _: &mut Checkpointer) {
                run_backward(ops, grads, $grads);
            }
        }
    };
}

backward_node!(BlockBackward, 10, BlockState, block_backward);
backward_node!(FinalBackward, 6, FinalState, final_backward);
backward_node!(
    BlockTabulatedBackward,
    9,
    BlockState,
    block_tabulated_backward
);
backward_node!(
    FinalTabulatedBackward,
    5,
    FinalState,
    final_tabulated_backward
);
backward_node!(TimeBackward, 5, TimeState, time_backward);

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn adaln_block(
        x: FloatTensor<Self>,
        s: FloatTensor<Self>,
        wm: FloatTensor<Self>,
        bm: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let inputs = [x, s, wm, bm, gamma, beta, w1, b1, w2, b2];
        tracked::<C, _, 10>(BlockBackward, inputs, block_forward)
    }

    fn adaln_final(
        x: FloatTensor<Self>,
        s: FloatTensor<Self>,
        wm: FloatTensor<Self>,
        bm: FloatTensor<Self>,
        wout: FloatTensor<Self>,
        bout: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        tracked::<C, _, 6>(FinalBackward, [x, s, wm, bm, wout, bout], final_forward)
    }

    fn adaln_block_tabulated(
        x: FloatTensor<Self>,
        t: FloatTensor<Self>,
        table: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let inputs = [x, t, table, gamma, beta, w1, b1, w2, b2];
        tracked::<C, _, 9>(BlockTabulatedBackward, inputs, block_tabulated_forward)
    }

    fn adaln_final_tabulated(
        x: FloatTensor<Self>,
        t: FloatTensor<Self>,
        table: FloatTensor<Self>,
        wout: FloatTensor<Self>,
        bout: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let inputs = [x, t, table, wout, bout];
        tracked::<C, _, 5>(FinalTabulatedBackward, inputs, final_tabulated_forward)
    }

    fn time_condition(
        emb: FloatTensor<Self>,
        w1: FloatTensor<Self>,
        b1: FloatTensor<Self>,
        w2: FloatTensor<Self>,
        b2: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        tracked::<C, _, 5>(TimeBackward, [emb, w1, b1, w2, b2], time_forward)
    }
}

/// One fused operation under autodiff: runs `forward` on the inputs' values and, when any input
/// is tracked, records `backward` with the state it returns.
fn tracked<C: CheckpointStrategy, B: Backward<Flex, N>, const N: usize>(
    backward: B,
    inputs: [FloatTensor<Autodiff<Flex, C>>; N],
    forward: fn([FlexTensor; N]) -> (FlexTensor, B::State),
) -> FloatTensor<Autodiff<Flex, C>> {
    let nodes = inputs.each_ref().map(|t| t.node());
    let values = inputs.map(|t| t.into_primitive());
    match backward.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (out, state) = forward(values);
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(values).0),
    }
}
