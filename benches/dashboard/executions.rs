//! The execution phases: bare fork+exec baselines, execute round trips, sustained rates, file
//! copies and output throughput, all on runners of the work pool.

use std::{
    process::Command,
    sync::Barrier,
    thread,
    time::{Duration, Instant},
};

use base64::Engine;
use serde_json::json;

use super::{
    bench::{Bench, WORK_ENV, show_rates},
    client::Client,
    report::{Copy, Executions, Output, Percentiles, Rate, Stages},
    server::cpu_seconds,
};

/// Executions timed one after another.
const ROUND_TRIPS: usize = 300;
/// Bare fork+exec runs.
const FORKS: usize = 500;
/// How long each concurrency level runs.
const RATE_WINDOW: Duration = Duration::from_millis(2500);
/// Bytes the output phase's programs write.
const OUTPUT_BYTES: u64 = 100 << 20;
/// The output phase's programs: the and DESIGN.md's.
const OUTPUT_COMMANDS: [&str; 2] = ["head -c 100M /dev/zero", "yes | head -c 100M"];

impl Bench<'_> {
    /// Runs the execution phases on runners of the work pool.
    pub fn executions(&mut self) -> Result<Executions, String> {
        let fork_exec = self.step(
            "bare fork+exec of /bin/true",
            |_| bare_run(&["/bin/true"]),
            Percentiles::show,
        )?;
        let bash = ["/bin/bash", "-c", "true"];
        let fork_exec_bash = self.step(
            "bare fork+exec of bash -c true",
            |_| bare_run(&bash),
            Percentiles::show,
        )?;
        let runner = self.client.claim(WORK_ENV)?;
        let (execute, execute_stages) = self.step(
            "execute round trip",
            |b| b.round_trips(&runner),
            |(p, s)| format!("{}; {}", p.show(), s.show()),
        )?;
        let rates = self.step("sustained executions/s", Self::rates, |rates| {
            show_rates(rates)
        })?;
        let mut copies = Vec::new();
        for (size, reps) in [(1, 10), (10, 3)] {
            let what = format!("file copy {size} MiB");
            copies.push(self.step(&what, |b| b.copy(&runner, size, reps), Copy::show)?);
        }
        let mut outputs = Vec::new();
        for command in OUTPUT_COMMANDS {
            outputs.push(self.step(command, |b| b.output(&runner, command), Output::show)?);
        }
        self.client.release(&runner)?;
        Ok(Executions {
            fork_exec,
            fork_exec_bash,
            execute_ratio_to_fork_exec: execute.p50_ms / fork_exec.p50_ms,
            execute,
            execute_stages,
            rates,
            copies,
            outputs,
        })
    }

    fn round_trips(&mut self, runner: &str) -> Result<(Percentiles, Stages), String> {
        for _ in 0..5 {
            self.client.run(runner, "true")?;
        }
        let runs = (0..ROUND_TRIPS)
            .map(|_| self.client.run(runner, "true"))
            .collect::<Result<Vec<_>, String>>()?;
        let mut times: Vec<Duration> = runs.iter().map(|run| run.round_trip).collect();
        let stage = |index: usize| {
            let mut times: Vec<Duration> = runs.iter().map(|run| run.stages[index]).collect();
            Percentiles::of(&mut times).p50_ms
        };
        let stages = Stages {
            post_ms: stage(0),
            handshake_ms: stage(1),
            start_ms: stage(2),
            exit_ms: stage(3),
        };
        Ok((Percentiles::of(&mut times), stages))
    }

    fn rates(&mut self) -> Result<Vec<Rate>, String> {
        let runners = (0..8)
            .map(|_| self.client.claim(WORK_ENV))
            .collect::<Result<Vec<_>, _>>()?;
        let rates = [1, 2, 4, 8]
            .into_iter()
            .map(|concurrency| sustained(&self.client, &runners[..concurrency]))
            .collect::<Result<Vec<_>, _>>()?;
        for runner in &runners {
            self.client.release(runner)?;
        }
        Ok(rates)
    }

    /// `reps` PATCH requests replacing the workspace with one file of `size_mib` MiB.
    fn copy(&mut self, runner: &str, size_mib: u64, reps: usize) -> Result<Copy, String> {
        let content: Vec<u8> = (0..size_mib << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let content = base64::engine::general_purpose::STANDARD.encode(content);
        let body = json!({"delete": ["./*"], "copy": [{"path": "data.bin", "content": content}]});
        let body = body.to_string().into_bytes();
        let path = format!("/runners/{runner}/files");
        let rss_before_kib = self.server.rss_kib()?;
        self.server.reset_peak()?;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let started = Instant::now();
            self.client.expect("PATCH", &path, &body, &[204])?;
            times.push(started.elapsed());
        }
        let total: Duration = times.iter().sum();
        Ok(Copy {
            size_mib,
            copies: reps,
            mb_per_s: (size_mib << 20) as f64 * reps as f64 / total.as_secs_f64() / 1e6,
            patch: Percentiles::of(&mut times),
            rss_before_kib,
            peak_rss_kib: self.server.peak_kib()?,
        })
    }

    /// One execution of `command`, which writes [`OUTPUT_BYTES`].
    fn output(&mut self, runner: &str, command: &'static str) -> Result<Output, String> {
        let rss_before_kib = self.server.rss_kib()?;
        self.server.reset_peak()?;
        let cpu = || {
            Ok::<_, String>((
                self.server.cpu_seconds()?,
                cpu_seconds("/proc/self/stat", false)?,
            ))
        };
        let before = cpu()?;
        let run = self.client.run(runner, command)?;
        let peak_rss_kib = self.server.peak_kib()?;
        let after = cpu()?;
        // The terminal turns each "\n" of `yes` into "\r\n": 50 Mi more bytes arrive.
        let newlines = if command.starts_with("yes") {
            OUTPUT_BYTES / 2
        } else {
            0
        };
        if run.stdout_bytes != OUTPUT_BYTES + newlines {
            return Err(format!(
                "`{command}`: received {} bytes of stdout, expected {}",
                run.stdout_bytes,
                OUTPUT_BYTES + newlines
            ));
        }
        let seconds = run.round_trip.as_secs_f64();
        let bare_pty_mb_per_s = bare_pty(command)?;
        Ok(Output {
            command,
            program_bytes: OUTPUT_BYTES,
            received_bytes: run.stdout_bytes,
            stdout_messages: run.stdout_frames,
            seconds,
            mb_per_s: OUTPUT_BYTES as f64 / seconds / 1e6,
            bare_pty_mb_per_s,
            rss_before_kib,
            peak_rss_kib,
            // /proc counts in hundredths of a second.
            server_cpu_s: ((after.0 - before.0) * 100.0).round() / 100.0,
            client_cpu_s: ((after.1 - before.1) * 100.0).round() / 100.0,
        })
    }
}

/// The same program's output read straight from a pseudo-terminal set up as the server sets up
/// its terminals, without the server: the kernel's ceiling for this measure on this host.
fn bare_pty(command: &str) -> Result<f64, String> {
    use std::process::Stdio;
    let (master, slave) =
        poseidon_lite::executor::pty::open().map_err(|err| format!("cannot open a pty: {err}"))?;
    let started = Instant::now();
    let mut child = Command::new("/bin/bash")
        .args(["-c", command])
        .stdin(Stdio::null())
        .stdout(Stdio::from(slave))
        .stderr(Stdio::null())
        .spawn()
        .map_err(|err| format!("cannot run {command:?}: {err}"))?;
    let mut buffer = vec![0; 64 << 10];
    let mut bytes = 0u64;
    // Reading ends with EIO once the program (and its pipeline) closed the terminal.
    while let Ok(n @ 1..) = rustix::io::read(&master, &mut buffer) {
        bytes += n as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    child
        .wait()
        .map_err(|err| format!("cannot wait for {command:?}: {err}"))?;
    if bytes != OUTPUT_BYTES {
        return Err(format!(
            "bare pty: read {bytes} bytes of `{command}`, expected {OUTPUT_BYTES}"
        ));
    }
    Ok(OUTPUT_BYTES as f64 / seconds / 1e6)
}

/// Median and 99th percentile of `FORKS` bare fork+exec+wait of `argv`.
fn bare_run(argv: &[&str]) -> Result<Percentiles, String> {
    let mut times = Vec::with_capacity(FORKS);
    for _ in 0..FORKS {
        let started = Instant::now();
        let status = Command::new(argv[0])
            .args(&argv[1..])
            .status()
            .map_err(|err| format!("cannot run {argv:?}: {err}"))?;
        times.push(started.elapsed());
        if !status.success() {
            return Err(format!("{argv:?} failed: {status}"));
        }
    }
    Ok(Percentiles::of(&mut times))
}

/// Executions per second with one worker thread (and client) per runner; every execution
/// started before the window's end is completed and counted.
fn sustained(client: &Client, runners: &[String]) -> Result<Rate, String> {
    let barrier = Barrier::new(runners.len());
    let started = Instant::now();
    let counts = thread::scope(|scope| {
        let workers: Vec<_> = runners
            .iter()
            .map(|runner| {
                let (client, barrier) = (client.fresh(), &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    let deadline = Instant::now() + RATE_WINDOW;
                    let mut done = 0u64;
                    while Instant::now() < deadline {
                        client.run(runner, "true")?;
                        done += 1;
                    }
                    Ok::<_, String>(done)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().map_err(|_| "a worker panicked".to_owned())?)
            .collect::<Result<Vec<u64>, String>>()
    })?;
    let executions: u64 = counts.iter().sum();
    Ok(Rate {
        concurrency: runners.len(),
        executions,
        per_second: executions as f64 / started.elapsed().as_secs_f64(),
    })
}
