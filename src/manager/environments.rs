//! Environment operations of the manager: create, replace, delete, persist, report.

use super::{
    Manager,
    state::{Effects, EnvState, StopReason},
};
use crate::{
    dto::{Environment, EnvironmentStatistics},
    error::{Error, Result},
    id::{EnvironmentId, RunnerId},
};

impl Manager {
    /// Creates or replaces an environment; `true` if it is new. The file is written (and
    /// synced) first: a definition that cannot be saved answers an error and changes nothing.
    pub fn put_environment(&self, id: EnvironmentId, environment: Environment) -> Result<bool> {
        self.executor.check_image(id, &environment.image)?;
        if environment.network_access {
            self.executor.check_network()?;
        }
        let environment = environment.with_id(id);
        // Held until memory matches the file, so concurrent writes of one environment end
        // in the same order on disk and in memory.
        let _writing = self.store_lock.lock().expect("store lock poisoned");
        self.store
            .save_environment(&environment)
            .map_err(|err| Error::internal("cannot persist the environment", err))?;
        let (created, effects) = {
            let mut state = self.lock();
            let mut effects = Effects::default();
            let version = state.next_version();
            let created = match state.environments.get_mut(&id) {
                None => {
                    let env = EnvState::new(environment, version);
                    state.environments.insert(id, env);
                    true
                }
                Some(env) => {
                    effects.destroy = env.redefine(environment, version);
                    false
                }
            };
            effects.jobs = state.refill(self.capacity);
            (created, effects)
        };
        let retired = effects.destroy.len();
        self.apply(effects);
        match created {
            true => log::info!("environment {id} created"),
            false => log::info!("environment {id} updated ({retired} idle runners retired)"),
        }
        Ok(created)
    }

    /// Removes an environment with all its runners, in this order: out of memory (claims
    /// of it fail from then on; records they queued before are ahead in the writer's
    /// queue), the runners' records, the runners, and last the environment's file. A crash
    /// at any point leaves no record of a runner without its environment file.
    pub fn delete_environment(&self, id: EnvironmentId) -> Result<()> {
        let _writing = self.store_lock.lock().expect("store lock poisoned");
        let (spec, effects) = {
            let mut state = self.lock();
            let env = state
                .environments
                .remove(&id)
                .ok_or(Error::EnvironmentNotFound(id))?;
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
            (env.spec, effects)
        };
        let runners = effects.destroy.len();
        self.apply(effects);
        if let Err(err) = self.store.remove_environment(id) {
            // Memory follows the disk: the definition stays (its runners are gone).
            let mut state = self.lock();
            let version = state.next_version();
            state.environments.insert(id, EnvState::new(spec, version));
            let jobs = state.refill(self.capacity);
            drop(state);
            self.apply(Effects {
                jobs,
                ..Effects::default()
            });
            return Err(Error::internal("cannot remove the environment", err));
        }
        log::info!("environment {id} deleted with {runners} runners");
        Ok(())
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
            .ok_or(Error::EnvironmentNotFound(id))
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
}
