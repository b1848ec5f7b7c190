//! A runner of the sandbox executor, as the server holds it: the control socket to the
//! runner's agent, the agent's launcher process, the runner's cgroup, directory and uid range,
//! and for environments with network access its interface and port forwarder.
//! Every operation opens its own socket, so runners need no lock and idle ones no thread.

use std::{
    fs,
    io::{self, Read, Write},
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rustix::net::{Shutdown, sockopt::Timeout};

use super::{
    AGENT_ARG,
    agent::{EXECUTE, FILES},
    cgroup::{Group, GroupLimits},
    image, operation,
    protocol::{self, AgentReply, AgentRequest, Setup, SocketReader, SocketWriter},
    reattach::{self, RunnerFile},
    shared::{IDS_PER_RUNNER, Shared},
};
use crate::{
    error::{Error, Result},
    executor::{Command, FileContent, FileUpdate, Process, Runner, RunnerSpec},
    id::RunnerId,
    network::{Attachment, forward::Forwarder, forward::MappedPort},
};

/// How long building a runner may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent gets to end the runner before its processes are killed.
const END_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest listing body accepted from an agent.
const MAX_LISTING: u64 = 256 << 20;

/// A Linux sandbox runner.
#[derive(Debug)]
pub struct SandboxRunner {
    id: RunnerId,
    shared: Arc<Shared>,
    slot: u32,
    dir: PathBuf,
    group: Arc<Group>,
    control: OnceLock<OwnedFd>,
    /// Executions go on their own socket, to the agent's waiting reaper.
    exec: OnceLock<OwnedFd>,
    launcher: Mutex<Option<Child>>,
    net: Mutex<Option<RunnerNet>>,
    destroyed: AtomicBool,
}

/// A networked runner's interface and forwarder; dropping it removes both.
#[derive(Debug)]
struct RunnerNet {
    // Declared first: listeners close before the interface goes.
    forwarder: Option<Forwarder>,
    attachment: Attachment,
}

impl SandboxRunner {
    /// Builds a runner: uid range, directory, cgroup, then the agent; undone on failure.
    pub(super) fn start(shared: &Arc<Shared>, id: &RunnerId, spec: &RunnerSpec) -> Result<Self> {
        let config = &shared.config;
        let lower = shared
            .resolver()
            .lower(spec.environment, &spec.image, image::PULL_WAIT)?;
        if spec.network_access {
            shared.network.check()?;
        }
        let runner = SandboxRunner {
            id: id.clone(),
            shared: shared.clone(),
            slot: shared.take_slot()?,
            dir: shared.dir.join(id.as_str()),
            group: Arc::new(shared.cgroups.group(id.as_str())),
            control: OnceLock::new(),
            exec: OnceLock::new(),
            launcher: Mutex::new(None),
            net: Mutex::new(None),
            destroyed: AtomicBool::new(false),
        };
        // On error, dropping `runner` destroys whatever part of it exists.
        fs::create_dir(&runner.dir)?;
        let memory_mb = match spec.memory_limit {
            0 => config.default_memory_limit_mb,
            mb => u64::from(mb),
        };
        let limits = GroupLimits::new(
            memory_mb,
            config.pids_limit,
            spec.cpu_limit,
            config.cpu_hard_limit,
            config.cpu_mhz,
        );
        let group = shared.cgroups.create(id.as_str(), &limits)?;
        let uid_base = config.uid_base + runner.slot * IDS_PER_RUNNER;
        let file = RunnerFile::new(runner.slot, uid_base);
        file.save(&runner.dir)?;
        let setup = Setup {
            hostname: id.as_str().to_owned(),
            uid_base,
            cgroup_procs: group.procs_files(),
            image: lower.source,
            runner_dir: runner.dir.clone(),
            disk_limit_mb: config.disk_limit_mb,
            resolv_conf: spec.network_access.then(|| shared.network.resolv_conf()),
            env: lower.env,
            secret: file.secret,
        };
        runner.launch(&setup)?;
        if spec.network_access {
            runner.connect(&spec.exposed_ports)?;
        }
        Ok(runner)
    }

    /// Gives the runner its interface and forwards its exposed ports. Runs before the runner
    /// is handed out, so no learner code runs before it is online.
    fn connect(&self, exposed_ports: &[u16]) -> Result<()> {
        let pid = match &*self.launcher.lock().unwrap() {
            Some(child) => child.id(),
            None => {
                return Err(Error::Internal(
                    "sandbox: the runner has no launcher".into(),
                ));
            }
        };
        // The launcher unshared the runner's network namespace before forking the init; it is
        // our unreaped child, so its pid is still its own.
        let netns = rustix::fs::open(
            format!("/proc/{pid}/ns/net"),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|err| Error::internal("sandbox: cannot open the runner's network", err))?;
        let attachment = self.shared.network.attach(netns.as_fd())?;
        let forwarder = match exposed_ports {
            [] => None,
            ports => {
                let config = self.shared.network.config();
                let forwarder = Forwarder::start(
                    config.publish_address,
                    config.advertise_host.as_deref(),
                    std::net::IpAddr::V4(attachment.runner_v4()),
                    ports,
                    config.forward_connections,
                )
                .map_err(|err| Error::internal("sandbox: cannot publish exposed ports", err))?;
                Some(forwarder)
            }
        };
        *self.net.lock().unwrap() = Some(RunnerNet {
            forwarder,
            attachment,
        });
        Ok(())
    }

    /// Takes back the runner an earlier server left in its directory: its init must be alive
    /// and prove itself (see `reattach`); its uid slot is reserved again.
    pub(super) fn adopt(shared: &Arc<Shared>, id: &RunnerId, spec: &RunnerSpec) -> Result<Self> {
        if spec.network_access {
            // Its interface and port forwarder belonged to the server that ended.
            return Err(Error::Internal(format!(
                "runner {id} has network access, which is not taken back yet"
            )));
        }
        let dir = shared.dir.join(id.as_str());
        let file = RunnerFile::load(&dir)?;
        let expected = shared.config.uid_base + file.slot * IDS_PER_RUNNER;
        if file.uid != expected {
            return Err(Error::Internal(format!(
                "runner {id} has uid {}, uid_base now gives {expected}",
                file.uid
            )));
        }
        let suffix = format!("/{}/{}", shared.config.cgroup_name, id.as_str());
        let (exec, exec_theirs) = protocol::socketpair()?;
        let control = reattach::connect(&dir, &file, &suffix, &exec_theirs)
            .map_err(|err| Error::internal(&format!("cannot reach runner {id}"), err))?;
        drop(exec_theirs);
        rustix::net::sockopt::set_socket_timeout(&exec, Timeout::Send, Some(SETUP_TIMEOUT))
            .map_err(io::Error::from)?;
        shared.reserve_slot(file.slot);
        let runner = SandboxRunner {
            id: id.clone(),
            shared: shared.clone(),
            slot: file.slot,
            dir,
            group: Arc::new(shared.cgroups.group(id.as_str())),
            control: OnceLock::new(),
            exec: OnceLock::new(),
            launcher: Mutex::new(None),
            net: Mutex::new(None),
            destroyed: AtomicBool::new(false),
        };
        let _ = runner.control.set(control);
        let _ = runner.exec.set(exec);
        Ok(runner)
    }

    /// Starts the agent and waits until it reports the runner ready.
    fn launch(&self, setup: &Setup) -> Result<()> {
        let (ours, theirs) = protocol::socketpair()?;
        let child = std::process::Command::new(&self.shared.agent)
            .arg(AGENT_ARG)
            .env_clear()
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|err| Error::internal("cannot start the sandbox agent", err))?;
        *self.launcher.lock().unwrap() = Some(child);
        for timeout in [Timeout::Recv, Timeout::Send] {
            rustix::net::sockopt::set_socket_timeout(&ours, timeout, Some(SETUP_TIMEOUT))
                .map_err(io::Error::from)?;
        }
        let (exec, exec_theirs) = protocol::socketpair()?;
        rustix::net::sockopt::set_socket_timeout(&exec, Timeout::Send, Some(SETUP_TIMEOUT))
            .map_err(io::Error::from)?;
        let text = serde_json::to_vec(setup).map_err(io::Error::other)?;
        protocol::send_record(ours.as_fd(), &text, &[exec_theirs.as_fd()])?;
        drop(exec_theirs);
        let (reply, _) = operation::reply(&ours, 0)?;
        if reply != AgentReply::Ready {
            return Err(operation::failure(reply));
        }
        // Sends of operation sockets may block only briefly; replies come on other sockets.
        rustix::net::sockopt::set_socket_timeout(&ours, Timeout::Recv, None)
            .map_err(io::Error::from)?;
        let _ = self.control.set(ours);
        let _ = self.exec.set(exec);
        Ok(())
    }

    /// Opens an operation of `kind` and sends `request` on it.
    fn request(&self, kind: &[u8], request: &AgentRequest) -> Result<OwnedFd> {
        if self.destroyed.load(Ordering::SeqCst) {
            return Err(Error::unknown_runner(&self.id));
        }
        let socket = if kind == EXECUTE {
            &self.exec
        } else {
            &self.control
        };
        let socket = socket
            .get()
            .ok_or_else(|| Error::unknown_runner(&self.id))?;
        let op = operation::open(socket.as_fd(), kind)?;
        let mut out = SocketWriter::new(&op);
        protocol::write_request(&mut out, request)?;
        out.flush()?;
        Ok(op)
    }

    /// Ends the agent and waits for its launcher; kills by cgroup if that takes too long.
    fn end_agent(&self) {
        if let Some(control) = self.control.get() {
            let _ = protocol::send_record(control.as_fd(), reattach::END, &[]);
        }
        self.detach();
        let Some(mut launcher) = self.launcher.lock().unwrap().take() else {
            return;
        };
        // The launcher is our unreaped child, so its pid cannot have been reused.
        let pid = rustix::process::Pid::from_child(&launcher);
        let ended = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            .map(|pidfd| operation::wait_readable(pidfd.as_fd(), END_TIMEOUT))
            .unwrap_or(false);
        if !ended {
            self.group.kill_all();
            let _ = launcher.kill();
        }
        let _ = launcher.wait();
    }

    /// Closes the server's sockets without `end`: the init detaches and waits for the next
    /// server; running executions end with their operation sockets.
    fn detach(&self) {
        for socket in [self.control.get(), self.exec.get()].into_iter().flatten() {
            let _ = rustix::net::shutdown(socket, Shutdown::Both);
        }
    }
}

impl Runner for SandboxRunner {
    fn execute(&self, command: &Command) -> Result<Process> {
        let oom_before = self.group.oom_kills();
        let request = AgentRequest::Execute {
            command: command.command.clone(),
            environment: command.environment.clone(),
            privileged: command.privileged,
        };
        let op = self.request(EXECUTE, &request)?;
        match operation::reply(&op, 2)? {
            (AgentReply::Started, fds) => {
                operation::process(op, fds, self.group.clone(), oom_before)
            }
            (reply, _) => Err(operation::failure(reply)),
        }
    }

    fn list_files(
        &self,
        path: &str,
        recursive: bool,
        privileged: bool,
    ) -> Result<Box<dyn Read + Send>> {
        let request = AgentRequest::List {
            path: path.to_owned(),
            recursive,
            privileged,
        };
        let op = self.request(FILES, &request)?;
        match operation::reply(&op, 0)? {
            (AgentReply::Done(_), _) => Ok(Box::new(SocketReader::new(op, MAX_LISTING))),
            (AgentReply::NotFound, _) => Err(not_found(path)),
            (reply, _) => Err(operation::failure(reply)),
        }
    }

    fn read_file(&self, path: &str, privileged: bool) -> Result<FileContent> {
        let request = AgentRequest::Read {
            path: path.to_owned(),
            privileged,
        };
        let op = self.request(FILES, &request)?;
        match operation::reply(&op, 0)? {
            (AgentReply::Done(Some(length)), _) => {
                let reader = operation::ExactReader::new(SocketReader::new(op, length), length);
                Ok(FileContent {
                    length,
                    reader: Box::new(reader),
                })
            }
            (AgentReply::NotFound, _) => Err(not_found(path)),
            (reply, _) => Err(operation::failure(reply)),
        }
    }

    fn update_files(&self, update: &FileUpdate) -> Result<()> {
        let copy = update
            .copy
            .iter()
            .map(|e| (e.path.clone(), e.content.len() as u64))
            .collect();
        let request = AgentRequest::Update {
            delete: update.delete.clone(),
            copy,
        };
        let op = self.request(FILES, &request)?;
        let mut out = SocketWriter::new(&op);
        // If the agent stops reading (it failed), its reply still explains why.
        let sent = update
            .copy
            .iter()
            .try_for_each(|entry| out.write_all(&entry.content))
            .and_then(|()| out.flush());
        match (operation::reply(&op, 0), sent) {
            (Ok((AgentReply::Done(_), _)), Ok(())) => Ok(()),
            (Ok((AgentReply::NotFound, _)), _) => Err(Error::FileCopy("file not found".into())),
            (Ok((reply, _)), _) => Err(operation::failure(reply)),
            (Err(_), Err(err)) => Err(Error::internal("sandbox: sending files", err)),
            (Err(err), Ok(())) => Err(err),
        }
    }

    fn mapped_ports(&self) -> Vec<MappedPort> {
        let net = self.net.lock().unwrap();
        let forwarder = net.as_ref().and_then(|net| net.forwarder.as_ref());
        forwarder.map_or_else(Vec::new, |forwarder| forwarder.ports().to_vec())
    }

    fn destroy(&self) {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return;
        }
        // Listeners close first; the interface goes once the runner's processes have ended.
        let net = self.net.lock().unwrap().take();
        let attachment = net.map(|net| {
            drop(net.forwarder);
            net.attachment
        });
        self.end_agent();
        drop(attachment);
        if let Err(err) = self.group.remove() {
            // The directory stays, so that the next start finds the group as a leftover; the
            // uid range is not reused while a process of this runner may still hold it.
            log::error!(
                "sandbox: cannot remove the cgroup of runner {}: {err}",
                self.id
            );
            return;
        }
        for name in [reattach::CONTROL_SOCKET, reattach::RUNNER_FILE] {
            let _ = fs::remove_file(self.dir.join(name));
        }
        if let Err(err) = fs::remove_dir(&self.dir)
            && err.kind() != io::ErrorKind::NotFound
        {
            log::warn!("sandbox: cannot remove {}: {err}", self.dir.display());
        }
        self.shared.give_slot(self.slot);
    }

    fn suspend(&self) {
        // Stays alive for the next server; this one forgets it without destroying it.
        if !self.destroyed.swap(true, Ordering::SeqCst) {
            self.detach();
        }
    }
}

impl Drop for SandboxRunner {
    fn drop(&mut self) {
        self.destroy();
    }
}

fn not_found(path: &str) -> Error {
    Error::FileNotFound(if path.is_empty() {
        "./".to_owned()
    } else {
        path.to_owned()
    })
}
