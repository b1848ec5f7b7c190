//! WebSocket handshakes, on either listener: the request head (read by the server's front)
//! must be a WebSocket upgrade (else 400, as Poseidon's upgrader answers), and path, token,
//! origin, runner and execution are checked and answered 401/403/404/410 as plain HTTP before
//! any upgrade; then the connection becomes an execution [`super::session`] on a thread of its
//! own.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, TcpStream},
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use tungstenite::{
    WebSocket,
    handshake::derive_accept_key,
    protocol::{Role, WebSocketConfig},
};

use super::{App, Reply, Route, error_reply, paths, session, token_matches};
use crate::{
    error::{Error, Result},
    id::{ExecutionId, RunnerId},
    manager::StartedExecution,
    server::http::{Exchange, Head, Length, Method, conn::write_head},
};

/// A TCP stream that can be told to drop what is written to it: the reading side of a session
/// must never write, because tungstenite's automatic replies would interleave with the frames
/// the writing side sends.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    discard_writes: bool,
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.discard_writes {
            Ok(buf.len())
        } else {
            self.stream.write(buf)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.discard_writes {
            Ok(())
        } else {
            self.stream.flush()
        }
    }
}

/// Answers a handshake request: a refusal, or 101 and a session on a thread of its own.
pub fn handshake(app: &Arc<App>, exchange: Exchange) {
    let arrived = Instant::now();
    let (head, conn) = exchange.into_parts();
    let leftover = conn.pending().to_vec();
    let mut stream = conn.stream;
    let checked = upgrade_key(&head).and_then(|key| Ok((key, authorize(app, &head)?)));
    let status = checked.as_ref().map_or_else(Error::status, |_| 101);
    app.metrics.request("websocket", status, arrived.elapsed());
    let (key, started) = match checked {
        Ok(checked) => checked,
        Err(err) => return refuse(stream, &err),
    };
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    let timeout = Some(app.server.websocket_timeout());
    // From here the reader waits for the client as long as the execution runs.
    let prepared = stream
        .write_all(answer.as_bytes())
        .and_then(|()| stream.set_read_timeout(None))
        .and_then(|()| stream.set_write_timeout(timeout))
        .and_then(|()| stream.try_clone());
    let writer = match prepared {
        Ok(writer) => writer,
        Err(err) => return log::debug!("cannot upgrade a WebSocket connection: {err}"),
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(app.server.max_message_bytes))
        .max_frame_size(Some(app.server.max_message_bytes));
    let reader = Conn {
        stream,
        discard_writes: true,
    };
    let websocket = WebSocket::from_partially_read(reader, leftover, Role::Server, Some(config));
    app.sessions.fetch_add(1, Ordering::SeqCst);
    let session_app = Arc::clone(app);
    let spawned = crate::threads::run("ws", move || {
        session::run(&session_app, websocket, writer, config, started);
        session_app.sessions.fetch_sub(1, Ordering::SeqCst);
    });
    if let Err(err) = spawned {
        app.sessions.fetch_sub(1, Ordering::SeqCst);
        log::error!("cannot start a WebSocket session thread: {err}");
    }
}

/// The `Sec-WebSocket-Key` of a valid upgrade request (RFC 6455 section 4.2.1).
fn upgrade_key(head: &Head) -> Result<String> {
    let refused = |what: &str| {
        Err(Error::bad_request(format!(
            "not a WebSocket handshake: {what}"
        )))
    };
    if head.method != Method::Get {
        return refused("the method is not GET");
    }
    if !head.websocket {
        return refused("no Upgrade: websocket");
    }
    let connection = head.header("connection").unwrap_or_default();
    if !connection
        .split(',')
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
    {
        return refused("no Connection: upgrade");
    }
    if head.header("sec-websocket-version") != Some("13") {
        return refused("Sec-WebSocket-Version is not 13");
    }
    match head.header("sec-websocket-key") {
        Some(key) if !key.is_empty() => Ok(key.to_owned()),
        _ => refused("no Sec-WebSocket-Key"),
    }
}

/// A plain HTTP answer for a refused handshake: the status and body the API answers with
/// ([`error_reply`]); then closes.
fn refuse(mut stream: TcpStream, err: &Error) {
    let (status, body) = match error_reply(err) {
        Reply::Json(status, body) => (status, body),
        Reply::Empty(status) => (status, Vec::new()),
        _ => (500, Vec::new()),
    };
    let headers: &[(&str, &str)] = if body.is_empty() {
        &[]
    } else {
        &[("Content-Type", "application/json")]
    };
    let length = Length::Known(body.len() as u64);
    let mut answer = Vec::new();
    let _ = write_head(&mut answer, status, headers, length, false);
    answer.extend_from_slice(&body);
    let _ = stream.write_all(&answer);
    let _ = stream.shutdown(Shutdown::Write);
    // Read what the client still sends for a moment, so that the answer is not lost to a reset.
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_millis(200)));
    let _ = io::copy(&mut (&stream).take(64 << 10), &mut io::sink());
}

/// Checks a handshake request and takes its execution.
fn authorize(app: &App, head: &Head) -> Result<StartedExecution> {
    let runner = match Route::parse(&Method::Get, head.path()) {
        Ok(Route::WebSocket(runner)) => runner,
        _ => return Err(Error::NotFound),
    };
    let token = head.header("poseidon-token").map(str::as_bytes);
    if !token_matches(&app.server, token) {
        return Err(Error::Unauthorized);
    }
    if !same_origin(head) {
        return Err(Error::Forbidden("request origin not allowed".into()));
    }
    let id = RunnerId::parse(&runner).ok_or(Error::UnknownRunner(runner))?;
    app.manager.check_runner(&id)?;
    let execution = head
        .target
        .split_once('?')
        .and_then(|(_, query)| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(key, _)| key == paths::EXECUTION_PARAMETER)
                .and_then(|(_, value)| ExecutionId::parse(&value))
        })
        .ok_or(Error::UnknownExecution)?;
    app.manager.start_execution(&id, execution)
}

/// Like Poseidon's WebSocket upgrader: a browser's `Origin` must name the host it connects to
/// (requests without `Origin`, as CodeOcean's, pass), so that other sites' pages cannot use
/// a leaked execution URL.
fn same_origin(head: &Head) -> bool {
    let Some(origin) = head.header("origin") else {
        return true;
    };
    let host = head.header("host");
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest.split('/').next().unwrap_or(rest));
    matches!((origin_host, host), (Some(origin), Some(host)) if origin.eq_ignore_ascii_case(host))
}
