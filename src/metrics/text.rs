//! Prometheus' text exposition format (version 0.0.4): `# HELP`, `# TYPE`, then one line per
//! sample, label values escaped.

use std::{
    fmt::{Display, Write},
    sync::atomic::Ordering,
    time::UNIX_EPOCH,
};

use super::{BUCKETS, Ended, Metrics, Snapshot, process};
use crate::dto::EnvironmentStatistics;

/// The `Content-Type` of a scrape answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Writes metric families into a string.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// Starts a family.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (index, (label, text)) in labels.iter().enumerate() {
                if index > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"{}\"", escape(text));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// The samples of one histogram: buckets, sum and count.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], snapshot: &Snapshot) {
        let bucket = format!("{name}_bucket");
        for (index, count) in snapshot.cumulative.iter().enumerate() {
            let bound = BUCKETS
                .get(index)
                .map_or_else(|| "+Inf".to_owned(), ToString::to_string);
            let mut with_le = labels.to_vec();
            with_le.push(("le", &bound));
            self.sample(&bucket, &with_le, count);
        }
        self.sample(&format!("{name}_sum"), labels, snapshot.sum);
        self.sample(&format!("{name}_count"), labels, snapshot.count());
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// Backslash, double quote and line feed are escaped in label values.
fn escape(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Every metric of the server, with the pools as the manager reports them.
pub fn render(metrics: &Metrics, pools: &[EnvironmentStatistics], release: &str) -> String {
    let mut out = Exposition::default();
    requests(&mut out, metrics);
    environments(&mut out, pools);
    executions(&mut out, metrics);
    runners(&mut out, metrics);
    images(&mut out, metrics);
    server(&mut out, metrics, release);
    out.finish()
}

fn requests(out: &mut Exposition, metrics: &Metrics) {
    let requests = metrics.requests();
    out.family(
        "poseidon_http_requests_total",
        "counter",
        "Answered API requests (and WebSocket handshakes) by route and status.",
    );
    for ((route, status), snapshot) in &requests {
        let status = status.to_string();
        let labels = [("route", *route), ("status", status.as_str())];
        out.sample("poseidon_http_requests_total", &labels, snapshot.count());
    }
    out.family(
        "poseidon_http_request_duration_seconds",
        "histogram",
        "Time from a request's arrival to its answer, by route and status.",
    );
    for ((route, status), snapshot) in &requests {
        let status = status.to_string();
        let labels = [("route", *route), ("status", status.as_str())];
        out.histogram("poseidon_http_request_duration_seconds", &labels, snapshot);
    }
}

fn environments(out: &mut Exposition, pools: &[EnvironmentStatistics]) {
    out.family(
        "poseidon_environments",
        "gauge",
        "Execution environments defined.",
    );
    out.sample("poseidon_environments", &[], pools.len());
    type Gauge = (
        &'static str,
        &'static str,
        fn(&EnvironmentStatistics) -> u64,
    );
    let gauges: [Gauge; 3] = [
        (
            "poseidon_prewarming_pool_size",
            "Idle runners an environment keeps ready (its prewarmingPoolSize).",
            |pool| u64::from(pool.prewarming_pool_size),
        ),
        (
            "poseidon_idle_runners",
            "Idle runners of an environment, ready to be claimed.",
            |pool| pool.idle_runners as u64,
        ),
        (
            "poseidon_used_runners",
            "Claimed runners of an environment.",
            |pool| pool.used_runners as u64,
        ),
    ];
    for (name, help, value) in gauges {
        out.family(name, "gauge", help);
        for pool in pools {
            let id = pool.id.to_string();
            out.sample(name, &[("environment_id", &id)], value(pool));
        }
    }
}

fn executions(out: &mut Exposition, metrics: &Metrics) {
    out.family(
        "poseidon_executions_started_total",
        "counter",
        "Executions started over a WebSocket.",
    );
    out.sample("poseidon_executions_started_total", &[], metrics.started());
    out.family(
        "poseidon_executions_ended_total",
        "counter",
        "Executions ended, by outcome (exit, timeout, oom, error, stopped, disconnected).",
    );
    for outcome in Ended::ALL {
        let labels = [("outcome", outcome.as_str())];
        let value = metrics.ended(outcome);
        out.sample("poseidon_executions_ended_total", &labels, value);
    }
    out.family(
        "poseidon_executions_running",
        "gauge",
        "Executions running now.",
    );
    let running = metrics.running.lock().expect("metrics poisoned").len();
    out.sample("poseidon_executions_running", &[], running);
    out.family(
        "poseidon_execution_duration_seconds",
        "histogram",
        "Round trip of an execution: from its start message to its final message.",
    );
    let snapshot = metrics.executions.snapshot();
    out.histogram("poseidon_execution_duration_seconds", &[], &snapshot);
    out.family(
        "poseidon_output_bytes_total",
        "counter",
        "Output bytes of ended executions, by stream.",
    );
    for (index, stream) in ["stdout", "stderr"].into_iter().enumerate() {
        let value = metrics.output_bytes[index].load(Ordering::Relaxed);
        out.sample("poseidon_output_bytes_total", &[("stream", stream)], value);
    }
}

fn runners(out: &mut Exposition, metrics: &Metrics) {
    out.family(
        "poseidon_claim_duration_seconds",
        "histogram",
        "Time to claim a runner (POST /runners), successful claims only.",
    );
    let snapshot = metrics.claims.snapshot();
    out.histogram("poseidon_claim_duration_seconds", &[], &snapshot);
    out.family(
        "poseidon_prewarm_duration_seconds",
        "histogram",
        "Time to create one runner for an idle pool.",
    );
    let snapshot = metrics.prewarms.snapshot();
    out.histogram("poseidon_prewarm_duration_seconds", &[], &snapshot);
    out.family(
        "poseidon_prewarm_failures_total",
        "counter",
        "Runners that could not be created for an idle pool.",
    );
    let failures = metrics.prewarm_failures.load(Ordering::Relaxed);
    out.sample("poseidon_prewarm_failures_total", &[], failures);
}

fn images(out: &mut Exposition, metrics: &Metrics) {
    out.family(
        "poseidon_image_pulls_total",
        "counter",
        "Image pulls, by result.",
    );
    let snapshot = metrics.pulls.snapshot();
    let failed = metrics.pulls_failed.load(Ordering::Relaxed);
    out.sample(
        "poseidon_image_pulls_total",
        &[("result", "ok")],
        snapshot.count(),
    );
    out.sample(
        "poseidon_image_pulls_total",
        &[("result", "failed")],
        failed,
    );
    out.family(
        "poseidon_image_pulls_in_progress",
        "gauge",
        "Image pulls running now.",
    );
    let pulling = metrics.pulling.lock().expect("metrics poisoned").len();
    out.sample("poseidon_image_pulls_in_progress", &[], pulling);
    out.family(
        "poseidon_image_pull_duration_seconds",
        "histogram",
        "Time of a successful image pull.",
    );
    out.histogram("poseidon_image_pull_duration_seconds", &[], &snapshot);
    out.family(
        "poseidon_image_pull_bytes_total",
        "counter",
        "Size of the images pulled successfully.",
    );
    let bytes = metrics.pull_bytes.load(Ordering::Relaxed);
    out.sample("poseidon_image_pull_bytes_total", &[], bytes);
}

fn server(out: &mut Exposition, metrics: &Metrics, release: &str) {
    out.family(
        "poseidon_build_info",
        "gauge",
        "Always 1; the label names the release.",
    );
    out.sample("poseidon_build_info", &[("version", release)], 1);
    let figures = process::figures();
    let start = metrics
        .started_at
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64());
    let samples: [(&str, &str, &str, f64); 5] = [
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of the server process.",
            figures.resident_bytes as f64,
        ),
        (
            "process_threads",
            "gauge",
            "Threads of the server process.",
            figures.threads as f64,
        ),
        (
            "process_open_fds",
            "gauge",
            "Open file descriptors of the server process.",
            figures.open_fds as f64,
        ),
        (
            "process_cpu_seconds_total",
            "counter",
            "CPU time (user and system) of the server process.",
            figures.cpu_seconds,
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start of the server in seconds since the Unix epoch.",
            start,
        ),
    ];
    for (name, kind, help, value) in samples {
        out.family(name, kind, help);
        out.sample(name, &[], value);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut out = Exposition::default();
        out.sample("m", &[("a", "x\"y\\z\nw"), ("b", "c")], 2);
        assert_eq!(out.finish(), "m{a=\"x\\\"y\\\\z\\nw\",b=\"c\"} 2\n");
    }

    #[test]
    fn histograms_end_with_inf_sum_and_count() {
        let metrics = Metrics::default();
        metrics.request("provide_runner", 200, Duration::from_millis(2));
        let text = render(&metrics, &[], "1.0");
        for line in [
            "poseidon_http_requests_total{route=\"provide_runner\",status=\"200\"} 1",
            "poseidon_http_request_duration_seconds_bucket{route=\"provide_runner\",status=\"200\",le=\"0.001\"} 0",
            "poseidon_http_request_duration_seconds_bucket{route=\"provide_runner\",status=\"200\",le=\"0.0025\"} 1",
            "poseidon_http_request_duration_seconds_bucket{route=\"provide_runner\",status=\"200\",le=\"+Inf\"} 1",
            "poseidon_http_request_duration_seconds_count{route=\"provide_runner\",status=\"200\"} 1",
            "# TYPE poseidon_http_request_duration_seconds histogram",
            "poseidon_build_info{version=\"1.0\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
