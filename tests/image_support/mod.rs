//! Test images and a real registry: Debian's `docker-registry` started on a loopback port with
//! a temporary storage directory, images built here (tiny busybox root file systems and hostile
//! layers) and pushed through the registry API, and a token proxy that puts a bearer-token
//! challenge in front of the registry.
#![allow(dead_code, unused_imports)]

pub mod archives;
pub mod build;
pub mod registry;
pub mod token;

pub use build::{Image, Layer};
pub use registry::Registry;

use std::time::Duration;

/// Timeout of every client call.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// An HTTP client that returns every status and follows no redirects (the tests' own client
/// for pushing: it trusts the test registry's self-made certificate).
pub fn agent() -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .disable_verification(true)
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .max_redirects(0)
        .proxy(None)
        .build()
        .into()
}

/// Moves this test (its thread, and the threads and children it starts) into a network
/// namespace of its own with only loopback, so that no image name can ever reach a real
/// registry. Nextest runs each test in its own process. `false` (skip) when not root.
pub fn isolate_network() -> bool {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root (a network namespace of its own)");
        return false;
    }
    // SAFETY: only the network namespace changes; the hazards of unshare (CLONE_FILES,
    // CLONE_FS changing what other threads' descriptors or paths mean) do not apply.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
        .expect("unshare(CLONE_NEWNET)");
    let status = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip (iproute2) must be installed");
    assert!(status.success());
    true
}
