//! Executions over the WebSocket: protocol, terminal, stdin, stderr, exit codes and limits.

mod support;

use serde_json::json;
use support::{TestServer, Ws};

#[test]
fn a_command_streams_output_and_exits_with_its_code() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let transcript = server.run(&runner, "echo hello; echo oops >&2; exit 3");
    assert_eq!(transcript.stdout, "hello\r\n");
    assert_eq!(transcript.stderr, "oops\n");
    assert_eq!(transcript.end, json!({"type": "exit", "data": 3}));
}

#[test]
fn the_terminal_echoes_stdin_and_the_program_reads_it() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let url = server.execute(&runner, "head -n 1", 20);
    let mut ws = server.connect(&url);
    assert_eq!(ws.next(), Some(json!({"type": "start"})));
    ws.send("Hello World!\n");
    let transcript = ws.transcript_rest();
    assert_eq!(
        transcript.stdout.matches("Hello World!\r\n").count(),
        2,
        "{transcript:?}"
    );
    assert_eq!(transcript.exit_code(), Some(0));
}

#[test]
fn the_time_limit_ends_the_execution_with_timeout() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    // Longer than the client's read timeout: without the limit the test fails.
    let url = server.execute(&runner, "sleep 60", 1);
    let transcript = server.connect(&url).transcript();
    assert_eq!(transcript.end, json!({"type": "timeout"}));
}

#[test]
fn an_execution_id_is_single_use() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let url = server.execute(&runner, "true", 5);
    server.connect(&url).transcript();
    let err = Ws::connect(&url, None)
        .err()
        .expect("second connect refused");
    assert!(err.contains("404"), "{err}");
}

#[test]
fn messages_follow_the_schema_and_end_with_one_final_message_and_close() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    // `transcript` checks the schema of every message, the order and the close code.
    let transcript = server.run(&runner, "printf \"a\\nb\\n\"; printf c >&2");
    assert_eq!(transcript.messages.first(), Some(&json!({"type": "start"})));
    assert_eq!(
        transcript.messages.last(),
        Some(&json!({"type": "exit", "data": 0}))
    );
    assert_eq!(transcript.stdout, "a\r\nb\r\n");
    assert_eq!(transcript.stderr, "c");
}

#[test]
fn the_program_sees_a_terminal_on_stdin_and_stdout_but_not_on_stderr() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let transcript = server.run(
        &runner,
        "test -t 0 && echo in-tty; test -t 1 && echo out-tty; test -t 2 || echo err-pipe",
    );
    assert_eq!(transcript.stdout, "in-tty\r\nout-tty\r\nerr-pipe\r\n");
}

#[test]
fn signal_deaths_are_reported_as_128_plus_the_signal() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    assert_eq!(server.run(&runner, "kill -KILL $$").exit_code(), Some(137));
    assert_eq!(server.run(&runner, "kill -TERM $$").exit_code(), Some(143));
    assert_eq!(server.run(&runner, "exit 255").exit_code(), Some(255));
}

#[test]
fn control_c_interrupts_the_program() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let url = server.execute(&runner, "echo ready; sleep 30", 20);
    let mut ws = server.connect(&url);
    ws.wait_for_stdout("ready");
    ws.send("\u{3}");
    let transcript = ws.transcript_rest();
    assert_eq!(transcript.exit_code(), Some(130), "{transcript:?}");
}

#[test]
fn the_environment_has_codeocean_set_and_request_variables_but_nothing_of_the_server() {
    // cargo runs tests with CARGO_* variables; the server must not pass them on.
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
    let server = TestServer::start();
    let runner = server.ready_runner();
    let url = server.execute_with(
        &runner,
        &json!({"command": "echo \"$CODEOCEAN|$GREETING|$(env | grep -c ^CARGO_)\"",
                "timeLimit": 10, "environment": {"GREETING": "hello world"}}),
    );
    let transcript = server.connect(&url).transcript();
    assert_eq!(transcript.stdout, "true|hello world|0\r\n");
}

#[test]
fn commands_with_newlines_and_tabs_run_as_written() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let transcript = server.run(&runner, "echo one\n\techo two");
    assert_eq!(transcript.stdout, "one\r\ntwo\r\n");
}

#[test]
fn utf8_split_across_reads_is_not_mangled_and_invalid_bytes_are_replaced() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let transcript = server.run(
        &runner,
        r#"printf "\xf0\x9f"; sleep 0.2; printf "\xa6\x80 gr\xc3\xbc\xc3\x9fe \xff\n""#,
    );
    assert_eq!(transcript.stdout, "🦀 grüße \u{fffd}\r\n");
}

#[test]
fn large_output_arrives_complete_and_in_order() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let transcript = server.run(&runner, "seq 1 100000");
    let lines: Vec<&str> = transcript
        .stdout
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(lines.len(), 100_000);
    assert!(
        lines
            .iter()
            .enumerate()
            .all(|(i, line)| line.parse::<usize>() == Ok(i + 1))
    );
    assert_eq!(transcript.exit_code(), Some(0));
}

#[test]
fn closing_the_websocket_kills_the_program_promptly() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let marker = format!("marker-{}", std::process::id());
    let url = server.execute(
        &runner,
        &format!("echo started; exec -a {marker} sleep 60"),
        60,
    );
    let mut ws = server.connect(&url);
    ws.wait_for_stdout("started");
    ws.socket.close(None).expect("close");
    // The server answers the close frame and the program is gone.
    while ws.next().is_some() {}
    let check = server.run(
        &runner,
        &format!(
            "pgrep -f [{}]{} >/dev/null && echo alive || echo gone",
            &marker[..1],
            &marker[1..]
        ),
    );
    assert_eq!(check.stdout, "gone\r\n");
    // The runner stays usable.
    assert_eq!(server.run(&runner, "true").exit_code(), Some(0));
}

#[test]
fn several_executions_run_on_one_runner_at_once() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let first = server.execute(&runner, "read line; echo got $line", 20);
    let second = server.execute(&runner, "echo second", 20);
    let mut first = server.connect(&first);
    assert_eq!(first.next(), Some(json!({"type": "start"})));
    let second = server.connect(&second).transcript();
    assert_eq!(second.stdout, "second\r\n");
    first.send("x\n");
    let first = first.transcript_rest();
    assert!(first.stdout.ends_with("got x\r\n"), "{first:?}");
}

#[test]
fn input_sent_before_the_program_reads_is_buffered() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let url = server.execute(&runner, "sleep 0.5; read a; read b; echo \"$a+$b\"", 20);
    let mut ws = server.connect(&url);
    ws.send("1\n");
    ws.send("2\n");
    let transcript = ws.transcript();
    assert!(transcript.stdout.ends_with("1+2\r\n"), "{transcript:?}");
}

#[test]
fn the_websocket_handshake_checks_runner_and_execution() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let url = server.execute(&runner, "true", 5);
    let unknown_execution = url.split("executionID=").next().unwrap().to_owned()
        + "executionID=00000000-0000-4000-8000-000000000000";
    let err = Ws::connect(&unknown_execution, None)
        .err()
        .expect("refused");
    assert!(err.contains("404"), "{err}");
    let other_runner = url.replace(&runner, "1-00000000-0000-4000-8000-000000000000");
    let err = Ws::connect(&other_runner, None).err().expect("refused");
    assert!(err.contains("410"), "{err}");
    // The refused attempts did not use up the execution.
    assert_eq!(server.connect(&url).transcript().exit_code(), Some(0));
}

#[test]
fn fifty_executions_on_fifty_runners_run_concurrently() {
    let server = TestServer::start();
    server.environment(1, 0);
    // Every program waits for its input, which is sent only once all fifty are running:
    // they can only finish if they really run at the same time.
    let mut sessions: Vec<(usize, Ws)> = (0..50)
        .map(|i| {
            let runner = server.runner(1, 0);
            let url = server.execute(
                &runner,
                &format!("echo ready; read line; echo run-{i}-$line"),
                20,
            );
            let mut ws = server.connect(&url);
            ws.wait_for_stdout("ready");
            (i, ws)
        })
        .collect();
    for (_, ws) in &mut sessions {
        ws.send("go\n");
    }
    let threads: Vec<_> = sessions
        .into_iter()
        .map(|(i, ws)| {
            std::thread::spawn(move || {
                let transcript = ws.transcript_rest();
                assert!(
                    transcript.stdout.ends_with(&format!("run-{i}-go\r\n")),
                    "{transcript:?}"
                );
                assert_eq!(transcript.exit_code(), Some(0));
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("execution thread");
    }
}

#[test]
fn short_external_commands_exit_normally() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    for i in 0..40 {
        let transcript = server.run(&runner, &format!("touch f{i}; ln -s f{i} l{i}"));
        assert_eq!(transcript.exit_code(), Some(0), "run {i}: {transcript:?}");
    }
}

#[test]
fn a_websocket_from_a_foreign_origin_is_refused_and_the_execution_kept() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let url = server.execute(&runner, "true", 5);
    let mut request =
        tungstenite::client::IntoClientRequest::into_client_request(url.as_str()).expect("request");
    request
        .headers_mut()
        .insert("Origin", "https://evil.example".parse().expect("header"));
    let stream = std::net::TcpStream::connect(server.handle().websocket_addr()).expect("connect");
    let err = tungstenite::client(request, stream).expect_err("refused");
    assert!(err.to_string().contains("403"), "{err}");
    assert_eq!(server.connect(&url).transcript().exit_code(), Some(0));
}

#[test]
fn programs_do_not_inherit_the_servers_raised_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    // The binary raises its own limit to the maximum; do the same here so the check can fail.
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).expect("raise the limit");
    let server = TestServer::start();
    let runner = server.ready_runner();
    let transcript = server.run(&runner, "ulimit -n");
    let files: u64 = transcript.stdout.trim().parse().expect("a number");
    assert!(files <= 1024, "{files}");
}

#[test]
fn programs_cannot_raise_their_file_limit_again() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let transcript = server.run(&runner, "ulimit -Hn; ulimit -n 20000 && echo raised");
    let lines: Vec<&str> = transcript.stdout.lines().collect();
    let hard: u64 = lines[0].trim().parse().expect("a number");
    assert!(hard <= 1024, "{hard}");
    assert!(!transcript.stdout.contains("raised"), "{transcript:?}");
}
