//! Bookkeeping of the manager's state: pool refills, counts and stored executions.

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
