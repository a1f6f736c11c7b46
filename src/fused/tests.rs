//! The fused operations against the same functions written with burn's tensor operations:
//! outputs and every gradient, per-row and shared conditions, tracked and frozen parameters.

use burn::prelude::*;
use burn::tensor::activation::silu;

use super::*;

/// A deterministic pseudo-random tensor with entries in about [-scale, scale].
fn rand<const D: usize>(shape: [usize; D], seed: u32, scale: f32, device: &Device) -> Tensor<D> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|i| {
            let v = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            ((v >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn layer_norm(x: Tensor<2>) -> Tensor<2> {
    let (var, mean) = x.clone().var_mean_bias(1);
    (x - mean) / var.add_scalar(1e-6).sqrt()
}

struct Params {
    s: Tensor<2>,
    wm: Tensor<2>,
    bm: Tensor<1>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    w1: Tensor<2>,
    b1: Tensor<1>,
    w2: Tensor<2>,
    b2: Tensor<1>,
}

impl Params {
    fn new(rows: usize, c: usize, device: &Device) -> Self {
        Params {
            s: rand([rows, c], 1, 1.0, device),
            wm: rand([c, 3 * c], 2, 0.3, device),
            bm: rand([3 * c], 3, 0.3, device),
            gamma: rand([c], 4, 0.5, device).add_scalar(1.0),
            beta: rand([c], 5, 0.2, device),
            w1: rand([c, c], 6, 0.4, device),
            b1: rand([c], 7, 0.2, device),
            w2: rand([c, c], 8, 0.4, device),
            b2: rand([c], 9, 0.2, device),
        }
    }

    fn require_grad(self) -> Self {
        Params {
            s: self.s.require_grad(),
            wm: self.wm.require_grad(),
            bm: self.bm.require_grad(),
            gamma: self.gamma.require_grad(),
            beta: self.beta.require_grad(),
            w1: self.w1.require_grad(),
            b1: self.b1.require_grad(),
            w2: self.w2.require_grad(),
            b2: self.b2.require_grad(),
        }
    }

    fn fused(&self, x: Tensor<2>) -> Tensor<2> {
        adaln_block(
            x,
            self.s.clone(),
            Affine {
                weight: self.wm.clone(),
                bias: self.bm.clone(),
            },
            (self.gamma.clone(), self.beta.clone()),
            Affine {
                weight: self.w1.clone(),
                bias: self.b1.clone(),
            },
            Affine {
                weight: self.w2.clone(),
                bias: self.b2.clone(),
            },
        )
    }

    fn reference(&self, x: Tensor<2>) -> Tensor<2> {
        let m = self.s.clone().matmul(self.wm.clone()) + self.bm.clone().unsqueeze();
        let mut parts = m.chunk(3, 1);
        let gate = parts.pop().unwrap();
        let scale = parts.pop().unwrap();
        let shift = parts.pop().unwrap();
        let y =
            layer_norm(x.clone()) * self.gamma.clone().unsqueeze() + self.beta.clone().unsqueeze();
        let h = y * (scale + 1.0) + shift;
        let a = silu(h.matmul(self.w1.clone()) + self.b1.clone().unsqueeze());
        let z2 = a.matmul(self.w2.clone()) + self.b2.clone().unsqueeze();
        x + gate * z2
    }
}

fn close(name: &str, a: Tensor<2>, b: Tensor<2>, tol: f32) {
    let a: Vec<f32> = a.inner().try_into_vec_as().unwrap();
    let b: Vec<f32> = b.inner().try_into_vec_as().unwrap();
    assert_eq!(a.len(), b.len(), "{name}: lengths");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{name}[{i}]: fused {x} vs reference {y} (scale {scale})"
        );
    }
}

/// Checks the block's output and the gradients of x and of every parameter.
fn check_block(n: usize, cond_rows: usize, c: usize) {
    let dev = Device::flex().autodiff();
    let weights = rand([n, c], 11, 1.0, &dev);
    let x = rand([n, c], 10, 2.0, &dev).add_scalar(0.3).require_grad();
    let p = Params::new(cond_rows, c, &dev).require_grad();
    let fused = p.fused(x.clone());
    let reference = p.reference(x.clone());
    close("output", fused.clone(), reference.clone(), 1e-5);
    let gf = (fused * weights.clone()).sum().backward();
    let gr = (reference * weights).sum().backward();
    close("dx", x.grad(&gf).unwrap(), x.grad(&gr).unwrap(), 1e-4);
    let v = |t: Option<Tensor<1>>| t.unwrap().unsqueeze::<2>();
    let pairs = [
        ("ds", p.s.grad(&gf).unwrap(), p.s.grad(&gr).unwrap()),
        ("dwm", p.wm.grad(&gf).unwrap(), p.wm.grad(&gr).unwrap()),
        ("dbm", v(p.bm.grad(&gf)), v(p.bm.grad(&gr))),
        ("dgamma", v(p.gamma.grad(&gf)), v(p.gamma.grad(&gr))),
        ("dbeta", v(p.beta.grad(&gf)), v(p.beta.grad(&gr))),
        ("dw1", p.w1.grad(&gf).unwrap(), p.w1.grad(&gr).unwrap()),
        ("db1", v(p.b1.grad(&gf)), v(p.b1.grad(&gr))),
        ("dw2", p.w2.grad(&gf).unwrap(), p.w2.grad(&gr).unwrap()),
        ("db2", v(p.b2.grad(&gf)), v(p.b2.grad(&gr))),
    ];
    for (name, a, b) in pairs {
        close(name, a, b, 1e-4);
    }
}

#[test]
fn block_matches_tensor_ops_with_per_row_conditions() {
    check_block(37, 37, 24);
}

#[test]
fn block_matches_tensor_ops_with_a_shared_condition() {
    check_block(40, 1, 16);
}

#[test]
fn block_matches_tensor_ops_on_many_rows_in_parallel() {
    check_block(300, 300, 64);
}

#[test]
fn block_with_frozen_parameters_gives_the_input_gradient() {
    let dev = Device::flex();
    let ad = dev.clone().autodiff();
    let n = 50;
    let c = 32;
    let p = Params::new(n, c, &dev);
    let x = rand([n, c], 12, 1.5, &ad).require_grad();
    let weights = rand([n, c], 13, 1.0, &ad);
    let gf = (p.fused(x.clone()) * weights.clone()).sum().backward();
    let gr = (p.reference(x.clone()) * weights).sum().backward();
    close("dx", x.grad(&gf).unwrap(), x.grad(&gr).unwrap(), 1e-4);
}

#[test]
fn block_without_autodiff_matches() {
    let dev = Device::flex();
    let p = Params::new(1, 48, &dev);
    let x = rand([70, 48], 14, 1.0, &dev);
    close("output", p.fused(x.clone()), p.reference(x), 1e-5);
}

#[test]
fn final_layer_and_time_condition_match_tensor_ops() {
    let dev = Device::flex().autodiff();
    let (n, c, d, f) = (45, 40, 3, 24);
    for cond_rows in [n, 1] {
        let x = rand([n, c], 20, 1.5, &dev).require_grad();
        let s = rand([cond_rows, c], 21, 1.0, &dev).require_grad();
        let wm = rand([c, 2 * c], 22, 0.3, &dev).require_grad();
        let bm = rand([2 * c], 23, 0.3, &dev).require_grad();
        let wo = rand([c, d], 24, 0.5, &dev).require_grad();
        let bo = rand([d], 25, 0.5, &dev).require_grad();
        let fused = adaln_final(
            x.clone(),
            s.clone(),
            Affine {
                weight: wm.clone(),
                bias: bm.clone(),
            },
            Affine {
                weight: wo.clone(),
                bias: bo.clone(),
            },
        );
        let m = s.clone().matmul(wm.clone()) + bm.clone().unsqueeze();
        let mut parts = m.chunk(2, 1);
        let scale = parts.pop().unwrap();
        let shift = parts.pop().unwrap();
        let reference = (layer_norm(x.clone()) * (scale + 1.0) + shift).matmul(wo.clone())
            + bo.clone().unsqueeze();
        close("final output", fused.clone(), reference.clone(), 1e-5);
        let weights = rand([n, d], 26, 1.0, &dev);
        let gf = (fused * weights.clone()).sum().backward();
        let gr = (reference * weights).sum().backward();
        close("final dx", x.grad(&gf).unwrap(), x.grad(&gr).unwrap(), 1e-4);
        close("final ds", s.grad(&gf).unwrap(), s.grad(&gr).unwrap(), 1e-4);
        close(
            "final dwm",
            wm.grad(&gf).unwrap(),
            wm.grad(&gr).unwrap(),
            1e-4,
        );
        let v = |t: Tensor<1>| t.unsqueeze::<2>();
        close(
            "final dbm",
            v(bm.grad(&gf).unwrap()),
            v(bm.grad(&gr).unwrap()),
            1e-4,
        );
        close(
            "final dwo",
            wo.grad(&gf).unwrap(),
            wo.grad(&gr).unwrap(),
            1e-4,
        );
        close(
            "final dbo",
            v(bo.grad(&gf).unwrap()),
            v(bo.grad(&gr).unwrap()),
            1e-4,
        );
    }

    let emb = rand([n, f], 30, 1.0, &dev).require_grad();
    let w1 = rand([f, c], 31, 0.4, &dev).require_grad();
    let b1 = rand([c], 32, 0.2, &dev).require_grad();
    let w2 = rand([c, c], 33, 0.4, &dev).require_grad();
    let b2 = rand([c], 34, 0.2, &dev).require_grad();
    let fused = time_condition(
        emb.clone(),
        Affine {
            weight: w1.clone(),
            bias: b1.clone(),
        },
        Affine {
            weight: w2.clone(),
            bias: b2.clone(),
        },
    );
    let reference = silu(
        silu(emb.clone().matmul(w1.clone()) + b1.clone().unsqueeze()).matmul(w2.clone())
            + b2.clone().unsqueeze(),
    );
    close("time output", fused.clone(), reference.clone(), 1e-5);
    let weights = rand([n, c], 35, 1.0, &dev);
    let gf = (fused * weights.clone()).sum().backward();
    let gr = (reference * weights).sum().backward();
    let v = |t: Tensor<1>| t.unsqueeze::<2>();
    close(
        "time demb",
        emb.grad(&gf).unwrap(),
        emb.grad(&gr).unwrap(),
        1e-4,
    );
    close(
        "time dw1",
        w1.grad(&gf).unwrap(),
        w1.grad(&gr).unwrap(),
        1e-4,
    );
    close(
        "time db1",
        v(b1.grad(&gf).unwrap()),
        v(b1.grad(&gr).unwrap()),
        1e-4,
    );
    close(
        "time dw2",
        w2.grad(&gf).unwrap(),
        w2.grad(&gr).unwrap(),
        1e-4,
    );
    close(
        "time db2",
        v(b2.grad(&gf).unwrap()),
        v(b2.grad(&gr).unwrap()),
        1e-4,
    );
}

/// Steps a linear layer with `optim` on three fixed losses, switching to `then` (restored from
/// the first's state bytes) after `switch_at` steps; returns the final weights.
fn train_linear(
    mut optim: burn::optim::ModuleOptimizer,
    then: burn::optim::ModuleOptimizer,
    switch_at: usize,
) -> Vec<f32> {
    use burn::optim::GradientsParams;
    let dev = Device::flex().autodiff();
    let mut layer = burn::nn::Linear {
        weight: burn::module::Param::from_tensor(rand([64, 1024], 40, 0.2, &dev)),
        bias: Some(burn::module::Param::from_tensor(rand(
            [1024],
            41,
            0.2,
            &dev,
        ))),
    };
    let mut then = Some(then);
    for step in 0..4 {
        if step == switch_at
            && let Some(next) = then.take()
        {
            let bytes = optim.into_bytes().unwrap();
            optim = next.from_bytes(bytes).unwrap();
        }
        let x = rand([8, 64], 50 + step as u32, 1.0, &dev);
        let w = rand([8, 1024], 60 + step as u32, 1.0, &dev);
        let loss = (layer.forward(x) * w).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &layer);
        layer = optim.step(1e-2, layer, grads);
    }
    layer.weight.val().inner().try_into_vec_as().unwrap()
}

#[test]
fn fused_adam_and_adamw_match_burns_bit_for_bit_and_share_state() {
    use burn::optim::{AdamConfig, AdamWConfig, ModuleOptimizer};
    for wd in [0.0f32, 0.05] {
        let burns = || -> ModuleOptimizer {
            if wd > 0.0 {
                AdamWConfig::new()
                    .with_beta_1(0.9)
                    .with_beta_2(0.95)
                    .with_epsilon(1e-8)
                    .with_weight_decay(wd)
                    .init()
            } else {
                AdamConfig::new()
                    .with_beta_1(0.9)
                    .with_beta_2(0.95)
                    .with_epsilon(1e-8)
                    .init()
            }
        };
        let ours = || ModuleOptimizer::from(adam::FusedAdam::new(0.9, 0.95, 1e-8, wd));
        let reference = train_linear(burns(), burns(), 99);
        assert_eq!(train_linear(ours(), ours(), 99), reference, "wd {wd}");
        // burn's state continues in ours and ours in burn's.
        assert_eq!(
            train_linear(burns(), ours(), 2),
            reference,
            "wd {wd}: burn -> fused"
        );
        assert_eq!(
            train_linear(ours(), burns(), 2),
            reference,
            "wd {wd}: fused -> burn"
        );
    }
}
