//! Cgroups of runners: detecting v1 or v2 at start-up, one group per runner with its memory,
//! pids and cpu limits, counting OOM kills, killing every process of a group and removing it.
//! Only groups under `<controller>/<cgroup_name>/` are ever created, written or removed; the
//! executor's own group carries a pids limit over all its runners together.

use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use rustix::process::{Pid, Signal};

/// How long removing a group may wait for its processes to vanish.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);
/// The CFS period used with a hard cpu quota, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// The limits of one runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupLimits {
    /// Hard memory cap in bytes.
    pub memory_bytes: Option<u64>,
    /// Most processes.
    pub pids: u32,
    /// Relative cpu weight in v1 shares (1024 = default), from the cpu limit in MHz.
    pub cpu_shares: Option<u64>,
    /// Hard cpu quota in microseconds per [`CPU_PERIOD_US`].
    pub cpu_quota_us: Option<u64>,
}

impl GroupLimits {
    /// GroupLimits from a runner's memory (MiB) and cpu (MHz) limits; 0 means none.
    pub fn new(memory_mb: u64, pids: u32, cpu_mhz_limit: u32, hard: bool, core_mhz: u32) -> Self {
        let cpu = u64::from(cpu_mhz_limit);
        GroupLimits {
            memory_bytes: (memory_mb > 0).then(|| memory_mb.saturating_mul(1 << 20)),
            pids,
            cpu_shares: (cpu > 0).then(|| cpu.clamp(2, 262_144)),
            cpu_quota_us: (hard && cpu > 0)
                .then(|| (cpu * CPU_PERIOD_US / u64::from(core_mhz.max(1))).max(1000)),
        }
    }
}

/// Which cgroup version is used and where its controllers are mounted.
#[derive(Debug, Clone)]
enum Layout {
    /// One hierarchy per controller; `cpu` is optional.
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: Option<PathBuf>,
    },
    /// The unified hierarchy; `cpu` tells whether the cpu controller is available.
    V2 { root: PathBuf, cpu: bool },
}

/// The cgroup hierarchy of this host as the executor uses it.
#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: Layout,
    name: String,
}

impl Cgroups {
    /// Detects the cgroup version from `/proc/self/mountinfo`; v1 wins when it carries the
    /// memory and pids controllers (hybrid hosts), else v2 must.
    pub fn detect(name: &str) -> Result<Cgroups, String> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|err| format!("cannot read /proc/self/mountinfo: {err}"))?;
        let mounts = parse_mountinfo(&mountinfo);
        let v1 = |controller: &str| {
            mounts
                .iter()
                .find(|(fstype, _, options)| {
                    fstype == "cgroup" && options.split(',').any(|o| o == controller)
                })
                .map(|(_, point, _)| point.clone())
        };
        let name = name.to_owned();
        if let (Some(memory), Some(pids)) = (v1("memory"), v1("pids")) {
            return Ok(Cgroups {
                layout: Layout::V1 {
                    memory,
                    pids,
                    cpu: v1("cpu"),
                },
                name,
            });
        }
        for (fstype, point, _) in &mounts {
            if fstype != "cgroup2" {
                continue;
            }
            let controllers =
                fs::read_to_string(point.join("cgroup.controllers")).unwrap_or_default();
            let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
            if has("memory") && has("pids") {
                let layout = Layout::V2 {
                    root: point.clone(),
                    cpu: has("cpu"),
                };
                return Ok(Cgroups { layout, name });
            }
        }
        Err("no cgroup hierarchy with the memory and pids controllers (neither v1 nor v2)".into())
    }

    /// A description for the log, e.g. `cgroup v1 (memory, pids, cpu)`.
    pub fn describe(&self) -> String {
        match &self.layout {
            Layout::V1 { memory, cpu, .. } => format!(
                "cgroup v1 (memory, pids{} under {})",
                if cpu.is_some() { ", cpu" } else { "" },
                memory.parent().unwrap_or(memory).display()
            ),
            Layout::V2 { root, cpu } => format!(
                "cgroup v2 (memory, pids{} under {})",
                if *cpu { ", cpu" } else { "" },
                root.display()
            ),
        }
    }

    /// Whether cpu limits can be enforced.
    pub fn has_cpu(&self) -> bool {
        match &self.layout {
            Layout::V1 { cpu, .. } => cpu.is_some(),
            Layout::V2 { cpu, .. } => *cpu,
        }
    }

    /// The executor's own group under each hierarchy used.
    fn parents(&self) -> Vec<PathBuf> {
        let roots = match &self.layout {
            Layout::V1 { memory, pids, cpu } => {
                let mut roots = vec![memory.clone(), pids.clone()];
                roots.extend(cpu.clone());
                roots
            }
            Layout::V2 { root, .. } => vec![root.clone()],
        };
        // Controllers may share a hierarchy (e.g. `cpu,cpuacct` with others); keep the order,
        // memory first, as `Group` relies on it.
        let mut parents: Vec<PathBuf> = Vec::new();
        for parent in roots.into_iter().map(|root| root.join(&self.name)) {
            if !parents.contains(&parent) {
                parents.push(parent);
            }
        }
        parents
    }

    /// Creates the executor's own groups (and on v2 enables the controllers for runners), with
    /// at most `total_pids` processes in all runners together.
    pub fn prepare(&self, total_pids: u64) -> io::Result<()> {
        for parent in self.parents() {
            fs::create_dir_all(&parent)?;
        }
        let pids_parent = match &self.layout {
            Layout::V1 { pids, .. } => pids.join(&self.name),
            Layout::V2 { root, .. } => root.join(&self.name),
        };
        if let Layout::V2 { root, cpu } = &self.layout {
            let controllers = if *cpu {
                "+memory +pids +cpu"
            } else {
                "+memory +pids"
            };
            enable_controllers(root, controllers)?;
            enable_controllers(&root.join(&self.name), controllers)?;
        }
        write(&pids_parent, "pids.max", total_pids)
    }

    /// Creates a runner's group with its limits.
    pub fn create(&self, runner: &str, limits: &GroupLimits) -> io::Result<Group> {
        let group = self.group(runner);
        for dir in &group.dirs {
            fs::create_dir(dir)?;
        }
        if let Err(err) = self.apply(&group, limits) {
            let _ = group.remove();
            return Err(err);
        }
        Ok(group)
    }

    fn apply(&self, group: &Group, limits: &GroupLimits) -> io::Result<()> {
        match &self.layout {
            Layout::V1 { memory, pids, cpu } => {
                let dir = |root: &Path| root.join(&self.name).join(group.runner());
                apply_v1(
                    &dir(memory),
                    &dir(pids),
                    cpu.as_deref().map(dir).as_deref(),
                    limits,
                )
            }
            Layout::V2 { cpu, .. } => apply_v2(&group.dirs[0], *cpu, limits),
        }
    }

    /// The group of a runner (whether or not it exists).
    pub fn group(&self, runner: &str) -> Group {
        let dirs = self
            .parents()
            .into_iter()
            .map(|parent| parent.join(runner))
            .collect();
        Group {
            dirs,
            v2: matches!(self.layout, Layout::V2 { .. }),
        }
    }
}

/// The group of one runner: one directory per hierarchy.
#[derive(Debug, Clone)]
pub struct Group {
    dirs: Vec<PathBuf>,
    v2: bool,
}

impl Group {
    fn runner(&self) -> &Path {
        Path::new(self.dirs[0].file_name().unwrap_or_default())
    }

    /// The `cgroup.procs` files a process writes its pid to in order to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|dir| dir.join("cgroup.procs"))
            .collect()
    }

    /// How many processes the kernel has killed for exceeding the memory limit.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        // The memory hierarchy comes first in `dirs`.
        let text = fs::read_to_string(self.dirs[0].join(file)).unwrap_or_default();
        text.lines()
            .find_map(|line| line.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The process ids currently in the group.
    pub fn pids(&self) -> Vec<Pid> {
        let text = fs::read_to_string(self.dirs[0].join("cgroup.procs")).unwrap_or_default();
        text.lines()
            .filter_map(|line| line.parse().ok())
            .filter_map(Pid::from_raw)
            .collect()
    }

    /// Sends SIGKILL to every process in the group (new forks are caught by repeating until
    /// the group is empty). A pid read from `cgroup.procs` may belong to another process by
    /// the time it is signalled (the one listed exited and its pid was reused): each is opened
    /// as a pidfd first and signalled only if that very process is still in the group.
    pub fn kill_all(&self) {
        if self.v2 && write(&self.dirs[0], "cgroup.kill", 1).is_ok() {
            return;
        }
        let path = self.relative_path();
        for pid in self.pids() {
            let Ok(pidfd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            else {
                continue;
            };
            let cgroups = fs::read_to_string(format!("/proc/{}/cgroup", pid.as_raw_nonzero()))
                .unwrap_or_default();
            // `hierarchy:controllers:path` lines; the path names the runner uniquely.
            if cgroups
                .lines()
                .any(|line| line.rsplit(':').next() == Some(&path))
            {
                let _ = rustix::process::pidfd_send_signal(&pidfd, Signal::KILL);
            }
        }
    }

    /// The group's path below the hierarchy's root, as `/proc/<pid>/cgroup` shows it.
    fn relative_path(&self) -> String {
        let dir = &self.dirs[0];
        let parent = dir.parent().and_then(Path::file_name).unwrap_or_default();
        format!("/{}/{}", parent.to_string_lossy(), self.runner().display())
    }

    /// Kills what is left and removes the group's directories, waiting for dying processes.
    pub fn remove(&self) -> io::Result<()> {
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        let mut pause = Duration::from_micros(100);
        for dir in &self.dirs {
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(err) if err.kind() == io::ErrorKind::NotFound => break,
                    Err(err) if Instant::now() >= deadline => return Err(err),
                    Err(_) => {
                        // Killed processes leave their group only once they have exited; v1
                        // has no event for "empty" (v2's cgroup.events would), so retry with a
                        // short, growing pause, bounded by the deadline.
                        self.kill_all();
                        thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_millis(20));
                    }
                }
            }
        }
        Ok(())
    }
}

fn apply_v1(
    memory: &Path,
    pids: &Path,
    cpu: Option<&Path>,
    limits: &GroupLimits,
) -> io::Result<()> {
    if let Some(bytes) = limits.memory_bytes {
        write(memory, "memory.limit_in_bytes", bytes)?;
        // Swap accounting may be off; where it is on, no swapping past the cap.
        let _ = write(memory, "memory.memsw.limit_in_bytes", bytes);
    }
    write(pids, "pids.max", limits.pids)?;
    if let Some(cpu) = cpu {
        if let Some(shares) = limits.cpu_shares {
            write(cpu, "cpu.shares", shares)?;
        }
        if let Some(quota) = limits.cpu_quota_us {
            write(cpu, "cpu.cfs_period_us", CPU_PERIOD_US)?;
            write(cpu, "cpu.cfs_quota_us", quota)?;
        }
    }
    Ok(())
}

fn apply_v2(dir: &Path, cpu: bool, limits: &GroupLimits) -> io::Result<()> {
    if let Some(bytes) = limits.memory_bytes {
        write(dir, "memory.max", bytes)?;
        let _ = write(dir, "memory.swap.max", 0);
    }
    write(dir, "pids.max", limits.pids)?;
    if cpu {
        if let Some(shares) = limits.cpu_shares {
            // The usual conversion of v1 shares [2, 262144] to v2 weights [1, 10000].
            write(dir, "cpu.weight", 1 + (shares - 2) * 9999 / 262_142)?;
        }
        if let Some(quota) = limits.cpu_quota_us {
            write(dir, "cpu.max", format!("{quota} {CPU_PERIOD_US}"))?;
        }
    }
    Ok(())
}

fn write(dir: &Path, file: &str, value: impl ToString) -> io::Result<()> {
    fs::write(dir.join(file), value.to_string())
        .map_err(|err| io::Error::new(err.kind(), format!("{}/{file}: {err}", dir.display())))
}

/// Enables controllers for the children of a v2 group, unless they already are.
fn enable_controllers(dir: &Path, controllers: &str) -> io::Result<()> {
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let missing: Vec<&str> = controllers
        .split_whitespace()
        .filter(|c| !enabled.split_whitespace().any(|e| e == &c[1..]))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        write(dir, "cgroup.subtree_control", missing.join(" "))
    }
}

/// `(fstype, mount point, super options)` of every mount.
fn parse_mountinfo(text: &str) -> Vec<(String, PathBuf, String)> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let point = before.split(' ').nth(4)?;
            let mut after = after.split(' ');
            let fstype = after.next()?;
            let options = after.nth(1)?;
            Some((fstype.to_owned(), PathBuf::from(point), options.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_convert_units() {
        let limits = GroupLimits::new(64, 100, 500, true, 2000);
        assert_eq!(limits.memory_bytes, Some(64 << 20));
        assert_eq!(limits.cpu_shares, Some(500));
        assert_eq!(limits.cpu_quota_us, Some(25_000));
        assert_eq!(GroupLimits::new(0, 1, 0, true, 2000).memory_bytes, None);
        assert_eq!(GroupLimits::new(0, 1, 0, true, 2000).cpu_quota_us, None);
    }

    #[test]
    fn mountinfo_names_cgroup_mounts() {
        let text = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts[0].0, "cgroup");
        assert_eq!(mounts[0].1, PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(mounts[0].2, "rw,memory");
        assert_eq!(mounts[1].0, "cgroup2");
    }
}
