//! What the command line adds to a library error: the flag behind a setting, and what to type
//! next. The library names settings by their config keys (`train.batch`); a user of the CLI types
//! flags (`--batch`).

use flowalign::Error;

/// Config keys and the flags that set them. A key written by several commands' configs maps to
/// the flag those commands share.
const FLAGS: &[(&str, &str)] = &[
    // The toy.
    ("seed", "--seed"),
    ("points", "--target-csv"),
    ("prior.steps", "--prior-steps"),
    ("prior.width", "--width"),
    ("prior.depth", "--depth"),
    ("prior.batch", "--batch"),
    ("prior.lr", "--prior-lr"),
    ("prior.ema", "--ema"),
    ("align.steps", "--align-steps"),
    ("align.lr", "--align-lr"),
    ("align.n_latents", "--n-latents"),
    ("align.mc", "--mc"),
    ("eval.grid", "--grid"),
    ("eval.t_values", "--t-values"),
    // Every training run's loop.
    ("train.steps", "--steps"),
    ("train.batch", "--batch"),
    ("train.lr", "--lr"),
    ("train.warmup", "--warmup"),
    ("train.ema", "--ema"),
    ("train.seed", "--seed"),
    ("train.checkpoint_every", "--checkpoint-every"),
    ("train.log_every", "--log-every"),
    ("train.precision", "--precision"),
    // The prior.
    ("data.features", "--features"),
    ("data.latent_dim", "--latent-dim"),
    ("data.projection", "--projection"),
    ("data.projection_seed", "--projection-seed"),
    ("data.scale", "--scale"),
    ("data.holdout", "--holdout"),
    ("data.drop_nonfinite", "--drop-nonfinite"),
    ("model.width", "--width"),
    ("model.depth", "--depth"),
    ("train.mc", "--mc"),
    // The autoencoder.
    ("data", "--data"),
    ("prior", "--prior"),
    ("model.latent_dim", "--latent-dim"),
    ("model.latent_tokens", "--latent-tokens"),
    ("model.image_size", "--image-size"),
    ("model.patch", "--patch"),
    ("loss.lambda", "--lambda"),
    ("loss.mc", "--mc"),
    ("loss.lpips", "--lpips"),
    ("loss.adv.weight", "--adv-weight"),
    ("train.small_images", "--small-images"),
    ("train.monitor_every", "--monitor-every"),
    ("train.recon_every", "--recon-every"),
    ("encoder_init", "--encoder-init"),
    ("lpips_weights", "--lpips-weights"),
    ("disc_init", "--disc-init"),
];

/// The flag that sets config key `key`, if one does.
pub fn flag(key: &str) -> Option<&'static str> {
    FLAGS.iter().find(|(k, _)| *k == key).map(|(_, f)| *f)
}

/// A hint for the command line to append to `e`'s message, if it has one.
pub fn hint(e: &anyhow::Error) -> Option<String> {
    let e = e.chain().find_map(|c| c.downcast_ref::<Error>())?;
    match e {
        Error::RunExists { .. } => {
            Some("pass --resume to continue it, or choose another --out".into())
        }
        Error::NoRun { .. } => Some("drop --resume to start a new run there".into()),
        Error::ResumeMismatch { key, .. } => Some(match flag(key) {
            Some(f) => format!(
                "drop {f} (or set it back) to continue the run, or start a new one in another --out"
            ),
            None => format!(
                "keep {key} as it was to continue the run, or start a new one in another --out"
            ),
        }),
        Error::OutOfMemory { batch, .. } => Some(format!("try --batch {}", (batch / 2).max(1))),
        _ => e
            .setting_key()
            .and_then(flag)
            .map(|f| format!("set with {f}")),
    }
}

/// An error as one line: the chain of causes, joined, skipping a cause the message already quotes,
/// then the command line's hint.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg = format!("{msg}: {c}");
        }
    }
    if let Some(h) = hint(e) {
        msg = format!("{msg} ({h})");
    }
    msg.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_gain_their_flag_and_runs_their_next_step() {
        let e = anyhow::Error::from(Error::setting("train.batch", "must be at least 1, got 0"));
        assert_eq!(
            error_line(&e),
            "train.batch: must be at least 1, got 0 (set with --batch)"
        );
        let e = anyhow::Error::from(Error::RunExists {
            dir: "runs/x".into(),
            step: 40,
        });
        let line = error_line(&e);
        assert!(
            line.contains("step 40") && line.contains("--resume"),
            "{line}"
        );
        let e = anyhow::Error::from(Error::OutOfMemory {
            what: "batch 64".into(),
            batch: 64,
        });
        assert!(error_line(&e).contains("--batch 32"));
        // Every flag named here exists on some command.
        for (_, f) in FLAGS {
            assert!(f.starts_with("--") && !f.contains(' '), "{f}");
        }
    }
}
