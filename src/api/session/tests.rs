//! `relay` and `finish` against an in-memory connection: what a client would read, in order.

use std::{cell::Cell, io::Cursor};

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

use super::*;

/// Longest a relay in these tests may take: its time limit, so a wrong test fails instead
/// of hanging.
const TIMEOUT: Duration = Duration::from_secs(20);

/// An in-memory connection: what is written stays in the buffer.
#[derive(Default)]
struct Buffer {
    written: Cursor<Vec<u8>>,
    deadline: Option<Instant>,
    shut_down: bool,
}

impl Read for Buffer {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Ok(0)
    }
}

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink for Buffer {
    fn bound_by(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    fn shut_down(&mut self) {
        self.shut_down = true;
    }
}

fn writer() -> Writer<Buffer> {
    Writer {
        context: WebSocketContext::new(Role::Server, Some(WebSocketConfig::default())),
        stream: Buffer::default(),
    }
}

/// The channels a relay listens to, with their sending ends kept open.
struct Channels {
    events: (Sender<Event>, Receiver<Event>),
    client: (Sender<ClientEvent>, Receiver<ClientEvent>),
    stop: (Sender<StopReason>, Receiver<StopReason>),
}

impl Channels {
    fn new() -> Channels {
        Channels {
            events: bounded(16),
            client: unbounded(),
            stop: bounded(1),
        }
    }

    /// Relays with `limits` into a fresh buffer; returns the final message, the number of
    /// kills and the writer.
    fn relay(&self, limits: SessionLimits) -> (Option<WsMessage>, u32, Writer<Buffer>) {
        let mut writer = writer();
        let kills = Cell::new(0);
        let kill = || kills.set(kills.get() + 1);
        let last = relay(
            &mut writer,
            &mut Output::default(),
            (&self.events.1, &kill),
            (&self.client.1, &self.stop.1),
            limits,
        )
        .last;
        (last, kills.get(), writer)
    }

    fn send(&self, event: Event) {
        self.events.0.send(event).expect("queued");
    }
}

fn limits() -> SessionLimits {
    SessionLimits {
        deadline: Some(Instant::now() + TIMEOUT),
        max_output: None,
        max_message: 1 << 20,
    }
}

/// What a client reads: each text message as JSON, `"close"` for the close frame and
/// `"pong <payload>"` for pongs.
fn frames(writer: Writer<Buffer>) -> Vec<Value> {
    let bytes = writer.stream.written.into_inner();
    let mut client = WebSocket::from_raw_socket(Cursor::new(bytes), Role::Client, None);
    let mut frames = Vec::new();
    loop {
        match client.read() {
            Ok(Message::Text(text)) => {
                frames.push(serde_json::from_str(&text).expect("messages are JSON"));
            }
            Ok(Message::Close(_)) => frames.push(json!("close")),
            Ok(Message::Pong(payload)) => {
                frames.push(json!(format!("pong {}", String::from_utf8_lossy(&payload))));
            }
            Ok(_) => {}
            Err(_) => return frames,
        }
    }
}

#[test]
fn output_goes_out_in_order_and_the_exit_code_comes_last() {
    let channels = Channels::new();
    channels.send(Event::Stdout(b"hi\r\n".to_vec()));
    channels.send(Event::Stderr(b"oops".to_vec()));
    channels.send(Event::Exit(Outcome::Exited(3)));
    let (last, kills, mut writer) = channels.relay(limits());
    assert_eq!(last, Some(WsMessage::Exit(3)));
    assert_eq!(kills, 0);
    finish(&mut writer, last.into(), None);
    assert_eq!(
        frames(writer),
        [
            json!({"type": "stdout", "data": "hi\r\n"}),
            json!({"type": "stderr", "data": "oops"}),
            json!({"type": "exit", "data": 3}),
            json!("close"),
        ]
    );
}

#[test]
fn characters_split_between_reads_arrive_whole() {
    let channels = Channels::new();
    let euro = "€".as_bytes();
    channels.send(Event::Stdout(euro[..2].to_vec()));
    channels.send(Event::Stdout(euro[2..].to_vec()));
    channels.send(Event::Stdout(vec![b'a', euro[0]]));
    channels.send(Event::Exit(Outcome::Exited(0)));
    let (last, _, writer) = channels.relay(limits());
    assert_eq!(last, Some(WsMessage::Exit(0)));
    // An incomplete character at the very end is written out (replaced) before the exit.
    assert_eq!(
        frames(writer),
        [
            json!({"type": "stdout", "data": "€"}),
            json!({"type": "stdout", "data": "a"}),
            json!({"type": "stdout", "data": "\u{fffd}"}),
        ]
    );
}

#[test]
fn output_beyond_the_limit_kills_the_execution() {
    let channels = Channels::new();
    channels.send(Event::Stdout(b"1234".to_vec()));
    channels.send(Event::Stdout(b"5".to_vec()));
    let (last, kills, mut writer) = channels.relay(SessionLimits {
        max_output: Some(4),
        ..limits()
    });
    let error = WsMessage::Error("the output limit was exceeded".into());
    assert_eq!(last, Some(error));
    assert_eq!(kills, 1);
    finish(&mut writer, last.into(), None);
    // The chunk that crossed the limit still goes out, nothing after it.
    assert_eq!(
        frames(writer),
        [
            json!({"type": "stdout", "data": "1234"}),
            json!({"type": "stdout", "data": "5"}),
            json!({"type": "error", "data": "the output limit was exceeded"}),
            json!("close"),
        ]
    );
}

#[test]
fn a_stop_of_the_runner_kills_and_says_why() {
    for (reason, message) in [
        (StopReason::RunnerDeleted, WsMessage::Error(STOPPED.into())),
        (StopReason::InactivityTimeout, WsMessage::Timeout),
        (
            StopReason::Shutdown,
            WsMessage::Error("the server is shutting down".into()),
        ),
    ] {
        let channels = Channels::new();
        channels.stop.0.send(reason).expect("queued");
        let (last, kills, _) = channels.relay(limits());
        assert_eq!(last, Some(message));
        assert_eq!(kills, 1);
    }
}

#[test]
fn a_stop_explains_the_death_it_caused() {
    let channels = Channels::new();
    channels
        .stop
        .0
        .send(StopReason::RunnerDeleted)
        .expect("queued");
    channels.send(Event::Exit(Outcome::Exited(137)));
    let (last, _, _) = channels.relay(limits());
    assert_eq!(last, Some(WsMessage::Error(STOPPED.into())));
}

#[test]
fn the_time_limit_kills_and_reports_a_timeout() {
    let channels = Channels::new();
    let (last, kills, mut writer) = channels.relay(SessionLimits {
        deadline: Some(Instant::now()),
        ..limits()
    });
    assert_eq!(last, Some(WsMessage::Timeout));
    assert_eq!(kills, 1);
    finish(&mut writer, last.into(), None);
    assert_eq!(frames(writer), [json!({"type": "timeout"}), json!("close")]);
}

#[test]
fn pings_are_answered_while_the_execution_runs() {
    let channels = Channels::new();
    channels
        .client
        .0
        .send(ClientEvent::Ping("p1".into()))
        .expect("queued");
    channels.client.0.send(ClientEvent::Gone).expect("queued");
    let (last, kills, writer) = channels.relay(limits());
    assert_eq!(last, None);
    assert_eq!(kills, 0);
    assert_eq!(frames(writer), [json!("pong p1")]);
}

#[test]
fn a_client_that_leaves_gets_nothing_more_but_a_close() {
    let channels = Channels::new();
    channels.client.0.send(ClientEvent::Gone).expect("queued");
    let (last, _, mut writer) = channels.relay(limits());
    assert_eq!(last, None);
    finish(&mut writer, last.into(), None);
    assert_eq!(frames(writer), [json!("close")]);
}

#[test]
fn an_execution_that_vanishes_without_an_end_is_an_error() {
    let channels = Channels::new();
    let (gone, events) = bounded(1);
    drop(gone);
    let mut writer = writer();
    let last = relay(
        &mut writer,
        &mut Output::default(),
        (&events, &|| {}),
        (&channels.client.1, &channels.stop.1),
        limits(),
    )
    .last;
    assert_eq!(last, Some(WsMessage::Error(FAILED.into())));
}

#[test]
fn finish_waits_for_the_clients_close_only_until_it_comes() {
    let (client_tx, client) = unbounded();
    client_tx
        .send(ClientEvent::Ping("late".into()))
        .expect("queued");
    client_tx.send(ClientEvent::Gone).expect("queued");
    let mut writer = writer();
    finish(&mut writer, Some(WsMessage::Exit(1)).into(), Some(&client));
    assert!(client.is_empty(), "finish reads up to the client's close");
    assert!(writer.stream.shut_down, "the connection is shut down");
    assert_eq!(
        frames(writer),
        [json!({"type": "exit", "data": 1}), json!("close")]
    );
}

#[test]
fn a_message_too_large_ends_with_an_explanation_and_close_code_1009() {
    let channels = Channels::new();
    channels
        .client
        .0
        .send(ClientEvent::TooLarge)
        .expect("queued");
    let mut writer = writer();
    let ending = relay(
        &mut writer,
        &mut Output::default(),
        (&channels.events.1, &|| {}),
        (&channels.client.1, &channels.stop.1),
        limits(),
    );
    assert_eq!(ending.code, CloseCode::Size);
    finish(&mut writer, ending, None);
    assert_eq!(
        frames(writer),
        [
            json!({"type": "error", "data": "a message exceeded the largest accepted size (1048576 bytes)"}),
            json!("close"),
        ]
    );
}

#[test]
fn output_writes_wait_at_most_until_the_time_limit_and_the_final_message_longer() {
    let channels = Channels::new();
    channels.send(Event::Stdout(b"x".to_vec()));
    channels.send(Event::Exit(Outcome::Exited(0)));
    let limits = limits();
    let (_, _, mut writer) = channels.relay(limits);
    assert_eq!(writer.stream.deadline, limits.deadline);
    finish(&mut writer, Some(WsMessage::Exit(0)).into(), None);
    assert_eq!(writer.stream.deadline, None);
}
