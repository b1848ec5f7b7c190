//! A front for a real registry. With authentication, as Docker Hub answers: requests without
//! the token get `401` with `WWW-Authenticate: Bearer realm=…/token,service=…,scope=…`;
//! `/token` hands the token out to the right basic-auth credentials. Everything else is
//! forwarded to the registry; blob downloads can be held until the test opens a gate.

use std::{
    io::Read,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    thread,
};

use base64::Engine as _;

use super::agent;

pub const USER: &str = "learner";
pub const PASSWORD: &str = "pa:ss";
const TOKEN: &str = "test-token-123";

/// A running token front; stops when dropped.
pub struct TokenFront {
    server: Arc<tiny_http::Server>,
    thread: Option<thread::JoinHandle<()>>,
    /// `127.0.0.1:<port>`.
    pub host: String,
    /// Tokens handed out.
    pub tokens: Arc<AtomicU32>,
    /// Requests refused for a missing token.
    pub challenges: Arc<AtomicU32>,
    /// Requests answered 503 (flaky fronts).
    pub failures: Arc<AtomicU32>,
    /// Blob requests redirected to the registry (flaky fronts).
    pub redirects: Arc<AtomicU32>,
    gate: Option<crossbeam_channel::Sender<()>>,
}

impl TokenFront {
    /// Starts a front for the registry at `upstream` (`http://127.0.0.1:<port>`).
    pub fn start(upstream: String) -> TokenFront {
        Self::with(upstream, Some(true), Vec::new(), false)
    }

    /// A front whose token endpoint hands tokens to anyone, as Docker Hub does for public
    /// repositories: the client must still answer the challenge.
    pub fn anonymous(upstream: String) -> TokenFront {
        Self::with(upstream, Some(false), Vec::new(), false)
    }

    /// A front that answers every other request with 503 and redirects blob downloads to the
    /// registry itself, as registries redirect to their storage.
    pub fn flaky(upstream: String) -> TokenFront {
        Self::with(upstream, None, Vec::new(), true)
    }

    /// A front without authentication whose downloads of the `held` blobs wait until
    /// [`TokenFront::open`].
    pub fn gated(upstream: String, held: Vec<String>) -> TokenFront {
        Self::with(upstream, None, held, false)
    }

    /// Lets held and later blob downloads through.
    pub fn open(&mut self) {
        self.gate = None;
    }

    fn with(upstream: String, auth: Option<bool>, held: Vec<String>, flaky: bool) -> TokenFront {
        let (gate, gate_rx) = crossbeam_channel::bounded::<()>(0);
        let failures = Arc::new(AtomicU32::new(0));
        let redirects = Arc::new(AtomicU32::new(0));
        let requests = AtomicU32::new(0);
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let host = server.server_addr().to_ip().unwrap().to_string();
        let tokens = Arc::new(AtomicU32::new(0));
        let challenges = Arc::new(AtomicU32::new(0));
        let thread = {
            let (server, host, tokens, challenges) = (
                server.clone(),
                host.clone(),
                tokens.clone(),
                challenges.clone(),
            );
            let (failures, redirects) = (failures.clone(), redirects.clone());
            thread::spawn(move || {
                for request in server.incoming_requests() {
                    if flaky && requests.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
                        failures.fetch_add(1, Ordering::SeqCst);
                        request.respond(tiny_http::Response::empty(503)).ok();
                        continue;
                    }
                    if flaky && request.url().contains("/blobs/") {
                        redirects.fetch_add(1, Ordering::SeqCst);
                        let location = format!("{upstream}{}", request.url());
                        let header = tiny_http::Header::from_bytes("Location", location).unwrap();
                        request
                            .respond(tiny_http::Response::empty(307).with_header(header))
                            .ok();
                        continue;
                    }
                    let (upstream, host) = (upstream.clone(), host.clone());
                    let (tokens, challenges) = (tokens.clone(), challenges.clone());
                    let gate = gate_rx.clone();
                    let hold = held
                        .iter()
                        .any(|digest| request.url().ends_with(digest.as_str()));
                    thread::spawn(move || {
                        if hold {
                            // Disconnection (the test opened the gate or ended) lets it through.
                            let _ = gate.recv_timeout(super::TIMEOUT);
                        }
                        serve(request, auth, &upstream, &host, &tokens, &challenges)
                    });
                }
            })
        };
        TokenFront {
            server,
            thread: Some(thread),
            host,
            tokens,
            challenges,
            failures,
            redirects,
            gate: Some(gate),
        }
    }
}

fn header<'a>(request: &'a tiny_http::Request, name: &'static str) -> Option<&'a str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

fn serve(
    request: tiny_http::Request,
    auth: Option<bool>,
    upstream: &str,
    host: &str,
    tokens: &AtomicU32,
    challenges: &AtomicU32,
) {
    let url = request.url().to_owned();
    if auth.is_some() && url.starts_with("/token") {
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
        );
        let credentials_ok =
            auth == Some(false) || header(&request, "Authorization") == Some(expected.as_str());
        if !credentials_ok
            || !url.contains("scope=repository%3A") && !url.contains("scope=repository:")
        {
            request
                .respond(tiny_http::Response::from_string("denied").with_status_code(401))
                .ok();
            return;
        }
        tokens.fetch_add(1, Ordering::SeqCst);
        request
            .respond(tiny_http::Response::from_string(format!(
                r#"{{"token":"{TOKEN}"}}"#
            )))
            .ok();
        return;
    }
    if auth.is_some() && header(&request, "Authorization") != Some(&format!("Bearer {TOKEN}")) {
        challenges.fetch_add(1, Ordering::SeqCst);
        let challenge = format!(
            r#"Bearer realm="http://{host}/token",service="test-registry",scope="repository:x:pull""#
        );
        let response = tiny_http::Response::from_string(r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#)
            .with_status_code(401)
            .with_header(tiny_http::Header::from_bytes("WWW-Authenticate", challenge).unwrap());
        request.respond(response).ok();
        return;
    }
    let mut forward = agent().get(&format!("{upstream}{url}"));
    if let Some(accept) = header(&request, "Accept") {
        forward = forward.header("Accept", accept);
    }
    let Ok(response) = forward.call() else {
        request.respond(tiny_http::Response::empty(502)).ok();
        return;
    };
    let status = response.status().as_u16();
    let mut headers = Vec::new();
    for name in ["content-type", "docker-content-digest", "location"] {
        if let Some(value) = response.headers().get(name) {
            headers.push(tiny_http::Header::from_bytes(name, value.as_bytes()).unwrap());
        }
    }
    let mut body = Vec::new();
    response
        .into_body()
        .into_reader()
        .read_to_end(&mut body)
        .ok();
    let mut reply = tiny_http::Response::from_data(body).with_status_code(status);
    for h in headers {
        reply.add_header(h);
    }
    request.respond(reply).ok();
}

impl Drop for TokenFront {
    fn drop(&mut self) {
        self.gate = None;
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            thread.join().ok();
        }
    }
}
