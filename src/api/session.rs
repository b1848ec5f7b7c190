//! One execution over one WebSocket: `start`, output chunks, exactly one final message (`exit`,
//! `timeout` or `error`), then close 1000. A reader thread forwards the client's frames to the
//! program's stdin; this thread owns the writing side and waits with `select!` on the
//! execution's output, the client, the runner and the time limit.
//!
//! Neither side lets a client stretch what it should not: writes to a client that does not
//! read wait at most until the time limit (then the program ends and the `timeout` message
//! waits for the client to read again), and input is written to the program without ever
//! blocking the reading of frames (input a program does not read is dropped beyond its pipe),
//! so a close is always seen.

use std::{
    io::{PipeWriter, Read, Write},
    net::{Shutdown, TcpStream},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender, at, never, select};
use tungstenite::{
    Message, WebSocket,
    protocol::{CloseFrame, Role, WebSocketConfig, WebSocketContext, frame::coding::CloseCode},
};

use super::App;
use crate::{
    dto::WsMessage,
    executor::{
        Outcome,
        output::{Event, Running, utf8::Utf8Stream},
    },
    manager::{StartedExecution, StopReason},
    metrics::{Ended, ExecutionGuard},
};

/// How long to wait for the client's close frame after ours.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// Input buffered for a program that does not read it (the stdin pipe's size); more is dropped.
const STDIN_BUFFER: usize = 1 << 20;
/// Output events written before one flush.
const BATCH: usize = 16;

/// Error texts CodeOcean knows.
const OOM_KILLED: &str = "the allocation was OOM Killed";
const STOPPED: &str = "the allocation stopped as expected";
const FAILED: &str = "Error executing the request";

/// What the reader thread reports.
#[derive(Debug)]
enum ClientEvent {
    Ping(tungstenite::Bytes),
    /// The client sent a message larger than `server.max_message_bytes`.
    TooLarge,
    /// The client sent a close frame or the connection ended.
    Gone,
}

/// How the session ends: the final message (none when the client is gone) and the close code.
struct Ending {
    last: Option<WsMessage>,
    code: CloseCode,
}

impl From<Option<WsMessage>> for Ending {
    fn from(last: Option<WsMessage>) -> Ending {
        Ending {
            last,
            code: CloseCode::Normal,
        }
    }
}

/// Where the session writes: the connection ([`Bounded`]), in tests a buffer. (tungstenite
/// wants `Read` too, but never reads while writing.)
trait Sink: Read + Write {
    /// Makes writes wait no longer than `deadline` (nor the usual timeout).
    fn bound_by(&mut self, deadline: Option<Instant>);
    /// Ends the connection in both directions.
    fn shut_down(&mut self);
}

/// The writing side of the connection.
struct Writer<S: Sink> {
    context: WebSocketContext,
    stream: S,
}

/// The socket, whose every write waits for the client at most until a deadline (nor longer
/// than the usual timeout): a client reading a little now and then cannot stretch a write.
struct Bounded {
    stream: TcpStream,
    deadline: Option<Instant>,
    /// How long a write may wait for the client (`server.websocket_timeout_secs`).
    timeout: Duration,
    /// The write timeout the socket has now.
    current: Duration,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.deadline.map_or(self.timeout, |deadline| {
            deadline.saturating_duration_since(Instant::now())
        });
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        let wanted = left.min(self.timeout);
        if wanted != self.current {
            self.stream.set_write_timeout(Some(wanted))?;
            self.current = wanted;
        }
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

impl Read for Bounded {
    /// Never used: the reader thread reads the client.
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Ok(0)
    }
}

impl Sink for Bounded {
    fn bound_by(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    fn shut_down(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl<S: Sink> Writer<S> {
    /// Makes writes wait no longer than `deadline` (nor the usual timeout).
    fn bound_by(&mut self, deadline: Option<Instant>) {
        self.stream.bound_by(deadline);
    }

    fn flush(&mut self) -> tungstenite::Result<()> {
        self.context.flush(&mut self.stream)
    }

    fn write(&mut self, message: &WsMessage) -> tungstenite::Result<()> {
        self.context
            .write(&mut self.stream, Message::text(message.to_json()))
    }

    fn send(&mut self, message: &WsMessage) -> tungstenite::Result<()> {
        self.write(message)?;
        self.flush()
    }

    fn close(&mut self, code: CloseCode) -> tungstenite::Result<()> {
        let frame = CloseFrame {
            code,
            reason: "".into(),
        };
        self.context.close(&mut self.stream, Some(frame))?;
        self.flush()
    }
}

/// Runs a started execution on an upgraded connection until it ends; `reader` is the
/// connection's reading side (it must never write), `stream` its writing side.
pub fn run<R: Read + Write + Send + 'static>(
    app: &App,
    reader: WebSocket<R>,
    stream: TcpStream,
    config: WebSocketConfig,
    started: StartedExecution,
) {
    let timeout = app.server.websocket_timeout();
    let mut writer = Writer {
        context: WebSocketContext::new(Role::Server, Some(config)),
        stream: Bounded {
            stream,
            deadline: None,
            timeout,
            current: timeout,
        },
    };
    if writer.send(&WsMessage::Start).is_err() {
        return;
    }
    let tracker = app
        .metrics
        .execution_started(&started.guard.runner().to_string());
    let running = started
        .runner
        .execute(&started.pending.command)
        .and_then(|process| Running::start(process).map_err(crate::error::Error::from));
    let mut running = match running {
        Ok(running) => running,
        Err(err) => {
            log::warn!("cannot start an execution: {err}");
            let last = Some(WsMessage::Error(FAILED.into()));
            record(app, tracker, last.as_ref(), &Output::default());
            finish(&mut writer, last.into(), None);
            return;
        }
    };
    let (client_tx, client) = crossbeam_channel::bounded(4);
    let stdin = running
        .stdin
        .take()
        .and_then(|pipe| match prepare_stdin(&pipe) {
            Ok(()) => Some(pipe),
            Err(err) => {
                log::warn!("cannot prepare the stdin pipe: {err}");
                None
            }
        });
    let spawned = crate::threads::run("ws-reader", move || read_client(reader, stdin, &client_tx));
    if spawned.is_err() {
        let last = Some(WsMessage::Error(FAILED.into()));
        record(app, tracker, last.as_ref(), &Output::default());
        finish(&mut writer, last.into(), None);
        return;
    }
    // A limit too large to represent as an instant is no limit.
    let deadline = started
        .pending
        .time_limit
        .and_then(|limit| Instant::now().checked_add(limit));
    let max_output = (app.max_output_bytes > 0).then_some(app.max_output_bytes);
    let limits = SessionLimits {
        deadline,
        max_output,
        max_message: app.server.max_message_bytes,
    };
    let mut output = Output::default();
    let kill = || running.kill();
    let ending = relay(
        &mut writer,
        &mut output,
        (&running.events, &kill),
        (&client, &started.stop),
        limits,
    );
    running.kill();
    record(app, tracker, ending.last.as_ref(), &output);
    finish(&mut writer, ending, Some(&client));
    drop(started.guard);
}

/// Counts the end of an execution; errors and out-of-memory kills go to the status page.
fn record(app: &App, tracker: ExecutionGuard, last: Option<&WsMessage>, output: &Output) {
    let runner = tracker.runner().to_owned();
    let ended = match last {
        None => Ended::Disconnected,
        Some(WsMessage::Exit(_)) => Ended::Exit,
        Some(WsMessage::Timeout) => Ended::Timeout,
        Some(WsMessage::Error(text)) if text == OOM_KILLED => {
            app.metrics.notice(
                "oom",
                format!("runner {runner}: an execution was OOM killed"),
            );
            Ended::Oom
        }
        Some(WsMessage::Error(text)) if text == STOPPED => Ended::Stopped,
        Some(WsMessage::Error(text)) => {
            app.metrics
                .notice("error", format!("runner {runner}: execution error: {text}"));
            Ended::Error
        }
        Some(_) => Ended::Error,
    };
    tracker.finish(ended, output.stdout_bytes, output.stderr_bytes);
}

#[derive(Debug, Clone, Copy)]
struct SessionLimits {
    deadline: Option<Instant>,
    max_output: Option<u64>,
    max_message: usize,
}

impl SessionLimits {
    /// The ending after a write to the client failed: the time limit if it has passed (the
    /// write waited for it), else the client is gone.
    fn write_failed(&self) -> Ending {
        let timed_out = self
            .deadline
            .is_some_and(|deadline| Instant::now() >= deadline);
        Ending::from(timed_out.then_some(WsMessage::Timeout))
    }
}

/// Forwards output until the execution ends; returns how the session ends. `kill` ends the
/// execution early (limits, stops).
fn relay<S: Sink>(
    writer: &mut Writer<S>,
    output: &mut Output,
    (events, kill): (&Receiver<Event>, &dyn Fn()),
    (client, stop): (&Receiver<ClientEvent>, &Receiver<StopReason>),
    limits: SessionLimits,
) -> Ending {
    let timer = limits.deadline.map_or_else(never, at);
    loop {
        select! {
            recv(events) -> event => {
                let Ok(event) = event else { return Some(WsMessage::Error(FAILED.into())).into() };
                // A client that does not read holds a write at most until the time limit.
                writer.bound_by(limits.deadline);
                // Write what is already queued before one flush.
                let queued = events.try_iter().take(BATCH);
                for event in std::iter::once(event).chain(queued) {
                    if let Event::Exit(outcome) = event {
                        let last = output.flush(writer);
                        // A stop requested for the runner explains the death of the process.
                        return match stop.try_recv() {
                            Ok(reason) => Some(stop_message(reason)).into(),
                            Err(_) if last.is_err() => limits.write_failed(),
                            Err(_) => Some(outcome_message(outcome)).into(),
                        };
                    }
                    if output.write(writer, event).is_err() {
                        return limits.write_failed();
                    }
                    if limits.max_output.is_some_and(|max| output.bytes() > max) {
                        kill();
                        return Some(WsMessage::Error("the output limit was exceeded".into())).into();
                    }
                }
                if writer.flush().is_err() {
                    return limits.write_failed();
                }
            }
            recv(client) -> event => match event {
                Ok(ClientEvent::Ping(payload)) => {
                    writer.bound_by(limits.deadline);
                    let pong = writer.context.write(&mut writer.stream, Message::Pong(payload));
                    if pong.and_then(|()| writer.flush()).is_err() {
                        return limits.write_failed();
                    }
                }
                Ok(ClientEvent::TooLarge) => {
                    let max = limits.max_message;
                    return Ending {
                        last: Some(WsMessage::Error(format!(
                            "a message exceeded the largest accepted size ({max} bytes)"
                        ))),
                        code: CloseCode::Size,
                    };
                }
                Ok(ClientEvent::Gone) | Err(_) => return None.into(),
            },
            recv(stop) -> reason => {
                kill();
                return Some(reason.map_or(WsMessage::Error(STOPPED.into()), stop_message)).into();
            }
            recv(timer) -> _ => {
                kill();
                return Some(WsMessage::Timeout).into();
            }
        }
    }
}

/// Output written so far, with a decoder per stream.
#[derive(Default)]
struct Output {
    stdout: Utf8Stream,
    stderr: Utf8Stream,
    stdout_bytes: u64,
    stderr_bytes: u64,
}

impl Output {
    fn bytes(&self) -> u64 {
        self.stdout_bytes + self.stderr_bytes
    }

    fn write<S: Sink>(&mut self, writer: &mut Writer<S>, event: Event) -> tungstenite::Result<()> {
        let message = match event {
            Event::Stdout(bytes) => {
                self.stdout_bytes += bytes.len() as u64;
                WsMessage::Stdout(self.stdout.decode(&bytes))
            }
            Event::Stderr(bytes) => {
                self.stderr_bytes += bytes.len() as u64;
                WsMessage::Stderr(self.stderr.decode(&bytes))
            }
            Event::Exit(_) => return Ok(()),
        };
        match &message {
            WsMessage::Stdout(text) | WsMessage::Stderr(text) if text.is_empty() => Ok(()),
            _ => writer.write(&message),
        }
    }

    /// Writes what the decoders still hold (incomplete characters at the very end).
    fn flush<S: Sink>(&mut self, writer: &mut Writer<S>) -> tungstenite::Result<()> {
        for message in [
            WsMessage::Stdout(self.stdout.finish()),
            WsMessage::Stderr(self.stderr.finish()),
        ] {
            if matches!(&message, WsMessage::Stdout(text) | WsMessage::Stderr(text) if !text.is_empty())
            {
                writer.write(&message)?;
            }
        }
        writer.flush()
    }
}

fn outcome_message(outcome: Outcome) -> WsMessage {
    match outcome {
        Outcome::Exited(code) => WsMessage::Exit(code),
        Outcome::OomKilled => WsMessage::Error(OOM_KILLED.into()),
        Outcome::Lost => WsMessage::Error(FAILED.into()),
    }
}

fn stop_message(reason: StopReason) -> WsMessage {
    match reason {
        StopReason::InactivityTimeout => WsMessage::Timeout,
        StopReason::RunnerDeleted => WsMessage::Error(STOPPED.into()),
        StopReason::Shutdown => WsMessage::Error("the server is shutting down".into()),
    }
}

/// Sends the final message and a close frame, waits briefly for the client's close, and shuts
/// the connection down.
/// The program has ended by now: the final message waits the usual timeout for the client.
fn finish<S: Sink>(writer: &mut Writer<S>, ending: Ending, client: Option<&Receiver<ClientEvent>>) {
    writer.bound_by(None);
    let code = ending.code;
    let closed = match &ending.last {
        Some(message) => writer
            .send(message)
            .and_then(|()| writer.close(code))
            .is_ok(),
        // The client is gone or closed: answer its close frame, send nothing else.
        None => writer.close(code).is_ok(),
    };
    if closed && let Some(client) = client {
        let deadline = at(Instant::now() + CLOSE_WAIT);
        loop {
            select! {
                recv(client) -> event => match event {
                    Ok(ClientEvent::Ping(_)) => continue,
                    _ => break,
                },
                recv(deadline) -> _ => break,
            }
        }
    }
    writer.stream.shut_down();
}

/// Makes the stdin pipe non-blocking with room for [`STDIN_BUFFER`] bytes (as far as the
/// system allows).
fn prepare_stdin(pipe: &PipeWriter) -> std::io::Result<()> {
    use rustix::fs::OFlags;
    let _ = rustix::pipe::fcntl_setpipe_size(pipe, STDIN_BUFFER);
    let flags = rustix::fs::fcntl_getfl(pipe)?;
    rustix::fs::fcntl_setfl(pipe, flags | OFlags::NONBLOCK)?;
    Ok(())
}

/// The reader thread: client frames become stdin; close and errors end it.
fn read_client<R: Read + Write>(
    mut reader: WebSocket<R>,
    mut stdin: Option<PipeWriter>,
    events: &Sender<ClientEvent>,
) {
    loop {
        let message = match reader.read() {
            Ok(message) => message,
            Err(tungstenite::Error::Capacity(_)) => {
                let _ = events.send(ClientEvent::TooLarge);
                return;
            }
            Err(_) => break,
        };
        let input: &[u8] = match &message {
            Message::Text(text) => text.as_bytes(),
            Message::Binary(bytes) => bytes,
            Message::Ping(payload) => {
                if events.send(ClientEvent::Ping(payload.clone())).is_err() {
                    return;
                }
                continue;
            }
            Message::Close(_) => break,
            Message::Pong(_) | Message::Frame(_) => continue,
        };
        // A program that ended no longer reads its input; keep reading frames for the close.
        // The pipe never blocks: what does not fit is input the program does not read.
        if let Some(pipe) = stdin.as_mut() {
            match pipe.write_all(input) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    log::debug!("input dropped: the program does not read its input");
                }
                Err(_) => stdin = None,
            }
        }
    }
    let _ = events.send(ClientEvent::Gone);
}

#[cfg(test)]
mod tests;
