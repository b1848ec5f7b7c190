//! Drives the I/O of one running execution with a single thread blocked in `poll(2)`: terminal
//! output and stderr go out as events over a bounded channel (so a slow consumer slows the
//! program instead of growing memory), stdin bytes come in through a pipe, and the end of the
//! process comes last, after both output streams are drained.

pub mod utf8;

use std::{
    io::{self, PipeReader, PipeWriter, Read},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender};
use rustix::{
    event::{EventfdFlags, PollFd, PollFlags, Timespec},
    fs::OFlags,
    io::Errno,
};

use crate::executor::{ExitWatch, Kill, Outcome, Process};

/// Largest output event (several reads of a stream are gathered into one).
const CHUNK: usize = 64 << 10;
/// Chunks buffered between the I/O thread and the consumer.
const QUEUE: usize = 8;
/// How long output may still trickle in after the process ended (descendants that escaped its
/// process group can keep the terminal open; the process executor cannot kill them).
const DRAIN: Duration = Duration::from_secs(1);

/// What a running execution produces.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Terminal output (stdout and echoed stdin).
    Stdout(Vec<u8>),
    /// Standard error.
    Stderr(Vec<u8>),
    /// The end; always the last event.
    Exit(Outcome),
}

/// A running execution.
#[derive(Debug)]
pub struct Running {
    /// Output and the end, in order per stream.
    pub events: Receiver<Event>,
    /// Bytes written here reach the program's terminal; taken by whoever forwards input.
    pub stdin: Option<PipeWriter>,
    kill: Arc<dyn Kill>,
    cancel: OwnedFd,
}

impl Running {
    /// Starts the I/O thread for a process.
    pub fn start(process: Process) -> io::Result<Running> {
        let (stdin_reader, stdin) = io::pipe()?;
        let (tx, events) = crossbeam_channel::bounded(QUEUE);
        let cancel = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        // Both streams are read until they have nothing more (see `read_output`).
        rustix::fs::fcntl_setfl(&process.pty, OFlags::NONBLOCK)?;
        rustix::fs::fcntl_setfl(&process.stderr, OFlags::NONBLOCK)?;
        let pump = Pump {
            pty: process.pty,
            pty_open: true,
            stderr: Some(process.stderr),
            exit: process.exit,
            stdin: Some(stdin_reader),
            cancel: cancel.try_clone()?,
            events: tx,
            pending: Vec::new(),
            outcome: None,
        };
        crate::threads::run("exec-io", move || pump.run())?;
        Ok(Running {
            events,
            stdin: Some(stdin),
            kill: process.kill,
            cancel,
        })
    }

    /// Kills the process and everything it started.
    pub fn kill(&self) {
        self.kill.kill();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Nobody consumes the execution any more: end it and release the I/O thread.
        self.kill.kill();
        let _ = rustix::io::write(&self.cancel, &1u64.to_ne_bytes());
    }
}

struct Pump {
    /// The terminal's master side. It stays open until the process has been reaped even when
    /// the program closed its side: closing it hangs the terminal up, and programs that close
    /// stdin and stdout before they exit (coreutils do) would die of SIGHUP.
    pty: OwnedFd,
    /// Whether terminal output may still come.
    pty_open: bool,
    stderr: Option<OwnedFd>,
    exit: Box<dyn ExitWatch>,
    stdin: Option<PipeReader>,
    cancel: OwnedFd,
    events: Sender<Event>,
    /// Input read from the stdin pipe, not yet written to the terminal.
    pending: Vec<u8>,
    outcome: Option<(Outcome, Instant)>,
}

/// The terminal's `ONLCR` output mapping: every `\n` becomes `\r\n`, exactly what the kernel
/// would produce with its output processing on (see [`crate::executor::pty`]).
pub fn onlcr(bytes: &[u8]) -> Vec<u8> {
    // Byte by byte: output of one-character lines (`yes`) makes run-wise copying slower.
    let mut mapped = Vec::with_capacity(bytes.len() + bytes.len() / 4);
    for &byte in bytes {
        if byte == b'\n' {
            mapped.push(b'\r');
        }
        mapped.push(byte);
    }
    mapped
}

/// Indices of the descriptors polled.
const PTY: usize = 0;
const STDERR: usize = 1;
const EXIT: usize = 2;
const STDIN: usize = 3;
const CANCEL: usize = 4;

impl Pump {
    fn run(mut self) {
        if let Err(err) = self.pump() {
            log::debug!("execution i/o ended: {err}");
        }
    }

    fn pump(&mut self) -> io::Result<()> {
        let mut buffer = vec![0; CHUNK];
        loop {
            if let Some((outcome, since)) = self.outcome
                && ((!self.pty_open && self.stderr.is_none()) || since.elapsed() >= DRAIN)
            {
                return self.send(Event::Exit(outcome));
            }
            let ready = self.wait()?;
            if ready[CANCEL] {
                return Ok(());
            }
            if ready[PTY] {
                self.read_output(true, &mut buffer)?;
            }
            if ready[STDERR] {
                self.read_output(false, &mut buffer)?;
            }
            if ready[STDIN] {
                self.read_stdin(&mut buffer);
            }
            if ready[PTY] || !self.pending.is_empty() {
                self.write_stdin();
            }
            if ready[EXIT] && self.outcome.is_none() {
                let outcome = self.exit.outcome().unwrap_or(Some(Outcome::Lost));
                self.outcome = outcome.map(|outcome| (outcome, Instant::now()));
            }
        }
    }

    /// Polls every open descriptor; returns which are ready.
    fn wait(&self) -> io::Result<[bool; 5]> {
        let input = PollFlags::IN;
        let mut pty_flags = input;
        if !self.pending.is_empty() {
            pty_flags |= PollFlags::OUT;
        }
        let exit_flags = if self.outcome.is_none() {
            input
        } else {
            PollFlags::empty()
        };
        let stdin_flags = if self.pending.is_empty() {
            input
        } else {
            PollFlags::empty()
        };
        let exit_fd = self.exit.fd();
        let entries: [(Option<BorrowedFd<'_>>, PollFlags); 5] = [
            (self.pty_open.then(|| self.pty.as_fd()), pty_flags),
            (self.stderr.as_ref().map(AsFd::as_fd), input),
            (Some(exit_fd), exit_flags),
            (self.stdin.as_ref().map(AsFd::as_fd), stdin_flags),
            (Some(self.cancel.as_fd()), input),
        ];
        let mut slots = Vec::with_capacity(5);
        let mut polled = Vec::with_capacity(5);
        for (index, (fd, flags)) in entries.iter().enumerate() {
            if let Some(fd) = fd
                && !flags.is_empty()
            {
                polled.push(PollFd::from_borrowed_fd(*fd, *flags));
                slots.push(index);
            }
        }
        let timeout = self.outcome.map(|(_, since)| {
            let left = DRAIN.saturating_sub(since.elapsed());
            Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: left.subsec_nanos().into(),
            }
        });
        match rustix::event::poll(&mut polled, timeout.as_ref()) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(errno) => return Err(errno.into()),
        }
        let mut ready = [false; 5];
        for (slot, fd) in slots.into_iter().zip(&polled) {
            ready[slot] = !fd.revents().is_empty();
        }
        Ok(ready)
    }

    fn send(&self, event: Event) -> io::Result<()> {
        self.events
            .send(event)
            .map_err(|_| io::Error::other("the consumer is gone"))
    }

    /// Reads what a stream has ready, up to one chunk, and sends it as one event; end of
    /// stream (EOF, or EIO once the terminal's last slave descriptor is closed) closes it.
    /// Gathering several reads into one event matters for fast output: a terminal hands out at
    /// most a few KiB per read, and every event becomes a WebSocket message.
    fn read_output(&mut self, terminal: bool, buffer: &mut [u8]) -> io::Result<()> {
        let fd = match (terminal, &self.stderr) {
            (true, _) if self.pty_open => self.pty.as_fd(),
            (false, Some(stderr)) => stderr.as_fd(),
            _ => return Ok(()),
        };
        let mut filled = 0;
        let ended = loop {
            match rustix::io::read(fd, &mut buffer[filled..]) {
                Ok(0) | Err(Errno::IO) => break true,
                Ok(n) => {
                    filled += n;
                    if filled == buffer.len() {
                        break false;
                    }
                }
                Err(Errno::AGAIN) => break false,
                Err(Errno::INTR) => {}
                Err(errno) => {
                    log::debug!("reading execution output failed: {errno}");
                    break true;
                }
            }
        };
        match (ended, terminal) {
            (true, true) => self.pty_open = false,
            (true, false) => self.stderr = None,
            (false, _) => {}
        }
        match (filled, terminal) {
            (0, _) => Ok(()),
            (n, true) => self.send(Event::Stdout(onlcr(&buffer[..n]))),
            (n, false) => self.send(Event::Stderr(buffer[..n].to_vec())),
        }
    }

    fn read_stdin(&mut self, buffer: &mut [u8]) {
        let Some(stdin) = self.stdin.as_mut() else {
            return;
        };
        match stdin.read(buffer) {
            Ok(0) | Err(_) => self.stdin = None,
            Ok(n) => self.pending.extend_from_slice(&buffer[..n]),
        }
    }

    /// Writes as much pending input as the terminal takes without blocking.
    fn write_stdin(&mut self) {
        if !self.pty_open {
            self.pending.clear();
            return;
        }
        if self.pending.is_empty() {
            return;
        }
        match rustix::io::write(&self.pty, &self.pending) {
            Ok(n) => {
                self.pending.drain(..n);
            }
            Err(Errno::AGAIN) | Err(Errno::INTR) => {}
            Err(_) => self.pending.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::onlcr;

    #[test]
    fn newlines_become_carriage_return_newline_as_on_a_terminal() {
        assert_eq!(onlcr(b"a\nb\n"), b"a\r\nb\r\n");
        assert_eq!(onlcr(b"\r\n"), b"\r\r\n");
        assert_eq!(onlcr(b"no newline"), b"no newline");
        assert_eq!(onlcr(b"\n\n"), b"\r\n\r\n");
        assert!(onlcr(b"").is_empty());
    }
}
