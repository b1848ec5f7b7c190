//! One executor's run against one server: the phases in order, each with its progress on
//! stderr and a check that the server is still alive afterwards.

use std::{
    thread,
    time::{Duration, Instant},
};

use super::{
    client::Client,
    report::{Figures, Many, Percentiles, Rate, mib, secs},
    server::ServerProcess,
};

/// Environment whose pool of 100 is timed and whose runners run the executions.
pub const WORK_ENV: u32 = 1;
/// Environment whose pool of 200 is claimed from.
pub const CLAIM_ENV: u32 = 2;
/// Environment that tops the idle runners up to [`MANY`].
pub const MANY_ENV: u32 = 3;
/// Runners in the work pool.
pub const WORK_POOL: u64 = 100;
/// Idle runners of the whole server in the memory phase.
pub const MANY: u64 = 1000;

/// One executor's run: the server and a client of it.
pub struct Bench<'a> {
    /// `process` or `sandbox`.
    pub executor: &'a str,
    /// The server under test.
    pub server: &'a mut ServerProcess,
    /// A client of it.
    pub client: Client,
}

impl Bench<'_> {
    /// Runs every phase and returns the figures.
    pub fn run(&mut self) -> Result<Figures, String> {
        let rss_idle_kib = self.step("idle RSS", Self::idle_rss, |kib| mib(*kib))?;
        let prewarm = self.step("prewarm 100 runners", Self::prewarm, |s| secs(*s))?;
        let many = self.step("1,000 idle runners", Self::many, Many::show)?;
        let http_floor = self.step(
            "HTTP floor (GET /version)",
            Self::http_floor,
            Percentiles::show,
        )?;
        let claim = self.step("claim latency", Self::claim_latency, Percentiles::show)?;
        let executions = self.executions()?;
        Ok(Figures {
            rss_idle_kib,
            prewarm_100_s: prewarm,
            many,
            http_floor,
            claim,
            claim_synced: None,
            record_write: None,
            executions,
            stop_s: None,
            server_errors: Vec::new(),
        })
    }

    /// Runs one phase with progress on stderr, then checks that the server still lives.
    pub fn step<T>(
        &mut self,
        what: &str,
        phase: impl FnOnce(&mut Self) -> Result<T, String>,
        show: impl FnOnce(&T) -> String,
    ) -> Result<T, String> {
        eprint!("[{}] {what}… ", self.executor);
        let started = Instant::now();
        let value = phase(self).inspect_err(|_| eprintln!("FAILED"))?;
        self.server.check_alive()?;
        let took = started.elapsed().as_secs_f64();
        eprintln!("done in {took:.1} s: {}", show(&value));
        Ok(value)
    }

    fn idle_rss(&mut self) -> Result<u64, String> {
        self.client.expect("GET", "/health", b"", &[204])?;
        self.client.expect("GET", "/version", b"", &[200])?;
        self.server.rss_kib()
    }

    fn prewarm(&mut self) -> Result<f64, String> {
        let started = Instant::now();
        self.client.environment(WORK_ENV, WORK_POOL as u32)?;
        wait_idle(&self.client, WORK_ENV, WORK_POOL, Duration::from_secs(60))?;
        Ok(started.elapsed().as_secs_f64())
    }

    /// Tops the server up to [`MANY`] idle runners (the work pool and a second pool), reads
    /// the RSS, then deletes the second pool.
    fn many(&mut self) -> Result<Many, String> {
        let rss_before_kib = self.server.rss_kib()?;
        let started = Instant::now();
        self.client
            .environment(MANY_ENV, (MANY - WORK_POOL) as u32)?;
        let (idle, stall) = wait_many(&self.client)?;
        let seconds = started.elapsed().as_secs_f64();
        let rss_kib = self.server.rss_kib()?;
        let limit = stall.map(|stall| {
            let warning = self.server.last_warning();
            format!(
                "{stall}; last server warning: {}",
                warning.as_deref().unwrap_or("none")
            )
        });
        if limit.is_some() && self.executor == "process" {
            return Err(format!(
                "only {idle} of {MANY} runners became idle: {limit:?}"
            ));
        }
        let deleting = Instant::now();
        self.client.delete_environment(MANY_ENV)?;
        Ok(Many {
            requested: MANY,
            idle,
            seconds,
            rss_before_kib,
            rss_kib,
            limit,
            delete_s: deleting.elapsed().as_secs_f64(),
        })
    }

    fn http_floor(&mut self) -> Result<Percentiles, String> {
        let mut times = (0..200)
            .map(|_| {
                let started = Instant::now();
                self.client.expect("GET", "/version", b"", &[200])?;
                Ok(started.elapsed())
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Percentiles::of(&mut times))
    }

    /// Claims 200 runners one after another from a full pool of 200 (which refills meanwhile).
    pub fn claim_latency(&mut self) -> Result<Percentiles, String> {
        const CLAIMS: usize = 200;
        self.client.environment(CLAIM_ENV, CLAIMS as u32)?;
        wait_idle(
            &self.client,
            CLAIM_ENV,
            CLAIMS as u64,
            Duration::from_secs(60),
        )?;
        let mut times = Vec::with_capacity(CLAIMS);
        let mut runners = Vec::with_capacity(CLAIMS);
        for _ in 0..CLAIMS {
            let started = Instant::now();
            runners.push(self.client.claim(CLAIM_ENV)?);
            times.push(started.elapsed());
        }
        for runner in &runners {
            self.client.release(runner)?;
        }
        self.client.delete_environment(CLAIM_ENV)?;
        Ok(Percentiles::of(&mut times))
    }
}

/// Waits until environment `id` has `idle` idle runners.
fn wait_idle(client: &Client, id: u32, idle: u64, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = client.idle(id)?;
        if now >= idle {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "environment {id} has {now} of {idle} idle runners after {timeout:?}"
            ));
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until the server has [`MANY`] idle runners; returns how many it reached and, if not
/// all, why the wait ended (no progress for a while: the host's limit).
fn wait_many(client: &Client) -> Result<(u64, Option<String>), String> {
    const STALL: Duration = Duration::from_secs(15);
    const LIMIT: Duration = Duration::from_secs(120);
    let started = Instant::now();
    let (mut best, mut progress, mut shown) = (0, started, started);
    loop {
        let idle = client.idle(WORK_ENV)? + client.idle(MANY_ENV)?;
        if idle >= MANY {
            return Ok((idle, None));
        }
        if idle > best {
            (best, progress) = (idle, Instant::now());
        }
        if progress.elapsed() > STALL {
            return Ok((best, Some(format!("no new idle runner for {STALL:?}"))));
        }
        if started.elapsed() > LIMIT {
            return Ok((best, Some(format!("not all within {LIMIT:?}"))));
        }
        if shown.elapsed() > Duration::from_secs(5) {
            eprint!("{idle} idle… ");
            shown = Instant::now();
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Shows sustained rates on one line.
pub fn show_rates(rates: &[Rate]) -> String {
    let shown: Vec<String> = rates.iter().map(Rate::show).collect();
    shown.join(", ")
}
