//! Poseidon's InfluxDB monitoring, for operators whose dashboards are built on it: the same
//! measurement names and tags, written in line protocol to InfluxDB v2's `/api/v2/write`.
//!
//! Points are queued in a bounded channel (a full queue drops the point and counts it: a
//! request never waits for InfluxDB) and written in batches by one thread, which retries a
//! failed batch (Poseidon: 50 times, 5 s apart) while new points keep queueing.

use std::{
    fmt::Write,
    sync::atomic::{AtomicU64, Ordering},
    thread::{self, JoinHandle},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use crate::config::InfluxdbConfig;

/// Points queued at most; more are dropped.
const QUEUE: usize = 10_000;
/// Points written in one request at most.
const BATCH: usize = 5_000;
/// Attempts per batch, as Poseidon.
const ATTEMPTS: u32 = 50;

/// A field value.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    /// An integer (`…i`).
    Int(i64),
    /// A string.
    Text(String),
    /// A boolean.
    Bool(bool),
}

/// One point, before the `stage` tag and the time are added.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// The measurement, e.g. `poseidon_poolsize`.
    pub measurement: String,
    /// Tags (sorted when written).
    pub tags: Vec<(&'static str, String)>,
    /// Fields (at least one).
    pub fields: Vec<(&'static str, Field)>,
}

impl Point {
    /// A point of `measurement`.
    pub fn new(measurement: impl Into<String>) -> Point {
        Point {
            measurement: measurement.into(),
            tags: Vec::new(),
            fields: Vec::new(),
        }
    }

    /// Adds a tag.
    pub fn tag(mut self, key: &'static str, value: impl ToString) -> Point {
        self.tags.push((key, value.to_string()));
        self
    }

    /// Adds a field.
    pub fn field(mut self, key: &'static str, value: Field) -> Point {
        self.fields.push((key, value));
        self
    }

    /// The point in line protocol, with `stage` among its tags, at `nanos` since the epoch.
    pub fn line(&self, stage: &str, nanos: u128) -> String {
        let mut line = escape(&self.measurement, ", ");
        let mut tags: Vec<(&str, &str)> = self
            .tags
            .iter()
            .map(|(key, value)| (*key, value.as_str()))
            .chain(std::iter::once(("stage", stage)))
            .filter(|(_, value)| !value.is_empty())
            .collect();
        tags.sort();
        for (key, value) in tags {
            let _ = write!(line, ",{key}={}", escape(value, ",= "));
        }
        for (index, (key, value)) in self.fields.iter().enumerate() {
            line.push(if index == 0 { ' ' } else { ',' });
            let _ = match value {
                Field::Int(number) => write!(line, "{key}={number}i"),
                Field::Bool(flag) => write!(line, "{key}={flag}"),
                Field::Text(text) => write!(line, "{key}=\"{}\"", escape(text, "\"")),
            };
        }
        let _ = write!(line, " {nanos}");
        line
    }
}

/// Backslash-escapes `special` characters (and backslashes in strings).
fn escape(text: &str, special: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if special.contains(c) || (c == '\\' && special.contains('"')) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Poseidon's name of a route (the measurement is `poseidon_<name>`).
pub fn poseidon_route(route: &str) -> Option<&'static str> {
    Some(match route {
        "health" => "/health",
        "version" => "/version",
        "statistics" => "/execution-environments",
        "list_environments" => "list",
        "get_environment" => "get",
        "put_environment" => "createOrUpdate",
        "delete_environment" => "delete",
        "provide_runner" => "provideRunner",
        "delete_runner" => "deleteRunner",
        "list_files" => "/files_list",
        "update_files" => "/files",
        "download_file" => "/files/raw",
        "execute" => "/execute",
        "websocket" => "/websocket",
        _ => return None,
    })
}

/// The queue of points and the thread that writes them.
#[derive(Debug)]
pub struct Influx {
    queue: Sender<String>,
    stage: String,
    dropped: AtomicU64,
}

impl Influx {
    /// Starts the writer; it ends when the returned [`Influx`] is dropped and the queue is
    /// written (or given up on).
    pub fn start(config: &InfluxdbConfig) -> std::io::Result<(Influx, JoinHandle<()>)> {
        let (queue, lines) = crossbeam_channel::bounded(QUEUE);
        let writer = Writer::new(config);
        let thread = thread::Builder::new()
            .name("influxdb".into())
            .spawn(move || writer.run(&lines))?;
        let influx = Influx {
            queue,
            stage: config.stage.clone(),
            dropped: AtomicU64::new(0),
        };
        Ok((influx, thread))
    }

    /// Queues a point; drops it when the queue is full.
    pub fn push(&self, point: &Point) {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        match self.queue.try_send(point.line(&self.stage, nanos)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                if self
                    .dropped
                    .fetch_add(1, Ordering::Relaxed)
                    .is_multiple_of(1000)
                {
                    log::warn!("InfluxDB is not keeping up: points are dropped");
                }
            }
        }
    }
}

/// Writes batches to `/api/v2/write`.
struct Writer {
    url: String,
    token: String,
    retry: Duration,
    agent: ureq::Agent,
}

impl Writer {
    fn new(config: &InfluxdbConfig) -> Writer {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("org", &config.organization)
            .append_pair("bucket", &config.bucket)
            .append_pair("precision", "ns")
            .finish();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        Writer {
            url: format!("{}/api/v2/write?{query}", config.url.trim_end_matches('/')),
            token: config.token.clone(),
            retry: Duration::from_millis(config.retry_interval_ms.max(1)),
            agent,
        }
    }

    fn run(&self, lines: &Receiver<String>) {
        let mut batch: Vec<String> = Vec::new();
        loop {
            if batch.is_empty() {
                match lines.recv() {
                    Ok(line) => batch.push(line),
                    Err(_) => return,
                }
            }
            // Whatever else is queued goes along.
            batch.extend(lines.try_iter().take(BATCH.saturating_sub(batch.len())));
            let mut attempt = 1;
            while let Err(err) = self.write(&batch) {
                if attempt == ATTEMPTS {
                    log::error!(
                        "InfluxDB: {} points given up after {ATTEMPTS} attempts: {err}",
                        batch.len()
                    );
                    break;
                }
                log::warn!(
                    "InfluxDB: cannot write {} points ({err}); retrying",
                    batch.len()
                );
                attempt += 1;
                match lines.recv_timeout(self.retry) {
                    // Keep the newest points while waiting, up to a batch.
                    Ok(line) if batch.len() < BATCH => batch.push(line),
                    Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => thread::sleep(self.retry),
                }
            }
            batch.clear();
        }
    }

    fn write(&self, batch: &[String]) -> Result<(), String> {
        let mut body = batch.join("\n");
        body.push('\n');
        let mut request = self
            .agent
            .post(&self.url)
            .header("Content-Type", "text/plain; charset=utf-8");
        if !self.token.is_empty() {
            request = request.header("Authorization", &format!("Token {}", self.token));
        }
        let response = request.send(body).map_err(|err| err.to_string())?;
        match response.status().as_u16() {
            200..=299 => Ok(()),
            status => Err(format!("answered {status}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_written_in_line_protocol() {
        let point = Point::new("poseidon_/execute")
            .tag("status", 200)
            .tag("environment_id", "a b,c=d")
            .field("duration", Field::Int(1500))
            .field("image", Field::Text("x \"y\" \\z".into()))
            .field("network_access", Field::Bool(false));
        assert_eq!(
            point.line("prod", 17),
            "poseidon_/execute,environment_id=a\\ b\\,c\\=d,stage=prod,status=200 \
             duration=1500i,image=\"x \\\"y\\\" \\\\z\",network_access=false 17"
        );
    }

    #[test]
    fn an_empty_stage_is_left_out() {
        let point = Point::new("m x").field("count", Field::Int(1));
        assert_eq!(point.line("", 5), "m\\ x count=1i 5");
    }
}
