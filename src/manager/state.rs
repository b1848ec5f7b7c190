//! The data behind the manager's mutex and the bookkeeping that keeps its counts exact.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::Sender;

use super::{Effects, Job, PendingExecution, StopReason, TimerCommand};
use crate::{
    dto::{Environment, EnvironmentStatistics},
    executor::Runner,
    id::{EnvironmentId, ExecutionId, RunnerId},
};

/// Everything the manager knows.
#[derive(Debug, Default)]
pub(super) struct State {
    pub environments: BTreeMap<EnvironmentId, EnvState>,
    pub runners: HashMap<RunnerId, Claimed>,
    /// Runners being created (prewarming and on demand), counted against the capacity.
    pub creating: usize,
    /// Set at shutdown: nothing new is created or pooled.
    pub closing: bool,
    tokens: u64,
    /// Source of environment versions, unique for the server's life: a job for an
    /// environment that was deleted and created again never matches the new one.
    versions: u64,
}

impl State {
    /// Runners that exist or are being created.
    pub fn total(&self) -> usize {
        let idle: usize = self.environments.values().map(|env| env.idle.len()).sum();
        idle + self.runners.len() + self.creating
    }

    /// A fresh environment version.
    pub fn next_version(&mut self) -> u64 {
        self.versions += 1;
        self.versions
    }

    /// A fresh token identifying an active execution.
    pub fn next_token(&mut self) -> u64 {
        self.tokens += 1;
        self.tokens
    }

    pub fn insert_claimed(&mut self, id: RunnerId, claimed: Claimed) {
        if let Some(env) = self.environments.get_mut(&claimed.env) {
            env.used += 1;
        }
        self.runners.insert(id, claimed);
    }

    /// Removes a claimed runner; its executions are stopped and it is destroyed afterwards.
    pub fn remove_claimed(
        &mut self,
        id: &RunnerId,
        reason: StopReason,
        effects: &mut Effects,
    ) -> bool {
        let Some(claimed) = self.runners.remove(id) else {
            return false;
        };
        if let Some(env) = self.environments.get_mut(&claimed.env) {
            env.used -= 1;
        }
        effects
            .stop
            .extend(claimed.active.into_values().map(|stop| (stop, reason)));
        effects.destroy.push(claimed.runner);
        effects.timer.push(TimerCommand::Disarm(id.clone()));
        effects.forget.push(id.clone());
        true
    }

    /// Prewarm jobs that bring every pool to its size, as far as the capacity allows.
    pub fn refill(&mut self, capacity: usize) -> Vec<Job> {
        if self.closing {
            return Vec::new();
        }
        let mut total = self.total();
        let mut jobs = Vec::new();
        for (id, env) in &mut self.environments {
            let missing = (env.spec.prewarming_pool_size as usize)
                .saturating_sub(env.idle.len() + env.creating)
                .min(capacity.saturating_sub(total));
            jobs.extend((0..missing).map(|_| Job {
                environment: *id,
                version: env.version,
            }));
            env.creating += missing;
            total += missing;
            self.creating += missing;
        }
        jobs
    }
}

/// An environment and its idle pool.
#[derive(Debug)]
pub(super) struct EnvState {
    pub spec: Environment,
    /// Bumped whenever the runner-relevant definition changes; older jobs are discarded.
    pub version: u64,
    pub idle: VecDeque<(RunnerId, Arc<dyn Runner>)>,
    /// Prewarm jobs of the current version in flight.
    pub creating: usize,
    /// Claimed runners of this environment.
    pub used: usize,
    /// Consecutive failed creations, for back-off.
    pub failures: u32,
}

impl EnvState {
    pub fn new(spec: Environment, version: u64) -> EnvState {
        EnvState {
            spec,
            version,
            idle: VecDeque::new(),
            creating: 0,
            used: 0,
            failures: 0,
        }
    }

    pub fn statistics(&self) -> EnvironmentStatistics {
        EnvironmentStatistics {
            id: self.spec.id,
            prewarming_pool_size: self.spec.prewarming_pool_size,
            idle_runners: self.idle.len(),
            used_runners: self.used,
        }
    }

    /// Applies a new definition; returns the idle runners that no longer fit it. A changed
    /// runner definition replaces the whole pool, a changed pool size only trims it.
    pub fn redefine(&mut self, spec: Environment, version: u64) -> Vec<Arc<dyn Runner>> {
        let retired: Vec<Arc<dyn Runner>> = if same_runners(&self.spec, &spec) {
            let keep = spec.prewarming_pool_size as usize;
            let surplus = self.idle.len().saturating_sub(keep);
            self.idle
                .drain(..surplus)
                .map(|(_, runner)| runner)
                .collect()
        } else {
            self.version = version;
            self.creating = 0;
            self.failures = 0;
            self.idle.drain(..).map(|(_, runner)| runner).collect()
        };
        self.spec = spec;
        retired
    }
}

/// Whether two definitions build identical runners.
fn same_runners(a: &Environment, b: &Environment) -> bool {
    (
        &a.image,
        a.cpu_limit,
        a.memory_limit,
        a.network_access,
        &a.exposed_ports,
    ) == (
        &b.image,
        b.cpu_limit,
        b.memory_limit,
        b.network_access,
        &b.exposed_ports,
    )
}

/// A claimed runner.
#[derive(Debug)]
pub(super) struct Claimed {
    pub env: EnvironmentId,
    pub runner: Arc<dyn Runner>,
    /// Zero means no inactivity timeout.
    pub timeout: Duration,
    /// Generation of the latest timer arming.
    pub generation: u64,
    pub pending: VecDeque<(ExecutionId, PendingExecution)>,
    /// Running executions, to be told why they must stop.
    pub active: HashMap<u64, Sender<StopReason>>,
}

impl Claimed {
    pub fn new(env: EnvironmentId, runner: Arc<dyn Runner>, timeout: Duration) -> Claimed {
        Claimed {
            env,
            runner,
            timeout,
            generation: 1,
            pending: VecDeque::new(),
            active: HashMap::new(),
        }
    }

    /// The timer command for the current generation, if the runner has a timeout.
    /// A timeout too large to represent as an instant never expires.
    pub fn arm(&self, id: &RunnerId, now: Instant) -> Option<TimerCommand> {
        let deadline = now
            .checked_add(self.timeout)
            .filter(|_| !self.timeout.is_zero())?;
        Some(TimerCommand::Arm {
            id: id.clone(),
            deadline,
            generation: self.generation,
        })
    }

    /// Restarts the inactivity timeout.
    pub fn rearm(&mut self, id: &RunnerId, now: Instant) -> Option<TimerCommand> {
        self.generation += 1;
        self.arm(id, now)
    }
}
