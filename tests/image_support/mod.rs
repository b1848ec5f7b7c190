//! Test images and a real registry: Debian's `docker-registry` started on a loopback port with
//! a temporary storage directory, images built here (tiny busybox root file systems and hostile
//! layers) and pushed through the registry API, and a token proxy that puts a bearer-token
//! challenge in front of the registry.
#![allow(dead_code, unused_imports)]

pub mod build;
pub mod registry;
pub mod token;

pub use build::{Image, Layer};
pub use registry::Registry;

use std::time::Duration;

/// Timeout of every client call.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// An HTTP client that returns every status and follows no redirects.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .max_redirects(0)
        .proxy(None)
        .build()
        .into()
}
