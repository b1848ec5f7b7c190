//! poseidon-lite: a single-host runner management server that speaks the HTTP and WebSocket API
//! of openHPI's Poseidon, so that CodeOcean can use it unchanged.
//!
//! It keeps pools of prewarmed runners per execution environment, copies files into them, runs
//! commands in them under a pseudo-terminal with output streamed over a WebSocket, and destroys
//! them after inactivity. Runners are built by an [`executor`]: `process` (no isolation) or
//! `sandbox` (Linux namespaces and cgroups).
#![deny(unsafe_code)]

pub mod api;
pub mod cli;
pub mod config;
pub mod dto;
pub mod error;
pub mod executor;
pub mod id;
pub mod image;
pub mod manager;
pub mod metrics;
pub mod migrate;
pub mod network;
pub mod server;
pub mod store;
#[allow(unsafe_code)]
mod sys;
mod threads;

pub use config::Config;
pub use error::{Error, Result};
pub use executor::sandbox::run_agent_if_requested;
pub use server::{Server, ServerHandle};
pub use sys::Allocator;
