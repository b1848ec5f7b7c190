//! The data behind the manager's mutex, the bookkeeping that keeps its counts exact, and the
//! messages the manager's threads are sent. The leaf of the manager: it uses nothing of it.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::Sender;

use crate::{
    dto::{Environment, EnvironmentStatistics},
    executor::{Command, Runner},
    id::{EnvironmentId, ExecutionId, RunnerId},
};

/// Why a running execution is stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The runner was deleted (by the client or with its environment).
    RunnerDeleted,
    /// The runner's inactivity timeout expired.
    InactivityTimeout,
    /// The server is shutting down.
    Shutdown,
}

/// An execution stored by `POST /execute`, waiting for its WebSocket.
#[derive(Debug, Clone)]
pub struct PendingExecution {
    /// What to run.
    pub command: Command,
    /// Time limit; `None` = unlimited.
    pub time_limit: Option<Duration>,
}

/// One runner for a prewarm thread to create for an environment's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Job {
    /// The environment.
    pub environment: EnvironmentId,
    /// The definition version the runner is for.
    pub version: u64,
}

/// What the timer thread is told.
#[derive(Debug)]
pub(super) enum TimerCommand {
    /// Expire `id` at `deadline` unless armed again or disarmed before.
    Arm {
        /// The runner.
        id: RunnerId,
        /// When it expires.
        deadline: Instant,
        /// The arming's generation; only the latest one counts.
        generation: u64,
    },
    /// Forget `id`.
    Disarm(RunnerId),
}

/// Things to do after the lock is released.
#[derive(Debug, Default)]
#[must_use]
pub(super) struct Effects {
    pub destroy: Vec<Arc<dyn Runner>>,
    pub stop: Vec<(Sender<StopReason>, StopReason)>,
    pub jobs: Vec<Job>,
    pub timer: Vec<TimerCommand>,
    pub forget: Vec<RunnerId>,
}

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

/// Stored executions per runner, oldest first.
const MAX_PENDING_EXECUTIONS: usize = 1024;
/// Bytes of commands and variables stored per runner.
const MAX_PENDING_BYTES: usize = 4 << 20;

/// Executions stored for a runner, waiting for their WebSocket. Poseidon keeps them until the
/// runner goes; here the oldest are dropped beyond a count and a size, so that a client
/// storing executions it never connects to cannot grow the server.
#[derive(Debug, Default)]
pub(super) struct PendingQueue {
    entries: VecDeque<(ExecutionId, PendingExecution, usize)>,
    bytes: usize,
}

impl PendingQueue {
    /// Stores an execution, dropping the oldest ones beyond the limits.
    pub fn push(&mut self, id: ExecutionId, execution: PendingExecution) {
        let size = execution.command.size();
        self.entries.push_back((id, execution, size));
        self.bytes += size;
        while self.entries.len() > MAX_PENDING_EXECUTIONS || self.bytes > MAX_PENDING_BYTES {
            let Some((_, _, size)) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= size;
        }
    }

    /// Takes a stored execution out.
    pub fn take(&mut self, id: ExecutionId) -> Option<PendingExecution> {
        let index = self.entries.iter().position(|(entry, _, _)| *entry == id)?;
        let (_, execution, size) = self.entries.remove(index)?;
        self.bytes -= size;
        Some(execution)
    }
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
    pub pending: PendingQueue,
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
            pending: PendingQueue::default(),
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

#[cfg(test)]
mod tests;
