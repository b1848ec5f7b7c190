//! Wire types of Poseidon's API: request and response bodies and WebSocket messages.
//!
//! Parsing is as lenient as Poseidon's (unknown fields ignored, `null` means "not given", only
//! the first JSON value of a body is read) but wrong types and invalid values are errors.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, de::DeserializeOwned};

use crate::{
    error::{Error, Result},
    id::EnvironmentId,
};

/// Parses the first JSON value of a request body, which must be an object (as Go decodes
/// bodies into structs; serde alone would also accept an array of the fields). The body is
/// deserialized straight into `T`: an intermediate `serde_json::Value` would multiply the
/// memory a large body takes.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    match body.iter().find(|byte| !byte.is_ascii_whitespace()) {
        None => return Err(Error::bad_request("request body is empty")),
        Some(b'{') => {}
        Some(_) => {
            return Err(Error::bad_request(
                "invalid request body: expected a JSON object",
            ));
        }
    }
    let mut values = serde_json::Deserializer::from_slice(body).into_iter::<T>();
    match values.next() {
        Some(Ok(value)) => Ok(value),
        Some(Err(err)) => Err(Error::bad_request(format!("invalid request body: {err}"))),
        None => Err(Error::bad_request("request body is empty")),
    }
}

/// Deserializes `null` like a missing field: as the type's default.
fn nullable<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(
    deserializer: D,
) -> std::result::Result<T, D::Error> {
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Most entries of a `PATCH /files` list: far beyond any exercise, and a body of 64 MiB of
/// `{},` stays a few MiB of memory instead of gigabytes.
pub const MAX_FILE_ENTRIES: usize = 10_000;

/// Deserializes a list that may be `null`, refusing more than [`MAX_FILE_ENTRIES`] entries
/// while it is read (not after it was allocated).
fn bounded_list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> std::result::Result<Vec<T>, D::Error> {
    use serde::de::{Error as _, SeqAccess, Visitor};
    use std::marker::PhantomData;

    struct List<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for List<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list")
        }

        fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Vec<T>, E> {
            Ok(Vec::new())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Vec<T>, A::Error> {
            let mut list = Vec::new();
            while let Some(entry) = seq.next_element()? {
                if list.len() == MAX_FILE_ENTRIES {
                    return Err(A::Error::custom(format!(
                        "more than {MAX_FILE_ENTRIES} entries"
                    )));
                }
                list.push(entry);
            }
            Ok(list)
        }
    }

    deserializer.deserialize_any(List(PhantomData))
}

/// `POST /runners`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RunnerRequest {
    /// The environment to take a runner from.
    #[serde(rename = "executionEnvironmentId", deserialize_with = "nullable")]
    pub environment_id: u64,
    /// Seconds of inactivity after which the runner is destroyed; 0 = never.
    #[serde(rename = "inactivityTimeout", deserialize_with = "nullable")]
    pub inactivity_timeout: i64,
}

/// Answer to `POST /runners`.
#[derive(Debug, Serialize)]
pub struct RunnerResponse {
    /// The claimed runner.
    #[serde(rename = "runnerId")]
    pub runner_id: String,
    /// The runner's exposed ports and where they are reachable; always an array.
    #[serde(rename = "mappedPorts")]
    pub mapped_ports: Vec<MappedPort>,
}

/// One entry of `mappedPorts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MappedPort {
    /// The port inside the runner.
    #[serde(rename = "exposedPort")]
    pub exposed_port: u16,
    /// `<host>:<port>` that reaches it.
    #[serde(rename = "hostAddress")]
    pub host_address: String,
}

/// `POST /runners/{id}/execute`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ExecutionRequest {
    /// The command line.
    #[serde(deserialize_with = "nullable")]
    pub command: String,
    /// Run as root inside the runner.
    #[serde(rename = "privilegedExecution", deserialize_with = "nullable")]
    pub privileged_execution: bool,
    /// Seconds after which the execution is stopped; 0 = unlimited.
    #[serde(rename = "timeLimit", deserialize_with = "nullable")]
    pub time_limit: i64,
    /// Extra environment variables.
    #[serde(deserialize_with = "nullable")]
    pub environment: BTreeMap<String, String>,
}

/// Answer to `POST /runners/{id}/execute`.
#[derive(Debug, Serialize)]
pub struct ExecutionResponse {
    /// Where to connect to run the stored execution.
    #[serde(rename = "websocketUrl")]
    pub websocket_url: String,
}

/// One entry of `PATCH /runners/{id}/files`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct FileCopy {
    /// Target path; a trailing `/` makes it a directory.
    #[serde(deserialize_with = "nullable")]
    pub path: String,
    /// Standard padded base64; absent or `null` is an empty file.
    #[serde(deserialize_with = "nullable")]
    pub content: String,
}

/// `PATCH /runners/{id}/files`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct UpdateFileSystemRequest {
    /// Paths to delete first.
    #[serde(deserialize_with = "bounded_list")]
    pub delete: Vec<String>,
    /// Files to copy after deleting.
    #[serde(deserialize_with = "bounded_list")]
    pub copy: Vec<FileCopy>,
}

/// An execution environment as Poseidon stores and returns it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Environment {
    /// Idle runners to keep ready.
    #[serde(rename = "prewarmingPoolSize", deserialize_with = "nullable")]
    pub prewarming_pool_size: u32,
    /// CPU limit in MHz.
    #[serde(rename = "cpuLimit", deserialize_with = "nullable")]
    pub cpu_limit: u32,
    /// Memory limit in MB.
    #[serde(rename = "memoryLimit", deserialize_with = "nullable")]
    pub memory_limit: u32,
    /// Image name.
    #[serde(deserialize_with = "nullable")]
    pub image: String,
    /// Whether runners may use the network.
    #[serde(rename = "networkAccess", deserialize_with = "nullable")]
    pub network_access: bool,
    /// Ports to expose (stored, not mapped yet).
    #[serde(rename = "exposedPorts", deserialize_with = "nullable")]
    pub exposed_ports: Vec<u16>,
    /// The id; in a PUT body it is ignored in favour of the path's.
    #[serde(deserialize_with = "nullable")]
    pub id: u64,
}

/// Most `exposedPorts` of an environment. Each becomes a forwarded port of every runner, and
/// the list is stored with the environment: an exercise needs a handful, and a bound keeps a
/// definition small (1,000,000 ports once made an 11 MB file).
pub const MAX_EXPOSED_PORTS: usize = 64;

/// Longest `image` name in bytes, far beyond any image reference (OCI repositories are
/// limited to 255 characters).
pub const MAX_IMAGE_BYTES: usize = 1024;

impl Environment {
    /// Checks the bounds of what a client may send (files of earlier versions are not held
    /// to them: a stored definition is never refused at start).
    pub fn check_bounds(&self) -> Result<(), String> {
        if self.exposed_ports.len() > MAX_EXPOSED_PORTS {
            return Err(format!(
                "exposedPorts: at most {MAX_EXPOSED_PORTS} ports, got {}",
                self.exposed_ports.len()
            ));
        }
        if self.image.len() > MAX_IMAGE_BYTES {
            return Err(format!("image: at most {MAX_IMAGE_BYTES} bytes"));
        }
        Ok(())
    }

    /// The same definition under the path's id.
    pub fn with_id(mut self, id: EnvironmentId) -> Self {
        self.id = id.0;
        self
    }
}

/// `GET /execution-environments`.
#[derive(Debug, Serialize)]
pub struct EnvironmentList {
    /// All environments (an empty array, never `null`).
    #[serde(rename = "executionEnvironments")]
    pub environments: Vec<Environment>,
}

/// One value of `GET /statistics/execution-environments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnvironmentStatistics {
    /// The environment id.
    pub id: u64,
    /// Its pool size.
    #[serde(rename = "prewarmingPoolSize")]
    pub prewarming_pool_size: u32,
    /// Idle runners now.
    #[serde(rename = "idleRunners")]
    pub idle_runners: usize,
    /// Claimed runners now.
    #[serde(rename = "usedRunners")]
    pub used_runners: usize,
}

/// Error body of 4xx answers.
#[derive(Debug, Serialize)]
pub struct ClientError<'a> {
    /// What went wrong.
    pub message: &'a str,
}

/// Error body of 5xx answers and of the 503 health answer.
#[derive(Debug, Serialize)]
pub struct InternalServerError<'a> {
    /// What went wrong.
    pub message: &'a str,
    /// Poseidon's error code.
    #[serde(rename = "errorCode")]
    pub error_code: &'a str,
}

/// A server → client WebSocket message, exactly as `websocket.schema.json` allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum WsMessage {
    /// The execution is about to start.
    Start,
    /// A chunk of standard output (the terminal).
    Stdout(String),
    /// A chunk of standard error.
    Stderr(String),
    /// The execution failed.
    Error(String),
    /// The execution exited with this code.
    Exit(u8),
    /// The time limit or the runner's inactivity timeout was hit.
    Timeout,
}

impl WsMessage {
    /// The message as JSON text.
    pub fn to_json(&self) -> String {
        match self {
            WsMessage::Stdout(text) => output_json("stdout", text),
            WsMessage::Stderr(text) => output_json("stderr", text),
            other => serde_json::to_string(other).unwrap_or_default(),
        }
    }
}

/// How each byte is escaped in a JSON string: 0 = as is, `u` = `\u00XX`, else `\` and
/// that character.
const ESCAPES: [u8; 256] = {
    let mut table = [0; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = b'u';
        byte += 1;
    }
    table[b'\n' as usize] = b'n';
    table[b'\r' as usize] = b'r';
    table[b'\t' as usize] = b't';
    table[0x08] = b'b';
    table[0x0c] = b'f';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// `{"type":"<kind>","data":"<text>"}` exactly as serde_json writes it, but faster: program
/// output is the bulk of what the server sends, and it is often dense with escapes (one per
/// two bytes for `yes`), where serde_json's general writer makes a call per escape.
pub fn output_json(kind: &str, text: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = text.as_bytes();
    // First the exact size, then every byte written without checks for capacity: escapes are
    // often too dense (`y\r\n`) for copying the runs between them to pay off.
    let extra: usize = bytes
        .iter()
        .map(|&byte| match ESCAPES[usize::from(byte)] {
            0 => 0,
            b'u' => 5,
            _ => 1,
        })
        .sum();
    let mut json = Vec::with_capacity(bytes.len() + extra + kind.len() + 24);
    json.extend_from_slice(br#"{"type":""#);
    json.extend_from_slice(kind.as_bytes());
    json.extend_from_slice(br#"","data":""#);
    let at = json.len();
    json.resize(at + bytes.len() + extra, 0);
    let mut out = at;
    for &byte in bytes {
        match ESCAPES[usize::from(byte)] {
            0 => {
                json[out] = byte;
                out += 1;
            }
            b'u' => {
                let (high, low) = (HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 15)]);
                json[out..out + 6].copy_from_slice(&[b'\\', b'u', b'0', b'0', high, low]);
                out += 6;
            }
            escape => {
                json[out] = b'\\';
                json[out + 1] = escape;
                out += 2;
            }
        }
    }
    json.extend_from_slice(br#""}"#);
    // Only ASCII bytes were replaced, by ASCII: the text stays valid UTF-8.
    String::from_utf8(json).expect("escaping keeps UTF-8 valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_messages_match_the_schema() {
        assert_eq!(WsMessage::Start.to_json(), r#"{"type":"start"}"#);
        assert_eq!(WsMessage::Timeout.to_json(), r#"{"type":"timeout"}"#);
        assert_eq!(
            WsMessage::Exit(137).to_json(),
            r#"{"type":"exit","data":137}"#
        );
        assert_eq!(
            WsMessage::Stdout("a\r\n".into()).to_json(),
            r#"{"type":"stdout","data":"a\r\n"}"#
        );
        assert_eq!(
            WsMessage::Error("x".into()).to_json(),
            r#"{"type":"error","data":"x"}"#
        );
    }

    #[test]
    fn output_is_encoded_exactly_as_serde_json_would() {
        let texts = [
            "",
            "plain",
            "y\r\ny\r\n",
            "quote \" backslash \\ tab \t",
            "\u{0}\u{1}\u{8}\u{b}\u{c}\u{1f}\u{7f}",
            "grüße 🦀 \u{fffd}",
            "</script>&<>",
        ];
        for text in texts {
            let expected = serde_json::to_string(&WsMessage::Stdout(text.into())).unwrap();
            assert_eq!(output_json("stdout", text), expected, "{text:?}");
            assert_eq!(
                WsMessage::Stderr(text.into()).to_json(),
                expected.replace("stdout", "stderr")
            );
        }
    }

    #[test]
    fn parsing_is_lenient_like_poseidon() {
        let request: RunnerRequest =
            parse(br#"{"executionEnvironmentId":3,"inactivityTimeout":null,"x":1} trailing"#)
                .unwrap();
        assert_eq!((request.environment_id, request.inactivity_timeout), (3, 0));
        let update: UpdateFileSystemRequest =
            parse(br#"{"copy":[{"path":"a","content":null}],"delete":null}"#).unwrap();
        assert_eq!(update.copy[0].content, "");
        assert!(update.delete.is_empty());
    }

    #[test]
    fn file_lists_are_bounded_while_they_are_read() {
        let many = format!(r#"{{"copy":[{}{{}}]}}"#, "{},".repeat(MAX_FILE_ENTRIES));
        let err = parse::<UpdateFileSystemRequest>(many.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("more than 10000 entries"), "{err}");
        let wrong = parse::<UpdateFileSystemRequest>(br#"{"delete":"./*"}"#).unwrap_err();
        assert!(wrong.to_string().contains("expected a list"), "{wrong}");
    }

    #[test]
    fn wrong_types_and_negative_sizes_are_rejected() {
        let err = parse::<RunnerRequest>(br#"{"executionEnvironmentId":"3"}"#).unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(err.to_string().contains("invalid type: string"), "{err}");
        let err = parse::<Environment>(br#"{"prewarmingPoolSize":-1}"#).unwrap_err();
        assert!(
            err.to_string().contains("invalid value: integer `-1`"),
            "{err}"
        );
        assert_eq!(
            parse::<Environment>(b"  ").unwrap_err().to_string(),
            "request body is empty"
        );
        assert_eq!(
            parse::<Environment>(b"").unwrap_err().to_string(),
            "request body is empty"
        );
        assert!(parse::<Environment>(br#"{"image": "#).is_err());
        assert!(parse::<Environment>(br#"[0, 20, 256, "x", false, [], 3]"#).is_err());
    }

    #[test]
    fn environments_serialize_with_id_last_and_empty_arrays() {
        let env = Environment {
            image: "i".into(),
            ..Default::default()
        }
        .with_id(EnvironmentId(9));
        assert_eq!(
            serde_json::to_string(&env).unwrap(),
            r#"{"prewarmingPoolSize":0,"cpuLimit":0,"memoryLimit":0,"image":"i","networkAccess":false,"exposedPorts":[],"id":9}"#
        );
    }
}
