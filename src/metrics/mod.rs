//! Metrics: what the server counts while it works, kept in atomics so that recording on hot
//! paths costs a few atomic adds, and rendered on demand in Prometheus' text exposition format
//! ([`text`]). The same figures feed the status page: running executions with their start,
//! recent errors and out-of-memory kills, image pulls in progress.
//!
//! Gauges that the manager knows exactly (idle and used runners, pool sizes) are not kept
//! here: they are read from the manager when rendering.

mod histogram;
pub mod influx;
pub mod process;
pub mod text;

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

pub use histogram::{BUCKETS, Histogram, Snapshot};
use influx::{Field, Influx, Point};

use crate::dto::{Environment, EnvironmentStatistics};

/// Recent notices kept for the status page.
const RECENT: usize = 20;

/// How an execution ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The program exited (with any code).
    Exit,
    /// The time limit or the runner's inactivity timeout ended it.
    Timeout,
    /// It was killed for exceeding the memory limit.
    Oom,
    /// It could not run or failed (output limit, lost process, shutdown).
    Error,
    /// Its runner was deleted while it ran.
    Stopped,
    /// The client went away before it ended.
    Disconnected,
}

impl Ended {
    /// Every outcome, in rendering order.
    pub const ALL: [Ended; 6] = [
        Ended::Exit,
        Ended::Timeout,
        Ended::Oom,
        Ended::Error,
        Ended::Stopped,
        Ended::Disconnected,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::Exit => "exit",
            Ended::Timeout => "timeout",
            Ended::Oom => "oom",
            Ended::Error => "error",
            Ended::Stopped => "stopped",
            Ended::Disconnected => "disconnected",
        }
    }
}

/// Something an operator should see on the status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// When it happened.
    pub at: SystemTime,
    /// `error` or `oom`.
    pub kind: &'static str,
    /// What happened.
    pub text: String,
}

/// A running execution, for the status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningExecution {
    /// Its runner.
    pub runner: String,
    /// When it started.
    pub started: Instant,
}

/// An image pull in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullInProgress {
    /// The image reference.
    pub image: String,
    /// When it started.
    pub started: Instant,
}

/// Everything counted; one per server.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    started_at: SystemTime,
    requests: Mutex<BTreeMap<(&'static str, u16), Histogram>>,
    claims: Histogram,
    executions: Histogram,
    executions_started: AtomicU64,
    outcomes: [AtomicU64; Ended::ALL.len()],
    /// stdout, stderr.
    output_bytes: [AtomicU64; 2],
    prewarms: Histogram,
    prewarm_failures: AtomicU64,
    pulls: Histogram,
    pulls_failed: AtomicU64,
    pull_bytes: AtomicU64,
    next_key: AtomicU64,
    running: Mutex<BTreeMap<u64, RunningExecution>>,
    pulling: Mutex<BTreeMap<u64, PullInProgress>>,
    recent: Mutex<VecDeque<Notice>>,
    /// Poseidon's InfluxDB measurements, when configured.
    influx: RwLock<Option<Influx>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            started_at: SystemTime::now(),
            requests: Mutex::default(),
            claims: Histogram::default(),
            executions: Histogram::default(),
            executions_started: AtomicU64::new(0),
            outcomes: Default::default(),
            output_bytes: Default::default(),
            prewarms: Histogram::default(),
            prewarm_failures: AtomicU64::new(0),
            pulls: Histogram::default(),
            pulls_failed: AtomicU64::new(0),
            pull_bytes: AtomicU64::new(0),
            next_key: AtomicU64::new(0),
            running: Mutex::default(),
            pulling: Mutex::default(),
            recent: Mutex::default(),
            influx: RwLock::default(),
        }
    }
}

impl Metrics {
    /// Counts one answered request of `route` (a [`crate::api::Route`] name).
    pub fn request(&self, route: &'static str, status: u16, duration: Duration) {
        {
            let mut requests = self.requests.lock().expect("metrics poisoned");
            requests
                .entry((route, status))
                .or_default()
                .observe(duration);
        }
        if let Some(name) = influx::poseidon_route(route) {
            let nanos = i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX);
            self.point(|| {
                Point::new(format!("poseidon_{name}"))
                    .tag("status", status)
                    .field("duration", Field::Int(nanos))
            });
        }
    }

    /// Sends Poseidon's measurements to InfluxDB from now on (until [`Metrics::stop_influx`]).
    pub fn start_influx(&self, influx: Influx) {
        *self.influx.write().expect("metrics poisoned") = Some(influx);
    }

    /// Whether InfluxDB points are sent.
    pub fn influx_on(&self) -> bool {
        self.influx.read().expect("metrics poisoned").is_some()
    }

    /// Stops queueing InfluxDB points; the writer finishes what is queued.
    pub fn stop_influx(&self) {
        self.influx.write().expect("metrics poisoned").take();
    }

    /// Queues the point `make` builds, if InfluxDB is configured (it is built only then).
    fn point(&self, make: impl FnOnce() -> Point) {
        if let Some(influx) = self.influx.read().expect("metrics poisoned").as_ref() {
            influx.push(&make());
        }
    }

    /// An environment was created or replaced; `count` environments exist now.
    pub fn environment_stored(&self, environment: &Environment, created: bool, count: usize) {
        let id = environment.id;
        let size = i64::from(environment.prewarming_pool_size);
        self.point(|| {
            Point::new("poseidon_poolsize")
                .tag("environment_id", id)
                .field("prewarming_pool_size", Field::Int(size))
        });
        if created {
            self.point(|| {
                Point::new("poseidon_environments")
                    .tag("id", id)
                    .tag("event_type", "creation")
                    .field("count", Field::Int(count as i64))
                    .field("image", Field::Text(environment.image.clone()))
                    .field("cpu_limit", Field::Int(i64::from(environment.cpu_limit)))
                    .field(
                        "memory_limit",
                        Field::Int(i64::from(environment.memory_limit)),
                    )
                    .field("network_access", Field::Bool(environment.network_access))
            });
        }
    }

    /// An environment was deleted; `count` environments are left.
    pub fn environment_deleted(&self, id: u64, count: usize) {
        self.point(|| {
            Point::new("poseidon_environments")
                .tag("id", id)
                .tag("event_type", "deletion")
                .field("count", Field::Int(count as i64))
        });
    }

    /// A runner was claimed (`creation`) or deleted (`deletion`); `used` of its environment
    /// are claimed now.
    pub fn runner_used(&self, runner: &str, event: &'static str, used: usize) {
        let environment = runner.split('-').next().unwrap_or_default().to_owned();
        self.point(|| {
            Point::new("poseidon_used_runners")
                .tag("id", runner)
                .tag("event_type", event)
                .tag("environment_id", environment)
                .field("count", Field::Int(used as i64))
        });
    }

    /// The periodic points: environments, and per environment idle and used runners and
    /// running executions.
    pub fn periodic(&self, pools: &[EnvironmentStatistics]) {
        let running = self.running();
        self.point(|| {
            Point::new("poseidon_environments")
                .tag("event_type", "periodically")
                .field("count", Field::Int(pools.len() as i64))
        });
        for pool in pools {
            let prefix = format!("{}-", pool.id);
            let executions = running
                .iter()
                .filter(|execution| execution.runner.starts_with(&prefix))
                .count();
            let figures = [
                ("poseidon_nomad_idle_runners", pool.idle_runners),
                ("poseidon_used_runners", pool.used_runners),
                ("poseidon_nomad_executions", executions),
            ];
            for (measurement, count) in figures {
                self.point(|| {
                    Point::new(measurement)
                        .tag("environment_id", pool.id)
                        .tag("event_type", "periodically")
                        .field("count", Field::Int(count as i64))
                });
            }
        }
    }

    /// Times one successful claim of a runner.
    pub fn claim(&self, duration: Duration) {
        self.claims.observe(duration);
    }

    /// Times one runner created for a pool (`ok` false: the creation failed).
    pub fn prewarm(&self, duration: Duration, ok: bool) {
        match ok {
            true => self.prewarms.observe(duration),
            false => _ = self.prewarm_failures.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Remembers an error for the status page.
    pub fn notice(&self, kind: &'static str, text: String) {
        let mut recent = self.recent.lock().expect("metrics poisoned");
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(Notice {
            at: SystemTime::now(),
            kind,
            text,
        });
    }

    /// Registers a starting execution; the returned guard records its end.
    pub fn execution_started(self: &Arc<Self>, runner: &str) -> ExecutionGuard {
        self.executions_started.fetch_add(1, Ordering::Relaxed);
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let execution = RunningExecution {
            runner: runner.to_owned(),
            started,
        };
        self.running
            .lock()
            .expect("metrics poisoned")
            .insert(key, execution);
        ExecutionGuard {
            metrics: Arc::clone(self),
            key,
            started,
        }
    }

    /// Registers an image pull; the returned guard records its end. For the image store.
    pub fn image_pull_started(self: &Arc<Self>, image: &str) -> PullGuard {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let pull = PullInProgress {
            image: image.to_owned(),
            started,
        };
        self.pulling
            .lock()
            .expect("metrics poisoned")
            .insert(key, pull);
        PullGuard {
            metrics: Arc::clone(self),
            key,
            started,
            finished: false,
        }
    }

    /// How long the server has been up.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Running executions, oldest first.
    pub fn running(&self) -> Vec<RunningExecution> {
        let running = self.running.lock().expect("metrics poisoned");
        running.values().cloned().collect()
    }

    /// Image pulls in progress, oldest first.
    pub fn pulling(&self) -> Vec<PullInProgress> {
        let pulling = self.pulling.lock().expect("metrics poisoned");
        pulling.values().cloned().collect()
    }

    /// Recent errors and out-of-memory kills, newest first.
    pub fn recent(&self) -> Vec<Notice> {
        let recent = self.recent.lock().expect("metrics poisoned");
        recent.iter().rev().cloned().collect()
    }

    /// Requests answered so far, by route and status.
    pub fn requests(&self) -> BTreeMap<(&'static str, u16), Snapshot> {
        let requests = self.requests.lock().expect("metrics poisoned");
        requests
            .iter()
            .map(|(key, histogram)| (*key, histogram.snapshot()))
            .collect()
    }

    /// Executions ended with `outcome` so far.
    pub fn ended(&self, outcome: Ended) -> u64 {
        self.outcomes[outcome as usize].load(Ordering::Relaxed)
    }

    /// Executions started so far.
    pub fn started(&self) -> u64 {
        self.executions_started.load(Ordering::Relaxed)
    }
}

/// Keeps an execution listed as running; [`ExecutionGuard::finish`] records how it ended.
#[derive(Debug)]
pub struct ExecutionGuard {
    metrics: Arc<Metrics>,
    key: u64,
    started: Instant,
}

impl ExecutionGuard {
    /// The execution's runner.
    pub fn runner(&self) -> String {
        let running = self.metrics.running.lock().expect("metrics poisoned");
        running
            .get(&self.key)
            .map(|execution| execution.runner.clone())
            .unwrap_or_default()
    }

    /// Records the end: outcome, duration from start to the final message, output bytes.
    pub fn finish(self, outcome: Ended, stdout_bytes: u64, stderr_bytes: u64) {
        let metrics = &self.metrics;
        metrics.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
        metrics.executions.observe(self.started.elapsed());
        metrics.output_bytes[0].fetch_add(stdout_bytes, Ordering::Relaxed);
        metrics.output_bytes[1].fetch_add(stderr_bytes, Ordering::Relaxed);
    }
}

impl Drop for ExecutionGuard {
    fn drop(&mut self) {
        let mut running = self.metrics.running.lock().expect("metrics poisoned");
        running.remove(&self.key);
    }
}

/// Keeps an image pull listed as in progress; [`PullGuard::finish`] records how it ended
/// (dropping it unfinished counts as a failure).
#[derive(Debug)]
pub struct PullGuard {
    metrics: Arc<Metrics>,
    key: u64,
    started: Instant,
    finished: bool,
}

impl PullGuard {
    /// Records the end of the pull: `Ok(bytes fetched)` or the error's text.
    pub fn finish(mut self, result: Result<u64, String>) {
        self.finished = true;
        let metrics = &self.metrics;
        match result {
            Ok(bytes) => {
                metrics.pulls.observe(self.started.elapsed());
                metrics.pull_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(text) => {
                metrics.pulls_failed.fetch_add(1, Ordering::Relaxed);
                metrics.notice("error", format!("image pull failed: {text}"));
            }
        }
    }
}

impl Drop for PullGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics.pulls_failed.fetch_add(1, Ordering::Relaxed);
        }
        let mut pulling = self.metrics.pulling.lock().expect("metrics poisoned");
        pulling.remove(&self.key);
    }
}
