//! Prewarm threads: they create runners for the idle pools, off the request path. They live as
//! long as the server, which matters to executors that tie a runner's life to its creating
//! thread.

use std::{
    sync::{Arc, Weak},
    thread,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, after, select};

use super::{
    Manager, runner_spec,
    state::{Effects, Job},
};
use crate::{
    error::{Error, Result},
    executor::{Runner, RunnerSpec},
    id::RunnerId,
};

/// Longest pause between two failed creations for one environment.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Back-off steps while an image is being pulled: at most 50 ms << 4 = 0.8 s, so the pool fills
/// soon after the image is ready.
const MAX_PENDING_FAILURES: u32 = 4;

/// Starts `count` prewarm threads; they end when `stop` or `jobs` is disconnected or the
/// manager is gone. They hold the manager weakly: it owns them, not they it.
pub(super) fn spawn(
    count: usize,
    manager: &Arc<Manager>,
    jobs: &Receiver<Job>,
    stop: &Receiver<()>,
) -> std::io::Result<Vec<thread::JoinHandle<()>>> {
    (0..count.max(1))
        .map(|index| {
            let (manager, jobs, stop) = (Arc::downgrade(manager), jobs.clone(), stop.clone());
            thread::Builder::new()
                .name(format!("prewarm-{index}"))
                .spawn(move || work(&manager, &jobs, &stop))
        })
        .collect()
}

fn work(manager: &Weak<Manager>, jobs: &Receiver<Job>, stop: &Receiver<()>) {
    loop {
        let job = select! {
            recv(jobs) -> job => match job { Ok(job) => job, Err(_) => return },
            recv(stop) -> _ => return,
        };
        let Some(manager) = manager.upgrade() else {
            return;
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
        // A runner of an image still being pulled would only wait: the job fails quietly and
        // is retried with the back-off, so these threads stay free for other environments.
        let created = match manager.executor().image_ready(&spec) {
            Ok(true) => {
                let started = Instant::now();
                let created = manager.executor().create(&id, &spec);
                manager.metrics.prewarm(started.elapsed(), created.is_ok());
                created
            }
            Ok(false) => Err(Error::ImagePending(spec.image.clone())),
            Err(err) => Err(err),
        }
        .map(|runner| (id, runner));
        manager.prewarmed(&job, created);
    }
}

impl Manager {
    /// Called by a prewarm thread with the runner it created (or failed to create).
    fn prewarmed(&self, job: &Job, runner: Result<(RunnerId, Arc<dyn Runner>)>) {
        let mut effects = Effects::default();
        {
            let mut state = self.lock();
            state.creating -= 1;
            let closing = state.closing;
            let env = state.environments.get_mut(&job.environment);
            let current = env.filter(|env| env.version == job.version);
            match (current, runner) {
                (Some(env), Ok((id, runner))) => {
                    env.creating -= 1;
                    env.failures = 0;
                    if env.idle.len() < env.spec.prewarming_pool_size as usize && !closing {
                        env.idle.push_back((id, runner));
                    } else {
                        effects.destroy.push(runner);
                    }
                }
                (Some(env), Err(Error::ImagePending(image))) => {
                    env.creating -= 1;
                    env.failures = env.failures.saturating_add(1).min(MAX_PENDING_FAILURES);
                    log::debug!("environment {}: image {image} not ready", job.environment);
                }
                (Some(env), Err(err)) => {
                    env.creating -= 1;
                    env.failures = env.failures.saturating_add(1);
                    log::warn!(
                        "cannot prewarm a runner for environment {}: {err}",
                        job.environment
                    );
                }
                (None, Ok((_, runner))) => effects.destroy.push(runner),
                (None, Err(_)) => {}
            }
            if !state.closing {
                effects.jobs = state.refill(self.capacity);
            }
        }
        self.apply(effects);
    }

    /// Called by a prewarm thread for a job that is no longer wanted.
    fn prewarm_cancelled(&self, job: &Job) {
        let mut state = self.lock();
        state.creating -= 1;
        if let Some(env) = state.environments.get_mut(&job.environment)
            && env.version == job.version
        {
            env.creating -= 1;
        }
    }

    /// The spec to build for a prewarm job, if the job is still wanted.
    fn job_spec(&self, job: &Job) -> Option<(RunnerSpec, u32)> {
        let state = self.lock();
        let env = state.environments.get(&job.environment)?;
        (env.version == job.version && !state.closing)
            .then(|| (runner_spec(&env.spec), env.failures))
    }
}
