//! The status page at `/` on the API listener, for an operator's browser: environments with
//! their pools, running executions with their age, image pulls in progress, recent errors and
//! out-of-memory kills, and the server's version, uptime and resource use.
//!
//! Nothing is shown without the token when one is set: it comes in the `Poseidon-Token`
//! header, or once through the login form (`POST /`), which sets a cookie holding a hash of
//! the token with a secret of this process (so the cookie does not reveal the token and ends
//! with the server). Answers forbid framing, caching and any script.

mod page;

use std::{sync::OnceLock, time::Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{App, Reply, Request};
use crate::{error::Result, metrics::Ended};

/// The cookie carrying the session.
const COOKIE: &str = "poseidon_status";

/// Headers of every page.
fn headers() -> Vec<(&'static str, String)> {
    vec![
        ("Content-Type", "text/html; charset=utf-8".into()),
        ("Cache-Control", "no-store".into()),
        (
            "Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
             frame-ancestors 'none'"
                .into(),
        ),
        ("X-Frame-Options", "DENY".into()),
        ("Referrer-Policy", "no-referrer".into()),
    ]
}

fn page(status: u16, headers: Vec<(&'static str, String)>, html: String) -> Reply {
    Reply::Page {
        status,
        headers,
        body: html.into_bytes(),
    }
}

/// The session value for a token: a hash of it with this process's secret.
fn session(token: &str) -> String {
    static SECRET: OnceLock<[u8; 16]> = OnceLock::new();
    let secret = SECRET.get_or_init(|| *uuid::Uuid::new_v4().as_bytes());
    let mut hash = Sha256::new();
    hash.update(secret);
    hash.update(token.as_bytes());
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the request may see the page: no token set, the token in the header, or the
/// session cookie of the login form.
fn allowed(app: &App, request: &Request) -> bool {
    let Some(token) = app.server.required_token() else {
        return true;
    };
    if request.authorized {
        return true;
    }
    let expected = session(token);
    request
        .cookie
        .as_deref()
        .unwrap_or_default()
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .any(|(name, value)| {
            name == COOKIE && bool::from(value.as_bytes().ct_eq(expected.as_bytes()))
        })
}

/// `GET /`: the status page, or the login form (401) without the token.
pub fn show(app: &App, request: &Request) -> Result<Reply> {
    if !allowed(app, request) {
        return Ok(page(401, headers(), page::login(false)));
    }
    Ok(page(200, headers(), page::status(&snapshot(app))))
}

/// `POST /` from the login form: a session cookie and back to the page (303), or the form
/// again (401).
pub fn login(app: &App, request: &Request) -> Result<Reply> {
    let Some(token) = app.server.required_token() else {
        return Ok(see_page(headers()));
    };
    let sent = form_urlencoded::parse(&request.body)
        .find(|(name, _)| name == "token")
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default();
    if !bool::from(sent.as_bytes().ct_eq(token.as_bytes())) {
        return Ok(page(401, headers(), page::login(true)));
    }
    let mut headers = headers();
    headers.push((
        "Set-Cookie",
        format!(
            "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
            session(token)
        ),
    ));
    Ok(see_page(headers))
}

fn see_page(mut headers: Vec<(&'static str, String)>) -> Reply {
    headers.push(("Location", "/".into()));
    page(303, headers, String::new())
}

/// Everything the page shows, taken now.
fn snapshot(app: &App) -> page::Snapshot {
    let now = Instant::now();
    let pools = app.manager.statistics();
    let environments = app
        .manager
        .environments()
        .into_iter()
        .filter_map(|environment| {
            let pool = pools.iter().find(|pool| pool.id == environment.id)?.clone();
            Some((environment, pool))
        })
        .collect();
    let metrics = &app.metrics;
    let since = |started: Instant| now.saturating_duration_since(started).as_secs();
    page::Snapshot {
        release: app.release(),
        executor: app.manager.executor().name(),
        uptime_secs: metrics.uptime().as_secs(),
        process: crate::metrics::process::figures(),
        environments,
        running: (metrics.running().into_iter())
            .map(|execution| {
                let age = since(execution.started);
                (execution, age)
            })
            .collect(),
        pulling: (metrics.pulling().into_iter())
            .map(|pull| {
                let age = since(pull.started);
                (pull, age)
            })
            .collect(),
        recent: metrics.recent(),
        started: metrics.started(),
        ended: Ended::ALL
            .iter()
            .map(|outcome| (*outcome, metrics.ended(*outcome)))
            .collect(),
    }
}
