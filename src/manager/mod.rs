//! The runner manager: environments, their idle pools, claimed runners and stored executions,
//! all behind ONE mutex. Nothing slow happens under the lock: runners are created and
//! destroyed, files written and channels used only after it is released.

mod environments;
mod pending;
pub mod prewarm;
mod state;
pub mod timer;

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crossbeam_channel::Sender;

pub use pending::{ActiveGuard, PendingExecution, StartedExecution};
pub use prewarm::Job;
use state::{Claimed, EnvState, State};
pub use timer::TimerCommand;

use crate::{
    dto::Environment,
    error::{Error, Result},
    executor::{Executor, Runner, RunnerSpec},
    id::{EnvironmentId, RunnerId},
    store::{RecordWriter, RunnerRecord, Store},
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
    store: Arc<Store>,
    /// Records claimed runners when the executor can take them back after a restart.
    records: Option<RecordWriter>,
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
    ) -> std::io::Result<Manager> {
        let store = Arc::new(store);
        let records = match executor.adopts() {
            true => Some(RecordWriter::spawn(Arc::clone(&store))?),
            false => None,
        };
        Ok(Manager {
            state: Mutex::new(State::default()),
            executor,
            store,
            records,
            store_lock: Mutex::new(()),
            timer,
            jobs,
            limits,
        })
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
        if let Some(records) = &self.records {
            effects.forget.into_iter().for_each(|id| records.remove(id));
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

    /// Claims a runner of `env`: an idle one, or a new one while capacity remains.
    pub fn claim(self: &Arc<Self>, env: EnvironmentId, timeout: Duration) -> Result<RunnerId> {
        let now = Instant::now();
        let spec = {
            let mut state = self.lock();
            if state.closing {
                return Err(Error::NoRunnerAvailable);
            }
            let total = state.total();
            let env_state = state
                .environments
                .get_mut(&env)
                .ok_or(Error::UnknownEnvironment(env))?;
            match env_state.idle.pop_front() {
                // Taken and registered under one lock, so the counts never miss it.
                Some((id, runner)) => {
                    let environment = env_state.spec.clone();
                    return Ok(self.register(state, id, runner, environment, timeout, now));
                }
                None if total < self.limits.capacity => {
                    let spec = env_state.spec.clone();
                    state.creating += 1;
                    spec
                }
                None => return Err(Error::NoRunnerAvailable),
            }
        };
        let id = RunnerId::new(env);
        let created = self.executor.create(&id, &runner_spec(&spec));
        let mut state = self.lock();
        state.creating -= 1;
        let runner = created?;
        // The environment may have gone, or the server begun to stop, meanwhile.
        if state.closing || !state.environments.contains_key(&env) {
            drop(state);
            runner.destroy();
            return Err(Error::UnknownEnvironment(env));
        }
        Ok(self.register(state, id, runner, spec, timeout, now))
    }

    /// Registers a claimed runner, then (unlocked) arms its timer, records it and refills.
    fn register(
        &self,
        mut state: MutexGuard<'_, State>,
        id: RunnerId,
        runner: Arc<dyn Runner>,
        environment: Environment,
        timeout: Duration,
        now: Instant,
    ) -> RunnerId {
        let mut effects = Effects::default();
        let claimed = Claimed::new(EnvironmentId(environment.id), runner, timeout);
        effects.timer.extend(claimed.arm(&id, now));
        state.insert_claimed(id.clone(), claimed);
        effects.jobs = state.refill(self.limits.capacity);
        drop(state);
        if let Some(records) = &self.records {
            let inactivity_timeout = timeout.as_secs();
            records.save(RunnerRecord {
                id: id.clone(),
                inactivity_timeout,
                environment,
            });
        }
        self.apply(effects);
        id
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
        if let Some(records) = &self.records {
            records.flush();
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
