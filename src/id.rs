//! Identifiers: environment ids (integers), runner ids and execution ids (unguessable, URL-safe).

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An execution environment id; CodeOcean's database id, always a non-negative integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EnvironmentId(pub u64);

impl fmt::Display for EnvironmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A runner id: `<environment id>-<uuid v4>`, like Poseidon's but with a random (v4) uuid so
/// that ids cannot be guessed from one another.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunnerId(String);

impl RunnerId {
    /// A fresh random id for a runner of `environment`.
    pub fn new(environment: EnvironmentId) -> Self {
        RunnerId(format!("{environment}-{}", Uuid::new_v4()))
    }

    /// Parses an id as it appears in a URL; `None` if it cannot be one of ours.
    pub fn parse(text: &str) -> Option<Self> {
        let (env, uuid) = text.split_once('-')?;
        env.parse::<u64>().ok()?;
        Uuid::parse_str(uuid).ok()?;
        Some(RunnerId(text.to_owned()))
    }

    /// The environment this runner belongs to.
    pub fn environment(&self) -> EnvironmentId {
        let env = self.0.split_once('-').map_or("0", |(env, _)| env);
        EnvironmentId(env.parse().unwrap_or(0))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A stored execution's id, handed to the client inside the WebSocket URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExecutionId(pub Uuid);

impl ExecutionId {
    /// A fresh random id.
    pub fn new() -> Self {
        ExecutionId(Uuid::new_v4())
    }

    /// Parses the `executionID` query parameter.
    pub fn parse(text: &str) -> Option<Self> {
        Uuid::parse_str(text).ok().map(ExecutionId)
    }
}

impl Default for ExecutionId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ExecutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_ids_round_trip_and_name_their_environment() {
        let id = RunnerId::new(EnvironmentId(42));
        assert!(id.as_str().starts_with("42-"));
        assert_eq!(RunnerId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(id.environment(), EnvironmentId(42));
        assert_ne!(RunnerId::new(EnvironmentId(42)), id);
    }

    #[test]
    fn foreign_runner_ids_are_rejected() {
        assert_eq!(RunnerId::parse("42"), None);
        assert_eq!(
            RunnerId::parse("x-0b7f3c2e-0000-4000-8000-000000000000"),
            None
        );
        assert_eq!(RunnerId::parse("42-../../etc"), None);
        assert!(ExecutionId::parse("nope").is_none());
    }
}
