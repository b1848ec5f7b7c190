//! The client side: Poseidon's HTTP API over a ureq agent (every status returned, never an
//! error) and executions over a tungstenite WebSocket, as CodeOcean drives them. Every answer
//! is checked; anything unexpected is an `Err` naming what went wrong.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::{Value, json};
use tungstenite::{Message, client::IntoClientRequest, protocol::frame::coding::CloseCode};

/// Timeout of every client call.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A client of one server.
#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    api: String,
    websocket: SocketAddr,
}

/// One message of an execution, as far as the bench reads it.
#[derive(Debug, Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    data: Option<Value>,
}

/// What one execution produced.
#[derive(Debug)]
pub struct Run {
    /// From `POST /execute` to the `exit` message.
    pub round_trip: Duration,
    /// Stages of the round trip: `POST /execute` answered, WebSocket handshake done, `start`
    /// received, `exit` received (each measured from the previous one).
    pub stages: [Duration; 4],
    /// Bytes of stdout data (decoded from the JSON strings).
    pub stdout_bytes: u64,
    /// `stdout` messages.
    pub stdout_frames: u64,
}

impl Client {
    /// A client of the API at `api` whose executions run on `websocket`.
    pub fn new(api: &str, websocket: SocketAddr) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(TIMEOUT))
            .build()
            .into();
        Client {
            agent,
            api: api.to_owned(),
            websocket,
        }
    }

    /// A client of the same server with its own connections.
    pub fn fresh(&self) -> Client {
        Client::new(&self.api, self.websocket)
    }

    /// Sends a request and returns the status and body.
    pub fn call(&self, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.api))
            .header("Content-Type", "application/json")
            .body(body.to_vec())
            .map_err(|err| format!("{method} {path}: {err}"))?;
        let mut response = self
            .agent
            .run(request)
            .map_err(|err| format!("{method} {path} failed: {err}"))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .map_err(|err| format!("reading the answer to {method} {path} failed: {err}"))?;
        Ok((status, body))
    }

    /// Sends a request that must answer with one of `expected`; returns the body.
    pub fn expect(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        expected: &[u16],
    ) -> Result<Vec<u8>, String> {
        let (status, answer) = self.call(method, path, body)?;
        if expected.contains(&status) {
            return Ok(answer);
        }
        Err(format!(
            "{method} {path} answered {status} (expected {expected:?}): {}",
            String::from_utf8_lossy(&answer)
        ))
    }

    /// Creates or replaces environment `id` as CodeOcean does, with a pool of `pool`.
    pub fn environment(&self, id: u32, pool: u32) -> Result<(), String> {
        let body = json!({"id": id, "image": "openhpi/co_execenv_python:3.8",
            "prewarmingPoolSize": pool, "cpuLimit": 20, "memoryLimit": 256,
            "networkAccess": false, "exposedPorts": []});
        let path = format!("/execution-environments/{id}");
        self.expect("PUT", &path, body.to_string().as_bytes(), &[201, 204])?;
        Ok(())
    }

    /// Deletes environment `id`.
    pub fn delete_environment(&self, id: u32) -> Result<(), String> {
        self.expect(
            "DELETE",
            &format!("/execution-environments/{id}"),
            b"",
            &[204],
        )?;
        Ok(())
    }

    /// The number of idle runners of environment `id`.
    pub fn idle(&self, id: u32) -> Result<u64, String> {
        let body = self.expect("GET", "/statistics/execution-environments", b"", &[200])?;
        let stats: Value = serde_json::from_slice(&body)
            .map_err(|err| format!("statistics are not JSON ({err})"))?;
        stats[id.to_string()]["idleRunners"]
            .as_u64()
            .ok_or_else(|| format!("statistics without idleRunners of {id}: {stats}"))
    }

    /// Claims a runner of environment `id`.
    pub fn claim(&self, id: u32) -> Result<String, String> {
        let body = json!({"executionEnvironmentId": id, "inactivityTimeout": 600});
        let answer = self.expect("POST", "/runners", body.to_string().as_bytes(), &[200])?;
        let answer: Value = serde_json::from_slice(&answer)
            .map_err(|err| format!("POST /runners: answer is not JSON ({err})"))?;
        answer["runnerId"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("POST /runners: no runnerId in {answer}"))
    }

    /// Destroys a claimed runner.
    pub fn release(&self, runner: &str) -> Result<(), String> {
        self.expect("DELETE", &format!("/runners/{runner}"), b"", &[204])?;
        Ok(())
    }

    /// Runs `command` in `runner` to its end; it must exit with 0.
    pub fn run(&self, runner: &str, command: &str) -> Result<Run, String> {
        let started = Instant::now();
        let body = json!({"command": command, "timeLimit": 120});
        let path = format!("/runners/{runner}/execute");
        let answer = self.expect("POST", &path, body.to_string().as_bytes(), &[200])?;
        let posted = Instant::now();
        let answer: Value = serde_json::from_slice(&answer)
            .map_err(|err| format!("POST {path}: answer is not JSON ({err})"))?;
        let url = answer["websocketUrl"]
            .as_str()
            .ok_or_else(|| format!("POST {path}: no websocketUrl in {answer}"))?;
        let request = url
            .into_client_request()
            .map_err(|err| format!("bad websocketUrl {url}: {err}"))?;
        let stream = TcpStream::connect(self.websocket)
            .map_err(|err| format!("cannot connect to {}: {err}", self.websocket))?;
        let no_timeout = |err| format!("cannot set a socket timeout: {err}");
        stream.set_read_timeout(Some(TIMEOUT)).map_err(no_timeout)?;
        stream
            .set_write_timeout(Some(TIMEOUT))
            .map_err(no_timeout)?;
        stream.set_nodelay(true).map_err(no_timeout)?;
        let (socket, _) = tungstenite::client(request, stream)
            .map_err(|err| format!("WebSocket handshake with {url} failed: {err}"))?;
        Execution::new(socket, command).read([started, posted, Instant::now()])
    }
}

/// Reads one execution's messages and checks them: `start`, output, `exit` 0, close 1000.
struct Execution {
    socket: tungstenite::WebSocket<TcpStream>,
    command: String,
    started: Option<Instant>,
    stdout_bytes: u64,
    stdout_frames: u64,
}

impl Execution {
    fn new(socket: tungstenite::WebSocket<TcpStream>, command: &str) -> Execution {
        Execution {
            socket,
            command: command.to_owned(),
            started: None,
            stdout_bytes: 0,
            stdout_frames: 0,
        }
    }

    /// Reads to the end; `times` are the request's start, its answer and the handshake's end.
    fn read(mut self, times: [Instant; 3]) -> Result<Run, String> {
        let start = loop {
            let frame = self.next_frame()?;
            match (frame.kind.as_str(), self.started) {
                ("start", None) => self.started = Some(Instant::now()),
                (_, None) => return Err(self.unexpected("first message is not start", &frame)),
                ("stdout" | "stderr", Some(_)) => self.count(&frame)?,
                ("exit", Some(start)) if frame.data == Some(json!(0)) => break start,
                _ => return Err(self.unexpected("unexpected message", &frame)),
            }
        };
        let [request, posted, connected] = times;
        let exit = Instant::now();
        self.expect_close()?;
        Ok(Run {
            round_trip: exit - request,
            stages: [
                posted - request,
                connected - posted,
                start - connected,
                exit - start,
            ],
            stdout_bytes: self.stdout_bytes,
            stdout_frames: self.stdout_frames,
        })
    }

    fn next_frame(&mut self) -> Result<Frame, String> {
        loop {
            match self.socket.read() {
                Ok(Message::Text(text)) => {
                    let fast = self.started.and_then(|_| stdout_length(&text));
                    if let Some(bytes) = fast {
                        self.stdout_bytes += bytes;
                        self.stdout_frames += 1;
                        continue;
                    }
                    return serde_json::from_str(&text).map_err(|err| {
                        format!("`{}`: not a message ({err}): {text}", self.command)
                    });
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                Ok(other) => return Err(format!("`{}`: unexpected frame {other:?}", self.command)),
                Err(err) => {
                    return Err(format!("`{}`: WebSocket read failed: {err}", self.command));
                }
            }
        }
    }

    fn count(&mut self, frame: &Frame) -> Result<(), String> {
        let Some(Value::String(data)) = &frame.data else {
            return Err(self.unexpected("output without a string", frame));
        };
        if frame.kind == "stdout" {
            self.stdout_bytes += data.len() as u64;
            self.stdout_frames += 1;
        }
        Ok(())
    }

    fn expect_close(&mut self) -> Result<(), String> {
        let mut closed = false;
        loop {
            match self.socket.read() {
                Ok(Message::Close(Some(frame))) if frame.code == CloseCode::Normal => closed = true,
                Ok(Message::Close(frame)) => {
                    return Err(format!("`{}`: closed with {frame:?}", self.command));
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                Ok(other) => {
                    return Err(format!("`{}`: {other:?} after exit", self.command));
                }
                Err(tungstenite::Error::ConnectionClosed) if closed => return Ok(()),
                Err(err) => {
                    return Err(format!(
                        "`{}`: no clean close after exit: {err}",
                        self.command
                    ));
                }
            }
        }
    }

    fn unexpected(&self, what: &str, frame: &Frame) -> String {
        format!("`{}`: {what}: {frame:?}", self.command)
    }
}

/// The decoded length of a `stdout` message's data, for messages exactly as poseidon-lite
/// writes them (`{"type":"stdout","data":"…"}`); `None` for anything else, which is then
/// parsed and checked in full. Keeps the client's share of the two cores small while it
/// reads hundreds of megabytes of escaped output.
fn stdout_length(text: &str) -> Option<u64> {
    let data = text
        .strip_prefix(r#"{"type":"stdout","data":""#)?
        .strip_suffix(r#""}"#)?
        .as_bytes();
    let (mut length, mut index) = (0u64, 0);
    while index < data.len() {
        // The common case of binary output: a NUL.
        if data[index..].starts_with(br"\u0000") {
            length += 1;
            index += 6;
            continue;
        }
        match data[index] {
            b'"' => return None,
            b'\\' => {
                let (bytes, used) = escape_length(&data[index + 1..])?;
                length += bytes;
                index += 1 + used;
            }
            _ => {
                length += 1;
                index += 1;
            }
        }
    }
    Some(length)
}

/// The UTF-8 length of the escape after a backslash and how many bytes it used.
fn escape_length(escape: &[u8]) -> Option<(u64, usize)> {
    match escape.first()? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some((1, 1)),
        b'u' => match hex4(escape.get(1..5)?)? {
            0..0x80 => Some((1, 5)),
            0x80..0x800 => Some((2, 5)),
            0xd800..0xdc00 if escape.get(5..7) == Some(b"\\u") => {
                matches!(hex4(escape.get(7..11)?)?, 0xdc00..0xe000).then_some((4, 11))
            }
            0xd800..0xe000 => None,
            _ => Some((3, 5)),
        },
        _ => None,
    }
}

/// Four hex digits.
fn hex4(digits: &[u8]) -> Option<u32> {
    digits.iter().try_fold(0, |value, &digit| {
        Some(value << 4 | char::from(digit).to_digit(16)?)
    })
}
