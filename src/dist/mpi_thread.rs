//! The thread that owns MPI: it runs each collective non-blocking and polls it against a deadline.
//!
//! Before each collective, every rank but 0 sends rank 0 a tiny "arrived" message carrying the
//! collective's sequence number, and while it waits it sends "alive" every second. While rank 0
//! waits, it reads those messages; when the deadline passes it names the ranks that never arrived,
//! or that arrived and then fell silent (dead or hung), and aborts the job. The other ranks wait
//! half as long again, so rank 0 speaks first; when they time out, rank 0 is the one missing.

use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::request::{Request, Scope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::{Job, Rank, Reply};
use crate::error::{Error, Result};

const TAG_ARRIVED: i32 = 7301;
const TAG_ALIVE: i32 = 7302;

/// How often a waiting rank tells rank 0 it is alive, and how long a silence means it is not.
const BEAT: Duration = Duration::from_secs(1);
const SILENCE: Duration = Duration::from_secs(3);

/// How long a wait polls without sleeping.
const SPIN: Duration = Duration::from_millis(200);

/// Broadcasts travel in pieces below MPI's `int` count limit.
const BROADCAST_PIECE: usize = 1 << 30;

struct Server {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    timeout: Duration,
    /// Collectives started so far (all ranks count the same).
    seq: u64,
    /// Rank 0: the last sequence number each rank reported arriving at.
    arrived: Vec<u64>,
    /// Rank 0: when each rank was last heard from.
    heard: Vec<Instant>,
}

pub(super) fn serve(
    jobs: Receiver<Job>,
    replies: Sender<Reply>,
    ready: Sender<Result<Rank>>,
    timeout: Duration,
) {
    let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
        let _ = ready.send(Err(Error::Distributed(
            "MPI was already initialised in this process".into(),
        )));
        return;
    };
    let world = universe.world();
    let local = world.split_shared(world.rank());
    let me = Rank {
        rank: world.rank() as usize,
        size: world.size() as usize,
        local_rank: local.rank() as usize,
        local_size: local.size() as usize,
    };
    drop(local);
    if ready.send(Ok(me)).is_err() {
        return;
    }
    let mut server = Server {
        world,
        rank: me.rank,
        size: me.size,
        timeout,
        seq: 0,
        arrived: vec![0; me.size],
        heard: vec![Instant::now(); me.size],
    };
    // A closed channel means the training thread is gone without saying how: stop the job.
    let mut code = 2;
    while let Ok(job) = jobs.recv() {
        let reply = match job {
            Job::SumF32 { buf, step, what } => Reply::F32(server.sum(buf, step, what)),
            Job::SumF64 { buf, step, what } => Reply::F64(server.sum(buf, step, what)),
            Job::Broadcast { buf, what } => Reply::Bytes(server.broadcast(buf, what)),
            Job::GatherU64 { value, step, what } => Reply::U64s(server.gather(value, step, what)),
            Job::Finish => {
                drop(server);
                // Dropping the universe calls MPI_Finalize.
                drop(universe);
                return;
            }
            Job::Abort(c) => {
                code = c;
                break;
            }
        };
        if replies.send(reply).is_err() {
            break;
        }
    }
    server.world.abort(code)
}

impl Server {
    fn sum<T>(&mut self, buf: Vec<T>, step: usize, what: &'static str) -> Vec<T>
    where
        T: Equivalence + Copy + Default,
    {
        let mut out = vec![T::default(); buf.len()];
        self.announce();
        mpi::request::scope(|scope| {
            let req = self.world.immediate_all_reduce_into(
                scope,
                &buf[..],
                &mut out[..],
                SystemOperation::sum(),
            );
            self.wait(req, step, what);
        });
        self.settle();
        out
    }

    fn gather(&mut self, value: u64, step: usize, what: &'static str) -> Vec<u64> {
        let mut out = vec![0u64; self.size];
        self.announce();
        mpi::request::scope(|scope| {
            let req = self
                .world
                .immediate_all_gather_into(scope, &value, &mut out[..]);
            self.wait(req, step, what);
        });
        self.settle();
        out
    }

    fn broadcast(&mut self, mut buf: Vec<u8>, what: &'static str) -> Vec<u8> {
        let mut len = buf.len() as u64;
        self.announce();
        mpi::request::scope(|scope| {
            let req = self
                .world
                .process_at_rank(0)
                .immediate_broadcast_into(scope, &mut len);
            self.wait(req, 0, what);
        });
        self.settle();
        buf.resize(len as usize, 0);
        for piece in buf.chunks_mut(BROADCAST_PIECE) {
            self.announce();
            mpi::request::scope(|scope| {
                let req = self
                    .world
                    .process_at_rank(0)
                    .immediate_broadcast_into(scope, piece);
                self.wait(req, 0, what);
            });
            self.settle();
        }
        buf
    }

    /// Tells rank 0 that this rank reached the next collective.
    fn announce(&mut self) {
        self.seq += 1;
        if self.rank != 0 {
            self.world
                .process_at_rank(0)
                .send_with_tag(&self.seq, TAG_ARRIVED);
        }
    }

    /// Rank 0: reads every "arrived" and "alive" message already sent.
    fn read_arrivals(&mut self) {
        while let Some((msg, status)) = self
            .world
            .any_process()
            .immediate_matched_probe_with_tag(TAG_ARRIVED)
        {
            let (seq, _) = msg.matched_receive::<u64>();
            let r = status.source_rank() as usize;
            self.arrived[r] = seq;
            self.heard[r] = Instant::now();
        }
        while let Some((msg, status)) = self
            .world
            .any_process()
            .immediate_matched_probe_with_tag(TAG_ALIVE)
        {
            let _ = msg.matched_receive::<u64>();
            self.heard[status.source_rank() as usize] = Instant::now();
        }
    }

    /// Rank 0, after a collective completed (so every rank arrived): consumes the rest of its
    /// "arrived" messages, so none is left over for the next one.
    fn settle(&mut self) {
        if self.rank != 0 {
            return;
        }
        for r in 1..self.size {
            while self.arrived[r] < self.seq {
                let (seq, _) = self
                    .world
                    .process_at_rank(r as i32)
                    .receive_with_tag::<u64>(TAG_ARRIVED);
                self.arrived[r] = seq;
            }
        }
    }

    /// Polls `req` until it completes; past the deadline, reports who is missing and aborts.
    fn wait<'a, D: ?Sized, S: Scope<'a>>(
        &mut self,
        mut req: Request<'a, D, S>,
        step: usize,
        what: &'static str,
    ) {
        let start = Instant::now();
        let limit = if self.rank == 0 {
            self.timeout
        } else {
            self.timeout + self.timeout / 2
        };
        let mut pause = Duration::from_micros(50);
        let mut beat = Instant::now();
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            if self.rank == 0 {
                self.read_arrivals();
            } else if beat.elapsed() > BEAT {
                self.world
                    .process_at_rank(0)
                    .send_with_tag(&self.seq, TAG_ALIVE);
                beat = Instant::now();
            }
            if start.elapsed() > limit {
                self.give_up(step, what, start.elapsed());
            }
            // MPI progresses a non-blocking collective only inside calls like `test`: spin (yielding
            // to the training thread) while a collective is young, then back off.
            if start.elapsed() < SPIN {
                std::thread::yield_now();
            } else {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(1));
            }
        }
    }

    fn give_up(&self, step: usize, what: &str, waited: Duration) -> ! {
        let at = if step > 0 {
            format!(" at step {step}")
        } else {
            String::new()
        };
        let msg = if self.rank == 0 {
            let list = |ranks: Vec<usize>| {
                ranks
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let missing: Vec<usize> = (1..self.size)
                .filter(|&r| self.arrived[r] < self.seq)
                .collect();
            let silent: Vec<usize> = (1..self.size)
                .filter(|&r| self.arrived[r] >= self.seq && self.heard[r].elapsed() > SILENCE)
                .collect();
            let fix = "stopping the job. The last checkpoint is intact: fix or replace that machine and rerun with --resume";
            if !missing.is_empty() {
                format!(
                    "rank 0: rank(s) {} did not reach the {what}{at} within {:.0} s (dead or hung); {fix}",
                    list(missing),
                    waited.as_secs_f64()
                )
            } else if !silent.is_empty() {
                format!(
                    "rank 0: rank(s) {} reached the {what}{at} and then stopped responding for {:.0} s (dead or hung); {fix}",
                    list(silent),
                    waited.as_secs_f64()
                )
            } else {
                format!(
                    "rank 0: the {what}{at} has not completed after {:.0} s although every rank reached it and is alive; the network between the machines may be down. Stopping the job; the last checkpoint is intact",
                    waited.as_secs_f64()
                )
            }
        } else {
            format!(
                "rank {}: the {what}{at} has waited {:.0} s and rank 0 has not named a missing rank, so rank 0 is likely dead or hung; stopping the job. Rerun with --resume",
                self.rank,
                waited.as_secs_f64()
            )
        };
        eprintln!("flowalign: {msg}");
        self.world.abort(3)
    }
}
