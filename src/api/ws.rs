//! The WebSocket listener: its own `TcpListener`, one thread per connection. The handshake
//! checks path, token, runner and execution and answers 401/404/410 as plain HTTP before any
//! upgrade; then the connection becomes an execution [`super::session`].

use std::{
    io::{self, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tungstenite::{
    handshake::server::{ErrorResponse, Request, Response},
    http::{self, StatusCode},
    protocol::WebSocketConfig,
};

use super::{App, session, token_matches};
use crate::{
    dto::ClientError,
    error::Error,
    id::{ExecutionId, RunnerId},
    manager::StartedExecution,
};

/// Connections handled at once; more are closed right away.
const MAX_CONNECTIONS: usize = 4096;
/// Pause after a failed `accept()`.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A TCP stream that can be told to drop what is written to it: the reading side of a session
/// must never write, because tungstenite's automatic replies would interleave with the frames
/// the writing side sends.
/// While it has a deadline (during the handshake), every read waits at most until then, so a
/// client that trickles its request in byte by byte is cut off all the same.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    discard_writes: bool,
    deadline: Option<Instant>,
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
        }
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

/// Accepts connections until `stop` is set (and the listener woken by a connection).
pub fn serve(listener: TcpListener, app: Arc<App>, stop: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(stream) => stream,
            Err(err) => {
                // Out of descriptors, say: wait a moment instead of spinning on the error.
                log::warn!("cannot accept a WebSocket connection: {err}");
                thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            log::warn!("too many WebSocket connections; closing a new one");
            continue;
        }
        let (app, connections) = (Arc::clone(&app), Arc::clone(&active));
        let spawned = thread::Builder::new().name("ws".into()).spawn(move || {
            connection(&app, stream);
            connections.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(err) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            log::error!("cannot start a WebSocket thread: {err}");
        }
    }
}

fn connection(app: &App, stream: TcpStream) {
    let timeout = Some(app.server.websocket_timeout());
    let prepared = stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.try_clone());
    let writer = match prepared {
        Ok(writer) => writer,
        Err(err) => return log::debug!("cannot prepare a WebSocket connection: {err}"),
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(app.server.max_message_bytes))
        .max_frame_size(Some(app.server.max_message_bytes));
    let mut started = None;
    let arrived = Instant::now();
    // Handshakes that fail before the request is understood count as bad requests.
    let status = std::cell::Cell::new(400);
    // The callback's error type is fixed by tungstenite's `Callback` trait.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        let authorized = authorize(app, request).map_err(|refusal| *refusal);
        status.set(match &authorized {
            Ok(_) => 101,
            Err(refusal) => refusal.status().as_u16(),
        });
        started = Some(authorized?);
        Ok(response)
    };
    let conn = Conn {
        stream,
        discard_writes: false,
        deadline: Some(Instant::now() + app.server.websocket_timeout()),
    };
    let accepted = tungstenite::accept_hdr_with_config(conn, callback, Some(config));
    app.metrics
        .request("websocket", status.get(), arrived.elapsed());
    let mut websocket = match accepted {
        Ok(websocket) => websocket,
        Err(err) => {
            log::debug!("WebSocket handshake failed: {err}");
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
    };
    let Some(started) = started else { return };
    websocket.get_mut().discard_writes = true;
    websocket.get_mut().deadline = None;
    // From here the reader waits for the client as long as the execution runs.
    let _ = websocket.get_ref().stream.set_read_timeout(None);
    session::run(app, websocket, writer, config, started);
}

/// Checks a handshake request and takes its execution.
fn authorize(app: &App, request: &Request) -> Result<StartedExecution, Box<ErrorResponse>> {
    let path = request.uri().path();
    let runner = path
        .strip_prefix("/api/v1/runners/")
        .and_then(|rest| rest.strip_suffix("/websocket"))
        .filter(|runner| !runner.is_empty() && !runner.contains('/'))
        .ok_or_else(|| reject(&Error::NotFound))?;
    let token = request
        .headers()
        .get("Poseidon-Token")
        .map(http::HeaderValue::as_bytes);
    if !token_matches(&app.server, token) {
        return Err(reject(&Error::Unauthorized));
    }
    if !same_origin(request) {
        return Err(reject(&Error::Forbidden(
            "request origin not allowed".into(),
        )));
    }
    let id =
        RunnerId::parse(runner).ok_or_else(|| reject(&Error::UnknownRunner(runner.to_owned())))?;
    app.manager.check_runner(&id).map_err(|err| reject(&err))?;
    let execution = request
        .uri()
        .query()
        .and_then(|query| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(key, _)| key == "executionID")
                .and_then(|(_, value)| ExecutionId::parse(&value))
        })
        .ok_or_else(|| reject(&Error::UnknownExecution))?;
    app.manager
        .start_execution(&id, execution)
        .map_err(|err| reject(&err))
}

/// Like Poseidon's WebSocket upgrader: a browser's `Origin` must name the host it connects to
/// (requests without `Origin`, as CodeOcean's, pass), so that other sites' pages cannot use
/// a leaked execution URL.
fn same_origin(request: &Request) -> bool {
    let Some(origin) = request.headers().get(http::header::ORIGIN) else {
        return true;
    };
    let host = request
        .headers()
        .get(http::header::HOST)
        .and_then(|host| host.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|origin| origin.split_once("://"))
        .map(|(_, rest)| rest.split('/').next().unwrap_or(rest));
    matches!((origin_host, host), (Some(origin), Some(host)) if origin.eq_ignore_ascii_case(host))
}

/// A plain HTTP answer for a refused handshake, with Poseidon's status and body.
fn reject(err: &Error) -> Box<ErrorResponse> {
    let body = (!err.has_empty_body()).then(|| {
        serde_json::to_string(&ClientError {
            message: &err.to_string(),
        })
        .unwrap_or_default()
    });
    let mut response = ErrorResponse::new(body);
    *response.status_mut() = StatusCode::from_u16(err.status()).unwrap_or(StatusCode::BAD_REQUEST);
    if response.body().is_some() {
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
    Box::new(response)
}
