//! The runner manager: environments, their idle pools, claimed runners and stored executions,
//! all behind ONE mutex. Nothing slow happens under the lock: runners are created and
//! destroyed, files written and channels used only after it is released.
//!
//! The manager owns its threads: the inactivity timer, the returner that destroys expired
//! runners, and the prewarm threads that fill the pools. A runner's way from claim through
//! timer to expiry stays inside this module.

mod environments;
mod pending;
mod prewarm;
mod state;
mod timer;

use std::{
    sync::{Arc, Mutex, MutexGuard, Weak},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender};

pub use pending::{ActiveGuard, StartedExecution};
use state::{Claimed, Effects, EnvState, Job, State, TimerCommand};
pub use state::{PendingExecution, StopReason};

use crate::{
    dto::Environment,
    error::{Error, Result},
    executor::{Executor, Runner, RunnerSpec},
    id::{EnvironmentId, RunnerId},
    metrics::Metrics,
    store::{RecordWriter, RunnerRecord, Store},
};

/// Runner management; see the module docs.
#[derive(Debug)]
pub struct Manager {
    state: Mutex<State>,
    executor: Arc<dyn Executor>,
    store: Arc<Store>,
    /// Records claimed runners when the executor can take them back after a restart.
    records: Option<RecordWriter>,
    /// Serializes environment changes with their files (taken before, never inside, `state`).
    store_lock: Mutex<()>,
    timer: Sender<TimerCommand>,
    jobs: Sender<Job>,
    /// Most runners that may exist at once.
    capacity: usize,
    threads: Mutex<Threads>,
    /// What the server counts (the manager's threads count prewarms).
    metrics: Arc<Metrics>,
}

/// The manager's own threads: the timer, the returner of expired runners and the prewarm
/// threads. Commands sent before they start wait in the channels.
#[derive(Debug)]
struct Threads {
    /// The receiving ends, until [`Manager::start`] hands them to the threads.
    receivers: Option<(Receiver<TimerCommand>, Receiver<Job>)>,
    /// Dropped to stop the timer and prewarm threads.
    stop: Option<Sender<()>>,
    prewarmers: Vec<JoinHandle<()>>,
    others: Vec<JoinHandle<()>>,
}

impl Manager {
    /// Creates a manager that keeps at most `capacity` runners; its threads run from
    /// [`Manager::start`] to [`Manager::shutdown`].
    pub fn new(
        executor: Arc<dyn Executor>,
        store: Store,
        capacity: usize,
    ) -> std::io::Result<Manager> {
        let store = Arc::new(store);
        let metrics = Arc::new(Metrics::default());
        executor.attach_metrics(&metrics);
        let records = match executor.adopts() {
            true => Some(RecordWriter::spawn(Arc::clone(&store))?),
            false => None,
        };
        let (timer, timer_rx) = crossbeam_channel::unbounded();
        let (jobs, jobs_rx) = crossbeam_channel::unbounded();
        Ok(Manager {
            state: Mutex::new(State::default()),
            executor,
            store,
            records,
            store_lock: Mutex::new(()),
            metrics,
            timer,
            jobs,
            capacity,
            threads: Mutex::new(Threads {
                receivers: Some((timer_rx, jobs_rx)),
                stop: None,
                prewarmers: Vec::new(),
                others: Vec::new(),
            }),
        })
    }

    /// Starts the timer, the returner of expired runners and `prewarm_threads` prewarm
    /// threads (at least one). Only the first call starts anything.
    pub fn start(self: &Arc<Self>, prewarm_threads: usize) -> std::io::Result<()> {
        let mut threads = self.threads.lock().expect("manager threads poisoned");
        let Some((timer_rx, jobs_rx)) = threads.receivers.take() else {
            return Ok(());
        };
        let (stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
        let (expired_tx, expired) = crossbeam_channel::unbounded();
        threads.stop = Some(stop_tx);
        threads
            .others
            .push(timer::spawn(timer_rx, expired_tx, stop.clone())?);
        let manager = Arc::downgrade(self);
        threads.others.push(
            thread::Builder::new()
                .name("returner".into())
                .spawn(move || return_expired(&manager, &expired))?,
        );
        threads.prewarmers = prewarm::spawn(prewarm_threads, self, &jobs_rx, &stop)?;
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("manager state poisoned")
    }

    /// What the server counts.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The executor runners are built with.
    pub fn executor(&self) -> &Arc<dyn Executor> {
        &self.executor
    }

    /// Carries out what a locked operation decided. Records of forgotten runners are removed
    /// (and that written) before the runners are destroyed, so that a crash in between never
    /// brings back a runner whose files are half gone.
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
        if let Some(records) = &self.records
            && !effects.forget.is_empty()
        {
            // Failures are logged by the writer; the runner is gone from memory either way,
            // and a record whose runner cannot be taken back is dropped at the next start.
            let _ = records.remove(effects.forget);
        }
        for runner in effects.destroy {
            runner.destroy();
        }
    }

    /// Restores persisted environments and claimed runners after a start. A damaged state
    /// file is an error naming it, and nothing is changed (see [`crate::store`]).
    pub fn restore(&self, now: Instant) -> Result<()> {
        let contents = self
            .store
            .load()
            .map_err(|damaged| Error::Internal(damaged.to_string()))?;
        let environments = contents.environments;
        // Runners that are not taken back but whose files must stay: quarantined ones and
        // those whose environment file is missing (it can only have been moved away: an
        // environment's file is removed only after its runners' records).
        let mut kept = contents.quarantined;
        let mut adopted = Vec::new();
        for record in contents.runners {
            let env = record.id.environment();
            let Some(environment) = environments.iter().find(|e| e.id == env.0) else {
                log::warn!(
                    "runner {} is not taken back: environment {env} does not exist; its \
                     record and files are kept",
                    record.id
                );
                kept.push(record.id);
                continue;
            };
            match self.executor.adopt(&record.id, &runner_spec(environment)) {
                Some(runner) => {
                    kept.push(record.id.clone());
                    adopted.push((record, runner));
                }
                None => {
                    log::warn!("runner {} is gone; its record is removed", record.id);
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
            log::info!("took back runner {}", record.id);
            let timeout = Duration::from_secs(record.inactivity_timeout);
            let claimed = Claimed::new(record.id.environment(), runner, timeout);
            effects.timer.extend(claimed.arm(&record.id, now));
            state.insert_claimed(record.id, claimed);
        }
        effects.jobs = state.refill(self.capacity);
        drop(state);
        self.apply(effects);
        Ok(())
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
                    return self.register(state, id, runner, environment, timeout, now);
                }
                None if total < self.capacity => {
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
        self.register(state, id, runner, spec, timeout, now)
    }

    /// Registers a claimed runner and queues its record (both under the lock, so the record
    /// is queued before anything can remove the runner), then, unlocked, arms its timer and
    /// refills. Answers once the record is written; if it cannot be, the claim is undone.
    fn register(
        &self,
        mut state: MutexGuard<'_, State>,
        id: RunnerId,
        runner: Arc<dyn Runner>,
        environment: Environment,
        timeout: Duration,
        now: Instant,
    ) -> Result<RunnerId> {
        let record = RunnerRecord {
            id: id.clone(),
            inactivity_timeout: timeout.as_secs(),
        };
        let queued = match &self.records {
            Some(records) => match records.queue_save(record) {
                Ok(done) => Some(done),
                Err(err) => {
                    drop(state);
                    runner.destroy();
                    return Err(Error::internal("cannot save the runner", err));
                }
            },
            None => None,
        };
        let mut effects = Effects::default();
        let claimed = Claimed::new(EnvironmentId(environment.id), runner, timeout);
        effects.timer.extend(claimed.arm(&id, now));
        state.insert_claimed(id.clone(), claimed);
        effects.jobs = state.refill(self.capacity);
        drop(state);
        let saved = queued.as_ref().map_or(Ok(()), crate::store::wait_for);
        self.apply(effects);
        if let Err(err) = saved {
            let mut effects = Effects::default();
            {
                let mut state = self.lock();
                state.remove_claimed(&id, StopReason::RunnerDeleted, &mut effects);
                effects.jobs = state.refill(self.capacity);
            }
            self.apply(effects);
            return Err(Error::internal("cannot save the runner", err));
        }
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
            effects.jobs = state.refill(self.capacity);
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

    /// Called by the returner: destroys the runner if this arming is still its latest.
    fn expire(&self, id: &RunnerId, generation: u64) {
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
            effects.jobs = state.refill(self.capacity);
        }
        self.apply(effects);
    }

    /// Stops the manager's threads and every execution, and destroys every runner.
    pub fn shutdown(&self) {
        let (prewarmers, others) = {
            let mut threads = self.threads.lock().expect("manager threads poisoned");
            threads.stop = None;
            (
                std::mem::take(&mut threads.prewarmers),
                std::mem::take(&mut threads.others),
            )
        };
        // No prewarm thread may pool a runner after the pools are emptied below.
        for thread in prewarmers {
            let _ = thread.join();
        }
        self.close();
        for thread in others {
            let _ = thread.join();
        }
        self.executor.shutdown();
    }

    /// Marks the manager closing, stops every execution and destroys every runner.
    fn close(&self) {
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
        if let Some(records) = &self.records
            && let Err(err) = records.flush()
        {
            log::error!("cannot write the runner records: {err}");
        }
    }

    /// Runner counts: (idle, claimed, being created).
    pub fn counts(&self) -> (usize, usize, usize) {
        let state = self.lock();
        let idle = state.environments.values().map(|env| env.idle.len()).sum();
        (idle, state.runners.len(), state.creating)
    }
}

/// The returner thread: hands expired runners back to the manager until the timer ends.
fn return_expired(manager: &Weak<Manager>, expired: &Receiver<timer::Expiry>) {
    for (id, generation) in expired {
        let Some(manager) = manager.upgrade() else {
            return;
        };
        manager.expire(&id, generation);
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
        exposed_ports: environment.exposed_ports.clone(),
    }
}
