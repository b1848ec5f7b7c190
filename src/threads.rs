//! Reusable threads for the work of one execution (its WebSocket session, the reader of the
//! client's frames, the output pump). Starting a thread costs a dozen system calls and a
//! stack mapping, paid three times per execution; here a finished thread waits a while for
//! the next job instead of ending, and a new one starts only when none is waiting.
//!
//! Jobs are handed over directly (a rendezvous), never queued: a job always runs at once,
//! on a waiting thread or a new one, so one slow job can never hold up another.

use std::{
    io,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::OnceLock,
    thread,
    time::Duration,
};

use crossbeam_channel::{Receiver, Sender, TrySendError};

/// A piece of work for a thread.
type Job = Box<dyn FnOnce() + Send>;

/// How long a thread without work waits for the next job before it ends.
const IDLE: Duration = Duration::from_secs(5);

/// The hand-over point between callers and waiting threads.
struct Pool {
    jobs: Sender<Job>,
    waiting: Receiver<Job>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        // Capacity zero: a send succeeds only into the hands of a thread waiting in `recv`.
        let (jobs, waiting) = crossbeam_channel::bounded(0);
        Pool { jobs, waiting }
    })
}

/// Runs `job` on a thread of its own: a waiting one, or a new one (named `name`). Fails only
/// when no thread can be started.
pub fn run(name: &str, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
    let pool = pool();
    let job: Job = match pool.jobs.try_send(Box::new(job)) {
        Ok(()) => return Ok(()),
        Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => job,
    };
    let waiting = pool.waiting.clone();
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || work(job, &waiting))?;
    Ok(())
}

/// A thread's life: its first job, then whatever it is handed while it waits.
fn work(first: Job, waiting: &Receiver<Job>) {
    let mut job = first;
    loop {
        // A job that panics ends its thread, as it would have without the reuse; the panic
        // is reported by the hook like any other.
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            return;
        }
        job = match waiting.recv_timeout(IDLE) {
            Ok(next) => next,
            Err(_) => return,
        };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(20);

    fn thread_id() -> thread::ThreadId {
        let (tx, rx) = crossbeam_channel::bounded(1);
        run("test", move || tx.send(thread::current().id()).unwrap()).unwrap();
        rx.recv_timeout(TIMEOUT).expect("the job ran")
    }

    #[test]
    fn a_finished_thread_takes_the_next_job() {
        let first = thread_id();
        // The first thread may not be waiting yet when the second job comes; within a few
        // tries it is, and takes it.
        let reused = (0..100).any(|_| {
            thread::sleep(Duration::from_millis(10));
            thread_id() == first
        });
        assert!(reused, "a waiting thread was never reused");
    }

    #[test]
    fn jobs_never_wait_for_each_other() {
        // Four jobs that only finish together: each needs a thread of its own at once.
        let barrier = Arc::new(Barrier::new(5));
        for _ in 0..4 {
            let barrier = Arc::clone(&barrier);
            run("test", move || {
                barrier.wait();
            })
            .unwrap();
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            barrier.wait();
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(TIMEOUT).is_ok(),
            "the jobs ran one after another"
        );
    }

    #[test]
    fn a_job_that_panics_does_not_take_others_down() {
        run("test", || panic!("a failing job")).unwrap();
        let (tx, rx) = crossbeam_channel::bounded(1);
        run("test", move || tx.send(()).unwrap()).unwrap();
        assert!(rx.recv_timeout(TIMEOUT).is_ok());
    }
}
