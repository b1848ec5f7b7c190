//! Prometheus metrics: a scripted session over the API, then a scrape whose counters must
//! match what the session did.

mod image_support;
mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
};

use serde_json::json;
use support::{TIMEOUT, TOKEN, TestServer};

/// The value of the sample `series` (name with labels exactly as rendered).
#[track_caller]
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
        .parse()
        .expect("a number")
}

fn scrape(server: &TestServer) -> String {
    let answer = server.get("/metrics");
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        answer.header("Content-Type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    answer.text()
}

#[test]
fn counters_match_a_scripted_session() {
    let server = TestServer::start_with(|config| config.server.token = Some(TOKEN.into()));
    server.environment(1, 2);
    server.wait_idle(1, 2);
    let first = server.runner(1, 0);
    let second = server.runner(1, 0);
    assert_eq!(server.delete(&format!("/runners/{second}")).status, 204);
    let unknown = server.send(
        "POST",
        "/runners",
        &json!({"executionEnvironmentId": 99, "inactivityTimeout": 0}),
    );
    assert_eq!(unknown.status, 404);
    let hello = server.run(&first, "echo hello; echo oops >&2");
    assert_eq!(hello.exit_code(), Some(0));
    let three = server.run(&first, "exit 3");
    assert_eq!(three.exit_code(), Some(3));
    let url = server.execute(&first, "sleep 60", 1);
    assert_eq!(
        server.connect(&url).transcript().end,
        json!({"type": "timeout"})
    );
    // Without the token the metrics are refused like every other route.
    assert_eq!(
        server.request_with("GET", "/metrics", None, None).status,
        401
    );
    server.wait_idle(1, 2);

    let text = scrape(&server);
    let requests = |route: &str, status: u16| {
        sample(
            &text,
            &format!("poseidon_http_requests_total{{route=\"{route}\",status=\"{status}\"}}"),
        )
    };
    assert_eq!(requests("put_environment", 201), 1.0);
    assert_eq!(requests("provide_runner", 200), 2.0);
    assert_eq!(requests("provide_runner", 404), 1.0);
    assert_eq!(requests("delete_runner", 204), 1.0);
    assert_eq!(requests("execute", 200), 3.0);
    assert_eq!(requests("websocket", 101), 3.0);
    assert_eq!(requests("metrics", 401), 1.0);
    let count = sample(
        &text,
        "poseidon_http_request_duration_seconds_count{route=\"provide_runner\",status=\"200\"}",
    );
    assert_eq!(count, 2.0);
    let inf = sample(
        &text,
        "poseidon_http_request_duration_seconds_bucket{route=\"provide_runner\",status=\"200\",le=\"+Inf\"}",
    );
    assert_eq!(inf, 2.0);

    assert_eq!(sample(&text, "poseidon_environments"), 1.0);
    let env = "{environment_id=\"1\"}";
    assert_eq!(
        sample(&text, &format!("poseidon_prewarming_pool_size{env}")),
        2.0
    );
    assert_eq!(sample(&text, &format!("poseidon_idle_runners{env}")), 2.0);
    assert_eq!(sample(&text, &format!("poseidon_used_runners{env}")), 1.0);

    assert_eq!(sample(&text, "poseidon_executions_started_total"), 3.0);
    let ended = |outcome: &str| {
        sample(
            &text,
            &format!("poseidon_executions_ended_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(ended("exit"), 2.0);
    assert_eq!(ended("timeout"), 1.0);
    assert_eq!(ended("oom"), 0.0);
    assert_eq!(ended("error"), 0.0);
    assert_eq!(sample(&text, "poseidon_executions_running"), 0.0);
    assert_eq!(
        sample(&text, "poseidon_execution_duration_seconds_count"),
        3.0
    );
    // "hello\r\n" on the terminal, "oops\n" on the stderr pipe.
    let stdout = "poseidon_output_bytes_total{stream=\"stdout\"}";
    assert_eq!(sample(&text, stdout), 7.0);
    let stderr = "poseidon_output_bytes_total{stream=\"stderr\"}";
    assert_eq!(sample(&text, stderr), 5.0);

    assert_eq!(sample(&text, "poseidon_claim_duration_seconds_count"), 2.0);
    // Two for the pool, one after each claim (the deleted runner is not reused).
    assert!(sample(&text, "poseidon_prewarm_duration_seconds_count") >= 4.0);
    assert_eq!(sample(&text, "poseidon_prewarm_failures_total"), 0.0);

    assert!(sample(&text, "process_resident_memory_bytes") > 1e6);
    assert!(sample(&text, "process_threads") >= 8.0);
    assert!(sample(&text, "process_open_fds") >= 3.0);
    let build = format!(
        "poseidon_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&text, &build), 1.0);
}

/// One HTTP/1.1 request over a fresh connection; returns the whole answer.
fn raw_get(address: std::net::SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect_timeout(&address, TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: scraper\r\n\r\n").expect("request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    answer
}

#[test]
fn a_separate_address_serves_metrics_without_the_token() {
    let server = TestServer::start_with(|config| {
        config.server.token = Some(TOKEN.into());
        config.metrics.listen = Some("127.0.0.1:0".parse().expect("address"));
    });
    server.environment(4, 1);
    let address = server.handle().metrics_addr().expect("metrics listener");
    let answer = raw_get(address, "/metrics");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    let body = answer.split_once("\r\n\r\n").expect("head").1;
    assert_eq!(
        sample(body, "poseidon_prewarming_pool_size{environment_id=\"4\"}"),
        1.0
    );
    assert_eq!(
        sample(
            body,
            "poseidon_http_requests_total{route=\"put_environment\",status=\"201\"}"
        ),
        1.0
    );
    // Nothing else is served there: not the API, not the status page.
    for path in ["/", "/api/v1/execution-environments", "/metricsx"] {
        let answer = raw_get(address, path);
        assert!(answer.starts_with("HTTP/1.1 404 "), "{path}: {answer}");
    }
    // The API's own route still wants the token.
    assert_eq!(
        server.request_with("GET", "/metrics", None, None).status,
        401
    );
}

#[test]
fn image_pulls_are_counted_while_in_progress_and_when_done() {
    use image_support::{Image, Layer, Registry, build::busybox_layer, token::TokenFront};
    if !image_support::isolate_network() {
        return;
    }
    let registry = Registry::start();
    let marker = Layer::builder().file("etc/marker", b"m\n").gzip();
    let image = Image::new(vec![busybox_layer(), marker], &["PATH=/bin"]);
    registry.push("course/counted", "1", &image);
    let layers = image.layers.iter().map(|l| l.digest.clone()).collect();
    // The registry holds the layers back until the test opens it.
    let mut front = TokenFront::gated(registry.url(), layers);
    let server = TestServer::start_with(|config| {
        config.runner.executor = poseidon_lite::config::ExecutorKind::Sandbox;
        config.images.offline = false;
    });
    let body = json!({"image": format!("{}/course/counted:1", front.host), "prewarmingPoolSize": 1,
        "cpuLimit": 20, "memoryLimit": 256, "networkAccess": false, "exposedPorts": []});
    let answer = server.send("PUT", "/execution-environments/1", &body);
    assert_eq!(answer.status, 201, "{}", answer.text());
    let text = scrape(&server);
    assert_eq!(sample(&text, "poseidon_image_pulls_in_progress"), 1.0);
    assert_eq!(
        sample(&text, "poseidon_image_pulls_total{result=\"ok\"}"),
        0.0
    );
    front.open();
    server.wait_idle(1, 1);
    let text = scrape(&server);
    assert_eq!(sample(&text, "poseidon_image_pulls_in_progress"), 0.0);
    assert_eq!(
        sample(&text, "poseidon_image_pulls_total{result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "poseidon_image_pulls_total{result=\"failed\"}"),
        0.0
    );
    assert_eq!(
        sample(&text, "poseidon_image_pull_duration_seconds_count"),
        1.0
    );
    assert!(sample(&text, "poseidon_image_pull_bytes_total") > 0.0);
}
