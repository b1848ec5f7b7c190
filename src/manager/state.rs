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
        let size = execution.command.command.len()
            + execution
                .command
                .environment
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
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
mod tests {
    use super::*;
    use crate::{
        error::Result,
        executor::{Command, FileContent, FileUpdate, Process},
    };

    /// Bookkeeping needs runners to count, not to run.
    #[derive(Debug)]
    struct Placeholder;

    impl Runner for Placeholder {
        fn execute(&self, _: &Command) -> Result<Process> {
            unreachable!("bookkeeping tests run nothing")
        }
        fn list_files(&self, _: &str, _: bool, _: bool) -> Result<Box<dyn std::io::Read + Send>> {
            unreachable!("bookkeeping tests list nothing")
        }
        fn read_file(&self, _: &str, _: bool) -> Result<FileContent> {
            unreachable!("bookkeeping tests read nothing")
        }
        fn update_files(&self, _: &FileUpdate) -> Result<()> {
            unreachable!("bookkeeping tests write nothing")
        }
        fn destroy(&self) {}
    }

    fn environment(id: u64, pool: u32, memory: u32) -> Environment {
        Environment {
            id,
            prewarming_pool_size: pool,
            memory_limit: memory,
            ..Default::default()
        }
    }

    fn state_with(envs: &[Environment]) -> State {
        let mut state = State::default();
        for env in envs {
            let version = state.next_version();
            state
                .environments
                .insert(EnvironmentId(env.id), EnvState::new(env.clone(), version));
        }
        state
    }

    fn idle(env: u64) -> (RunnerId, Arc<dyn Runner>) {
        (RunnerId::new(EnvironmentId(env)), Arc::new(Placeholder))
    }

    #[test]
    fn refill_asks_for_what_each_pool_lacks_within_the_capacity() {
        let mut state = state_with(&[environment(1, 3, 0), environment(2, 4, 0)]);
        state
            .environments
            .get_mut(&EnvironmentId(1))
            .unwrap()
            .idle
            .push_back(idle(1));
        let jobs = state.refill(5);
        let for_env = |id| {
            jobs.iter()
                .filter(|job| job.environment == EnvironmentId(id))
                .count()
        };
        assert_eq!(
            (for_env(1), for_env(2)),
            (2, 2),
            "capacity 5 = 1 idle + 4 new"
        );
        assert_eq!(state.total(), 5);
        assert!(
            state.refill(5).is_empty(),
            "jobs in flight count as creating"
        );
    }

    #[test]
    fn nothing_is_prewarmed_while_closing() {
        let mut state = state_with(&[environment(1, 3, 0)]);
        state.closing = true;
        assert!(state.refill(100).is_empty());
    }

    #[test]
    fn a_changed_pool_size_trims_but_keeps_the_runners() {
        let mut state = state_with(&[environment(1, 3, 0)]);
        let env = state.environments.get_mut(&EnvironmentId(1)).unwrap();
        env.idle.extend([idle(1), idle(1), idle(1)]);
        let version = env.version;
        let retired = env.redefine(environment(1, 1, 0), 99);
        assert_eq!(
            (retired.len(), env.idle.len(), env.version),
            (2, 1, version)
        );
    }

    #[test]
    fn a_changed_definition_replaces_the_pool_and_outdates_running_jobs() {
        let mut state = state_with(&[environment(1, 2, 0)]);
        let jobs = state.refill(10);
        let env = state.environments.get_mut(&EnvironmentId(1)).unwrap();
        env.idle.push_back(idle(1));
        let retired = env.redefine(environment(1, 2, 512), 42);
        assert_eq!(
            (retired.len(), env.idle.len(), env.creating, env.version),
            (1, 0, 0, 42)
        );
        assert!(jobs.iter().all(|job| job.version != 42));
    }

    #[test]
    fn claimed_runners_are_counted_per_environment_and_stopped_on_removal() {
        let mut state = state_with(&[environment(1, 0, 0)]);
        let (id, runner) = idle(1);
        let mut claimed = Claimed::new(EnvironmentId(1), runner, Duration::ZERO);
        let (stop, stopped) = crossbeam_channel::bounded(1);
        claimed.active.insert(7, stop);
        state.insert_claimed(id.clone(), claimed);
        assert_eq!(
            state.environments[&EnvironmentId(1)]
                .statistics()
                .used_runners,
            1
        );
        let mut effects = Effects::default();
        assert!(state.remove_claimed(&id, StopReason::RunnerDeleted, &mut effects));
        assert_eq!(
            state.environments[&EnvironmentId(1)]
                .statistics()
                .used_runners,
            0
        );
        assert_eq!((effects.destroy.len(), effects.stop.len()), (1, 1));
        drop(effects);
        assert!(
            stopped.try_recv().is_err(),
            "stop reasons go out after the lock, not here"
        );
        assert!(!state.remove_claimed(&id, StopReason::RunnerDeleted, &mut Effects::default()));
    }

    #[test]
    fn a_runner_without_timeout_is_never_armed_and_a_huge_one_never_expires() {
        let (id, runner) = idle(1);
        let now = Instant::now();
        assert!(
            Claimed::new(EnvironmentId(1), runner.clone(), Duration::ZERO)
                .arm(&id, now)
                .is_none()
        );
        assert!(
            Claimed::new(EnvironmentId(1), runner.clone(), Duration::MAX)
                .arm(&id, now)
                .is_none()
        );
        let mut claimed = Claimed::new(EnvironmentId(1), runner, Duration::from_secs(5));
        let Some(TimerCommand::Arm {
            generation,
            deadline,
            ..
        }) = claimed.rearm(&id, now)
        else {
            panic!("armed")
        };
        assert_eq!((generation, deadline), (2, now + Duration::from_secs(5)));
    }
}
