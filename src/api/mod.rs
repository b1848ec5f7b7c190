//! The HTTP API: the one place that knows URLs. [`dispatch`] turns a tiny_http request into a
//! parsed [`Request`], routes it, checks the token, calls a handler and writes its [`Reply`];
//! errors become Poseidon's status codes and bodies here and nowhere else.

mod environments;
mod route;
mod runners;
pub mod session;
pub mod ws;

use std::{
    collections::HashMap,
    io::{self, Read},
    panic::{AssertUnwindSafe, catch_unwind},
    sync::Arc,
    time::Instant,
};

use serde::Serialize;
use subtle::ConstantTimeEq;
use tiny_http::{Header, Response, StatusCode};

pub use route::Route;

use crate::{
    config::ServerConfig,
    dto::{ClientError, InternalServerError},
    error::{Error, Result},
    manager::Manager,
    metrics::Metrics,
};

/// What handlers share.
#[derive(Debug)]
pub struct App {
    /// Runner management.
    pub manager: Arc<Manager>,
    /// Server settings (token, limits, URLs).
    pub server: ServerConfig,
    /// Port of the WebSocket listener, for the URLs handed out by `execute`.
    pub websocket_port: u16,
    /// Largest output of one execution (0 = unlimited).
    pub max_output_bytes: u64,
    /// What the server counts.
    pub metrics: Arc<Metrics>,
}

impl App {
    /// The release served by `/version`.
    pub fn release(&self) -> String {
        self.server
            .release
            .clone()
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
    }

    /// Every metric in Prometheus' text format.
    pub fn metrics_text(&self) -> String {
        let pools = self.manager.statistics();
        crate::metrics::text::render(&self.metrics, &pools, &self.release())
    }
}

/// A parsed request, free of tiny_http.
#[derive(Debug, Default)]
pub struct Request {
    /// Query parameters (percent-decoded; the first occurrence wins).
    pub query: HashMap<String, String>,
    /// The `Host` header.
    pub host: Option<String>,
    /// The body (empty for requests without one).
    pub body: Vec<u8>,
}

impl Request {
    /// A boolean query parameter parsed like Go's `strconv.ParseBool`; `None` if absent or
    /// unparsable.
    pub fn flag(&self, name: &str) -> Option<bool> {
        match self.query.get(name)?.as_str() {
            "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
            "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
            _ => None,
        }
    }
}

/// What a handler answers.
pub enum Reply {
    /// A status without body.
    Empty(u16),
    /// A JSON body.
    Json(u16, Vec<u8>),
    /// A streamed body; without a length it is sent chunked.
    Stream {
        /// Headers besides the length.
        headers: Vec<(&'static str, String)>,
        /// Exact length, if known.
        length: Option<u64>,
        /// The body.
        body: Box<dyn Read + Send>,
    },
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Empty(status) => write!(f, "Empty({status})"),
            Reply::Json(status, body) => write!(f, "Json({status}, {} bytes)", body.len()),
            Reply::Stream { length, .. } => write!(f, "Stream({length:?})"),
        }
    }
}

impl Reply {
    /// A JSON reply.
    pub fn json(status: u16, value: &impl Serialize) -> Reply {
        Reply::Json(status, serde_json::to_vec(value).unwrap_or_default())
    }

    fn status(&self) -> u16 {
        match self {
            Reply::Empty(status) | Reply::Json(status, _) => *status,
            Reply::Stream { .. } => 200,
        }
    }
}

/// The reply for an error: Poseidon's status and body shape.
pub fn error_reply(err: &Error) -> Reply {
    let status = err.status();
    if err.has_empty_body() {
        return Reply::Empty(status);
    }
    let message = err.to_string();
    match err.code() {
        Some(code) => {
            log::error!("{message}");
            Reply::json(
                status,
                &InternalServerError {
                    message: &message,
                    error_code: code,
                },
            )
        }
        None => Reply::json(status, &ClientError { message: &message }),
    }
}

/// Handles one request completely: a panic in a handler becomes a 500 and the worker lives on.
pub fn dispatch(app: &App, mut request: tiny_http::Request) {
    let started = Instant::now();
    let method = request.method().clone();
    let url = request.url().to_owned();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let (route, reply, body_read) = handle(app, &mut request);
        let status = reply.status();
        if status >= 500 {
            notice_error(app, route, &reply);
        }
        // Counted before answering, so that a client sees its request in the next scrape.
        app.metrics.request(route, status, started.elapsed());
        // tiny_http drains a body left unread when the request is dropped, for as long as the
        // client keeps sending; bodies up to 1 KiB it has read already. Let a thread of its
        // own do that, not a worker.
        if !body_read && request.body_length().is_some_and(|length| length > 1024) {
            let spawned = std::thread::Builder::new()
                .name("drain".into())
                .spawn(move || respond(request, reply));
            if let Err(err) = spawned {
                log::warn!("cannot start a thread to answer {method} {url}: {err}");
            }
        } else if let Err(err) = respond(request, reply) {
            log::debug!("cannot answer {method} {url}: {err}");
        }
        status
    }));
    match outcome {
        Ok(status) => log::debug!("{method} {url} {status} {:?}", started.elapsed()),
        // The request was consumed by the panicking code; tiny_http answers 500 when it drops.
        Err(_) => log::error!("handler panicked on {method} {url}"),
    }
}

/// Remembers a server error for the status page.
fn notice_error(app: &App, route: &str, reply: &Reply) {
    let detail = match reply {
        Reply::Json(_, body) => String::from_utf8_lossy(body).into_owned(),
        _ => String::new(),
    };
    let status = reply.status();
    app.metrics
        .notice("error", format!("{route} answered {status} {detail}"));
}

/// Routes, authenticates, reads the body and runs the handler; also tells the route's name
/// (for metrics) and whether the body was read.
fn handle(app: &App, request: &mut tiny_http::Request) -> (&'static str, Reply, bool) {
    let url = request.url().to_owned();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let route = match Route::parse(request.method(), path) {
        Ok(route) => route,
        Err(err) => return ("unknown", error_reply(&err), false),
    };
    let name = route.name();
    if route.needs_token() && !authorized(app, request) {
        return (name, error_reply(&Error::Unauthorized), false);
    }
    let limit = app.server.max_body_bytes;
    if request
        .body_length()
        .is_some_and(|length| length as u64 > limit)
    {
        return (name, error_reply(&Error::PayloadTooLarge(limit)), false);
    }
    let parsed = match read_request(app, request, query) {
        Ok(parsed) => parsed,
        Err(err) => return (name, error_reply(&err), false),
    };
    let reply = match route.handle(app, &parsed) {
        Ok(reply) => reply,
        Err(err) => error_reply(&err),
    };
    (name, reply, true)
}

/// Compares the `Poseidon-Token` header in constant time.
fn authorized(app: &App, request: &tiny_http::Request) -> bool {
    let Some(token) = app.server.required_token() else {
        return true;
    };
    request
        .headers()
        .iter()
        .find(|header| header.field.equiv("Poseidon-Token"))
        .is_some_and(|header| bool::from(header.value.as_bytes().ct_eq(token.as_bytes())))
}

/// Checks a token sent to the WebSocket listener.
pub fn token_matches(server: &ServerConfig, sent: Option<&[u8]>) -> bool {
    match (server.required_token(), sent) {
        (None, _) => true,
        (Some(token), Some(sent)) => bool::from(sent.ct_eq(token.as_bytes())),
        (Some(_), None) => false,
    }
}

fn read_request(app: &App, request: &mut tiny_http::Request, query: &str) -> Result<Request> {
    let limit = app.server.max_body_bytes;
    let mut body = Vec::new();
    request
        .as_reader()
        .take(limit + 1)
        .read_to_end(&mut body)
        .map_err(|err| Error::bad_request(format!("cannot read the request body: {err}")))?;
    if body.len() as u64 > limit {
        return Err(Error::PayloadTooLarge(limit));
    }
    let mut parsed = Request {
        body,
        ..Request::default()
    };
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        parsed
            .query
            .entry(key.into_owned())
            .or_insert_with(|| value.into_owned());
    }
    parsed.host = request
        .headers()
        .iter()
        .find(|header| header.field.equiv("Host"))
        .map(|header| header.value.as_str().to_owned());
    Ok(parsed)
}

fn respond(request: tiny_http::Request, reply: Reply) -> io::Result<()> {
    let json = || Header::from_bytes("Content-Type", "application/json").expect("valid header");
    match reply {
        Reply::Empty(status) => request.respond(Response::empty(StatusCode(status))),
        Reply::Json(status, body) => {
            let length = body.len();
            let body = io::Cursor::new(body);
            let response =
                Response::new(StatusCode(status), vec![json()], body, Some(length), None);
            request.respond(response.with_chunked_threshold(usize::MAX))
        }
        Reply::Stream {
            headers,
            length,
            body,
        } => {
            let headers = headers
                .into_iter()
                .filter_map(|(name, value)| Header::from_bytes(name, value).ok())
                .collect();
            let length = length.and_then(|length| usize::try_from(length).ok());
            let response = Response::new(StatusCode(200), headers, body, length, None);
            // A known length is always sent as Content-Length (tiny_http would switch to
            // chunked encoding from 32 KiB on); an unknown one is sent chunked.
            let threshold = if length.is_some() { usize::MAX } else { 0 };
            request.respond(response.with_chunked_threshold(threshold))
        }
    }
}
