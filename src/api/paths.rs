//! The paths the server hands out or calls itself; [`super::Route`] reads them back.

use crate::id::{ExecutionId, RunnerId};

/// The prefix of every API path.
pub const PREFIX: &str = "/api/v1";

/// The path and query of an execution's WebSocket, as [`super::Route::parse`] reads it back
/// ([`super::Route::WebSocket`]).
pub fn websocket_path(runner: &RunnerId, execution: ExecutionId) -> String {
    format!("{PREFIX}/runners/{runner}/websocket?{EXECUTION_PARAMETER}={execution}")
}

/// The query parameter naming the execution of a WebSocket.
pub const EXECUTION_PARAMETER: &str = "executionID";
