//! The `process` executor: each runner is a private workspace directory under the state
//! directory and commands run there as the server's own user. There is NO isolation: learner
//! code can read and write anything the server can. For trusted code only (test harnesses,
//! development, CI).

use std::{
    fs, io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
    thread,
};

use rustix::process::{Pid, PidfdFlags, Signal, WaitIdOptions};

use super::{
    Command, Executor, ExitWatch, FileContent, FileUpdate, Kill, Outcome, Process, Runner,
    RunnerSpec,
    fsview::{NameSource, Root},
    pty,
};
use crate::{
    error::{Error, Result},
    id::RunnerId,
};

/// Builds runners that are plain directories.
#[derive(Debug)]
pub struct ProcessExecutor {
    workspaces: PathBuf,
    shell: &'static str,
}

impl ProcessExecutor {
    /// Keeps workspaces under `<state dir>/workspaces`.
    pub fn new(state_dir: &Path) -> io::Result<ProcessExecutor> {
        let workspaces = state_dir.join("workspaces");
        fs::create_dir_all(&workspaces)?;
        let shell = if Path::new("/bin/bash").exists() {
            "/bin/bash"
        } else {
            "/bin/sh"
        };
        Ok(ProcessExecutor { workspaces, shell })
    }

    fn runner(&self, id: &RunnerId) -> Result<Arc<dyn Runner>> {
        let dir = self.workspaces.join(id.as_str());
        let root = Root::open(&dir, "/", NameSource::Host)?;
        Ok(Arc::new(ProcessRunner {
            dir,
            root,
            shell: self.shell,
            live: Mutex::new(Vec::new()),
            destroyed: AtomicBool::new(false),
        }))
    }
}

impl Executor for ProcessExecutor {
    fn name(&self) -> &'static str {
        "process"
    }

    fn check_image(&self, _environment: crate::id::EnvironmentId, _image: &str) -> Result<()> {
        // Images mean nothing without isolation: every runner sees the host.
        Ok(())
    }

    fn create(&self, id: &RunnerId, _spec: &RunnerSpec) -> Result<Arc<dyn Runner>> {
        fs::create_dir(self.workspaces.join(id.as_str()))?;
        self.runner(id)
    }

    fn adopts(&self) -> bool {
        true
    }

    fn adopt(&self, id: &RunnerId, _spec: &RunnerSpec) -> Option<Arc<dyn Runner>> {
        let runner = self.runner(id).ok()?;
        // Copies the previous server was cut off in the middle of.
        super::fsview::remove_partial_files(&self.workspaces.join(id.as_str()));
        Some(runner)
    }

    fn remove_leftovers(&self, keep: &[RunnerId]) {
        let Ok(entries) = fs::read_dir(&self.workspaces) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !keep.iter().any(|id| name == id.as_str()) {
                log::info!("removing leftover workspace {}", entry.path().display());
                if let Err(err) = fs::remove_dir_all(entry.path()) {
                    log::warn!("cannot remove {}: {err}", entry.path().display());
                }
            }
        }
    }
}

/// A workspace directory with the executions running in it.
#[derive(Debug)]
struct ProcessRunner {
    dir: PathBuf,
    root: Root,
    shell: &'static str,
    live: Mutex<Vec<Weak<GroupKill>>>,
    destroyed: AtomicBool,
}

impl Runner for ProcessRunner {
    fn execute(&self, command: &Command) -> Result<Process> {
        if self.destroyed.load(Ordering::SeqCst) {
            return Err(Error::Internal("the runner was destroyed".into()));
        }
        let (master, slave) = pty::open()?;
        let (stderr, stderr_writer) = io::pipe()?;
        let mut process = std::process::Command::new(self.shell);
        process
            .arg("-c")
            .arg(&command.command)
            .current_dir(&self.dir)
            .env_clear()
            .env("PATH", super::PATH)
            .env("HOME", &self.dir)
            .env("LANG", "C.UTF-8")
            .env("CODEOCEAN", "true")
            .envs(command.environment.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave))
            .stderr(Stdio::from(stderr_writer));
        let child = crate::sys::spawn_with_controlling_terminal(&mut process, super::FILE_LIMIT)?;
        let pid =
            Pid::from_raw(child.id() as i32).ok_or_else(|| Error::Internal("no pid".into()))?;
        let pidfd =
            rustix::process::pidfd_open(pid, PidfdFlags::empty()).map_err(io::Error::from)?;
        let kill = Arc::new(GroupKill {
            group: pid,
            reaped: AtomicBool::new(false),
        });
        {
            let mut live = self.live.lock().expect("live list poisoned");
            live.retain(|kill| kill.strong_count() > 0);
            live.push(Arc::downgrade(&kill));
        }
        let exit = Box::new(PidfdWatch {
            pidfd,
            kill: Arc::clone(&kill),
        });
        Ok(Process {
            pty: master,
            stderr: stderr.into(),
            exit,
            kill,
        })
    }

    fn list_files(
        &self,
        path: &str,
        recursive: bool,
        _privileged: bool,
    ) -> Result<Box<dyn io::Read + Send>> {
        let listing = self.root.list(path, recursive)?;
        let (reader, writer) = io::pipe()?;
        thread::Builder::new()
            .name("listing".into())
            .spawn(move || {
                // A reader that went away (client gone) ends the listing early; nothing to report.
                let _ = listing.write_json(writer);
            })?;
        Ok(Box::new(reader))
    }

    fn read_file(&self, path: &str, _privileged: bool) -> Result<FileContent> {
        self.root.open_file(path)
    }

    fn update_files(&self, update: &FileUpdate) -> Result<()> {
        self.root.apply(update)
    }

    fn destroy(&self) {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.kill_all();
        if let Err(err) = fs::remove_dir_all(&self.dir)
            && err.kind() != io::ErrorKind::NotFound
        {
            log::warn!("cannot remove workspace {}: {err}", self.dir.display());
        }
    }

    fn suspend(&self) {
        // The workspace stays: the restarted server takes the runner back.
        self.kill_all();
    }
}

impl ProcessRunner {
    fn kill_all(&self) {
        let live = std::mem::take(&mut *self.live.lock().expect("live list poisoned"));
        for kill in live.iter().filter_map(Weak::upgrade) {
            kill.kill();
        }
    }
}

/// Kills the process group of an execution (its session leader's pid is the group id).
#[derive(Debug)]
struct GroupKill {
    group: Pid,
    /// Set once the leader is reaped: its pid, and so the group id, may then be reused by an
    /// unrelated process, so nothing is signalled any more.
    reaped: AtomicBool,
}

impl Kill for GroupKill {
    fn kill(&self) {
        if !self.reaped.load(Ordering::SeqCst) {
            let _ = rustix::process::kill_process_group(self.group, Signal::KILL);
        }
    }
}

/// Waits for the session leader through a pidfd.
#[derive(Debug)]
struct PidfdWatch {
    pidfd: OwnedFd,
    kill: Arc<GroupKill>,
}

impl ExitWatch for PidfdWatch {
    fn fd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    fn outcome(&mut self) -> io::Result<Option<Outcome>> {
        let leader = || rustix::process::WaitId::PidFd(self.pidfd.as_fd());
        let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG;
        // Look without reaping first: while the leader is a zombie its group id cannot be
        // reused, so what the command left running in its group is killed safely.
        let Some(status) = rustix::process::waitid(leader(), options | WaitIdOptions::NOWAIT)?
        else {
            return Ok(None);
        };
        self.kill.kill();
        rustix::process::waitid(leader(), options)?;
        self.kill.reaped.store(true, Ordering::SeqCst);
        Ok(Some(
            match (status.exit_status(), status.terminating_signal()) {
                (Some(code), _) => Outcome::Exited(u8::try_from(code & 0xff).unwrap_or(255)),
                (None, Some(signal)) => Outcome::signaled(signal),
                (None, None) => Outcome::Lost,
            },
        ))
    }
}
