//! Moving environments to another server: `environments export` from one running server,
//! `environments import URL` into another, through their APIs.

mod support;

use std::process::{Command, Output};

use serde_json::{Value, json};
use support::{TOKEN, TestServer};

const OTHER_TOKEN: &str = "an0ther-t0ken";

fn binary(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_poseidon-lite"))
        .args(args)
        .env_remove("POSEIDON_SERVER_TOKEN")
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn environments_move_from_one_server_to_another() {
    let source = TestServer::start_with(|config| config.server.token = Some(TOKEN.into()));
    source.environment(10, 1);
    let python = json!({"image": support::TEST_IMAGE, "prewarmingPoolSize": 0, "cpuLimit": 40,
        "memoryLimit": 300, "networkAccess": false, "exposedPorts": []});
    let answer = source.send("PUT", "/execution-environments/11", &python);
    assert_eq!(answer.status, 201);
    let target = TestServer::start_with(|config| config.server.token = Some(OTHER_TOKEN.into()));

    // The configuration's own server by default (address, port and token as it serves them).
    let port = source.handle().http_addr().port().to_string();
    let exported = binary(&["--port", &port, "--token", TOKEN, "environments", "export"]);
    assert!(exported.status.success(), "{}", text(&exported.stderr));
    let listed: Value = serde_json::from_slice(&exported.stdout).expect("JSON");
    assert_eq!(listed, source.get("/execution-environments").json());

    let file = tempfile::NamedTempFile::new().expect("file");
    std::fs::write(file.path(), &exported.stdout).expect("write");
    let path = file.path().to_str().expect("path");
    let imported = binary(&[
        "environments",
        "import",
        &target.base,
        "--to-token",
        OTHER_TOKEN,
        "--file",
        path,
    ]);
    assert!(imported.status.success(), "{}", text(&imported.stderr));
    assert_eq!(
        text(&imported.stdout),
        "environment 10: created\nenvironment 11: created\n"
    );
    assert_eq!(
        target.get("/execution-environments").json(),
        source.get("/execution-environments").json()
    );
    // The moved environments work there: the pool fills, runners are claimed.
    target.wait_idle(10, 1);
    target.runner(11, 0);

    // Importing again replaces; a wrong token is refused and reported.
    let again = binary(&[
        "environments",
        "import",
        &target.base,
        "--to-token",
        OTHER_TOKEN,
        "--file",
        path,
    ]);
    assert_eq!(
        text(&again.stdout),
        "environment 10: replaced\nenvironment 11: replaced\n"
    );
    let refused = binary(&["environments", "import", &target.base, "--file", path]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("environment 10: refused with 401"),
        "{}",
        text(&refused.stderr)
    );
}

#[test]
fn an_export_from_a_server_that_refuses_is_an_error() {
    let source = TestServer::start_with(|config| config.server.token = Some(TOKEN.into()));
    let exported = binary(&["environments", "export", "--from", &source.base]);
    assert!(!exported.status.success());
    assert!(
        text(&exported.stderr).contains("answered 401"),
        "{}",
        text(&exported.stderr)
    );
    assert!(exported.stdout.is_empty());
}
