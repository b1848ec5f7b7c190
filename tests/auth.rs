//! Authentication with `Poseidon-Token` and routing: which routes need the token, what a
//! missing or wrong token gets, unknown routes, wrong methods and trailing slashes.

mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
};

use serde_json::json;
use support::{Answer, TIMEOUT, TOKEN, TestServer, Ws, base64, environment_body};

const UNKNOWN_RUNNER: &str = "1-0b7f3c2e-1111-4222-8333-444455556666";
const EXECUTION: &str = "0b7f3c2e-1111-4222-8333-444455556666";

fn start() -> TestServer {
    TestServer::start_with(|config| config.server.token = Some(TOKEN.into()))
}

/// Every route that needs the token, as (method, path, body), for `runner`.
fn protected_routes(runner: &str) -> Vec<(&'static str, String, Option<Vec<u8>>)> {
    let copy = json!({"copy": [{"path": "x.txt", "content": base64(b"x")}]});
    let execute = json!({"command": "true", "timeLimit": 5});
    let claim = json!({"executionEnvironmentId": 1, "inactivityTimeout": 0});
    let body = |value: serde_json::Value| Some(value.to_string().into_bytes());
    vec![
        ("GET", "/statistics/execution-environments".into(), None),
        ("GET", "/execution-environments".into(), None),
        ("GET", "/execution-environments?fetch=true".into(), None),
        ("GET", "/execution-environments/1".into(), None),
        ("GET", "/execution-environments/2".into(), None),
        (
            "PUT",
            "/execution-environments/2".into(),
            body(environment_body(2, 1)),
        ),
        (
            "PUT",
            "/execution-environments/1".into(),
            body(environment_body(1, 5)),
        ),
        ("DELETE", "/execution-environments/1".into(), None),
        ("POST", "/runners".into(), body(claim)),
        ("DELETE", format!("/runners/{runner}"), None),
        ("GET", format!("/runners/{runner}/files"), None),
        (
            "GET",
            format!("/runners/{runner}/files?path=.%2F&privilegedExecution=false&recursive=true"),
            None,
        ),
        ("PATCH", format!("/runners/{runner}/files"), body(copy)),
        (
            "GET",
            format!("/runners/{runner}/files/raw?path=a.txt"),
            None,
        ),
        ("POST", format!("/runners/{runner}/execute"), body(execute)),
        (
            "GET",
            format!("/runners/{runner}/websocket?executionID={EXECUTION}"),
            None,
        ),
    ]
}

/// Sends raw bytes to the HTTP listener and returns the whole answer.
fn raw(server: &TestServer, request: &str) -> String {
    let mut stream = TcpStream::connect(server.handle().http_addr()).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(request.as_bytes()).expect("send");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("answer");
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status and body of a raw answer.
fn status_and_body(answer: &str) -> (u16, &str) {
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, body)
}

#[track_caller]
fn assert_empty(answer: &Answer, status: u16, what: &str) {
    assert_eq!(answer.status, status, "{what}: {}", answer.text());
    assert!(answer.body.is_empty(), "{what}: body {:?}", answer.text());
}

/// Asserts that nothing was changed by refused requests: the environment, its pool and the
/// runner with its file are as before.
#[track_caller]
fn assert_unchanged(server: &TestServer, runner: &str) {
    assert_eq!(
        server.get("/execution-environments").json(),
        json!({"executionEnvironments": [{"prewarmingPoolSize": 1, "cpuLimit": 20,
            "memoryLimit": 256, "image": "openhpi/co_execenv_python:3.8", "networkAccess": false,
            "exposedPorts": [], "id": 1}]})
    );
    assert_eq!(
        server.get("/statistics/execution-environments").json()["1"]["usedRunners"],
        1
    );
    let answer = server.get(&format!("/runners/{runner}/files?path=."));
    let names: Vec<String> = answer.json()["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["./a.txt"], "{}", answer.text());
}

#[test]
fn every_protected_route_is_401_with_an_empty_body_without_or_with_a_wrong_token() {
    let server = start();
    server.environment(1, 1);
    let runner = server.runner(1, 0);
    server.copy(&runner, &[("a.txt", "a")]);
    let (longer, upper, bearer) = (
        format!("{TOKEN}x"),
        TOKEN.to_uppercase(),
        format!("Bearer {TOKEN}"),
    );
    let wrong_tokens = [
        None,
        Some("wrong"),
        Some(""),
        Some(&TOKEN[..TOKEN.len() - 1]),
        Some(longer.as_str()),
        Some(upper.as_str()),
        Some(bearer.as_str()),
    ];
    for token in wrong_tokens {
        for (method, path, body) in protected_routes(&runner) {
            let answer = server.request_with(method, &path, body.as_deref(), token);
            assert_empty(&answer, 401, &format!("{method} {path} with {token:?}"));
        }
    }
    assert_unchanged(&server, &runner);
}

#[test]
fn a_wrong_token_on_an_unknown_runner_is_401_not_410() {
    let server = start();
    for runner in [UNKNOWN_RUNNER, "nonsense"] {
        for (method, path, body) in protected_routes(runner) {
            if !path.starts_with("/runners/") {
                continue;
            }
            for token in [None, Some("wrong")] {
                let answer = server.request_with(method, &path, body.as_deref(), token);
                assert_empty(&answer, 401, &format!("{method} {path} with {token:?}"));
            }
            let answer = server.request(method, &path, body.as_deref());
            assert_eq!(answer.status, 410, "{method} {path}: {}", answer.text());
        }
    }
}

#[test]
fn the_right_token_opens_every_route() {
    let server = start();
    server.environment(1, 1);
    let runner = server.runner(1, 0);
    server.copy(&runner, &[("a.txt", "a")]);
    // Deletions last, the runner before its environment.
    let (deletions, others): (Vec<_>, Vec<_>) = protected_routes(&runner)
        .into_iter()
        .filter(|(_, path, _)| !path.contains("websocket"))
        .partition(|(method, _, _)| *method == "DELETE");
    for (method, path, body) in others.into_iter().chain(deletions.into_iter().rev()) {
        let answer = server.request(method, &path, body.as_deref());
        let fine = match (method, path.as_str()) {
            ("GET", "/execution-environments/2") => answer.status == 404,
            _ => (200..300).contains(&answer.status),
        };
        assert!(fine, "{method} {path}: {} {}", answer.status, answer.text());
    }
}

#[test]
fn an_oversized_request_without_a_token_is_401() {
    let server = TestServer::start_with(|config| {
        config.server.token = Some(TOKEN.into());
        config.server.max_body_bytes = 1024;
    });
    let body = environment_body(1, 0)
        .to_string()
        .replace('}', &format!(",\"pad\":\"{}\"}}", "x".repeat(2048)));
    for token in [None, Some("wrong")] {
        let answer = server.request_with(
            "PUT",
            "/execution-environments/1",
            Some(body.as_bytes()),
            token,
        );
        assert_empty(&answer, 401, &format!("oversized PUT with {token:?}"));
    }
    assert_eq!(
        server
            .request("PUT", "/execution-environments/1", Some(body.as_bytes()))
            .status,
        413
    );
}

#[test]
fn health_and_version_need_no_token() {
    let server = start();
    for token in [None, Some("wrong"), Some(TOKEN)] {
        assert_empty(
            &server.request_with("GET", "/health", None, token),
            204,
            "health",
        );
        let version = server.request_with("GET", "/version", None, token);
        assert_eq!(version.status, 200, "{}", version.text());
        assert!(version.json().is_string());
    }
}

#[test]
fn the_health_alert_is_visible_without_a_token() {
    let server = TestServer::start_with(|config| {
        config.server.token = Some(TOKEN.into());
        config.server.prewarming_pool_threshold = 0.5;
        config.runner.capacity = 1;
    });
    server.environment(1, 4);
    server.wait_idle(1, 1);
    let answer = server.request_with("GET", "/health", None, None);
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert_eq!(answer.json()["errorCode"], "PREWARMING_POOL_DEPLETING");
}

#[test]
fn the_token_is_only_read_from_the_poseidon_token_header() {
    let server = start();
    for header in [
        format!("Authorization: Bearer {TOKEN}"),
        format!("Authorization: {TOKEN}"),
        format!("X-Poseidon-Token: {TOKEN}"),
        format!("Cookie: Poseidon-Token={TOKEN}"),
    ] {
        let request = format!(
            "GET /api/v1/execution-environments HTTP/1.1\r\nHost: x\r\n{header}\r\n\
             Connection: close\r\n\r\n"
        );
        let answer = raw(&server, &request);
        assert_eq!(status_and_body(&answer), (401, ""), "{header}: {answer}");
    }
    let answer = server.request_with(
        "GET",
        &format!("/execution-environments?Poseidon-Token={TOKEN}"),
        None,
        None,
    );
    assert_empty(&answer, 401, "token in the query");
    let request = format!(
        "GET /api/v1/execution-environments HTTP/1.1\r\nHost: x\r\nposeidon-token: {TOKEN}\r\n\
         Connection: close\r\n\r\n"
    );
    assert_eq!(status_and_body(&raw(&server, &request)).0, 200);
}

#[test]
fn the_websocket_handshake_needs_the_token() {
    let server = start();
    server.environment(1, 1);
    let runner = server.runner(1, 0);
    let url = server.execute(&runner, "echo hi", 5);
    for token in [None, Some("wrong")] {
        let err = Ws::connect(&url, token).err().expect("refused");
        assert!(err.contains("401"), "{token:?}: {err}");
    }
    let unknown = format!(
        "ws://{}/api/v1/runners/{UNKNOWN_RUNNER}/websocket?executionID={EXECUTION}",
        server.handle().websocket_addr()
    );
    let err = Ws::connect(&unknown, Some("wrong")).err().expect("refused");
    assert!(err.contains("401"), "{err}");
    // The refused attempts did not use up the execution.
    let transcript = server.connect(&url).transcript();
    assert_eq!(transcript.exit_code(), Some(0));
}

#[test]
fn requests_without_a_body_may_carry_a_json_content_type() {
    let server = start();
    server.environment(1, 1);
    let runner = server.runner(1, 0);
    server.copy(&runner, &[("a.txt", "a")]);
    let get = |path: &str| {
        format!(
            "GET /api/v1{path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Poseidon-Token: {TOKEN}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        )
    };
    for path in [
        "/execution-environments".to_owned(),
        "/statistics/execution-environments".to_owned(),
        format!("/runners/{runner}/files"),
        format!("/runners/{runner}/files/raw?path=a.txt"),
    ] {
        let answer = raw(&server, &get(&path));
        assert_eq!(status_and_body(&answer).0, 200, "{path}: {answer}");
    }
    let answer = raw(&server, &get("/health"));
    assert_eq!(status_and_body(&answer).0, 204, "{answer}");
    let delete = format!(
        "DELETE /api/v1/runners/{runner} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 0\r\nPoseidon-Token: {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(status_and_body(&raw(&server, &delete)), (204, ""));
    let delete = format!(
        "DELETE /api/v1/execution-environments/1 HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/json\r\nPoseidon-Token: {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(status_and_body(&raw(&server, &delete)), (204, ""));
}

#[test]
fn unknown_routes_are_404_with_an_empty_body() {
    let server = start();
    for path in [
        "/nothing",
        "/runners/1-x/nothing",
        "/runners/1-x/files/raw/more",
        "/execution-environments/1/runners",
        "/statistics",
        "/statistics/runners",
    ] {
        for token in [Some(TOKEN), None] {
            let answer = server.request_with("GET", path, None, token);
            assert_empty(&answer, 404, &format!("{path} with {token:?}"));
        }
    }
    // `/` is the status page (tests/status_page.rs).
    for path in ["/health", "/api/health", "/api/v2/health", "/api/v1"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let answer = raw(&server, &request);
        assert_eq!(status_and_body(&answer), (404, ""), "{path}: {answer}");
    }
}

#[test]
fn a_wrong_method_is_405_with_an_empty_body() {
    let server = start();
    server.environment(1, 0);
    let runner = server.runner(1, 0);
    for (method, path) in [
        ("POST", "/health".to_owned()),
        ("DELETE", "/version".to_owned()),
        ("POST", "/statistics/execution-environments".to_owned()),
        ("POST", "/execution-environments".to_owned()),
        ("DELETE", "/execution-environments".to_owned()),
        ("POST", "/execution-environments/1".to_owned()),
        ("PATCH", "/execution-environments/1".to_owned()),
        ("GET", "/runners".to_owned()),
        ("PUT", "/runners".to_owned()),
        ("GET", format!("/runners/{runner}")),
        ("POST", format!("/runners/{runner}")),
        ("PUT", format!("/runners/{runner}/files")),
        ("POST", format!("/runners/{runner}/files")),
        ("DELETE", format!("/runners/{runner}/files/raw")),
        ("GET", format!("/runners/{runner}/execute")),
        ("POST", format!("/runners/{runner}/websocket")),
    ] {
        let answer = server.request(method, &path, None);
        assert_empty(&answer, 405, &format!("{method} {path}"));
    }
    assert_eq!(server.get(&format!("/runners/{runner}/files")).status, 200);
    assert_eq!(server.get("/execution-environments/1").status, 200);
}

#[test]
fn a_trailing_slash_is_404() {
    let server = start();
    server.environment(1, 0);
    let runner = server.runner(1, 0);
    for (method, path) in [
        ("GET", "/health/".to_owned()),
        ("GET", "/version/".to_owned()),
        ("GET", "/statistics/execution-environments/".to_owned()),
        ("GET", "/execution-environments/".to_owned()),
        ("GET", "/execution-environments/1/".to_owned()),
        ("DELETE", "/execution-environments/1/".to_owned()),
        ("POST", "/runners/".to_owned()),
        ("DELETE", format!("/runners/{runner}/")),
        ("GET", format!("/runners/{runner}/files/")),
        ("GET", format!("/runners/{runner}/files/raw/")),
    ] {
        let answer = server.request(method, &path, None);
        assert_empty(&answer, 404, &format!("{method} {path}"));
    }
    assert_eq!(server.get(&format!("/runners/{runner}/files")).status, 200);
    assert_eq!(server.get("/execution-environments/1").status, 200);
}
