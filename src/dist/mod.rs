//! Data parallelism across processes and machines through MPI (cargo feature `mpi`).
//!
//! Every rank runs the same training loop on its slice of the global batch; [`Comm`] sums the
//! gradients over ranks every step (`train::Trainer::with_comm`), so every rank applies the same
//! update and holds the same weights. Rank 0 alone reads and writes the run folder; it broadcasts
//! the config and the trainer state at start (a new or a resumed run), so the other ranks need only
//! the data. A periodic checksum verifies that the ranks still agree.
//!
//! All MPI calls happen on one thread that owns the MPI library (`MPI_THREAD_FUNNELED`); the
//! training thread hands it buffers over a channel. That keeps the trainer `Send`, lets the
//! training thread stage the next gradient bucket from the device while the previous one is summed,
//! and lets the MPI thread poll its non-blocking collectives with a deadline: a rank that dies or
//! hangs stops the whole job (`MPI_Abort`) with a message naming it, never a silent hang.

use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;

use crate::error::{Error, Result};

#[cfg(feature = "mpi")]
mod mpi_thread;

/// Gradient buckets are summed as they are staged (PyTorch DDP's default is 25 MB).
pub const BUCKET_FLOATS: usize = 25 * 1024 * 1024 / 4;

/// How long a rank waits in one collective before it declares a peer dead or hung.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// One request to the MPI thread.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
enum Job {
    /// Element-wise sum over ranks; `step` and `what` name the collective in a timeout message.
    SumF32 {
        buf: Vec<f32>,
        step: usize,
        what: &'static str,
    },
    SumF64 {
        buf: Vec<f64>,
        step: usize,
        what: &'static str,
    },
    /// Rank 0's bytes to every rank (the others pass an empty vector).
    Broadcast { buf: Vec<u8>, what: &'static str },
    /// Every rank's value, in rank order.
    GatherU64 {
        value: u64,
        step: usize,
        what: &'static str,
    },
    /// Finalise MPI (a clean end).
    Finish,
    /// Stop every rank of the job with this exit code.
    Abort(i32),
}

/// The MPI thread's answer to a [`Job`], in order.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
enum Reply {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<u8>),
    U64s(Vec<u64>),
}

/// Where this process sits in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rank {
    /// This process's rank in the job (0 leads).
    pub rank: usize,
    /// Processes in the job.
    pub size: usize,
    /// This process's rank among those on the same machine (picks its GPU).
    pub local_rank: usize,
    /// Processes on this machine.
    pub local_size: usize,
}

/// A handle on the job's communicator, shared by the trainers of one process.
pub struct Comm {
    me: Rank,
    jobs: Sender<Job>,
    replies: Mutex<Receiver<Reply>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Comm").field("me", &self.me).finish()
    }
}

impl Comm {
    /// Joins the MPI job this process was started in (by `mpirun`/`srun`; a process started alone
    /// is a job of one). `timeout` bounds every wait on a peer.
    pub fn mpi(timeout: Duration) -> Result<Comm> {
        #[cfg(feature = "mpi")]
        {
            use std::sync::mpsc::channel;
            let (jobs, job_rx) = channel();
            let (reply_tx, replies) = channel();
            let (ready_tx, ready_rx) = channel();
            let thread = std::thread::Builder::new()
                .name("mpi".into())
                .spawn(move || mpi_thread::serve(job_rx, reply_tx, ready_tx, timeout))
                .map_err(|e| Error::Distributed(format!("could not start the MPI thread: {e}")))?;
            let me = ready_rx.recv().map_err(|_| {
                Error::Distributed("MPI failed to initialise (see the message above)".into())
            })??;
            Ok(Comm {
                me,
                jobs,
                replies: Mutex::new(replies),
                thread: Mutex::new(Some(thread)),
            })
        }
        #[cfg(not(feature = "mpi"))]
        {
            let _ = timeout;
            Err(Error::Distributed(
                "this flowalign was built without MPI; rebuild with `cargo build --release --features mpi` (needs OpenMPI's libopenmpi-dev and libclang-dev)".into(),
            ))
        }
    }

    /// Where this process sits in the job.
    pub fn rank(&self) -> Rank {
        self.me
    }

    /// Whether this is rank 0, the one that reads and writes the run folder.
    pub fn leads(&self) -> bool {
        self.me.rank == 0
    }

    fn call(&self, job: Job) -> Result<Reply> {
        self.jobs.send(job).map_err(|_| gone())?;
        self.replies
            .lock()
            .map_err(|_| gone())?
            .recv()
            .map_err(|_| gone())
    }

    /// Starts summing `buf` over ranks; [`Comm::finish_sum`] returns the results in order.
    pub fn start_sum(&self, buf: Vec<f32>, step: usize, what: &'static str) -> Result<()> {
        self.jobs
            .send(Job::SumF32 { buf, step, what })
            .map_err(|_| gone())
    }

    /// The oldest sum started by [`Comm::start_sum`] and not yet returned.
    pub fn finish_sum(&self) -> Result<Vec<f32>> {
        match self.replies.lock().map_err(|_| gone())?.recv() {
            Ok(Reply::F32(v)) => Ok(v),
            _ => Err(gone()),
        }
    }

    /// The element-wise sum of `buf` over ranks (for metrics).
    pub fn sum_f64(&self, buf: Vec<f64>, step: usize, what: &'static str) -> Result<Vec<f64>> {
        match self.call(Job::SumF64 { buf, step, what })? {
            Reply::F64(v) => Ok(v),
            _ => Err(gone()),
        }
    }

    /// Whether `flag` is set on any rank (e.g. a stop request seen by one of them).
    pub fn any(&self, flag: bool, step: usize) -> Result<bool> {
        let v = self.sum_f64(vec![f64::from(u8::from(flag))], step, "stop flag")?;
        Ok(v[0] > 0.0)
    }

    /// Rank 0's `bytes` on every rank (the others' argument is ignored).
    pub fn broadcast(&self, bytes: Vec<u8>, what: &'static str) -> Result<Vec<u8>> {
        let buf = if self.leads() { bytes } else { Vec::new() };
        match self.call(Job::Broadcast { buf, what })? {
            Reply::Bytes(v) => Ok(v),
            _ => Err(gone()),
        }
    }

    /// Every rank's `value`, in rank order.
    pub fn gather_u64(&self, value: u64, step: usize, what: &'static str) -> Result<Vec<u64>> {
        match self.call(Job::GatherU64 { value, step, what })? {
            Reply::U64s(v) => Ok(v),
            _ => Err(gone()),
        }
    }

    /// Checks that every rank holds the same weights (`checksum` is this rank's
    /// [`weights_checksum`]); an error names the ranks that differ from rank 0.
    pub fn verify_same(&self, checksum: u64, step: usize) -> Result<()> {
        let all = self.gather_u64(checksum, step, "weights checksum")?;
        let odd: Vec<String> = all
            .iter()
            .enumerate()
            .filter(|(_, c)| **c != all[0])
            .map(|(r, _)| r.to_string())
            .collect();
        if odd.is_empty() {
            Ok(())
        } else {
            Err(Error::Distributed(format!(
                "at step {step} the weights of rank(s) {} differ from rank 0's (checksums {all:x?}); the ranks diverged, \
                 so the run stops: resume from the last checkpoint, and report this as a bug if it repeats",
                odd.join(", ")
            )))
        }
    }

    /// Ends the job cleanly on this rank (`MPI_Finalize`); call it once training is over.
    pub fn finish(&self) {
        let _ = self.jobs.send(Job::Finish);
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }

    /// Stops every rank of the job with exit code `code` (`MPI_Abort`); does not return.
    pub fn abort(&self, code: i32) -> ! {
        let _ = self.jobs.send(Job::Abort(code));
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
        // The MPI thread aborts the process; this is reached only if it had already gone.
        std::process::exit(code)
    }
}

fn gone() -> Error {
    Error::Distributed("the MPI thread has stopped (see the message above)".into())
}

/// The rows `[a, b)` of a global batch of `batch` that rank `rank` of `size` trains on.
///
/// The split is even: a global batch that `size` does not divide is refused up front by
/// [`check_batch`], so every rank's loss has the same weight in the mean.
pub fn part(batch: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let per = batch / size;
    rank * per..(rank + 1) * per
}

/// Refuses a global batch that the ranks cannot share evenly.
pub fn check_batch(batch: usize, size: usize, what: &str) -> Result<()> {
    if !batch.is_multiple_of(size) || batch < size {
        return Err(Error::setting(
            "train.batch",
            format!(
                "the global batch of {batch} {what} does not split evenly over {size} ranks; use a multiple of {size} (e.g. {})",
                (batch / size).max(1) * size
            ),
        ));
    }
    Ok(())
}

/// A fingerprint of a module's weights: equal on two ranks exactly when their weights are
/// bit-identical (up to hash collisions).
pub fn weights_checksum<M: Module>(module: &M) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for v in crate::params::param_values(module) {
        v.to_bits().hash(&mut h);
    }
    h.finish()
}

/// Replaces each gradient in `grads` by its mean over the ranks of `comm`, and returns the mean of
/// `loss`. Gradients travel in buckets of about [`BUCKET_FLOATS`]: while the MPI thread sums one,
/// this thread copies the next off the device.
pub fn mean_grads<M: Module>(
    comm: &Comm,
    module: &M,
    grads: &mut GradientsParams,
    loss: f32,
    step: usize,
) -> Result<f32> {
    let mut stage = Stage {
        grads,
        bucket: Vec::new(),
        sent: 0,
        comm,
        step,
        failed: None,
    };
    module.visit(&mut stage);
    let Stage {
        grads,
        mut bucket,
        sent,
        failed,
        ..
    } = stage;
    if let Some(e) = failed {
        return Err(e);
    }
    // The loss rides in the last bucket.
    bucket.push(loss);
    comm.start_sum(bucket, step, "gradient all-reduce")?;
    let mut summed = Vec::with_capacity(sent + 1);
    for _ in 0..=sent {
        summed.push(comm.finish_sum()?);
    }
    let n = comm.rank().size as f32;
    let loss = summed.last_mut().and_then(|b| b.pop()).unwrap_or(f32::NAN) / n;
    let mut unstage = Unstage {
        grads,
        buckets: summed.into_iter(),
        current: Vec::new().into_iter(),
        scale: 1.0 / n,
    };
    module.visit(&mut unstage);
    Ok(loss)
}

/// Copies gradients to host buckets and starts summing each full one.
struct Stage<'a> {
    grads: &'a mut GradientsParams,
    bucket: Vec<f32>,
    sent: usize,
    comm: &'a Comm,
    step: usize,
    failed: Option<Error>,
}

impl ModuleVisitor for Stage<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.failed.is_some() {
            return;
        }
        let Some(g) = self.grads.get::<D>(param.id) else {
            return;
        };
        match g.try_into_vec_as::<f32>() {
            Ok(v) => self.bucket.extend_from_slice(&v),
            Err(e) => {
                self.failed = Some(Error::Distributed(format!(
                    "could not read a gradient back from the device: {e:?}"
                )));
                return;
            }
        }
        if self.bucket.len() >= BUCKET_FLOATS {
            let full = std::mem::take(&mut self.bucket);
            match self.comm.start_sum(full, self.step, "gradient all-reduce") {
                Ok(()) => self.sent += 1,
                Err(e) => self.failed = Some(e),
            }
        }
    }
}

/// Writes the summed buckets back as gradients, in the order [`Stage`] read them.
struct Unstage<'a> {
    grads: &'a mut GradientsParams,
    buckets: std::vec::IntoIter<Vec<f32>>,
    current: std::vec::IntoIter<f32>,
    scale: f32,
}

impl ModuleVisitor for Unstage<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(g) = self.grads.remove::<D>(param.id) else {
            return;
        };
        let shape = g.shape();
        let device = g.device();
        let n = shape.num_elements();
        let mut values = Vec::with_capacity(n);
        while values.len() < n {
            if self.current.len() == 0 {
                match self.buckets.next() {
                    Some(b) => self.current = b.into_iter(),
                    None => break,
                }
            }
            values.extend(self.current.by_ref().take(n - values.len()));
        }
        values.iter_mut().for_each(|v| *v *= self.scale);
        self.grads.register(
            param.id,
            Tensor::<D>::from_data(TensorData::new(values, shape), &device),
        );
    }
}
