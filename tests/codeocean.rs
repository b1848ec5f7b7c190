//! CodeOcean's session, call by call and frame by frame as its Poseidon client makes them
//! (`lib/runner/strategy/poseidon.rb`, `lib/runner/connection.rb`): every request carries
//! `Content-Type: application/json` and the token, queries are sorted, stdin is a JSON line.

mod support;

use serde_json::{Value, json};
use support::{TOKEN, TestServer, Ws, base64};

fn codeocean_server() -> TestServer {
    TestServer::start_with(|config| config.server.token = Some(TOKEN.to_owned()))
}

/// `Runner::Strategy::Poseidon.sync_environment` and its validation run of `whoami`.
fn sync_and_validate(server: &TestServer, id: u64) {
    let body = json!({"id": id, "image": "openhpi/co_execenv_python:3.8", "prewarmingPoolSize": 1,
                      "cpuLimit": 20, "memoryLimit": 256, "networkAccess": false, "exposedPorts": []});
    let answer = server.send("PUT", &format!("/execution-environments/{id}"), &body);
    assert!(matches!(answer.status, 201 | 204), "{answer:?}");
    let runner = server.runner(id, 180);
    let url = server.execute_with(
        &runner,
        &json!({"command": "whoami", "timeLimit": 60, "privilegedExecution": false}),
    );
    let transcript = server.connect(&url).transcript();
    // Any stderr output fails the environment's validation in CodeOcean.
    assert_eq!(transcript.stderr, "", "{transcript:?}");
    assert_eq!(transcript.exit_code(), Some(0));
}

#[test]
fn a_codeocean_session_works_end_to_end() {
    let server = codeocean_server();

    // Dashboard and ping.
    assert_eq!(server.get("/health").status, 204);
    let version = server.get("/version");
    assert_eq!(version.status, 200);
    assert!(version.json().is_string());
    assert_eq!(
        server.get("/statistics/execution-environments").json(),
        json!({})
    );
    let list = server.get("/execution-environments").json();
    assert_eq!(list["executionEnvironments"], json!([]));

    // Environment sync with validation.
    sync_and_validate(&server, 4242);

    // Runner.for: request_from_management.
    let answer = server.send(
        "POST",
        "/runners",
        &json!({"executionEnvironmentId": 4242, "inactivityTimeout": 180}),
    );
    assert_eq!(answer.status, 200);
    let runner = answer.json()["runnerId"]
        .as_str()
        .expect("runnerId")
        .to_owned();

    // copy_files: directories first, every file with content, delete ./* always.
    let files = json!({"copy": [
        {"path": "lib/"},
        {"path": "main.py", "content": base64(b"from lib.helper import greet\nimport json\nprint(json.dumps({'cmd': 'input'}))\nanswer = input()\nprint(greet(answer))\n")},
        {"path": "lib/__init__.py", "content": ""},
        {"path": "lib/helper.py", "content": base64(b"def greet(raw):\n    import json\n    return 'Hello ' + json.loads(raw)['data']\n")}
    ], "delete": ["./*"]});
    assert_eq!(
        server
            .send("PATCH", &format!("/runners/{runner}/files"), &files)
            .status,
        204
    );

    // execute_command + the WebSocket, with the prompt answered as CodeOcean forwards it.
    let url = server.execute_with(
        &runner,
        &json!({"command": "python3 main.py", "timeLimit": 60, "privilegedExecution": false}),
    );
    let mut ws = server.connect(&url);
    assert_eq!(ws.next(), Some(json!({"type": "start"})));
    ws.wait_for_stdout("{\"cmd\": \"input\"}");
    ws.send("{\"cmd\":\"result\",\"data\":\"World\"}\n");
    let transcript = ws.transcript_rest();
    assert!(
        transcript
            .stdout
            .contains("{\"cmd\":\"result\",\"data\":\"World\"}\r\n"),
        "echo: {transcript:?}"
    );
    assert!(
        transcript.stdout.ends_with("Hello World\r\n"),
        "{transcript:?}"
    );
    assert_eq!(transcript.exit_code(), Some(0));

    // After an exit CodeOcean lists the workspace (sorted query, recursive).
    let listing = server.get(&format!(
        "/runners/{runner}/files?path=.%2F&privilegedExecution=false&recursive=true"
    ));
    assert_eq!(listing.status, 200);
    let names: Vec<String> = listing.json()["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|file| file["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        names.contains(&"./main.py".to_owned()) && names.contains(&"./lib/helper.py".to_owned()),
        "{names:?}"
    );
    for file in listing.json()["files"].as_array().expect("files") {
        for key in [
            "name",
            "entryType",
            "size",
            "modificationTime",
            "permissions",
            "owner",
            "group",
        ] {
            assert!(!file[key].is_null(), "{key} missing in {file}");
        }
    }

    // download_file streams with the right length.
    let download = server.get(&format!(
        "/runners/{runner}/files/raw?path=main.py&privilegedExecution=false"
    ));
    assert_eq!(download.status, 200);
    assert_eq!(
        download.header("Content-Length"),
        Some(download.body.len().to_string().as_str())
    );

    // The statistics show the claimed runners.
    let stats = server.get("/statistics/execution-environments").json();
    assert_eq!(stats["4242"]["usedRunners"], json!(2));

    // destroy_at_management: 204, then 410 (which CodeOcean tolerates).
    assert_eq!(server.delete(&format!("/runners/{runner}")).status, 204);
    assert_eq!(server.delete(&format!("/runners/{runner}")).status, 410);
}

#[test]
fn a_timeout_makes_codeocean_delete_the_runner_and_get_a_new_one() {
    let server = codeocean_server();
    sync_and_validate(&server, 1);
    let runner = server.runner(1, 180);
    let url = server.execute_with(
        &runner,
        &json!({"command": "sleep 30", "timeLimit": 1, "privilegedExecution": false}),
    );
    let transcript = server.connect(&url).transcript();
    assert_eq!(transcript.end, json!({"type": "timeout"}));
    assert_eq!(server.delete(&format!("/runners/{runner}")).status, 204);
    // Submission#swap_runner: the stored id now answers 410, a new runner is requested.
    let answer = server.send(
        "POST",
        &format!("/runners/{runner}/execute"),
        &json!({"command": "true"}),
    );
    assert_eq!(answer.status, 410);
    let fresh = server.runner(1, 180);
    assert_ne!(fresh, runner);
}

#[test]
fn synchronize_all_keeps_integer_ids() {
    let server = codeocean_server();
    for id in [3, 11, 4242] {
        server.environment(id, 0);
    }
    let list = server.get("/execution-environments").json();
    let ids: Vec<Value> = list["executionEnvironments"]
        .as_array()
        .expect("list")
        .iter()
        .map(|env| env["id"].clone())
        .collect();
    assert_eq!(ids, vec![json!(3), json!(11), json!(4242)]);
    // CodeOcean deletes what it does not have: 204 each.
    assert_eq!(server.delete("/execution-environments/11").status, 204);
}

#[test]
fn an_unknown_environment_on_claim_is_404_so_codeocean_syncs_it() {
    let server = codeocean_server();
    let answer = server.send(
        "POST",
        "/runners",
        &json!({"executionEnvironmentId": 77, "inactivityTimeout": 180}),
    );
    assert_eq!(answer.status, 404);
    assert!(answer.json()["message"].is_string());
    sync_and_validate(&server, 77);
}

#[test]
fn the_websocket_handshake_as_codeocean_sends_it_needs_the_token() {
    let server = codeocean_server();
    let runner = server.ready_runner();
    let url = server.execute(&runner, "true", 5);
    let err = Ws::connect(&url, None)
        .err()
        .expect("refused without token");
    assert!(err.contains("401"), "{err}");
    assert_eq!(server.connect(&url).transcript().exit_code(), Some(0));
}
