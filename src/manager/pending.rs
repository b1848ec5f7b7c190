//! Pending and running executions: `POST /execute` stores one, the WebSocket takes it (once)
//! and keeps it registered with its runner while it runs.

use std::{sync::Arc, time::Instant};

use crossbeam_channel::Receiver;

use super::{
    Manager,
    state::{PendingExecution, StopReason},
};
use crate::{
    error::{Error, Result},
    executor::Runner,
    id::{ExecutionId, RunnerId},
};

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

impl ActiveGuard {
    /// The runner the execution runs in.
    pub fn runner(&self) -> &RunnerId {
        &self.runner
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(claimed) = self.manager.lock().runners.get_mut(&self.runner) {
            claimed.active.remove(&self.token);
        }
    }
}

impl Manager {
    /// Stores an execution for a later WebSocket connection (does not restart the timer).
    pub fn store_execution(&self, id: &RunnerId, pending: PendingExecution) -> Result<ExecutionId> {
        let mut state = self.lock();
        let claimed = state
            .runners
            .get_mut(id)
            .ok_or_else(|| Error::unknown_runner(id))?;
        let execution = ExecutionId::new();
        claimed.pending.push(execution, pending);
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
            let pending = claimed
                .pending
                .take(execution)
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
}
