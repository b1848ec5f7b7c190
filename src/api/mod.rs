//! The HTTP API: the one place that knows URLs. [`dispatch`] turns an HTTP exchange into a
//! parsed [`Request`], routes it, checks the token, calls a handler and writes its [`Reply`];
//! errors become Poseidon's status codes and bodies here and nowhere else.

mod environments;
pub mod paths;
mod route;
mod runners;
pub mod session;
mod status;
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

pub use paths::PREFIX;
pub use route::Route;

use crate::{
    config::ServerConfig,
    dto::{ClientError, InternalServerError},
    error::{Error, Result},
    manager::Manager,
    metrics::Metrics,
    server::http::{Exchange, Length},
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
    /// WebSocket sessions running (shutdown waits for their final messages).
    pub sessions: std::sync::atomic::AtomicUsize,
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
    /// Whether the `Poseidon-Token` header carried the token (or none is required).
    pub authorized: bool,
    /// The `Cookie` header (the status page's session).
    pub cookie: Option<String>,
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
    /// A complete body with its status and headers (the status page).
    Page {
        /// The status.
        status: u16,
        /// Headers besides the length.
        headers: Vec<(&'static str, String)>,
        /// The body.
        body: Vec<u8>,
    },
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
            Reply::Page { status, body, .. } => write!(f, "Page({status}, {} bytes)", body.len()),
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
            Reply::Empty(status) | Reply::Json(status, _) | Reply::Page { status, .. } => *status,
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
pub fn dispatch(app: &App, exchange: &mut Exchange) {
    let started = Instant::now();
    let method = exchange.method().clone();
    let target = exchange.target().to_owned();
    let (route, reply) = match catch_unwind(AssertUnwindSafe(|| handle(app, exchange))) {
        Ok(handled) => handled,
        Err(_) => {
            log::error!("handler panicked on {method} {target}");
            let err = Error::Internal("the request handler failed".into());
            ("unknown", error_reply(&err))
        }
    };
    let status = reply.status();
    if status >= 500 {
        notice_error(app, route, &reply);
    }
    // Counted before answering, so that a client sees its request in the next scrape.
    app.metrics.request(route, status, started.elapsed());
    if let Err(err) = respond(exchange, reply) {
        log::debug!("cannot answer {method} {target}: {err}");
    }
    log::debug!("{method} {target} {status} {:?}", started.elapsed());
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
/// (for metrics). A body is read only for a request that gets that far; the connection of
/// any other is closed after the answer.
fn handle(app: &App, exchange: &mut Exchange) -> (&'static str, Reply) {
    let target = exchange.target().to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let route = match Route::parse(exchange.method(), path) {
        Ok(route) => route,
        Err(err) => return ("unknown", error_reply(&err)),
    };
    let name = route.name();
    let authorized = authorized(app, exchange);
    if route.needs_token() && !authorized {
        return (name, error_reply(&Error::Unauthorized));
    }
    let limit = app.server.max_body_bytes;
    if exchange.body_length().is_some_and(|length| length > limit) {
        return (name, error_reply(&Error::PayloadTooLarge(limit)));
    }
    let parsed = match read_request(app, exchange, query) {
        Ok(parsed) => Request {
            authorized,
            ..parsed
        },
        Err(err) => return (name, error_reply(&err)),
    };
    let reply = match route.handle(app, &parsed) {
        Ok(reply) => reply,
        Err(err) => error_reply(&err),
    };
    (name, reply)
}

/// Compares the `Poseidon-Token` header in constant time.
fn authorized(app: &App, exchange: &Exchange) -> bool {
    let sent = exchange.header("poseidon-token").map(str::as_bytes);
    token_matches(&app.server, sent)
}

/// Checks a token sent to the WebSocket listener.
pub fn token_matches(server: &ServerConfig, sent: Option<&[u8]>) -> bool {
    match (server.required_token(), sent) {
        (None, _) => true,
        (Some(token), Some(sent)) => bool::from(sent.ct_eq(token.as_bytes())),
        (Some(_), None) => false,
    }
}

fn read_request(app: &App, exchange: &mut Exchange, query: &str) -> Result<Request> {
    let limit = app.server.max_body_bytes;
    let mut body = Vec::new();
    exchange
        .body()
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
    parsed.host = exchange.header("host").map(str::to_owned);
    parsed.cookie = exchange.header("cookie").map(str::to_owned);
    Ok(parsed)
}

fn respond(exchange: &mut Exchange, reply: Reply) -> io::Result<()> {
    const JSON: (&str, &str) = ("Content-Type", "application/json");
    match reply {
        Reply::Empty(status) => exchange.respond(status, &[], Length::Known(0), &mut io::empty()),
        Reply::Json(status, body) => {
            let length = Length::Known(body.len() as u64);
            exchange.respond(status, &[JSON], length, &mut io::Cursor::new(body))
        }
        Reply::Page {
            status,
            headers,
            body,
        } => {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(name, value)| (*name, value.as_str()))
                .collect();
            let length = Length::Known(body.len() as u64);
            exchange.respond(status, &headers, length, &mut io::Cursor::new(body))
        }
        Reply::Stream {
            headers,
            length,
            mut body,
        } => {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(name, value)| (*name, value.as_str()))
                .collect();
            let length = length.map_or(Length::Chunked, Length::Known);
            exchange.respond(200, &headers, length, &mut body)
        }
    }
}
