//! One execution over one WebSocket: `start`, output chunks, exactly one final message (`exit`,
//! `timeout` or `error`), then close 1000. A reader thread forwards the client's frames to the
//! program's stdin; this thread owns the writing side and waits with `select!` on the
//! execution's output, the client, the runner and the time limit.

use std::{
    io::{PipeWriter, Write},
    net::{Shutdown, TcpStream},
    thread,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender, at, never, select};
use tungstenite::{
    Message, WebSocket,
    protocol::{CloseFrame, Role, WebSocketConfig, WebSocketContext, frame::coding::CloseCode},
};

use super::{App, ws::Conn};
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
    /// The client sent a close frame or the connection ended.
    Gone,
}

/// The writing side of the connection.
struct Writer {
    context: WebSocketContext,
    stream: TcpStream,
}

impl Writer {
    fn write(&mut self, message: &WsMessage) -> tungstenite::Result<()> {
        self.context
            .write(&mut self.stream, Message::text(message.to_json()))
    }

    fn send(&mut self, message: &WsMessage) -> tungstenite::Result<()> {
        self.write(message)?;
        self.context.flush(&mut self.stream)
    }

    fn close(&mut self) -> tungstenite::Result<()> {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        self.context.close(&mut self.stream, Some(frame))?;
        self.context.flush(&mut self.stream)
    }
}

/// Runs a started execution on an upgraded connection until it ends.
pub fn run(
    app: &App,
    reader: WebSocket<Conn>,
    stream: TcpStream,
    config: WebSocketConfig,
    started: StartedExecution,
) {
    let mut writer = Writer {
        context: WebSocketContext::new(Role::Server, Some(config)),
        stream,
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
            finish(&mut writer, last, None);
            return;
        }
    };
    let (client_tx, client) = crossbeam_channel::bounded(4);
    let stdin = running.stdin.take();
    let spawned = thread::Builder::new()
        .name("ws-reader".into())
        .spawn(move || read_client(reader, stdin, &client_tx));
    if spawned.is_err() {
        let last = Some(WsMessage::Error(FAILED.into()));
        record(app, tracker, last.as_ref(), &Output::default());
        finish(&mut writer, last, None);
        return;
    }
    // A limit too large to represent as an instant is no limit.
    let deadline = started
        .pending
        .time_limit
        .and_then(|limit| Instant::now().checked_add(limit));
    let max_output = (app.max_output_bytes > 0).then_some(app.max_output_bytes);
    let limits = Limits {
        deadline,
        max_output,
    };
    let mut output = Output::default();
    let last = relay(
        &mut writer,
        &mut output,
        &running,
        (&client, &started.stop),
        limits,
    );
    running.kill();
    record(app, tracker, last.as_ref(), &output);
    finish(&mut writer, last, Some(&client));
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
struct Limits {
    deadline: Option<Instant>,
    max_output: Option<u64>,
}

/// Forwards output until the execution ends; returns the final message (none when the client
/// is gone).
fn relay(
    writer: &mut Writer,
    output: &mut Output,
    running: &Running,
    (client, stop): (&Receiver<ClientEvent>, &Receiver<StopReason>),
    limits: Limits,
) -> Option<WsMessage> {
    let timer = limits.deadline.map_or_else(never, at);
    loop {
        select! {
            recv(running.events) -> event => {
                let Ok(event) = event else { return Some(WsMessage::Error(FAILED.into())) };
                // Write what is already queued before one flush.
                let queued = running.events.try_iter().take(BATCH);
                for event in std::iter::once(event).chain(queued) {
                    if let Event::Exit(outcome) = event {
                        let last = output.flush(writer);
                        // A stop requested for the runner explains the death of the process.
                        return match stop.try_recv() {
                            Ok(reason) => Some(stop_message(reason)),
                            Err(_) => last.ok().map(|()| outcome_message(outcome)),
                        };
                    }
                    if output.write(writer, event).is_err() {
                        return None;
                    }
                    if limits.max_output.is_some_and(|max| output.bytes() > max) {
                        running.kill();
                        return Some(WsMessage::Error("the output limit was exceeded".into()));
                    }
                }
                if writer.context.flush(&mut writer.stream).is_err() {
                    return None;
                }
            }
            recv(client) -> event => match event {
                Ok(ClientEvent::Ping(payload)) => {
                    let pong = writer.context.write(&mut writer.stream, Message::Pong(payload));
                    if pong.and_then(|()| writer.context.flush(&mut writer.stream)).is_err() {
                        return None;
                    }
                }
                Ok(ClientEvent::Gone) | Err(_) => return None,
            },
            recv(stop) -> reason => {
                running.kill();
                return Some(reason.map_or(WsMessage::Error(STOPPED.into()), stop_message));
            }
            recv(timer) -> _ => {
                running.kill();
                return Some(WsMessage::Timeout);
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

    fn write(&mut self, writer: &mut Writer, event: Event) -> tungstenite::Result<()> {
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
    fn flush(&mut self, writer: &mut Writer) -> tungstenite::Result<()> {
        for message in [
            WsMessage::Stdout(self.stdout.finish()),
            WsMessage::Stderr(self.stderr.finish()),
        ] {
            if matches!(&message, WsMessage::Stdout(text) | WsMessage::Stderr(text) if !text.is_empty())
            {
                writer.write(&message)?;
            }
        }
        writer.context.flush(&mut writer.stream)
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
fn finish(writer: &mut Writer, last: Option<WsMessage>, client: Option<&Receiver<ClientEvent>>) {
    let closed = match &last {
        Some(message) => writer.send(message).and_then(|()| writer.close()).is_ok(),
        // The client is gone or closed: answer its close frame, send nothing else.
        None => writer.close().is_ok(),
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
    let _ = writer.stream.shutdown(Shutdown::Both);
}

/// The reader thread: client frames become stdin; close and errors end it.
fn read_client(
    mut reader: WebSocket<Conn>,
    mut stdin: Option<PipeWriter>,
    events: &Sender<ClientEvent>,
) {
    loop {
        let message = match reader.read() {
            Ok(message) => message,
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
        if let Some(pipe) = stdin.as_mut()
            && pipe.write_all(input).is_err()
        {
            stdin = None;
        }
    }
    let _ = events.send(ClientEvent::Gone);
}
