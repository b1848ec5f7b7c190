//! The shipped systemd unit's capability set is enough for the sandbox: the binary runs under
//! `setpriv` with exactly the unit's `CapabilityBoundingSet=` (and no_new_privs, as the unit
//! sets) through a whole CodeOcean session. A change that needs another capability fails here
//! instead of on an operator's host.

mod support;

use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};
use support::{TIMEOUT, Ws, process};

/// The capabilities of the unit, as setpriv names them (`sys_admin`, …).
fn unit_capabilities() -> Vec<String> {
    let unit = include_str!("../contrib/systemd/poseidon-lite.service");
    let line = unit
        .lines()
        .find_map(|line| line.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet=");
    line.split_whitespace()
        .map(|cap| cap.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect()
}

/// The server under setpriv; stopped with SIGTERM and its cgroups removed when dropped.
struct Confined {
    child: Child,
    cgroup_name: String,
}

impl Drop for Confined {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + TIMEOUT;
        while self.child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        support::remove_cgroups(&self.cgroup_name);
    }
}

fn call(api: &str, method: &str, path: &str, body: Value) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .build()
        .into();
    let request = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{api}{path}"))
        .body(body.to_string())
        .expect("request");
    let mut response = agent.run(request).expect("request succeeds");
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_to_string().unwrap_or_default(),
    )
}

#[test]
fn the_units_capabilities_are_enough_for_a_sandbox_session() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let capabilities = unit_capabilities();
    assert!(
        capabilities.contains(&"sys_admin".to_owned()),
        "{capabilities:?}"
    );
    let bounding: String = std::iter::once("-all".to_owned())
        .chain(capabilities.iter().map(|cap| format!("+{cap}")))
        .collect::<Vec<_>>()
        .join(",");
    let state = tempfile::tempdir().expect("state");
    let (cgroup_name, uid_base) = (
        process::own_cgroup_name(),
        process::uid_base(state.path(), 8),
    );
    let mut child = Command::new("setpriv")
        .args([
            "--bounding-set",
            &bounding,
            "--inh-caps",
            "-all",
            "--no-new-privs",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_poseidon-lite"))
        .args([
            "--executor",
            "sandbox",
            "--port",
            "0",
            "--websocket-port",
            "0",
        ])
        .args(["--log-level", "info", "--capacity", "8"])
        .arg("--image")
        .arg(format!("{}=host", support::TEST_IMAGE))
        .arg("--state-dir")
        .arg(state.path())
        .args([
            "--cgroup-name",
            &cgroup_name,
            "--uid-base",
            &uid_base.to_string(),
        ])
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux) starts the server");
    let lines = process::stderr_lines(&mut child);
    let _server = Confined { child, cgroup_name };
    let mut log = Vec::new();
    let api = loop {
        let line = lines
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|_| panic!("the confined server did not start: {log:#?}"));
        if let Some((_, api)) = line.split_once("HTTP API listening on ") {
            break api.trim().to_owned();
        }
        log.push(line);
    };

    let (status, body) = call(
        &api,
        "PUT",
        "/execution-environments/3",
        support::environment_body(3, 1),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = call(
        &api,
        "POST",
        "/runners",
        json!({"executionEnvironmentId": 3, "inactivityTimeout": 0}),
    );
    assert_eq!(status, 200, "{body}");
    let runner: Value = serde_json::from_str(&body).expect("JSON");
    let runner = runner["runnerId"].as_str().expect("runnerId").to_owned();
    let files = json!({"delete": ["./*"], "copy": [{"path": "dir/main.sh",
        "content": support::base64(b"echo ran as $(id -u)")}]});
    let (status, body) = call(&api, "PATCH", &format!("/runners/{runner}/files"), files);
    assert_eq!(status, 204, "{body}");
    for (privileged, expected) in [(false, "ran as 1000\r\n"), (true, "ran as 0\r\n")] {
        let (status, body) = call(
            &api,
            "POST",
            &format!("/runners/{runner}/execute"),
            json!({"command": "bash dir/main.sh; touch made", "timeLimit": 10,
                   "privilegedExecution": privileged}),
        );
        assert_eq!(status, 200, "{body}");
        let url: Value = serde_json::from_str(&body).expect("JSON");
        let url = url["websocketUrl"].as_str().expect("websocketUrl");
        let transcript = Ws::connect(url, None).expect("connect").transcript();
        assert_eq!(transcript.exit_code(), Some(0), "{transcript:?}");
        assert_eq!(transcript.stdout, expected);
    }
    let (status, body) = call(
        &api,
        "GET",
        &format!("/runners/{runner}/files?path=./"),
        json!(null),
    );
    assert!(
        status == 200 && body.contains("\"./made\""),
        "{status} {body}"
    );
    let (status, _) = call(&api, "DELETE", &format!("/runners/{runner}"), json!(null));
    assert_eq!(status, 204);
}
