//! Prewarm threads: they create runners for the idle pools, off the request path. They live as
//! long as the server, which matters to executors that tie a runner's life to its creating
//! thread.

use std::{sync::Arc, thread, time::Duration};

use crossbeam_channel::{Receiver, after, select};

use super::Manager;
use crate::id::{EnvironmentId, RunnerId};

/// Longest pause between two failed creations for one environment.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One runner to create for an environment's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    /// The environment.
    pub environment: EnvironmentId,
    /// The definition version the runner is for.
    pub version: u64,
}

/// Starts `count` prewarm threads; they end when `stop` is disconnected.
pub fn spawn(
    count: usize,
    manager: &Arc<Manager>,
    jobs: &Receiver<Job>,
    stop: &Receiver<()>,
) -> std::io::Result<Vec<thread::JoinHandle<()>>> {
    (0..count.max(1))
        .map(|index| {
            let (manager, jobs, stop) = (Arc::clone(manager), jobs.clone(), stop.clone());
            thread::Builder::new()
                .name(format!("prewarm-{index}"))
                .spawn(move || work(&manager, &jobs, &stop))
        })
        .collect()
}

fn work(manager: &Manager, jobs: &Receiver<Job>, stop: &Receiver<()>) {
    loop {
        let job = select! {
            recv(jobs) -> job => match job { Ok(job) => job, Err(_) => return },
            recv(stop) -> _ => return,
        };
        let Some((spec, failures)) = manager.job_spec(&job) else {
            manager.prewarm_cancelled(&job);
            continue;
        };
        if failures > 0 {
            let pause = Duration::from_millis(50 << failures.min(10)).min(MAX_BACKOFF);
            let stopped = select! {
                recv(stop) -> _ => true,
                recv(after(pause)) -> _ => false,
            };
            if stopped {
                return;
            }
        }
        let id = RunnerId::new(job.environment);
        let created = manager
            .executor()
            .create(&id, &spec)
            .map(|runner| (id, runner));
        manager.prewarmed(&job, created);
    }
}
