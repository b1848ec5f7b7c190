//! TLS on both listeners: HTTPS for the API and WSS for executions with a certificate the
//! test makes (rcgen), TLS 1.3 only, and a certificate replaced while the server runs.

mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    sync::Arc,
};

use rustls::{
    ClientConfig, ClientConnection, RootCertStore, StreamOwned,
    pki_types::{CertificateDer, ServerName},
};
use serde_json::{Value, json};
use support::{TIMEOUT, TOKEN, TestServer, check_schema};
use tungstenite::{Message, client::IntoClientRequest};

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM files into `dir`.
fn certificate(dir: &Path) -> CertificateDer<'static> {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("certificate");
    std::fs::write(dir.join("cert.pem"), made.cert.pem()).expect("write");
    std::fs::write(dir.join("key.pem"), made.signing_key.serialize_pem()).expect("write");
    made.cert.der().clone()
}

fn server(dir: &Path) -> TestServer {
    TestServer::start_with(|config| {
        config.server.token = Some(TOKEN.into());
        config.server.tls.active = true;
        config.server.tls.certfile = Some(dir.join("cert.pem"));
        config.server.tls.keyfile = Some(dir.join("key.pem"));
    })
}

fn client_config(trusted: &CertificateDer<'static>, tls12_only: bool) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(trusted.clone()).expect("root");
    // The server's provider (ring; deprecated only for lacking post-quantum key exchange).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match tls12_only {
        true => &[&rustls::version::TLS12],
        false => &[&rustls::version::TLS13],
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A TLS connection to `address` that trusts only `trusted`; the handshake is completed.
fn connect(
    address: std::net::SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<StreamOwned<ClientConnection, TcpStream>> {
    let tcp = TcpStream::connect_timeout(&address, TIMEOUT)?;
    tcp.set_read_timeout(Some(TIMEOUT))?;
    tcp.set_write_timeout(Some(TIMEOUT))?;
    let name = ServerName::IpAddress(address.ip().into());
    let conn = ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// An HTTPS client trusting `trusted`.
fn agent(trusted: &CertificateDer<'static>) -> ureq::Agent {
    let roots = vec![ureq::tls::Certificate::from_der(trusted.as_ref()).to_owned()];
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
        .build();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .tls_config(tls)
        .build()
        .into()
}

fn call(agent: &ureq::Agent, method: &str, url: &str, body: Option<Value>) -> (u16, String) {
    let request = ureq::http::Request::builder()
        .method(method)
        .uri(url)
        .header("Poseidon-Token", TOKEN)
        .header("Content-Type", "application/json")
        .body(body.map(|body| body.to_string()).unwrap_or_default())
        .expect("request");
    let mut response = agent.run(request).expect("HTTPS request");
    let status = response.status().as_u16();
    (status, response.body_mut().read_to_string().expect("body"))
}

#[test]
fn codeocean_runs_code_over_https_and_wss() {
    let dir = tempfile::tempdir().expect("directory");
    let trusted = certificate(dir.path());
    let server = server(dir.path());
    let api = server.handle().url();
    assert!(api.starts_with("https://127.0.0.1:"), "{api}");
    let agent = agent(&trusted);
    let put = call(
        &agent,
        "PUT",
        &format!("{api}/execution-environments/1"),
        Some(support::environment_body(1, 1)),
    );
    assert_eq!(put.0, 201, "{}", put.1);
    let claim = call(
        &agent,
        "POST",
        &format!("{api}/runners"),
        Some(json!({"executionEnvironmentId": 1, "inactivityTimeout": 60})),
    );
    assert_eq!(claim.0, 200, "{}", claim.1);
    let runner: Value = serde_json::from_str(&claim.1).expect("JSON");
    let runner = runner["runnerId"].as_str().expect("runnerId").to_owned();
    let files = json!({"delete": ["./*"], "copy": [{"path": "main.sh",
        "content": support::base64(b"read name; echo \"hello $name\"")}]});
    let patch = call(
        &agent,
        "PATCH",
        &format!("{api}/runners/{runner}/files"),
        Some(files),
    );
    assert_eq!(patch.0, 204, "{}", patch.1);
    let execute = call(
        &agent,
        "POST",
        &format!("{api}/runners/{runner}/execute"),
        Some(json!({"command": "bash main.sh", "timeLimit": 20})),
    );
    assert_eq!(execute.0, 200, "{}", execute.1);
    let url: Value = serde_json::from_str(&execute.1).expect("JSON");
    let url = url["websocketUrl"]
        .as_str()
        .expect("websocketUrl")
        .to_owned();
    let websocket = server.handle().websocket_addr();
    assert!(
        url.starts_with(&format!("wss://127.0.0.1:{}/", websocket.port())),
        "{url}"
    );

    // The WebSocket, as CodeOcean opens it: TLS, then the upgrade with the token.
    let stream = connect(websocket, client_config(&trusted, false)).expect("TLS");
    let mut request = url.as_str().into_client_request().expect("request");
    request
        .headers_mut()
        .insert("Poseidon-Token", TOKEN.parse().expect("header"));
    let (mut ws, _) = tungstenite::client(request, stream).expect("WebSocket over TLS");
    let mut messages = Vec::new();
    let mut sent = false;
    loop {
        let message = match ws.read() {
            Ok(Message::Text(text)) => serde_json::from_str::<Value>(&text).expect("JSON"),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        check_schema(&message);
        if !sent && message["type"] == "start" {
            ws.send(Message::text("Ada\n")).expect("stdin");
            sent = true;
        }
        messages.push(message);
    }
    let stdout: String = messages
        .iter()
        .filter(|m| m["type"] == "stdout")
        .filter_map(|m| m["data"].as_str())
        .collect();
    assert!(stdout.contains("hello Ada\r\n"), "{messages:?}");
    assert_eq!(messages.last(), Some(&json!({"type": "exit", "data": 0})));
}

#[test]
fn only_tls_1_3_is_spoken_and_plain_http_gets_nothing() {
    let dir = tempfile::tempdir().expect("directory");
    let trusted = certificate(dir.path());
    let server = server(dir.path());
    let address = server.handle().http_addr();
    assert!(connect(address, client_config(&trusted, true)).is_err());
    let mut tls13 = connect(address, client_config(&trusted, false)).expect("TLS 1.3");
    assert_eq!(
        tls13.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    write!(
        tls13,
        "GET /api/v1/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut answer = String::new();
    let _ = tls13.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A plain request is no TLS handshake: no HTTP answer comes back.
    let mut plain = TcpStream::connect(address).expect("connect");
    plain.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    plain
        .write_all(b"GET /api/v1/version HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[test]
fn a_reloaded_certificate_is_used_by_new_connections() {
    let dir = tempfile::tempdir().expect("directory");
    let old = certificate(dir.path());
    let server = server(dir.path());
    let address = server.handle().http_addr();
    let kept = connect(address, client_config(&old, false)).expect("old certificate");
    let new = certificate(dir.path());
    server.handle().reload_certificates().expect("reload");
    assert!(connect(address, client_config(&new, false)).is_ok());
    assert!(connect(address, client_config(&old, false)).is_err());
    drop(kept);
    // A broken file is refused and the certificate in use stays.
    std::fs::write(dir.path().join("key.pem"), "not a key").expect("write");
    assert!(server.handle().reload_certificates().is_err());
    assert!(connect(address, client_config(&new, false)).is_ok());
}

#[test]
fn the_binary_reloads_its_certificate_on_sighup() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().expect("directory");
    let old = certificate(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_poseidon-lite"))
        .args([
            "--executor",
            "process",
            "--port",
            "0",
            "--websocket-port",
            "0",
        ])
        .args(["--tls", "true", "--log-level", "info", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--tls-certfile")
        .arg(dir.path().join("cert.pem"))
        .arg("--tls-keyfile")
        .arg(dir.path().join("key.pem"))
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .expect("server starts");
    let stderr = child.stderr.take().expect("stderr");
    /// Kills the server if the test ends early.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Killed(child);
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_for = |needle: &str| loop {
        let line = lines.recv_timeout(TIMEOUT).expect("a log line in time");
        if let Some((_, rest)) = line.split_once(needle) {
            return rest.trim().to_owned();
        }
    };
    let api = wait_for("HTTP API listening on https://");
    let address: std::net::SocketAddr = api
        .split('/')
        .next()
        .and_then(|host| host.parse().ok())
        .expect("address");
    assert!(connect(address, client_config(&old, false)).is_ok());
    let new = certificate(dir.path());
    let signal = |name: &str| {
        let status = Command::new("kill")
            .args(["-s", name, &child.0.id().to_string()])
            .status();
        assert!(status.expect("kill runs").success());
    };
    signal("HUP");
    wait_for("certificates reloaded");
    assert!(connect(address, client_config(&new, false)).is_ok());
    assert!(connect(address, client_config(&old, false)).is_err());
    signal("TERM");
    wait_for("stopped");
    assert!(child.0.wait().expect("exit").success());
}
