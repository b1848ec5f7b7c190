//! The runner manager: environments, their idle pools, claimed runners and stored executions,
//! all behind ONE mutex. Nothing slow happens under the lock: runners are created and
//! destroyed, files written and channels used only after it is released.

pub mod prewarm;
mod state;
pub mod timer;

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender};

pub use prewarm::Job;
use state::{Claimed, EnvState, State};
pub use timer::TimerCommand;

use crate::{
    dto::{Environment, EnvironmentStatistics},
    error::{Error, Result},
    executor::{Command, Executor, Runner, RunnerSpec},
    id::{EnvironmentId, ExecutionId, RunnerId},
    store::{RunnerRecord, Store},
};

/// Stored executions per runner; older ones are dropped beyond this.
const MAX_PENDING_EXECUTIONS: usize = 1024;

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

/// A stored execution taken for running.
#[derive(Debug)]
pub struct StartedExecution {
    /// The runner to run it in.
    pub runner: Arc<dyn Runner>,
    /// The stored request.
    pub pending: PendingExecution,
    /// Receives a reason when the execution must stop because of its runner.
    pub stop: Receiver<StopReason>,
    /// Unregisters the execution from its runner when dropped.
    pub guard: ActiveGuard,
}

/// Keeps an execution registered with its runner while it runs.
#[derive(Debug)]
pub struct ActiveGuard {
    manager: Arc<Manager>,
    runner: RunnerId,
    token: u64,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(claimed) = self.manager.lock().runners.get_mut(&self.runner) {
            claimed.active.remove(&self.token);
        }
    }
}

/// Limits the manager works within.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most runners that may exist at once.
    pub capacity: usize,
}

/// Runner management; see the module docs.
#[derive(Debug)]
pub struct Manager {
    state: Mutex<State>,
    executor: Arc<dyn Executor>,
    store: Store,
    /// Serializes writes of environment files (taken before, never inside, `state`).
    store_lock: Mutex<()>,
    timer: Sender<TimerCommand>,
    jobs: Sender<Job>,
    limits: Limits,
}

/// Things to do after the lock is released.
#[derive(Debug, Default)]
#[must_use]
struct Effects {
    destroy: Vec<Arc<dyn Runner>>,
    stop: Vec<(Sender<StopReason>, StopReason)>,
    jobs: Vec<Job>,
    timer: Vec<TimerCommand>,
    forget: Vec<RunnerId>,
}

impl Manager {
    /// Creates a manager; `timer` and `jobs` feed the timer and prewarm threads.
    pub fn new(
        executor: Arc<dyn Executor>,
        store: Store,
        limits: Limits,
        timer: Sender<TimerCommand>,
        jobs: Sender<Job>,
    ) -> Manager {
        Manager {
            state: Mutex::new(State::default()),
            executor,
            store,
            store_lock: Mutex::new(()),
            timer,
            jobs,
            limits,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("manager state poisoned")
    }

    /// The executor runners are built with.
    pub fn executor(&self) -> &Arc<dyn Executor> {
        &self.executor
    }

    /// Carries out what a locked operation decided.
    fn apply(&self, effects: Effects) {
        for command in effects.timer {
            let _ = self.timer.send(command);
        }
        for job in effects.jobs {
            let _ = self.jobs.send(job);
        }
        // Stop reasons go out before the runners die, so executions report the reason rather
        // than the death of their process.
        for (stop, reason) in effects.stop {
            let _ = stop.try_send(reason);
        }
        for id in effects.forget {
            if let Err(err) = self.store.remove_runner(&id) {
                log::warn!("cannot remove the record of runner {id}: {err}");
            }
        }
        for runner in effects.destroy {
            runner.destroy();
        }
    }

    /// Restores persisted environments and claimed runners after a start.
    pub fn restore(&self, now: Instant) {
        let environments = self.store.environments();
        let mut kept = Vec::new();
        let mut adopted = Vec::new();
        for record in self.store.runners() {
            let env = EnvironmentId(record.environment.id);
            let runner = environments
                .iter()
                .any(|e| e.id == env.0)
                .then(|| {
                    self.executor
                        .adopt(&record.id, &runner_spec(&record.environment))
                })
                .flatten();
            match runner {
                Some(runner) => {
                    kept.push(record.id.clone());
                    adopted.push((record, runner));
                }
                None => {
                    let _ = self.store.remove_runner(&record.id);
                }
            }
        }
        self.executor.remove_leftovers(&kept);
        let mut state = self.lock();
        for environment in environments {
            let id = EnvironmentId(environment.id);
            log::info!("restored environment {id} (image {:?})", environment.image);
            let version = state.next_version();
            state
                .environments
                .insert(id, EnvState::new(environment, version));
        }
        let mut effects = Effects::default();
        for (record, runner) in adopted {
            let env = EnvironmentId(record.environment.id);
            log::info!("took back runner {}", record.id);
            let timeout = Duration::from_secs(record.inactivity_timeout);
            let claimed = Claimed::new(env, runner, timeout);
            effects.timer.extend(claimed.arm(&record.id, now));
            state.insert_claimed(record.id, claimed);
        }
        effects.jobs = state.refill(self.limits.capacity);
        drop(state);
        self.apply(effects);
    }

    /// Creates or replaces an environment; `true` if it is new.
    pub fn put_environment(&self, id: EnvironmentId, environment: Environment) -> Result<bool> {
        self.executor.check_image(&environment.image)?;
        let environment = environment.with_id(id);
        let (created, effects) = {
            let mut state = self.lock();
            let mut effects = Effects::default();
            let created = match state.environments.get_mut(&id) {
                None => {
                    let version = state.next_version();
                    state
                        .environments
                        .insert(id, EnvState::new(environment, version));
                    true
                }
                Some(_) => {
                    let version = state.next_version();
                    if let Some(env) = state.environments.get_mut(&id) {
                        effects.destroy = env.redefine(environment, version);
                    }
                    false
                }
            };
            effects.jobs = state.refill(self.limits.capacity);
            (created, effects)
        };
        self.persist_environment(id)?;
        self.apply(effects);
        Ok(created)
    }

    /// Removes an environment with all its runners.
    pub fn delete_environment(&self, id: EnvironmentId) -> Result<()> {
        let effects = {
            let mut state = self.lock();
            let env = state
                .environments
                .remove(&id)
                .ok_or(Error::UnknownEnvironmentEmpty)?;
            let mut effects = Effects::default();
            effects
                .destroy
                .extend(env.idle.into_iter().map(|(_, runner)| runner));
            let ids: Vec<RunnerId> = state
                .runners
                .iter()
                .filter(|(_, c)| c.env == id)
                .map(|(id, _)| id.clone())
                .collect();
            for runner_id in ids {
                state.remove_claimed(&runner_id, StopReason::RunnerDeleted, &mut effects);
            }
            effects
        };
        self.persist_environment(id)?;
        self.apply(effects);
        Ok(())
    }

    /// Writes the current definition of an environment (or removes its file).
    fn persist_environment(&self, id: EnvironmentId) -> Result<()> {
        let _writing = self.store_lock.lock().expect("store lock poisoned");
        let current = self
            .lock()
            .environments
            .get(&id)
            .map(|env| env.spec.clone());
        match current {
            Some(environment) => self.store.save_environment(&environment),
            None => self.store.remove_environment(id),
        }
        .map_err(|err| Error::internal("cannot persist the environment", err))
    }

    /// All environments, ordered by id.
    pub fn environments(&self) -> Vec<Environment> {
        self.lock()
            .environments
            .values()
            .map(|env| env.spec.clone())
            .collect()
    }

    /// One environment.
    pub fn environment(&self, id: EnvironmentId) -> Result<Environment> {
        let state = self.lock();
        state
            .environments
            .get(&id)
            .map(|env| env.spec.clone())
            .ok_or(Error::UnknownEnvironmentEmpty)
    }

    /// Pool statistics of every environment.
    pub fn statistics(&self) -> Vec<EnvironmentStatistics> {
        self.lock()
            .environments
            .values()
            .map(EnvState::statistics)
            .collect()
    }

    /// Environments whose idle pool is below `threshold` of its size.
    pub fn depleted(&self, threshold: f64) -> Vec<EnvironmentId> {
        let state = self.lock();
        state
            .environments
            .iter()
            .filter(|(_, env)| {
                let size = env.spec.prewarming_pool_size;
                size > 0 && (env.idle.len() as f64 / f64::from(size)) < threshold
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Claims a runner of `env`: an idle one, or a new one while capacity remains.
    pub fn claim(self: &Arc<Self>, env: EnvironmentId, timeout: Duration) -> Result<RunnerId> {
        let now = Instant::now();
        let (claimed, spec) = {
            let mut state = self.lock();
            let total = state.total();
            let Some(env_state) = state.environments.get_mut(&env) else {
                return Err(Error::UnknownEnvironment(env));
            };
            match env_state.idle.pop_front() {
                Some((id, runner)) => (Some((id, runner, env_state.spec.clone())), None),
                None if total < self.limits.capacity => {
                    let spec = env_state.spec.clone();
                    state.creating += 1;
                    (None, Some(spec))
                }
                None => return Err(Error::NoRunnerAvailable),
            }
        };
        let (id, runner, environment) = match (claimed, spec) {
            (Some(claimed), _) => claimed,
            (None, Some(spec)) => {
                let id = RunnerId::new(env);
                let created = self.executor.create(&id, &runner_spec(&spec));
                self.lock().creating -= 1;
                (id, created?, spec)
            }
            (None, None) => unreachable!("claim decided neither to take nor to create"),
        };
        self.insert_claimed(id, runner, environment, timeout, now)
    }

    fn insert_claimed(
        &self,
        id: RunnerId,
        runner: Arc<dyn Runner>,
        environment: Environment,
        timeout: Duration,
        now: Instant,
    ) -> Result<RunnerId> {
        let env = EnvironmentId(environment.id);
        let record = RunnerRecord {
            id: id.clone(),
            inactivity_timeout: timeout.as_secs(),
            environment: environment.clone(),
        };
        let mut effects = Effects::default();
        {
            let mut state = self.lock();
            if !state.environments.contains_key(&env) {
                drop(state);
                runner.destroy();
                return Err(Error::UnknownEnvironment(env));
            }
            let claimed = Claimed::new(env, runner, timeout);
            effects.timer.extend(claimed.arm(&id, now));
            state.insert_claimed(id.clone(), claimed);
            effects.jobs = state.refill(self.limits.capacity);
        }
        if let Err(err) = self.store.save_runner(&record) {
            log::warn!("cannot record runner {id}: {err}");
        }
        self.apply(effects);
        Ok(id)
    }

    /// Destroys a claimed runner.
    pub fn delete_runner(&self, id: &RunnerId) -> Result<()> {
        let mut effects = Effects::default();
        {
            let mut state = self.lock();
            if !state.remove_claimed(id, StopReason::RunnerDeleted, &mut effects) {
                return Err(Error::unknown_runner(id));
            }
            effects.jobs = state.refill(self.limits.capacity);
        }
        self.apply(effects);
        Ok(())
    }

    /// A claimed runner, with its inactivity timer restarted.
    pub fn touch(&self, id: &RunnerId) -> Result<Arc<dyn Runner>> {
        let now = Instant::now();
        let (runner, arm) = {
            let mut state = self.lock();
            let claimed = state
                .runners
                .get_mut(id)
                .ok_or_else(|| Error::unknown_runner(id))?;
            (claimed.runner.clone(), claimed.rearm(id, now))
        };
        if let Some(command) = arm {
            let _ = self.timer.send(command);
        }
        Ok(runner)
    }

    /// Whether a runner is claimed (without restarting its timer).
    pub fn check_runner(&self, id: &RunnerId) -> Result<()> {
        match self.lock().runners.contains_key(id) {
            true => Ok(()),
            false => Err(Error::unknown_runner(id)),
        }
    }

    /// Stores an execution for a later WebSocket connection (does not restart the timer).
    pub fn store_execution(&self, id: &RunnerId, pending: PendingExecution) -> Result<ExecutionId> {
        let mut state = self.lock();
        let claimed = state
            .runners
            .get_mut(id)
            .ok_or_else(|| Error::unknown_runner(id))?;
        let execution = ExecutionId::new();
        if claimed.pending.len() >= MAX_PENDING_EXECUTIONS {
            claimed.pending.pop_front();
        }
        claimed.pending.push_back((execution, pending));
        Ok(execution)
    }

    /// Takes a stored execution for running (single use) and restarts the runner's timer.
    pub fn start_execution(
        self: &Arc<Self>,
        id: &RunnerId,
        execution: ExecutionId,
    ) -> Result<StartedExecution> {
        let now = Instant::now();
        let (stop_tx, stop) = crossbeam_channel::bounded(1);
        let (runner, pending, token, arm) = {
            let mut state = self.lock();
            let token = state.next_token();
            let claimed = state
                .runners
                .get_mut(id)
                .ok_or_else(|| Error::unknown_runner(id))?;
            let index = claimed.pending.iter().position(|(e, _)| *e == execution);
            let (_, pending) = index
                .and_then(|index| claimed.pending.remove(index))
                .ok_or(Error::UnknownExecution)?;
            claimed.active.insert(token, stop_tx);
            (
                claimed.runner.clone(),
                pending,
                token,
                claimed.rearm(id, now),
            )
        };
        if let Some(command) = arm {
            let _ = self.timer.send(command);
        }
        let guard = ActiveGuard {
            manager: Arc::clone(self),
            runner: id.clone(),
            token,
        };
        Ok(StartedExecution {
            runner,
            pending,
            stop,
            guard,
        })
    }

    /// Called by the timer: destroys the runner if this arming is still its latest.
    pub fn expire(&self, id: &RunnerId, generation: u64) {
        let mut effects = Effects::default();
        {
            let mut state = self.lock();
            if state
                .runners
                .get(id)
                .is_none_or(|claimed| claimed.generation != generation)
            {
                return;
            }
            log::info!("runner {id} expired after its inactivity timeout");
            state.remove_claimed(id, StopReason::InactivityTimeout, &mut effects);
            effects.jobs = state.refill(self.limits.capacity);
        }
        self.apply(effects);
    }

    /// Called by a prewarm thread with the runner it created (or failed to create).
    pub fn prewarmed(&self, job: &Job, runner: Result<(RunnerId, Arc<dyn Runner>)>) {
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
                effects.jobs = state.refill(self.limits.capacity);
            }
        }
        self.apply(effects);
    }

    /// Called by a prewarm thread for a job that is no longer wanted.
    pub fn prewarm_cancelled(&self, job: &Job) {
        let mut state = self.lock();
        state.creating -= 1;
        if let Some(env) = state.environments.get_mut(&job.environment)
            && env.version == job.version
        {
            env.creating -= 1;
        }
    }

    /// The spec to build for a prewarm job, if the job is still wanted.
    pub fn job_spec(&self, job: &Job) -> Option<(RunnerSpec, u32)> {
        let state = self.lock();
        let env = state.environments.get(&job.environment)?;
        (env.version == job.version && !state.closing)
            .then(|| (runner_spec(&env.spec), env.failures))
    }

    /// Stops every execution and destroys every runner.
    pub fn shutdown(&self) {
        let mut effects = Effects::default();
        let mut idle = Vec::new();
        {
            let mut state = self.lock();
            state.closing = true;
            for env in state.environments.values_mut() {
                idle.extend(env.idle.drain(..).map(|(_, runner)| runner));
            }
            let ids: Vec<RunnerId> = state.runners.keys().cloned().collect();
            for id in ids {
                state.remove_claimed(&id, StopReason::Shutdown, &mut effects);
            }
        }
        // Claimed runners are suspended, not destroyed, and their records kept: an executor
        // that can take them back after the restart will.
        effects.forget.clear();
        let claimed = std::mem::take(&mut effects.destroy);
        effects.destroy = idle;
        self.apply(effects);
        for runner in claimed {
            runner.suspend();
        }
    }

    /// Runner counts: (idle, claimed, being created).
    pub fn counts(&self) -> (usize, usize, usize) {
        let state = self.lock();
        let idle = state.environments.values().map(|env| env.idle.len()).sum();
        (idle, state.runners.len(), state.creating)
    }
}

/// What an executor needs from an environment definition.
pub fn runner_spec(environment: &Environment) -> RunnerSpec {
    RunnerSpec {
        environment: EnvironmentId(environment.id),
        image: environment.image.clone(),
        cpu_limit: environment.cpu_limit,
        memory_limit: environment.memory_limit,
        network_access: environment.network_access,
    }
}
