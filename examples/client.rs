//! An embedded poseidon-lite driven by a client through a whole CodeOcean-style run:
//! environment → runner → files → interactive execution → listing → delete.
//!
//! Run with `cargo run --example client` (process executor) or, as root,
//! `cargo run --example client -- sandbox`.

use std::{error::Error, net::TcpStream, time::Duration};

use base64::Engine;
use poseidon_lite::{Config, Server, config::ExecutorKind};
use serde_json::{Value, json};
use tungstenite::{Message, client::IntoClientRequest};

fn main() -> Result<(), Box<dyn Error>> {
    // Sandboxes run this same binary as their agent (see the README's "Library use").
    poseidon_lite::run_agent_if_requested();
    let state = std::env::temp_dir().join(format!("poseidon-lite-example-{}", std::process::id()));
    let mut config = Config::ephemeral(&state);
    config.runner.executor = match std::env::args().nth(1).as_deref() {
        Some("sandbox") => ExecutorKind::Sandbox,
        _ => ExecutorKind::Process,
    };
    // CodeOcean names Docker images; this one is served by the host's own file system.
    config
        .sandbox
        .images
        .insert("openhpi/co_execenv_python:3.8".into(), "host".into());
    let server = Server::bind(config)?.spawn()?;
    let api = server.url();
    println!("server at {api}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();

    // 1. The environment, as CodeOcean syncs it.
    let environment = json!({"id": 10, "image": "openhpi/co_execenv_python:3.8",
        "prewarmingPoolSize": 1, "cpuLimit": 20, "memoryLimit": 256,
        "networkAccess": false, "exposedPorts": []});
    let status = agent
        .put(format!("{api}/execution-environments/10"))
        .send_json(&environment)?
        .status();
    println!("PUT environment: {status}");

    // 2. A runner.
    let claim = json!({"executionEnvironmentId": 10, "inactivityTimeout": 60});
    let runner: Value = agent
        .post(format!("{api}/runners"))
        .send_json(&claim)?
        .body_mut()
        .read_json()?;
    let runner = runner["runnerId"].as_str().ok_or("no runnerId")?.to_owned();
    println!("runner: {runner}");

    // 3. The learner's files.
    let program = "name = input('Your name? ')\nprint(f'Hello, {name}!')\nopen('greeting.txt', 'w').write(name)\n";
    let content = base64::engine::general_purpose::STANDARD.encode(program);
    let files = json!({"delete": ["./*"], "copy": [{"path": "main.py", "content": content}]});
    let status = agent
        .patch(format!("{api}/runners/{runner}/files"))
        .send_json(&files)?
        .status();
    println!("PATCH files: {status}");

    // 4. An interactive execution.
    let execute =
        json!({"command": "python3 main.py", "timeLimit": 10, "privilegedExecution": false});
    let answer: Value = agent
        .post(format!("{api}/runners/{runner}/execute"))
        .send_json(&execute)?
        .body_mut()
        .read_json()?;
    let url = answer["websocketUrl"].as_str().ok_or("no websocketUrl")?;
    let request = url.into_client_request()?;
    let stream = TcpStream::connect(server.websocket_addr())?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (mut socket, _) = tungstenite::client(request, stream)?;
    loop {
        match socket.read() {
            Ok(Message::Text(text)) => {
                println!("  ← {text}");
                let message: Value = serde_json::from_str(&text)?;
                // Python writes input()'s prompt to stderr when stdin and stdout are a terminal.
                if message["data"].as_str().unwrap_or("").contains("name?") {
                    println!("  → World");
                    socket.send(Message::text("World\n"))?;
                }
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }

    // 5. What the program left in the workspace.
    let listing = agent
        .get(format!("{api}/runners/{runner}/files"))
        .call()?
        .body_mut()
        .read_to_string()?;
    println!("files: {listing}");

    // 6. Done with the runner.
    let status = agent
        .delete(format!("{api}/runners/{runner}"))
        .call()?
        .status();
    println!("DELETE runner: {status}");
    server.shutdown();
    std::fs::remove_dir_all(state)?;
    Ok(())
}
