//! Runners over HTTP: claiming, ids, validation, capacity, deletion, the 410 contract of every
//! runner route, the inactivity timeout and what resets it, and restarts.

mod support;

use std::{
    collections::BTreeSet,
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use support::{Answer, TestServer, Ws, base64, eventually};

/// A runner id of the right shape that was never handed out.
const UNKNOWN: &str = "1-0b7f3c2e-1111-4222-8333-444455556666";

fn claim(server: &TestServer, body: &Value) -> Answer {
    server.send("POST", "/runners", body)
}

fn claim_body(env: u64, inactivity: i64) -> Value {
    json!({"executionEnvironmentId": env, "inactivityTimeout": inactivity})
}

fn statistics(server: &TestServer) -> Value {
    server.get("/statistics/execution-environments").json()
}

fn used(server: &TestServer, env: u64) -> u64 {
    statistics(server)[env.to_string()]["usedRunners"]
        .as_u64()
        .expect("usedRunners")
}

#[track_caller]
fn assert_json_error(answer: &Answer, status: u16, what: &str) {
    assert_eq!(answer.status, status, "{what}: {}", answer.text());
    assert_eq!(
        answer.header("Content-Type"),
        Some("application/json"),
        "{what}"
    );
    assert!(!answer.message().is_empty(), "{what}: {}", answer.text());
}

/// Every HTTP route of a runner, as (what, answer).
fn every_runner_route(server: &TestServer, runner: &str) -> Vec<(String, Answer)> {
    let copy = json!({"copy": [{"path": "a.txt", "content": base64(b"a")}], "delete": ["./*"]});
    let execute = json!({"command": "true", "timeLimit": 5});
    let execution = "0b7f3c2e-1111-4222-8333-444455556666";
    let base = format!("/runners/{runner}");
    vec![
        ("list files".into(), server.get(&format!("{base}/files"))),
        (
            "list files with parameters".into(),
            server.get(&format!(
                "{base}/files?path=.%2F&privilegedExecution=false&recursive=true"
            )),
        ),
        (
            "patch files".into(),
            server.send("PATCH", &format!("{base}/files"), &copy),
        ),
        (
            "patch files with a bad body".into(),
            server.request("PATCH", &format!("{base}/files"), Some(b"{nonsense")),
        ),
        (
            "download".into(),
            server.get(&format!("{base}/files/raw?path=a.txt")),
        ),
        (
            "execute".into(),
            server.send("POST", &format!("{base}/execute"), &execute),
        ),
        (
            "execute with a bad body".into(),
            server.request("POST", &format!("{base}/execute"), Some(b"[")),
        ),
        (
            "websocket on the HTTP listener".into(),
            server.get(&format!("{base}/websocket?executionID={execution}")),
        ),
        ("delete".into(), server.delete(&base)),
    ]
}

#[track_caller]
fn assert_gone_everywhere(server: &TestServer, runner: &str) {
    for (what, answer) in every_runner_route(server, runner) {
        assert_json_error(&answer, 410, &format!("{what} of {runner:?}"));
    }
    let url = format!(
        "ws://{}/api/v1/runners/{runner}/websocket?executionID=0b7f3c2e-1111-4222-8333-444455556666",
        server.handle().websocket_addr()
    );
    let err = Ws::connect(&url, None)
        .err()
        .expect("the handshake is refused");
    assert!(err.contains("410"), "websocket of {runner:?}: {err}");
}

#[test]
fn claiming_answers_200_with_the_runner_id_and_empty_mapped_ports() {
    let server = TestServer::start();
    server.environment(3, 1);
    let answer = claim(&server, &claim_body(3, 60));
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("Content-Type"), Some("application/json"));
    let body = answer.json();
    let id = body["runnerId"].as_str().expect("runnerId is a string");
    assert_eq!(body, json!({"runnerId": id, "mappedPorts": []}));
}

#[test]
fn runner_ids_are_the_environment_and_a_uuid_v4_and_never_repeat() {
    let server = TestServer::start();
    server.environment(42, 2);
    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        let id = server.runner(42, 0);
        let (env, uuid) = id.split_once('-').expect("<env>-<uuid>");
        assert_eq!(env, "42", "{id}");
        let uuid = uuid::Uuid::parse_str(uuid).unwrap_or_else(|err| panic!("{id}: {err}"));
        assert_eq!(uuid.get_version_num(), 4, "{id}");
        assert!(
            id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "{id} is not URL-safe"
        );
        assert!(seen.insert(id.clone()), "{id} handed out twice");
    }
}

#[test]
fn claiming_from_an_unknown_environment_is_404_with_a_json_message() {
    let server = TestServer::start();
    assert_json_error(&claim(&server, &claim_body(5, 0)), 404, "no environments");
    server.environment(4, 1);
    let answer = claim(&server, &claim_body(5, 0));
    assert_json_error(&answer, 404, "unknown environment");
    assert!(
        answer.message().contains("execution environment"),
        "{}",
        answer.text()
    );
}

#[test]
fn bad_claim_bodies_are_400_with_a_json_message_and_claim_nothing() {
    let server = TestServer::start();
    server.environment(1, 1);
    server.wait_idle(1, 1);
    let bodies: &[&[u8]] = &[
        b"",
        b"{",
        br#"{"executionEnvironmentId": "1", "inactivityTimeout": 0}"#,
        br#"{"executionEnvironmentId": 1, "inactivityTimeout": "60"}"#,
        br#"{"executionEnvironmentId": 1, "inactivityTimeout": -1}"#,
        br#"{"executionEnvironmentId": 1, "inactivityTimeout": 1.5}"#,
        br#"{"executionEnvironmentId": -1, "inactivityTimeout": 0}"#,
        br#"{"executionEnvironmentId": true}"#,
        b"[1, 0]",
        b"1",
    ];
    let mut wrong = Vec::new();
    for body in bodies {
        let answer = server.request("POST", "/runners", Some(body));
        if answer.status == 400 {
            assert_json_error(&answer, 400, &String::from_utf8_lossy(body));
        } else {
            wrong.push((String::from_utf8_lossy(body).into_owned(), answer.status));
        }
    }
    assert!(wrong.is_empty(), "not rejected with 400: {wrong:?}");
    assert_eq!(used(&server, 1), 0);
}

#[test]
fn missing_claim_fields_take_zero_values() {
    let server = TestServer::start();
    server.environment(1, 1);
    let answer = claim(&server, &json!({"executionEnvironmentId": 1}));
    assert_eq!(answer.status, 200, "{}", answer.text());
    let answer = claim(
        &server,
        &json!({"executionEnvironmentId": 1, "inactivityTimeout": null, "extra": [1]}),
    );
    assert_eq!(answer.status, 200, "{}", answer.text());
    // Without an environment id it is environment 0, which does not exist.
    assert_json_error(&claim(&server, &json!({})), 404, "no environment id");
}

/// Runs `check`; if it fails, the server is leaked rather than shut down, because a server
/// whose state lock was poisoned panics again while shutting down, which would abort the whole
/// test binary instead of reporting this one failure.
fn check_or_leak(server: TestServer, check: impl FnOnce(&TestServer)) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&server)));
    if let Err(panic) = outcome {
        std::mem::forget(server);
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn a_huge_inactivity_timeout_does_not_break_the_server() {
    check_or_leak(TestServer::start(), |server| {
        server.environment(1, 1);
        for timeout in [i64::MAX, 1 << 62, u32::MAX as i64 * 1000] {
            let answer = claim(server, &claim_body(1, timeout));
            assert!(
                matches!(answer.status, 200 | 400),
                "inactivityTimeout {timeout}: {} {}",
                answer.status,
                answer.text()
            );
            if answer.status == 200 {
                let runner = answer.json()["runnerId"].as_str().unwrap().to_owned();
                assert_eq!(server.get(&format!("/runners/{runner}/files")).status, 200);
            }
        }
        let runner = server.runner(1, 60);
        assert_eq!(server.get(&format!("/runners/{runner}/files")).status, 200);
        assert_eq!(server.get("/statistics/execution-environments").status, 200);
    });
}

#[test]
fn an_empty_pool_creates_a_runner_on_demand() {
    let server = TestServer::start();
    server.environment(6, 0);
    let runner = server.runner(6, 0);
    assert_eq!(
        statistics(&server)["6"],
        json!({"id": 6, "prewarmingPoolSize": 0, "idleRunners": 0, "usedRunners": 1})
    );
    server.copy(&runner, &[("a.txt", "on demand")]);
    assert_eq!(
        server
            .get(&format!("/runners/{runner}/files/raw?path=a.txt"))
            .text(),
        "on demand"
    );
}

#[test]
fn exhausted_capacity_is_500_nomad_overload_until_a_runner_is_freed() {
    let server = TestServer::start_with(|config| config.runner.capacity = 2);
    server.environment(1, 1);
    server.wait_idle(1, 1);
    let first = server.runner(1, 0);
    server.wait_idle(1, 1);
    let second = server.runner(1, 0);
    let answer = claim(&server, &claim_body(1, 0));
    assert_eq!(answer.status, 500, "{}", answer.text());
    assert_eq!(answer.header("Content-Type"), Some("application/json"));
    assert_eq!(
        answer.json(),
        json!({"message": "no runners available for this execution environment",
               "errorCode": "NOMAD_OVERLOAD"})
    );
    assert_eq!(used(&server, 1), 2);
    assert_eq!(server.delete(&format!("/runners/{first}")).status, 204);
    server.wait_idle(1, 1);
    let third = server.runner(1, 0);
    assert_ne!(third, first);
    assert_eq!(claim(&server, &claim_body(1, 0)).status, 500);
    assert_eq!(server.get(&format!("/runners/{second}/files")).status, 200);
}

#[test]
fn deleting_a_runner_answers_204_with_an_empty_body() {
    let server = TestServer::start();
    server.environment(1, 1);
    let runner = server.runner(1, 0);
    let answer = server.delete(&format!("/runners/{runner}"));
    assert_eq!(answer.status, 204);
    assert!(answer.body.is_empty(), "{}", answer.text());
    assert_eq!(used(&server, 1), 0);
}

#[test]
fn a_deleted_runner_answers_410_on_every_route() {
    let server = TestServer::start();
    server.environment(1, 1);
    let runner = server.runner(1, 0);
    let kept = server.runner(1, 0);
    assert_eq!(server.delete(&format!("/runners/{runner}")).status, 204);
    assert_gone_everywhere(&server, &runner);
    assert_eq!(server.get(&format!("/runners/{kept}/files")).status, 200);
}

#[test]
fn never_existing_and_malformed_runner_ids_answer_410() {
    let server = TestServer::start();
    server.environment(1, 1);
    let real = server.runner(1, 0);
    let (_, uuid) = real.split_once('-').unwrap();
    let other_env = format!("2-{uuid}");
    let overflowing = format!("99999999999999999999999-{uuid}");
    for id in [
        UNKNOWN,
        "nonsense",
        "42",
        "1-not-a-uuid",
        &other_env,
        &overflowing,
        "%2e%2e%2fetc",
    ] {
        assert_gone_everywhere(&server, id);
    }
    assert_eq!(server.get(&format!("/runners/{real}/files")).status, 200);
}

#[test]
fn idle_runners_are_not_addressable() {
    let server = TestServer::start();
    server.environment(1, 2);
    server.wait_idle(1, 2);
    let idle: Vec<String> = server.runner_dirs().into_iter().collect();
    assert_eq!(idle.len(), 2);
    let answer = server.get(&format!("/runners/{}/files", idle[0]));
    assert_json_error(&answer, 410, "idle runner");
    let answer = server.delete(&format!("/runners/{}", idle[1]));
    assert_json_error(&answer, 410, "idle runner");
    server.wait_idle(1, 2);
}

#[test]
fn a_runner_expires_after_its_inactivity_timeout_while_one_without_timeout_stays() {
    let server = TestServer::start();
    server.environment(1, 0);
    let forever = server.runner(1, 0);
    let short = server.runner(1, 1);
    assert_eq!(used(&server, 1), 2);
    eventually("the runner with a 1 s timeout expires", || {
        used(&server, 1) == 1
    });
    assert_gone_everywhere(&server, &short);
    let answer = server.get(&format!("/runners/{forever}/files"));
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(server.delete(&format!("/runners/{forever}")).status, 204);
}

/// Claims a runner with a 2 s timeout and keeps it busy with `action` for twice as long; the
/// runner must survive that, then expire once left alone.
#[track_caller]
fn assert_action_resets_the_timer(server: &TestServer, action: impl Fn(&str) -> u16) {
    server.environment(1, 0);
    let runner = server.runner(1, 2);
    server.copy(&runner, &[("a.txt", "a")]);
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let status = action(&runner);
        assert!(
            (200..300).contains(&status),
            "the runner expired although it was kept busy: {status}"
        );
        thread::sleep(Duration::from_millis(250));
    }
    // Polling with execute, which does not reset the timer, sees it expire.
    eventually("the runner expires once left alone", || {
        let execute = json!({"command": "true"});
        server
            .send("POST", &format!("/runners/{runner}/execute"), &execute)
            .status
            == 410
    });
}

#[test]
fn listing_files_resets_the_inactivity_timer() {
    let server = TestServer::start();
    assert_action_resets_the_timer(&server, |runner| {
        server.get(&format!("/runners/{runner}/files")).status
    });
}

#[test]
fn patching_files_resets_the_inactivity_timer() {
    let server = TestServer::start();
    assert_action_resets_the_timer(&server, |runner| {
        let body = json!({"copy": [{"path": "b.txt", "content": base64(b"b")}]});
        server
            .send("PATCH", &format!("/runners/{runner}/files"), &body)
            .status
    });
}

#[test]
fn downloading_a_file_resets_the_inactivity_timer() {
    let server = TestServer::start();
    assert_action_resets_the_timer(&server, |runner| {
        server
            .get(&format!("/runners/{runner}/files/raw?path=a.txt"))
            .status
    });
}

#[test]
fn connecting_an_execution_resets_the_inactivity_timer() {
    let server = TestServer::start();
    assert_action_resets_the_timer(&server, |runner| {
        match server.run(runner, "true").exit_code() {
            Some(0) => 200,
            _ => 500,
        }
    });
}

#[test]
fn storing_an_execution_does_not_reset_the_inactivity_timer() {
    let server = TestServer::start();
    server.environment(1, 0);
    let runner = server.runner(1, 1);
    // If execute restarted the timer, this constant polling would keep the runner forever.
    eventually("the runner expires despite execute requests", || {
        let execute = json!({"command": "true", "timeLimit": 1});
        server
            .send("POST", &format!("/runners/{runner}/execute"), &execute)
            .status
            == 410
    });
    assert_eq!(used(&server, 1), 0);
}

#[test]
fn an_expired_runner_is_not_revived_by_later_requests() {
    let server = TestServer::start();
    server.environment(1, 0);
    let runner = server.runner(1, 1);
    eventually("the runner expires", || used(&server, 1) == 0);
    assert_eq!(server.get(&format!("/runners/{runner}/files")).status, 410);
    assert_eq!(server.delete(&format!("/runners/{runner}")).status, 410);
    assert_eq!(used(&server, 1), 0);
}

#[test]
fn execute_answers_an_absolute_websocket_url_with_a_fresh_execution_id() {
    let server = TestServer::start();
    server.environment(1, 1);
    let runner = server.runner(1, 0);
    let body = json!({"command": "true", "timeLimit": 5, "privilegedExecution": false});
    let answer = server.send("POST", &format!("/runners/{runner}/execute"), &body);
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("Content-Type"), Some("application/json"));
    let url = answer.json()["websocketUrl"]
        .as_str()
        .expect("url")
        .to_owned();
    assert_eq!(answer.json(), json!({"websocketUrl": url}));
    let prefix = format!(
        "ws://127.0.0.1:{}/api/v1/runners/{runner}/websocket?executionID=",
        server.handle().websocket_addr().port()
    );
    let execution = url.strip_prefix(&prefix).unwrap_or_else(|| panic!("{url}"));
    assert_eq!(
        uuid::Uuid::parse_str(execution).unwrap().get_version_num(),
        4
    );
    let again = server.send("POST", &format!("/runners/{runner}/execute"), &body);
    assert_ne!(again.json()["websocketUrl"], url);
}

#[test]
fn the_websocket_url_names_the_host_the_client_used() {
    let server = TestServer::start();
    server.environment(1, 1);
    let runner = server.runner(1, 0);
    let body = r#"{"command":"true","timeLimit":5}"#;
    let request = format!(
        "POST /api/v1/runners/{runner}/execute HTTP/1.1\r\nHost: runners.example.org:7200\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = std::net::TcpStream::connect(server.handle().http_addr()).unwrap();
    stream.set_read_timeout(Some(support::TIMEOUT)).unwrap();
    std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
    let expected = format!(
        "\"ws://runners.example.org:{}/api/v1/runners/{runner}/websocket?executionID=",
        server.handle().websocket_addr().port()
    );
    assert!(answer.contains(&expected), "{answer}");
}

#[test]
fn bad_execute_requests_are_400_with_a_json_message() {
    let server = TestServer::start();
    server.environment(1, 1);
    let runner = server.runner(1, 0);
    let path = format!("/runners/{runner}/execute");
    let answer = server.send("POST", &path, &json!({"command": "echo 'hi'"}));
    assert_json_error(&answer, 400, "quote");
    assert_eq!(answer.message(), "use of forbidden character");
    let bodies: &[&[u8]] = &[
        b"",
        b"{",
        br#"{"command": 5}"#,
        br#"{"command": "true", "timeLimit": -1}"#,
        br#"{"command": "true", "timeLimit": "5"}"#,
        br#"{"command": "true", "privilegedExecution": "yes"}"#,
        br#"{"command": "true", "environment": {"1A": "x"}}"#,
        br#"{"command": "true", "environment": {"A-B": "x"}}"#,
        br#"{"command": "true", "environment": {"": "x"}}"#,
        br#"{"command": "true", "environment": {"A": 1}}"#,
        br#"{"command": "true", "environment": ["A=1"]}"#,
        br#"["true"]"#,
    ];
    let mut wrong = Vec::new();
    for body in bodies {
        let answer = server.request("POST", &path, Some(body));
        if answer.status == 400 {
            assert_json_error(&answer, 400, &String::from_utf8_lossy(body));
        } else {
            wrong.push((String::from_utf8_lossy(body).into_owned(), answer.status));
        }
    }
    assert!(wrong.is_empty(), "not rejected with 400: {wrong:?}");
    let fine = json!({"command": "echo $A_1", "environment": {"A_1": "x y", "_b": ""}});
    assert_eq!(server.send("POST", &path, &fine).status, 200);
}

#[test]
fn claimed_runners_survive_a_restart_with_their_files() {
    let server = TestServer::start();
    server.environment(1, 1);
    let runner = server.runner(1, 0);
    server.copy(&runner, &[("dir/", ""), ("dir/kept.txt", "survives")]);
    let dir = server.stop();

    let server = TestServer::start_in(dir, |_| {});
    if !support::process_executor() {
        // Sandboxes end with the server that ran them.
        assert_eq!(statistics(&server)["1"]["usedRunners"], json!(0));
        assert_eq!(server.get(&format!("/runners/{runner}/files")).status, 410);
        server.wait_idle(1, 1);
        return;
    }
    assert_eq!(
        statistics(&server)["1"]["usedRunners"],
        json!(1),
        "{}",
        statistics(&server)
    );
    let answer = server.get(&format!("/runners/{runner}/files/raw?path=dir/kept.txt"));
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "survives");
    assert_eq!(server.run(&runner, "cat dir/kept.txt").stdout, "survives");
    assert_eq!(server.delete(&format!("/runners/{runner}")).status, 204);
}

#[test]
fn claimed_runners_keep_their_inactivity_timeout_after_a_restart() {
    let server = TestServer::start();
    server.environment(1, 0);
    let runner = server.runner(1, 1);
    let forever = server.runner(1, 0);
    let dir = server.stop();

    let server = TestServer::start_in(dir, |_| {});
    if !support::process_executor() {
        assert_eq!(
            used(&server, 1),
            0,
            "sandboxes end with the server that ran them"
        );
        return;
    }
    assert_eq!(used(&server, 1), 2, "claimed runners are back");
    eventually(
        "the runner with a timeout expires after the restart",
        || used(&server, 1) == 1,
    );
    assert_eq!(server.delete(&format!("/runners/{runner}")).status, 410);
    assert_eq!(server.get(&format!("/runners/{forever}/files")).status, 200);
}

#[test]
fn stored_executions_are_gone_after_a_restart() {
    let server = TestServer::start();
    server.environment(1, 0);
    let runner = server.runner(1, 0);
    let url = server.execute(&runner, "echo never", 5);
    let execution = url
        .split("executionID=")
        .nth(1)
        .expect("executionID")
        .to_owned();
    let dir = server.stop();

    let server = TestServer::start_in(dir, |_| {});
    if !support::process_executor() {
        assert_eq!(server.get(&format!("/runners/{runner}/files")).status, 410);
        return;
    }
    assert_eq!(server.get(&format!("/runners/{runner}/files")).status, 200);
    let url = format!(
        "ws://{}/api/v1/runners/{runner}/websocket?executionID={execution}",
        server.handle().websocket_addr()
    );
    let err = Ws::connect(&url, None)
        .err()
        .expect("the stored execution is gone");
    assert!(err.contains("404"), "{err}");
}

#[test]
fn commands_too_long_to_run_are_refused_and_nothing_is_stored() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let path = format!("/runners/{runner}/execute");
    let long = json!({"command": format!("echo {}", "x".repeat(200_000))});
    let answer = server.send("POST", &path, &long);
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert!(answer.message().contains("exceed"), "{}", answer.text());
    let variables = json!({"command": "true", "environment": {"BIG": "y".repeat(200_000)}});
    assert_eq!(server.send("POST", &path, &variables).status, 400);
    assert_eq!(server.run(&runner, "echo fine").stdout, "fine\r\n");
}
