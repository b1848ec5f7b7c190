//! The sandbox executor: start-up checks, image resolution, the uid range check, runner creation
//! and the removal of what an earlier (crashed) server left behind.

use std::{
    collections::BTreeSet,
    fs,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use super::{
    cgroup::Cgroups,
    image, operation,
    runner::SandboxRunner,
    shared::{IDS_PER_RUNNER, Shared, Slots},
};
use crate::{
    config::{Config, SandboxConfig},
    error::{Error, Result},
    executor::{Command, Executor, Outcome, Runner, RunnerSpec},
    id::{EnvironmentId, RunnerId},
    image::service::Images,
    network::Network,
};

/// How long the start-up self-test may take to run `true`.
const SELF_TEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The lowest allowed `uid_base`: ids below are the host's own (system and login users).
const LOWEST_UID_BASE: u32 = 65536;
/// Files naming host uids and gids (`passwd`, `group`) and ranges (`subuid`, `subgid`) that
/// runner ranges must not overlap.
const HOST_ID_FILES: [&str; 4] = ["/etc/passwd", "/etc/group", "/etc/subuid", "/etc/subgid"];

/// Builds runners as Linux sandboxes.
#[derive(Debug, Clone)]
pub struct SandboxExecutor {
    shared: Arc<Shared>,
}

impl SandboxExecutor {
    /// How many uid ranges of 65536 ids, counted from `uid_base`, a server of `capacity`
    /// runners may use: twice the capacity (runners being destroyed still hold theirs while
    /// replacements start) and some for the self-test.
    pub fn uid_ranges(capacity: usize) -> u32 {
        u32::try_from(capacity.saturating_mul(2).saturating_add(16)).unwrap_or(u32::MAX)
    }

    /// Checks that this host can run sandboxes and prepares the executor's cgroups and state
    /// directory. The error names what is missing.
    pub fn new(config: &Config) -> Result<SandboxExecutor> {
        let unavailable =
            |what: String| Error::Internal(format!("{what}; choose --executor process"));
        let sandbox = &config.sandbox;
        check_host().map_err(unavailable)?;
        let agent = agent_path(sandbox).map_err(unavailable)?;
        let count = slot_count(sandbox.uid_base, config.runner.capacity);
        check_uid_range(sandbox.uid_base, count, &HOST_ID_FILES).map_err(unavailable)?;
        let network = Network::new(config)?;
        let cgroups = Cgroups::detect(&sandbox.cgroup_name).map_err(unavailable)?;
        cgroups
            .prepare(total_pids_limit(sandbox))
            .map_err(|err| unavailable(format!("cannot create the sandbox cgroups: {err}")))?;
        let dir = config.state.dir.join("sandbox");
        fs::create_dir_all(&dir)
            .map_err(|err| unavailable(format!("cannot create {}: {err}", dir.display())))?;
        log::info!(
            "sandbox executor: {}, uids from {}, agent {}",
            cgroups.describe(),
            sandbox.uid_base,
            agent.display()
        );
        if sandbox.cpu_hard_limit && !cgroups.has_cpu() {
            log::warn!("sandbox: no cpu controller, cpu limits are not enforced");
        }
        let slots = Mutex::new(Slots::new(count));
        let images = Images::open(&config.state.dir, &config.images.settings())
            .map_err(|err| Error::Internal(format!("image store: {err}")))?;
        let shared = Shared {
            config: sandbox.clone(),
            agent,
            dir,
            cgroups,
            images: Some(images),
            slots,
            network,
        };
        let executor = SandboxExecutor {
            shared: Arc::new(shared),
        };
        // Runners an earlier server left keep their uid ranges until they are taken back or
        // removed; the self-test must not run in one of them.
        // A runner file that cannot be read stops the start (its runner would otherwise be
        // removed as a leftover): nothing is deleted because of a damaged file.
        let entries = fs::read_dir(&executor.shared.dir).into_iter().flatten();
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                continue;
            }
            match super::reattach::RunnerFile::load(&entry.path()) {
                Ok(file) => executor.shared.reserve_slot(file.slot),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    let path = entry.path().join(super::reattach::RUNNER_FILE);
                    return Err(Error::Internal(format!(
                        "the state file {} is damaged ({err}); nothing was changed. Repair it, \
                         or delete it to have that runner removed at the next start",
                        path.display()
                    )));
                }
            }
        }
        executor
            .self_test()
            .map_err(|err| unavailable(format!("sandbox self-test failed: {err}")))?;
        Ok(executor)
    }
}

impl SandboxExecutor {
    /// Builds a runner of the `host` image and runs `true` in it: whatever the host lacks
    /// (namespaces, overlayfs, mount options, seccomp, ...) shows at start-up, not per request.
    fn self_test(&self) -> Result<()> {
        let spec = RunnerSpec {
            environment: EnvironmentId(0),
            image: image::HOST_IMAGE.to_owned(),
            cpu_limit: 0,
            memory_limit: 0,
            network_access: false,
            exposed_ports: Vec::new(),
        };
        let runner = SandboxRunner::start(&self.shared, &RunnerId::new(spec.environment), &spec)?;
        let command = Command {
            command: "true".into(),
            environment: Vec::new(),
            privileged: false,
        };
        let mut process = runner.execute(&command)?;
        let outcome = loop {
            if !operation::wait_readable(process.exit.fd(), SELF_TEST_TIMEOUT) {
                break None;
            }
            if let Some(outcome) = process.exit.outcome()? {
                break Some(outcome);
            }
        };
        match outcome {
            Some(Outcome::Exited(0)) => Ok(()),
            other => Err(Error::Internal(format!("`true` ended with {other:?}"))),
        }
    }
}

/// The pids limit over all runners: configured, or half of the kernel's `pid_max`, so that
/// runners together can never take every process slot of the host.
fn total_pids_limit(sandbox: &SandboxConfig) -> u64 {
    if sandbox.total_pids_limit > 0 {
        return sandbox.total_pids_limit;
    }
    let pid_max = fs::read_to_string("/proc/sys/kernel/pid_max").unwrap_or_default();
    pid_max
        .trim()
        .parse::<u64>()
        .map_or(16_384, |max| (max / 2).max(1))
}

/// Uid ranges to reserve: those [`SandboxExecutor::uid_ranges`] wants, within the 32-bit uid
/// space (the last uid is invalid).
fn slot_count(base: u32, capacity: usize) -> u32 {
    ((u32::MAX - base) / IDS_PER_RUNNER).min(SandboxExecutor::uid_ranges(capacity))
}

/// Refuses a uid base that maps runner ids onto host ids: below [`LOWEST_UID_BASE`], or
/// overlapping a uid/gid of `passwd`/`group` or a range of `subuid`/`subgid` in `files`
/// (missing files name nothing). Runner root mapped onto host root (`uid_base` 0) would read
/// the host's `/etc/shadow`.
pub(super) fn check_uid_range(base: u32, count: u32, files: &[&str]) -> Result<(), String> {
    if base < LOWEST_UID_BASE {
        return Err(format!(
            "uid_base {base} is below {LOWEST_UID_BASE}: runner uids would be host uids"
        ));
    }
    if count == 0 {
        return Err(format!("uid_base {base} leaves no uid range"));
    }
    let range = u64::from(base)..u64::from(base) + u64::from(count) * u64::from(IDS_PER_RUNNER);
    for file in files {
        let Ok(text) = fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            let taken = match fields.as_slice() {
                // subuid, subgid: name:first:count
                [_, first, count] => first
                    .parse::<u64>()
                    .ok()
                    .zip(count.parse::<u64>().ok())
                    .map(|(first, count)| first..first + count),
                // passwd, group: name:password:id:...
                [_, _, id, _, ..] => id.parse::<u64>().ok().map(|id| id..id + 1),
                _ => None,
            };
            if let Some(taken) = taken.filter(|t| t.start < range.end && range.start < t.end) {
                return Err(format!(
                    "uid_base {base}: the runner ids {}..{} overlap {}..{} of {file} ({})",
                    range.start, range.end, taken.start, taken.end, fields[0]
                ));
            }
        }
    }
    Ok(())
}

/// The agent binary: configured, or this program.
fn agent_path(sandbox: &SandboxConfig) -> Result<PathBuf, String> {
    // By default the running executable itself, through /proc: even when its file has been
    // replaced on disk (an upgrade in place), runners get the agent matching this server.
    let agent = match &sandbox.agent {
        Some(agent) => agent.clone(),
        None => PathBuf::from("/proc/self/exe"),
    };
    if agent.is_file() {
        Ok(agent)
    } else {
        Err(format!("agent binary {} not found", agent.display()))
    }
}

/// Root, user namespaces and overlayfs.
fn check_host() -> Result<(), String> {
    let euid = rustix::process::geteuid().as_raw();
    if euid != 0 {
        return Err(format!(
            "the sandbox executor needs root (running as uid {euid})"
        ));
    }
    let max = fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
    if max.trim().parse::<u64>().unwrap_or(0) == 0 {
        return Err("user namespaces are disabled (/proc/sys/user/max_user_namespaces)".into());
    }
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems
        .lines()
        .any(|line| line.split_whitespace().last() == Some("overlay"))
    {
        return Err("overlayfs is not available (modprobe overlay)".into());
    }
    Ok(())
}

impl Executor for SandboxExecutor {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn attach_metrics(&self, metrics: &Arc<crate::metrics::Metrics>) {
        if let Some(images) = &self.shared.images {
            images.attach_metrics(metrics);
        }
    }

    fn check_image(&self, environment: EnvironmentId, image: &str) -> Result<()> {
        self.shared.resolver().check(environment, image)
    }

    fn image_ready(&self, spec: &RunnerSpec) -> Result<bool> {
        self.shared.resolver().ready(spec.environment, &spec.image)
    }

    fn check_network(&self) -> Result<()> {
        self.shared.network.check()
    }

    fn shutdown(&self) {
        self.shared.network.shutdown();
    }

    fn create(&self, id: &RunnerId, spec: &RunnerSpec) -> Result<Arc<dyn Runner>> {
        let runner = SandboxRunner::start(&self.shared, id, spec)?;
        Ok(Arc::new(runner))
    }

    fn adopts(&self) -> bool {
        true
    }

    /// Its files, limits (the cgroup) and id stay as they were: only the server's sockets
    /// are new.
    fn adopt(&self, id: &RunnerId, spec: &RunnerSpec) -> Option<Arc<dyn Runner>> {
        match SandboxRunner::adopt(&self.shared, id, spec) {
            Ok(runner) => Some(Arc::new(runner)),
            Err(err) => {
                log::warn!("sandbox: cannot take runner {id} back: {err}");
                None
            }
        }
    }

    /// A runner's directory under the state directory exists for as long as its cgroup does
    /// (created before it, removed after it), so leftovers are found through the directories:
    /// groups of another server that shares the cgroup name (another state directory) are
    /// never touched.
    fn remove_leftovers(&self, keep: &[RunnerId]) {
        let keep: BTreeSet<&str> = keep.iter().map(RunnerId::as_str).collect();
        let Ok(entries) = fs::read_dir(&self.shared.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if keep.contains(name.as_str()) {
                continue;
            }
            let slot = super::reattach::RunnerFile::load(&entry.path()).map(|file| file.slot);
            if let Err(err) = self.shared.cgroups.group(&name).remove() {
                log::warn!("sandbox: cannot remove the leftover cgroup {name}: {err}");
                continue;
            }
            if let Ok(slot) = slot {
                self.shared.give_slot(slot);
            }
            match fs::remove_dir_all(entry.path()) {
                Ok(()) => log::info!("sandbox: removed leftover runner {name}"),
                Err(err) => log::warn!("sandbox: cannot remove {}: {err}", entry.path().display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_bases_overlapping_host_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        let subuid = dir.path().join("subuid");
        fs::write(
            &passwd,
            "root:x:0:0::/root:/bin/sh\nbig:x:2000000:1::/:/bin/sh\n",
        )
        .unwrap();
        fs::write(&subuid, "alice:100000:65536\n").unwrap();
        let files = [passwd.to_str().unwrap(), subuid.to_str().unwrap()];
        let check = |base, count| check_uid_range(base, count, &files);
        assert!(check(0, 1).unwrap_err().contains("below 65536"));
        assert!(check(65535, 1).is_err());
        assert!(check(65536, 1).unwrap_err().contains("subuid"));
        assert!(check(1 << 20, 16).unwrap_err().contains("2000000"));
        assert!(check(1 << 20, 14).is_ok());
        assert!(check(3 << 20, 100).is_ok());
        assert_eq!(slot_count(u32::MAX - 10, 10), 0);
        assert!(check(u32::MAX - 10, 0).is_err());
    }
}
