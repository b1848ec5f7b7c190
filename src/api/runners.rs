//! Handlers of the runner routes: provide, delete, files, download, execute.

use std::time::{Duration, Instant};

use base64::Engine;

use super::{App, Reply, Request, paths};
use crate::{
    dto::{self, ExecutionRequest, ExecutionResponse, RunnerRequest, RunnerResponse},
    error::{Error, Result},
    executor::{Command, FileEntry, FileUpdate},
    id::{EnvironmentId, ExecutionId, RunnerId},
    manager::PendingExecution,
};

/// Largest command plus environment: the kernel refuses a longer single argument
/// (`MAX_ARG_STRLEN`), so a longer command could never run.
const MAX_COMMAND_BYTES: usize = 128 << 10;

/// A runner id from a URL; ids that cannot be ours are unknown runners (410).
fn runner_id(text: &str) -> Result<RunnerId> {
    RunnerId::parse(text).ok_or_else(|| Error::UnknownRunner(text.to_owned()))
}

/// `POST /runners`.
pub fn provide(app: &App, request: &Request) -> Result<Reply> {
    let body: RunnerRequest = dto::parse(&request.body)?;
    let timeout = u64::try_from(body.inactivity_timeout)
        .map_err(|_| Error::bad_request("inactivityTimeout must not be negative"))?;
    let started = Instant::now();
    let id = app.manager.claim(
        EnvironmentId(body.environment_id),
        Duration::from_secs(timeout),
    )?;
    app.metrics.claim(started.elapsed());
    used_runners(app, &id, "creation");
    // Deleted meanwhile: the client learns that on its next request.
    let mapped_ports = app
        .manager
        .touch(&id)
        .map(|runner| runner.mapped_ports())
        .unwrap_or_default()
        .into_iter()
        .map(|port| dto::MappedPort {
            exposed_port: port.exposed_port,
            host_address: port.host_address,
        })
        .collect();
    Ok(Reply::json(
        200,
        &RunnerResponse {
            runner_id: id.to_string(),
            mapped_ports,
        },
    ))
}

/// `DELETE /runners/{id}`.
pub fn delete(app: &App, id: &str) -> Result<Reply> {
    let id = runner_id(id)?;
    app.manager.delete_runner(&id)?;
    used_runners(app, &id, "deletion");
    Ok(Reply::Empty(204))
}

/// Poseidon's `poseidon_used_runners` point for a claim or a deletion.
fn used_runners(app: &App, id: &RunnerId, event: &'static str) {
    if !app.metrics.influx_on() {
        return;
    }
    let environment = id.to_string();
    let environment = environment.split('-').next().unwrap_or_default();
    let used = (app.manager.statistics().into_iter())
        .find(|pool| pool.id.to_string() == environment)
        .map_or(0, |pool| pool.used_runners);
    app.metrics.runner_used(&id.to_string(), event, used);
}

/// `GET /runners/{id}/files`: streamed listing; `recursive` defaults to true.
pub fn list_files(app: &App, id: &str, request: &Request) -> Result<Reply> {
    let runner = app.manager.touch(&runner_id(id)?)?;
    let path = request.query.get("path").map_or("./", String::as_str);
    let recursive = request.flag("recursive").unwrap_or(true);
    let privileged = request.flag("privilegedExecution").unwrap_or(false);
    let body = runner.list_files(path, recursive, privileged)?;
    Ok(Reply::Stream {
        headers: vec![("Content-Type", "application/json".to_owned())],
        length: None,
        body,
    })
}

/// `PATCH /runners/{id}/files`: validated completely before anything is changed.
pub fn update_files(app: &App, id: &str, request: &Request) -> Result<Reply> {
    let runner = app.manager.touch(&runner_id(id)?)?;
    let body: dto::UpdateFileSystemRequest = dto::parse(&request.body)?;
    let mut update = FileUpdate {
        delete: body.delete,
        copy: Vec::with_capacity(body.copy.len()),
    };
    for path in &update.delete {
        check_path(path)?;
    }
    for file in body.copy {
        check_path(&file.path)?;
        if file.path.is_empty() {
            return Err(Error::bad_request("a copied file needs a path"));
        }
        let content = decode_base64(&file.content).map_err(|err| {
            Error::bad_request(format!("invalid base64 content of {:?}: {err}", file.path))
        })?;
        update.copy.push(FileEntry {
            path: file.path,
            content,
        });
    }
    runner.update_files(&update)?;
    Ok(Reply::Empty(204))
}

/// Standard padded base64; line breaks inside are ignored, as Go's decoder does.
fn decode_base64(text: &str) -> std::result::Result<Vec<u8>, base64::DecodeError> {
    if text.contains(['\r', '\n']) {
        let joined: String = text.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        return base64::engine::general_purpose::STANDARD.decode(joined);
    }
    base64::engine::general_purpose::STANDARD.decode(text)
}

fn check_path(path: &str) -> Result<()> {
    if path.contains('\0') {
        return Err(Error::bad_request("paths must not contain NUL characters"));
    }
    Ok(())
}

/// `GET /runners/{id}/files/raw`: the file's bytes with their exact length.
pub fn download_file(app: &App, id: &str, request: &Request) -> Result<Reply> {
    let runner = app.manager.touch(&runner_id(id)?)?;
    let path = request.query.get("path").map_or("", String::as_str);
    check_path(path).map_err(|_| Error::FileNotFound(path.to_owned()))?;
    let privileged = request.flag("privilegedExecution").unwrap_or(false);
    let content = runner.read_file(path, privileged)?;
    Ok(Reply::Stream {
        headers: vec![
            ("Content-Type", "application/octet-stream".to_owned()),
            ("Content-Disposition", content_disposition(path)),
        ],
        length: Some(content.length),
        body: content.reader,
    })
}

/// `attachment; filename="<path as given>"` like Poseidon's; a name beyond ASCII (which a
/// header cannot carry) is also given as `filename*` (RFC 6266), its plain form with `_`.
fn content_disposition(path: &str) -> String {
    if path.is_ascii() {
        return format!("attachment; filename=\"{}\"", quote(path));
    }
    let plain: String = path
        .chars()
        .map(|c| if c.is_ascii() { c } else { '_' })
        .collect();
    let encoded: String = path
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!(
        "attachment; filename=\"{}\"; filename*=UTF-8''{encoded}",
        quote(&plain)
    )
}

/// A file name fit for a quoted header parameter.
fn quote(path: &str) -> String {
    path.chars()
        .filter(|c| !c.is_control())
        .flat_map(|c| match c {
            '"' | '\\' => vec!['\\', c],
            c => vec![c],
        })
        .collect()
}

/// `POST /runners/{id}/execute`: stores the execution and answers where to run it.
pub fn execute(app: &App, id: &str, request: &Request) -> Result<Reply> {
    let id = runner_id(id)?;
    app.manager.check_runner(&id)?;
    let body: ExecutionRequest = dto::parse(&request.body)?;
    let pending = pending_execution(body)?;
    let execution = app.manager.store_execution(&id, pending)?;
    let websocket_url = websocket_url(app, request.host.as_deref(), &id, execution);
    Ok(Reply::json(200, &ExecutionResponse { websocket_url }))
}

fn pending_execution(body: ExecutionRequest) -> Result<PendingExecution> {
    if body.command.contains('\'') {
        // Poseidon's only semantic check, kept because clients are written against it.
        return Err(Error::bad_request("use of forbidden character"));
    }
    if body.command.contains('\0') {
        return Err(Error::bad_request(
            "the command must not contain NUL characters",
        ));
    }
    let seconds = u64::try_from(body.time_limit)
        .map_err(|_| Error::bad_request("timeLimit must not be negative"))?;
    for (name, value) in &body.environment {
        let mut chars = name.chars();
        let valid = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(Error::bad_request(format!(
                "invalid environment variable name {name:?}"
            )));
        }
        if value.contains('\0') {
            return Err(Error::bad_request(format!(
                "the value of {name} contains a NUL character"
            )));
        }
    }
    let command = Command {
        command: body.command,
        environment: body.environment.into_iter().collect(),
        privileged: body.privileged_execution,
    };
    if command.size() > MAX_COMMAND_BYTES {
        return Err(Error::bad_request(format!(
            "command and environment exceed {MAX_COMMAND_BYTES} bytes"
        )));
    }
    Ok(PendingExecution {
        command,
        time_limit: (seconds > 0).then(|| Duration::from_secs(seconds)),
    })
}

/// The absolute WebSocket URL of an execution: the configured base, or the request's host
/// with the WebSocket listener's port.
fn websocket_url(app: &App, host: Option<&str>, id: &RunnerId, execution: ExecutionId) -> String {
    let path = paths::websocket_path(id, execution);
    if let Some(base) = &app.server.websocket_url {
        return format!("{}{path}", base.trim_end_matches('/'));
    }
    let host = host
        .map(host_name)
        .filter(|host| {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-_[]:".contains(&b))
        })
        .map_or_else(|| app.server.address.to_string(), str::to_owned);
    let scheme = if app.server.tls.active { "wss" } else { "ws" };
    format!("{scheme}://{host}:{}{path}", app.websocket_port)
}

/// The host part of a `Host` header (`name`, `name:port`, `[v6]:port`).
fn host_name(host: &str) -> &str {
    match host.find(']') {
        Some(end) if host.starts_with('[') => &host[..=end],
        _ => host.split(':').next().unwrap_or(host),
    }
}

/// `GET /runners/{id}/websocket` on the HTTP listener: executions connect to the WebSocket
/// listener, whose URL `execute` returns.
pub fn websocket_on_http(app: &App, id: &str) -> Result<Reply> {
    app.manager.check_runner(&runner_id(id)?)?;
    Err(Error::bad_request(format!(
        "connect to the websocketUrl returned by execute (port {})",
        app.websocket_port
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_lose_their_port() {
        assert_eq!(host_name("example.org:7200"), "example.org");
        assert_eq!(host_name("[::1]:7200"), "[::1]");
        assert_eq!(host_name("runner-host"), "runner-host");
    }

    #[test]
    fn content_disposition_carries_names_beyond_ascii() {
        assert_eq!(
            content_disposition("out.txt"),
            "attachment; filename=\"out.txt\""
        );
        assert_eq!(
            content_disposition("grüße.txt"),
            "attachment; filename=\"gr__e.txt\"; filename*=UTF-8''gr%C3%BC%C3%9Fe.txt"
        );
    }

    #[test]
    fn content_disposition_names_cannot_break_the_header() {
        assert_eq!(quote("a\"b\\c\r\nd"), "a\\\"b\\\\cd");
    }

    #[test]
    fn base64_is_strict_but_ignores_line_breaks() {
        assert_eq!(decode_base64("aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64("aG\r\nk=").unwrap(), b"hi");
        assert!(decode_base64("aGk").is_err());
        assert!(decode_base64("a*k=").is_err());
    }

    #[test]
    fn executions_are_validated() {
        let request = |command: &str, time_limit, env: &[(&str, &str)]| ExecutionRequest {
            command: command.into(),
            time_limit,
            environment: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let message = |r| pending_execution(r).unwrap_err().to_string();
        assert_eq!(
            message(request("echo 'x'", 0, &[])),
            "use of forbidden character"
        );
        assert_eq!(
            message(request("true", -1, &[])),
            "timeLimit must not be negative"
        );
        assert!(
            message(request("true", 0, &[("1A", "x")])).contains("invalid environment variable")
        );
        assert!(message(request(&"x".repeat(200_000), 0, &[])).contains("exceed 131072 bytes"));
        let ok = pending_execution(request("true", 5, &[("A_1", "x y")])).unwrap();
        assert_eq!(ok.time_limit, Some(Duration::from_secs(5)));
        assert_eq!(
            ok.command.environment,
            vec![("A_1".to_string(), "x y".to_string())]
        );
    }
}
