//! Poseidon's InfluxDB monitoring: the points reach a line-protocol receiver of the test's
//! own (an HTTP server speaking InfluxDB v2's write API), with Poseidon's measurement names
//! and tags; a receiver that hangs or fails blocks no request and loses no point.

mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    sync::mpsc,
    thread,
};

use support::{TIMEOUT, TestServer};

/// One write request as received.
#[derive(Debug)]
struct Received {
    target: String,
    authorization: Option<String>,
    lines: Vec<String>,
}

/// Serves InfluxDB's write route on a loopback port. The first request waits until `release`
/// is signalled and is then refused with 503; the rest are accepted with 204.
fn receiver() -> (String, mpsc::Receiver<Received>, mpsc::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let (writes_tx, writes) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    thread::spawn(move || {
        let mut first = true;
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let _ = stream.set_read_timeout(Some(TIMEOUT));
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut head = String::new();
            let (mut length, mut authorization) = (0, None);
            let mut target = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let trimmed = line.trim_end().to_owned();
                if head.is_empty() {
                    target = trimmed.split(' ').nth(1).unwrap_or_default().to_owned();
                }
                head.push_str(&line);
                if trimmed.is_empty() {
                    break;
                }
                let (name, value) = trimmed.split_once(':').unwrap_or_default();
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "authorization" => authorization = Some(value.trim().to_owned()),
                    _ => {}
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let status = if std::mem::take(&mut first) {
                let _ = released.recv_timeout(TIMEOUT);
                "503 Service Unavailable"
            } else {
                "204 No Content"
            };
            let lines = String::from_utf8_lossy(&body)
                .lines()
                .map(str::to_owned)
                .collect();
            let _ = writes_tx.send(Received {
                target,
                authorization,
                lines,
            });
            let mut stream = stream;
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (url, writes, release)
}

#[test]
fn poseidons_measurements_reach_influxdb() {
    let (url, writes, release) = receiver();
    let server = TestServer::start_with(|config| {
        config.influxdb.url = url.clone();
        config.influxdb.token = "influx-token".into();
        config.influxdb.organization = "openHPI".into();
        config.influxdb.bucket = "poseidon".into();
        config.influxdb.stage = "test".into();
        config.influxdb.retry_interval_ms = 20;
        config.influxdb.interval_secs = 1;
    });
    // The receiver holds the first write: none of this may wait for it.
    server.environment(5, 1);
    server.wait_idle(5, 1);
    let runner = server.runner(5, 0);
    assert_eq!(server.run(&runner, "true").exit_code(), Some(0));
    assert_eq!(server.delete(&format!("/runners/{runner}")).status, 204);
    assert_eq!(server.delete("/execution-environments/5").status, 204);
    release.send(()).expect("release");

    let mut refused = None;
    let mut accepted: Vec<String> = Vec::new();
    let expected = [
        "poseidon_createOrUpdate,stage=test,status=201 duration=",
        "poseidon_poolsize,environment_id=5,stage=test prewarming_pool_size=1i ",
        "poseidon_environments,event_type=creation,id=5,stage=test count=1i,image=\"openhpi/co_execenv_python:3.8\",cpu_limit=20i,memory_limit=256i,network_access=false ",
        "poseidon_provideRunner,stage=test,status=200 duration=",
        &format!(
            "poseidon_used_runners,environment_id=5,event_type=creation,id={runner},stage=test count=1i "
        ),
        "poseidon_/execute,stage=test,status=200 duration=",
        "poseidon_/websocket,stage=test,status=101 duration=",
        &format!(
            "poseidon_used_runners,environment_id=5,event_type=deletion,id={runner},stage=test count=0i "
        ),
        "poseidon_deleteRunner,stage=test,status=204 duration=",
        "poseidon_environments,event_type=deletion,id=5,stage=test count=0i ",
        "poseidon_delete,stage=test,status=204 duration=",
        "poseidon_environments,event_type=periodically,stage=test count=",
    ];
    while !expected
        .iter()
        .all(|prefix| accepted.iter().any(|line| line.starts_with(prefix)))
    {
        let write = writes.recv_timeout(TIMEOUT).unwrap_or_else(|_| {
            panic!("points missing; accepted so far:\n{}", accepted.join("\n"))
        });
        assert_eq!(
            write.target,
            "/api/v2/write?org=openHPI&bucket=poseidon&precision=ns"
        );
        assert_eq!(write.authorization.as_deref(), Some("Token influx-token"));
        match refused {
            None => refused = Some(write.lines),
            Some(_) => accepted.extend(write.lines),
        }
    }
    // The refused batch was written again: nothing was lost.
    let refused = refused.expect("a refused write");
    assert!(!refused.is_empty());
    for line in &refused {
        assert!(accepted.contains(line), "{line} was lost");
    }
    // Durations are integers (nanoseconds), times are nanoseconds since the epoch.
    let execute = accepted
        .iter()
        .find(|line| line.starts_with("poseidon_/execute,"))
        .expect("execute point");
    let fields: Vec<&str> = execute.split(' ').collect();
    assert_eq!(fields.len(), 3, "{execute}");
    assert!(
        fields[1]
            .strip_prefix("duration=")
            .is_some_and(|d| d.ends_with('i'))
    );
    assert!(fields[2].len() >= 19, "{execute}");
}
