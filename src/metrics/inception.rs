//! The FID Inception-v3 (the TensorFlow graph of 2015-12-05 as pytorch-fid and torch-fidelity port
//! it), frozen and loaded from a user-supplied safetensors file, giving the 2048-d pool3 features of
//! FID, KID and precision/recall and, when the file has the classifier, the 1008-way logits of the
//! Inception Score (METHOD.md section 8).
//!
//! Architecture as pytorch-fid's `InceptionV3()` with its `FIDInceptionA/C/E_1/E_2` blocks (the same
//! network as torch-fidelity's `FeatureExtractorInceptionV3`): torchvision's Inception-v3 whose every
//! convolution is conv (no bias) + batch norm (eps 0.001, running statistics) + ReLU, except that the
//! pool branches of the A, C and first E blocks average over the valid pixels only
//! (`count_include_pad=False`, as TensorFlow does) and the last E block max-pools there. Batch norm is
//! folded into the convolutions at load time.
//!
//! Accepted names: the keys of pytorch-fid's `InceptionV3().state_dict()` (`blocks.0.0.conv.weight`,
//! ..., `blocks.3.2.branch_pool.bn.running_var`), or the torchvision-style names of the raw
//! `pt_inception-2015-12-05-6726825d.pth` and of torch-fidelity's
//! `weights-inception-2015-12-05-6726825d.pth` (`Conv2d_1a_3x3.conv.weight`,
//! `Mixed_7c.branch_pool.bn.bias`, ...). `fc.weight` (`[1008, 2048]`) is read when present (the
//! Inception Score needs it; pytorch-fid's state dict drops it); `fc.bias` and `num_batches_tracked`
//! are ignored.

use std::collections::HashMap;
use std::path::Path;

use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::{adaptive_avg_pool2d, avg_pool2d, conv2d, interpolate, max_pool2d};
use burn::tensor::ops::{
    AvgPoolOptions, ConvOptions, InterpolateMode, InterpolateOptions, MaxPoolOptions,
};

use crate::error::{Error, Result};

/// The input size of the network.
pub const INPUT_SIZE: usize = 299;
/// The size of the pool3 features.
pub const FEATURES: usize = 2048;
/// The classes of the graph's classifier (1000 ImageNet classes and 8 unused ones).
pub const CLASSES: usize = 1008;
/// Batch-norm epsilon of the TensorFlow graph.
const BN_EPS: f64 = 0.001;

/// What to tell the user when the file does not fit.
const SUPPLY: &str = "supply the FID Inception-v3 weights (pytorch-fid's pt_inception-2015-12-05 as safetensors; see the README)";

/// The two naming schemes of the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `pytorch_fid.inception.InceptionV3().state_dict()`: `blocks.{i}.{j}...`.
    PytorchFid,
    /// torchvision's module names, as in `pt_inception-2015-12-05-6726825d.pth`.
    Torchvision,
}

/// The kind of one module of the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A single BasicConv2d: out channels, square kernel, stride, padding.
    Conv(usize, usize, usize, usize),
    /// FIDInceptionA with its pool features.
    A(usize),
    /// InceptionB (grid reduction 35 -> 17).
    B,
    /// FIDInceptionC with its 7x7 channels.
    C(usize),
    /// InceptionD (grid reduction 17 -> 8).
    D,
    /// FIDInceptionE_1 (average pool branch).
    E1,
    /// FIDInceptionE_2 (max pool branch).
    E2,
}

/// Every module in order: torchvision name, pytorch-fid name, input channels, kind. The stem's
/// 3 x 3 stride-2 max pools follow `Conv2d_2b_3x3` and `Conv2d_4a_3x3`.
const MODULES: [(&str, &str, usize, Kind); 16] = [
    ("Conv2d_1a_3x3", "blocks.0.0", 3, Kind::Conv(32, 3, 2, 0)),
    ("Conv2d_2a_3x3", "blocks.0.1", 32, Kind::Conv(32, 3, 1, 0)),
    ("Conv2d_2b_3x3", "blocks.0.2", 32, Kind::Conv(64, 3, 1, 1)),
    ("Conv2d_3b_1x1", "blocks.1.0", 64, Kind::Conv(80, 1, 1, 0)),
    ("Conv2d_4a_3x3", "blocks.1.1", 80, Kind::Conv(192, 3, 1, 0)),
    ("Mixed_5b", "blocks.2.0", 192, Kind::A(32)),
    ("Mixed_5c", "blocks.2.1", 256, Kind::A(64)),
    ("Mixed_5d", "blocks.2.2", 288, Kind::A(64)),
    ("Mixed_6a", "blocks.2.3", 288, Kind::B),
    ("Mixed_6b", "blocks.2.4", 768, Kind::C(128)),
    ("Mixed_6c", "blocks.2.5", 768, Kind::C(160)),
    ("Mixed_6d", "blocks.2.6", 768, Kind::C(160)),
    ("Mixed_6e", "blocks.2.7", 768, Kind::C(192)),
    ("Mixed_7a", "blocks.3.0", 768, Kind::D),
    ("Mixed_7b", "blocks.3.1", 1280, Kind::E1),
    ("Mixed_7c", "blocks.3.2", 2048, Kind::E2),
];

/// The shape of one BasicConv2d.
#[derive(Debug, Clone, Copy)]
struct ConvSpec {
    /// The branch name inside its block (empty for the stem's plain convolutions).
    name: &'static str,
    c_in: usize,
    c_out: usize,
    kernel: [usize; 2],
    stride: usize,
    padding: [usize; 2],
}

const fn conv(
    name: &'static str,
    c_in: usize,
    c_out: usize,
    kernel: [usize; 2],
    stride: usize,
    padding: [usize; 2],
) -> ConvSpec {
    ConvSpec {
        name,
        c_in,
        c_out,
        kernel,
        stride,
        padding,
    }
}

/// The convolutions of a module with `c` input channels (torchvision's `inception.py`).
fn conv_specs(c: usize, kind: Kind) -> Vec<ConvSpec> {
    let (k1, k3, k5) = ([1, 1], [3, 3], [5, 5]);
    let (r17, c71) = ([1, 7], [7, 1]);
    let (r13, c31) = ([1, 3], [3, 1]);
    match kind {
        Kind::Conv(out, k, s, p) => vec![conv("", c, out, [k, k], s, [p, p])],
        Kind::A(pool) => vec![
            conv("branch1x1", c, 64, k1, 1, [0, 0]),
            conv("branch5x5_1", c, 48, k1, 1, [0, 0]),
            conv("branch5x5_2", 48, 64, k5, 1, [2, 2]),
            conv("branch3x3dbl_1", c, 64, k1, 1, [0, 0]),
            conv("branch3x3dbl_2", 64, 96, k3, 1, [1, 1]),
            conv("branch3x3dbl_3", 96, 96, k3, 1, [1, 1]),
            conv("branch_pool", c, pool, k1, 1, [0, 0]),
        ],
        Kind::B => vec![
            conv("branch3x3", c, 384, k3, 2, [0, 0]),
            conv("branch3x3dbl_1", c, 64, k1, 1, [0, 0]),
            conv("branch3x3dbl_2", 64, 96, k3, 1, [1, 1]),
            conv("branch3x3dbl_3", 96, 96, k3, 2, [0, 0]),
        ],
        Kind::C(c7) => vec![
            conv("branch1x1", c, 192, k1, 1, [0, 0]),
            conv("branch7x7_1", c, c7, k1, 1, [0, 0]),
            conv("branch7x7_2", c7, c7, r17, 1, [0, 3]),
            conv("branch7x7_3", c7, 192, c71, 1, [3, 0]),
            conv("branch7x7dbl_1", c, c7, k1, 1, [0, 0]),
            conv("branch7x7dbl_2", c7, c7, c71, 1, [3, 0]),
            conv("branch7x7dbl_3", c7, c7, r17, 1, [0, 3]),
            conv("branch7x7dbl_4", c7, c7, c71, 1, [3, 0]),
            conv("branch7x7dbl_5", c7, 192, r17, 1, [0, 3]),
            conv("branch_pool", c, 192, k1, 1, [0, 0]),
        ],
        Kind::D => vec![
            conv("branch3x3_1", c, 192, k1, 1, [0, 0]),
            conv("branch3x3_2", 192, 320, k3, 2, [0, 0]),
            conv("branch7x7x3_1", c, 192, k1, 1, [0, 0]),
            conv("branch7x7x3_2", 192, 192, r17, 1, [0, 3]),
            conv("branch7x7x3_3", 192, 192, c71, 1, [3, 0]),
            conv("branch7x7x3_4", 192, 192, k3, 2, [0, 0]),
        ],
        Kind::E1 | Kind::E2 => vec![
            conv("branch1x1", c, 320, k1, 1, [0, 0]),
            conv("branch3x3_1", c, 384, k1, 1, [0, 0]),
            conv("branch3x3_2a", 384, 384, r13, 1, [0, 1]),
            conv("branch3x3_2b", 384, 384, c31, 1, [1, 0]),
            conv("branch3x3dbl_1", c, 448, k1, 1, [0, 0]),
            conv("branch3x3dbl_2", 448, 384, k3, 1, [1, 1]),
            conv("branch3x3dbl_3a", 384, 384, r13, 1, [0, 1]),
            conv("branch3x3dbl_3b", 384, 384, c31, 1, [1, 0]),
            conv("branch_pool", c, 192, k1, 1, [0, 0]),
        ],
    }
}

/// The name prefix of one convolution (`...` of `....conv.weight`) in `layout`.
fn prefix(layout: Layout, module: (&str, &str), spec: &ConvSpec) -> String {
    let m = match layout {
        Layout::PytorchFid => module.1,
        Layout::Torchvision => module.0,
    };
    if spec.name.is_empty() {
        m.to_string()
    } else {
        format!("{m}.{}", spec.name)
    }
}

/// The parameter tensors of one BasicConv2d: suffix and shape.
fn conv_tensors(spec: &ConvSpec) -> [(&'static str, Vec<usize>); 5] {
    let c = spec.c_out;
    [
        (
            "conv.weight",
            vec![c, spec.c_in, spec.kernel[0], spec.kernel[1]],
        ),
        ("bn.weight", vec![c]),
        ("bn.bias", vec![c]),
        ("bn.running_mean", vec![c]),
        ("bn.running_var", vec![c]),
    ]
}

/// Every tensor the network reads, with its shape, in `layout` (94 convolutions, 5 tensors each).
pub fn expected_tensors(layout: Layout) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for (tv, fid, c_in, kind) in MODULES {
        for spec in conv_specs(c_in, kind) {
            let p = prefix(layout, (tv, fid), &spec);
            for (suffix, shape) in conv_tensors(&spec) {
                out.push((format!("{p}.{suffix}"), shape));
            }
        }
    }
    out
}

/// A convolution with its batch norm folded in, followed by ReLU.
#[derive(Debug, Clone)]
struct BasicConv {
    weight: Tensor<4>,
    bias: Tensor<1>,
    stride: usize,
    padding: [usize; 2],
}

impl BasicConv {
    /// # Shapes
    /// - `x`: `[batch, c_in, h, w]`; output `[batch, c_out, h', w']`
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        relu(conv2d(
            x,
            self.weight.clone(),
            Some(self.bias.clone()),
            ConvOptions::new([self.stride; 2], self.padding, [1, 1], 1),
        ))
    }
}

/// One module: its kind and its convolutions by branch name.
#[derive(Debug, Clone)]
struct Module {
    kind: Kind,
    convs: HashMap<&'static str, BasicConv>,
}

impl Module {
    /// The convolutions `names` applied in turn to `x`.
    fn chain(&self, names: &[&str], x: Tensor<4>) -> Tensor<4> {
        names.iter().fold(x, |h, name| {
            self.convs
                .get(name)
                .expect("every branch is loaded with its module")
                .forward(h)
        })
    }

    /// # Shapes
    /// - `x`: `[batch, c_in, h, w]`; output `[batch, c_out, h', w']`
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        // TensorFlow's average pool counts only the pixels inside the image.
        let avg = |x: Tensor<4>| {
            avg_pool2d(
                x,
                AvgPoolOptions::new([3, 3])
                    .with_stride([1, 1])
                    .with_padding([1, 1])
                    .with_count_include_pad(false),
            )
        };
        let reduce = |x: Tensor<4>| max_pool2d(x, MaxPoolOptions::new([3, 3]).with_stride([2, 2]));
        let parts = match self.kind {
            Kind::Conv(..) => return self.chain(&[""], x),
            Kind::A(_) => vec![
                self.chain(&["branch1x1"], x.clone()),
                self.chain(&["branch5x5_1", "branch5x5_2"], x.clone()),
                self.chain(
                    &["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
                    x.clone(),
                ),
                self.chain(&["branch_pool"], avg(x)),
            ],
            Kind::B => vec![
                self.chain(&["branch3x3"], x.clone()),
                self.chain(
                    &["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
                    x.clone(),
                ),
                reduce(x),
            ],
            Kind::C(_) => vec![
                self.chain(&["branch1x1"], x.clone()),
                self.chain(&["branch7x7_1", "branch7x7_2", "branch7x7_3"], x.clone()),
                self.chain(
                    &[
                        "branch7x7dbl_1",
                        "branch7x7dbl_2",
                        "branch7x7dbl_3",
                        "branch7x7dbl_4",
                        "branch7x7dbl_5",
                    ],
                    x.clone(),
                ),
                self.chain(&["branch_pool"], avg(x)),
            ],
            Kind::D => vec![
                self.chain(&["branch3x3_1", "branch3x3_2"], x.clone()),
                self.chain(
                    &[
                        "branch7x7x3_1",
                        "branch7x7x3_2",
                        "branch7x7x3_3",
                        "branch7x7x3_4",
                    ],
                    x.clone(),
                ),
                reduce(x),
            ],
            Kind::E1 | Kind::E2 => {
                let b3 = self.chain(&["branch3x3_1"], x.clone());
                let d3 = self.chain(&["branch3x3dbl_1", "branch3x3dbl_2"], x.clone());
                let pooled = if self.kind == Kind::E1 {
                    avg(x.clone())
                } else {
                    // pytorch-fid: the FID graph max-pools here (likely a bug in the original,
                    // kept because the published statistics depend on it).
                    max_pool2d(
                        x.clone(),
                        MaxPoolOptions::new([3, 3])
                            .with_stride([1, 1])
                            .with_padding([1, 1]),
                    )
                };
                vec![
                    self.chain(&["branch1x1"], x),
                    self.chain(&["branch3x3_2a"], b3.clone()),
                    self.chain(&["branch3x3_2b"], b3),
                    self.chain(&["branch3x3dbl_3a"], d3.clone()),
                    self.chain(&["branch3x3dbl_3b"], d3),
                    self.chain(&["branch_pool"], pooled),
                ]
            }
        };
        Tensor::cat(parts, 1)
    }
}

/// The frozen FID Inception-v3 (plain tensors, no autodiff parameters).
#[derive(Debug, Clone)]
pub struct Inception {
    modules: Vec<Module>,
    /// `fc.weight^T` `[2048, 1008]`, when the file has the classifier.
    fc: Option<Tensor<2>>,
    /// The weights file, for messages.
    source: std::path::PathBuf,
    /// FNV-1a of the bits of every tensor read, in reading order (see [`Inception::fingerprint`]).
    fingerprint: u64,
}

/// Folds `values` into an FNV-1a hash by their f32 bits.
fn fnv1a_f32(mut hash: u64, values: &[f32]) -> u64 {
    for v in values {
        for b in v.to_bits().to_le_bytes() {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
        }
    }
    hash
}

impl Inception {
    /// Reads the weights from `path` (either [`Layout`]; f32, f16 or bf16) onto `device`, checking
    /// every name and shape, and folds each batch norm into its convolution.
    pub fn load(path: &Path, device: &Device) -> Result<Inception> {
        let mut tensors =
            crate::params::read_matching(path, |n| !n.ends_with("num_batches_tracked"))?;
        if let Some(fc) = tensors.get("fc.weight")
            && fc.shape.first() == Some(&1000)
        {
            tracing::warn!(
                "{}: a 1000-class fc layer: these look like torchvision's ImageNet Inception-v3, not the FID network (1008 classes); FID values will not match published ones",
                path.display()
            );
        }
        let layout = if tensors.contains_key("blocks.0.0.conv.weight") {
            Layout::PytorchFid
        } else if tensors.contains_key("Conv2d_1a_3x3.conv.weight") {
            Layout::Torchvision
        } else {
            return Err(Error::input(
                path,
                format!(
                    "has neither blocks.0.0.conv.weight (pytorch-fid layout) nor Conv2d_1a_3x3.conv.weight (torchvision layout); {SUPPLY}"
                ),
            ));
        };
        let mut fingerprint = 0xCBF2_9CE4_8422_2325u64;
        let mut take = |name: String, shape: &[usize]| -> Result<Vec<f32>> {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| Error::input(path, format!("has no tensor {name}; {SUPPLY}")))?;
            if t.shape != shape {
                return Err(Error::input(
                    path,
                    format!(
                        "tensor {name} has shape {:?}, the FID Inception-v3 needs {shape:?}; {SUPPLY}",
                        t.shape
                    ),
                ));
            }
            fingerprint = fnv1a_f32(fingerprint, &t.data);
            Ok(t.data)
        };
        let mut modules = Vec::with_capacity(MODULES.len());
        for (tv, fid, c_in, kind) in MODULES {
            let mut convs = HashMap::new();
            for spec in conv_specs(c_in, kind) {
                let p = prefix(layout, (tv, fid), &spec);
                let [w, g, b, m, v] =
                    conv_tensors(&spec).map(|(suffix, shape)| (format!("{p}.{suffix}"), shape));
                let mut weight = take(w.0, &w.1)?;
                let (gamma, beta) = (take(g.0, &g.1)?, take(b.0, &b.1)?);
                let (mean, var) = (take(m.0, &m.1)?, take(v.0, &v.1)?);
                // y = gamma (conv(x) - mean) / sqrt(var + eps) + beta = conv'(x) + bias'.
                let per_out = weight.len() / spec.c_out;
                let mut bias = Vec::with_capacity(spec.c_out);
                for o in 0..spec.c_out {
                    let scale = f64::from(gamma[o]) / (f64::from(var[o]) + BN_EPS).sqrt();
                    for w in &mut weight[o * per_out..(o + 1) * per_out] {
                        *w = (f64::from(*w) * scale) as f32;
                    }
                    bias.push((f64::from(beta[o]) - f64::from(mean[o]) * scale) as f32);
                }
                convs.insert(
                    spec.name,
                    BasicConv {
                        weight: Tensor::from_data(TensorData::new(weight, w.1), device),
                        bias: Tensor::from_data(TensorData::new(bias, [spec.c_out]), device),
                        stride: spec.stride,
                        padding: spec.padding,
                    },
                );
            }
            modules.push(Module { kind, convs });
        }
        let fc = match tensors.remove("fc.weight") {
            Some(t) if t.shape == [CLASSES, FEATURES] => {
                fingerprint = fnv1a_f32(fingerprint, &t.data);
                // Stored [1008, 2048] (PyTorch's Linear); the logits are pool3 @ fc.weight^T.
                let w =
                    Tensor::<2>::from_data(TensorData::new(t.data, [CLASSES, FEATURES]), device);
                Some(w.transpose())
            }
            // A 1000-class classifier was warned about above.
            Some(t) if t.shape.first() == Some(&1000) => None,
            Some(t) => {
                tracing::warn!(
                    "{}: fc.weight has shape {:?}, the FID network's classifier is [{CLASSES}, {FEATURES}]; the Inception Score is unavailable with these weights",
                    path.display(),
                    t.shape
                );
                None
            }
            None => None,
        };
        Ok(Inception {
            modules,
            fc,
            source: path.to_path_buf(),
            fingerprint,
        })
    }

    /// Whether the weights had the 1008-way classifier, so [`Inception::logits`] works.
    pub fn has_classifier(&self) -> bool {
        self.fc.is_some()
    }

    /// `Ok` when the weights had the classifier, else the one message saying the Inception Score is
    /// unavailable and why, naming the file.
    pub fn require_classifier(&self) -> Result<()> {
        match self.fc {
            Some(_) => Ok(()),
            None => Err(self.no_classifier()),
        }
    }

    fn no_classifier(&self) -> Error {
        Error::input(
            &self.source,
            format!(
                "has no fc.weight [{CLASSES}, {FEATURES}], so no Inception Score; use weights with the classifier (torch-fidelity's weights-inception-2015-12-05-6726825d.pth converted to safetensors; pytorch-fid's state dict drops it)"
            ),
        )
    }

    /// A hash of every weight read (FNV-1a of the f32 bits, before batch-norm folding): cached
    /// reference statistics record it so that statistics of other weights are refused.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.modules[0]
            .convs
            .values()
            .next()
            .expect("every module has a convolution")
            .weight
            .device()
    }

    /// The pool3 features of images with values in [0, 1], pytorch-fid's way: bilinear resize to
    /// 299 x 299 (half-pixel centres, like `F.interpolate(..., align_corners=False)`), then `2 x - 1`,
    /// then [`Inception::pool3`]. torch-fidelity's input pipeline (uint8, TF1 resize, `(x - 128) /
    /// 128`) is `metrics::input`.
    ///
    /// # Shapes
    /// - `x`: `[batch, 3, H, W]`; output `[batch, 2048]`
    pub fn features(&self, x: Tensor<4>) -> Tensor<2> {
        let [_, _, h, w] = x.dims();
        let x = if (h, w) == (INPUT_SIZE, INPUT_SIZE) {
            x
        } else {
            interpolate(
                x,
                InterpolateOptions::new(InterpolateMode::Bilinear)
                    .with_align_corners(false)
                    .with_output_size([INPUT_SIZE, INPUT_SIZE]),
            )
        };
        self.pool3(x * 2.0 - 1.0)
    }

    /// The pool3 features of network-ready images: 299 x 299, values scaled to about [-1, 1].
    ///
    /// # Shapes
    /// - `x`: `[batch, 3, 299, 299]`; output `[batch, 2048]`
    pub fn pool3(&self, x: Tensor<4>) -> Tensor<2> {
        let n = x.dims()[0];
        let mut h = x;
        let reduce = |x: Tensor<4>| max_pool2d(x, MaxPoolOptions::new([3, 3]).with_stride([2, 2]));
        for (i, module) in self.modules.iter().enumerate() {
            h = module.forward(h);
            // The stem's max pools, after Conv2d_2b_3x3 and Conv2d_4a_3x3.
            if i == 2 || i == 4 {
                h = reduce(h);
            }
        }
        adaptive_avg_pool2d(h, [1, 1]).reshape([n, FEATURES]) // [batch, 2048]
    }

    /// The classifier's logits without its bias, `pool3 @ fc.weight^T` (torch-fidelity's
    /// `logits_unbiased`, the Inception Score's input). Fails, naming the file, when the weights had no
    /// classifier.
    ///
    /// # Shapes
    /// - `pool3`: `[batch, 2048]`; output `[batch, 1008]`
    pub fn logits(&self, pool3: Tensor<2>) -> Result<Tensor<2>> {
        match &self.fc {
            Some(fc) => Ok(pool3.matmul(fc.clone())),
            None => Err(self.no_classifier()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_pytorch_fids_94_convolutions_and_2048_outputs() {
        let names = expected_tensors(Layout::PytorchFid);
        assert_eq!(names.len(), 94 * 5);
        let params: usize = names.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        // torchvision's Inception3(aux_logits=False).state_dict() without fc and the counters.
        assert_eq!(params, 21_820_000);
        assert!(
            names
                .iter()
                .any(|(n, s)| n == "blocks.3.2.branch_pool.bn.weight" && s == &[192])
        );
        let tv = expected_tensors(Layout::Torchvision);
        assert!(
            tv.iter()
                .any(|(n, s)| n == "Mixed_5b.branch1x1.bn.running_var" && s == &[64])
        );
        assert_eq!(tv[0].0, "Conv2d_1a_3x3.conv.weight");
        assert_eq!(tv[0].1, [32, 3, 3, 3]);
    }

    /// The pool branch averages over valid pixels: a constant image stays constant at the border.
    #[test]
    fn average_pool_ignores_the_padding() {
        let dev = Device::flex();
        let x = Tensor::<4>::ones([1, 1, 4, 4], &dev);
        let y = avg_pool2d(
            x,
            AvgPoolOptions::new([3, 3])
                .with_stride([1, 1])
                .with_padding([1, 1])
                .with_count_include_pad(false),
        );
        let v = y.try_into_vec_as::<f32>().unwrap();
        assert!(v.iter().all(|v| (v - 1.0).abs() < 1e-6), "{v:?}");
    }
}
