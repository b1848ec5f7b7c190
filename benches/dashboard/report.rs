//! The figures one executor's run produces, with units in their (serialized) names.

use std::time::Duration;

use serde::Serialize;

/// p50 and p99 of some timings.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    /// Median in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile (nearest rank) in milliseconds.
    pub p99_ms: f64,
    /// Number of samples.
    pub samples: usize,
}

impl Percentiles {
    /// The percentiles of `times` (sorted in place).
    pub fn of(times: &mut [Duration]) -> Percentiles {
        times.sort_unstable();
        let rank = |p: f64| {
            let index = ((p * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1;
            times[index].as_secs_f64() * 1e3
        };
        Percentiles {
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            samples: times.len(),
        }
    }

    /// "p50 / p99 ms".
    pub fn show(&self) -> String {
        format!("p50 {:.3} ms, p99 {:.3} ms", self.p50_ms, self.p99_ms)
    }
}

/// Medians of the stages of an execute round trip, each from the end of the previous one.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stages {
    /// `POST /execute` answered.
    pub post_ms: f64,
    /// WebSocket connected and upgraded.
    pub handshake_ms: f64,
    /// `start` received.
    pub start_ms: f64,
    /// `exit` received.
    pub exit_ms: f64,
}

impl Stages {
    /// The four medians.
    pub fn show(&self) -> String {
        format!(
            "p50 stages: POST {:.3} + handshake {:.3} + start {:.3} + exit {:.3} ms",
            self.post_ms, self.handshake_ms, self.start_ms, self.exit_ms
        )
    }
}

/// Sustained executions at one concurrency.
#[derive(Debug, Serialize)]
pub struct Rate {
    /// Worker threads, each with its own runner.
    pub concurrency: usize,
    /// Executions completed (exit received).
    pub executions: u64,
    /// Executions per second.
    pub per_second: f64,
}

impl Rate {
    /// "c=N: X/s".
    pub fn show(&self) -> String {
        format!("c={}: {:.0}/s", self.concurrency, self.per_second)
    }
}

/// `PATCH /files` of one file size.
#[derive(Debug, Serialize)]
pub struct Copy {
    /// File size in MiB.
    pub size_mib: u64,
    /// Number of PATCH requests timed.
    pub copies: usize,
    /// File bytes per second (MB = 10^6 bytes).
    pub mb_per_s: f64,
    /// Duration of one PATCH.
    pub patch: Percentiles,
    /// Server RSS before, in KiB.
    pub rss_before_kib: u64,
    /// Server peak RSS during the copies, in KiB.
    pub peak_rss_kib: u64,
}

impl Copy {
    /// Throughput and memory.
    pub fn show(&self) -> String {
        format!(
            "{:.0} MB/s, RSS {:.1} -> {}",
            self.mb_per_s,
            self.rss_before_kib as f64 / 1024.0,
            mib(self.peak_rss_kib)
        )
    }
}

/// One execution writing 100 MiB.
#[derive(Debug, Serialize)]
pub struct Output {
    /// The command.
    pub command: &'static str,
    /// Bytes the program wrote.
    pub program_bytes: u64,
    /// Bytes of stdout data received (the terminal turns "\n" into "\r\n").
    pub received_bytes: u64,
    /// `stdout` messages they came in.
    pub stdout_messages: u64,
    /// From `POST /execute` to `exit`.
    pub seconds: f64,
    /// Program output per second (MB = 10^6 bytes).
    pub mb_per_s: f64,
    /// The same output read straight from a pseudo-terminal in the same run, without the
    /// server: the kernel's ceiling on this host.
    pub bare_pty_mb_per_s: f64,
    /// Server RSS before, in KiB.
    pub rss_before_kib: u64,
    /// Server peak RSS during the execution, in KiB.
    pub peak_rss_kib: u64,
    /// CPU time of the server (with the program, once reaped) during the execution.
    pub server_cpu_s: f64,
    /// CPU time of the bench's client during the execution.
    pub client_cpu_s: f64,
}

impl Output {
    /// Throughput and memory.
    pub fn show(&self) -> String {
        format!(
            "{:.0} MB/s (bare pty {:.0}, {} msgs), RSS {:.1} -> {}",
            self.mb_per_s,
            self.bare_pty_mb_per_s,
            self.stdout_messages,
            self.rss_before_kib as f64 / 1024.0,
            mib(self.peak_rss_kib)
        )
    }
}

/// The big idle pool.
#[derive(Debug, Serialize)]
pub struct Many {
    /// Pool size asked for.
    pub requested: u64,
    /// Idle runners reached.
    pub idle: u64,
    /// Time from the PUT until `idle` runners were idle (or the wait ended).
    pub seconds: f64,
    /// Server RSS before the PUT, in KiB.
    pub rss_before_kib: u64,
    /// Server RSS with `idle` idle runners, in KiB.
    pub rss_kib: u64,
    /// Why fewer than `requested` became idle (the host's limit), if so.
    pub limit: Option<String>,
    /// Time to delete the environment holding all but 100 of them.
    pub delete_s: f64,
}

impl Many {
    /// Count, time and memory.
    pub fn show(&self) -> String {
        format!(
            "{} of {} idle in {:.1} s, RSS {}",
            self.idle,
            self.requested,
            self.seconds,
            mib(self.rss_kib)
        )
    }
}

/// Everything measured for one executor.
#[derive(Debug, Serialize)]
pub struct Figures {
    /// Server RSS after start, in KiB.
    pub rss_idle_kib: u64,
    /// From the PUT of a pool of 100 until all 100 are idle.
    pub prewarm_100_s: f64,
    /// The server with 1,000 idle runners.
    #[serde(rename = "idle_runners")]
    pub many: Many,
    /// `GET /version`: the HTTP round trip floor, for comparison with the claim.
    #[serde(rename = "http_floor_get_version")]
    pub http_floor: Percentiles,
    /// `POST /runners` from a prewarmed pool.
    #[serde(rename = "claim_latency")]
    pub claim: Percentiles,
    /// `POST /runners` with `state.sync` (records flushed to the disk before the answer),
    /// from a second server.
    #[serde(rename = "claim_latency_state_sync")]
    pub claim_synced: Option<Percentiles>,
    /// A bare write of a runner-record-sized file (create, write, rename) in the state
    /// directory: what a claim waits for besides the HTTP round trip.
    #[serde(rename = "record_write_reference")]
    pub record_write: Option<Percentiles>,
    /// The execution phases.
    #[serde(flatten)]
    pub executions: Executions,
    /// Time from SIGTERM to the server's exit.
    pub stop_s: Option<f64>,
    /// ERROR lines the server logged during the run.
    pub server_errors: Vec<String>,
}

/// What the execution phases measured.
#[derive(Debug, Serialize)]
pub struct Executions {
    /// Bare fork+exec+wait of `/bin/true`, measured right before the round trips.
    #[serde(rename = "fork_exec_true_baseline")]
    pub fork_exec: Percentiles,
    /// Bare fork+exec+wait of `bash -c true` (what the server runs), for comparison.
    #[serde(rename = "fork_exec_bash_true_reference")]
    pub fork_exec_bash: Percentiles,
    /// `POST /execute` → WebSocket connect → `true` → `exit` received.
    #[serde(rename = "execute_round_trip")]
    pub execute: Percentiles,
    /// Where the execute round trip's time goes.
    #[serde(rename = "execute_round_trip_stages")]
    pub execute_stages: Stages,
    /// Execute round trip p50 / bare fork+exec p50.
    pub execute_ratio_to_fork_exec: f64,
    /// Sustained executions per second at concurrency 1, 2, 4, 8.
    #[serde(rename = "executions_per_second")]
    pub rates: Vec<Rate>,
    /// `PATCH /files` throughput.
    #[serde(rename = "file_copy")]
    pub copies: Vec<Copy>,
    /// Output throughput of one execution: `head -c 100M /dev/zero`, `yes | head -c 100M`.
    #[serde(rename = "output_throughput")]
    pub outputs: Vec<Output>,
}

/// "12.3 MiB".
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// "1.234 s".
pub fn secs(seconds: f64) -> String {
    format!("{seconds:.3} s")
}
