//! `make bench`: the performance dashboard of DESIGN.md's "Performance targets".
//!
//! For the `process` and the `sandbox` executor in turn, it starts the release server binary
//! as a subprocess on ephemeral ports with a fresh state directory and measures, over HTTP
//! (ureq) and WebSocket (tungstenite) as CodeOcean drives it: claim latency of a prewarmed
//! runner, execute round trips of `true` (against a bare fork+exec of `/bin/true` measured in
//! the same run), sustained executions per second at concurrency 1, 2, 4 and 8, file copy and
//! output throughput with the server's peak RSS (VmHWM after `clear_refs`), the time to
//! prewarm 100 runners, and the server's RSS idle and with 1,000 idle runners. A second
//! server with `--state-sync true` measures the claim latency when every runner record is
//! flushed to the disk before the answer.
//! Then images (`dashboard/images.rs`): pull + unpack of an image from a local registry beside
//! `tar -xzf` of its layers, and prewarm per runner of a store image beside a directory and
//! the host image.
//!
//! Progress goes to stderr, the table to stdout, the figures as JSON to
//! `target/bench/results.json`. A missed target is reported, not a failure; a server that
//! answers unexpectedly, crashes or does not stop cleanly fails the run (exit status 1). A
//! server that refuses to start with `--executor sandbox` (not built, not root) leaves the
//! sandbox "not measured".

#[path = "dashboard/bench.rs"]
mod bench;
#[path = "dashboard/client.rs"]
mod client;
#[path = "dashboard/executions.rs"]
mod executions;
#[path = "dashboard/images.rs"]
mod images;
#[path = "dashboard/network.rs"]
mod network;
#[path = "dashboard/report.rs"]
mod report;
#[path = "dashboard/server.rs"]
mod server;
#[path = "dashboard/table.rs"]
mod table;

use std::{
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use serde_json::json;

use bench::Bench;
use client::Client;
use server::{ServerProcess, StartError};
use table::Outcome;

/// The executors measured, in order.
const EXECUTORS: [&str; 2] = ["process", "sandbox"];

fn main() {
    let started = Instant::now();
    let load_before = load_average();
    let mut results = Vec::new();
    // POSEIDON_BENCH_ONLY=network measures the network section alone.
    let only_network = std::env::var("POSEIDON_BENCH_ONLY").as_deref() == Ok("network");
    for executor in EXECUTORS.into_iter().filter(|_| !only_network) {
        match measure_executor(executor) {
            Ok(outcome) => results.push((executor, outcome)),
            Err(message) => {
                eprintln!("\nbench FAILED ({executor}): {message}");
                std::process::exit(1);
            }
        }
    }
    let images = if only_network {
        Err("skipped (POSEIDON_BENCH_ONLY=network)".to_owned())
    } else {
        images::measure(binary(), &|state| server_args("sandbox", state))
    };
    eprintln!("[network] measuring runner networking inside namespaces");
    let network = match network::measure(binary()) {
        Ok(Ok(figures)) => Some(figures),
        Ok(Err(reason)) => {
            eprintln!("[network] not measured: {reason}");
            None
        }
        Err(message) => {
            eprintln!("\nbench FAILED (network): {message}");
            std::process::exit(1);
        }
    };
    print!("{}", table::table(&results));
    match &network {
        Some(figures) => print!("{}", figures.show()),
        None => println!("\nnetwork: not measured (needs root, iproute2 and nftables)"),
    }
    match &images {
        Ok(figures) => print!("{}", figures.show()),
        Err(reason) => println!("\nimages: {reason}"),
    }
    let path = results_path();
    let load_after = load_average();
    println!("load average (1, 5, 15 min) before / after: {load_before} / {load_after}");
    if load_before
        .split(' ')
        .next()
        .and_then(|l| l.parse::<f64>().ok())
        > Some(0.5)
    {
        println!("note: other work was running on this host; it skews the figures");
    }
    let load = json!({"before": load_before, "after": load_after});
    let mut document = table::to_json(&results, host(load));
    document["images"] = match &images {
        Ok(figures) => figures.to_json(),
        Err(reason) => json!({"not_measured": reason}),
    };
    document["network"] = network
        .as_ref()
        .map_or(serde_json::Value::Null, |n| n.json());
    let written = fs::create_dir_all(path.parent().expect("a parent"))
        .and_then(|()| fs::write(&path, format!("{document:#}\n")));
    if let Err(err) = written {
        eprintln!("bench FAILED: cannot write {}: {err}", path.display());
        std::process::exit(1);
    }
    println!(
        "\nfigures as JSON: {} (run took {:.0} s)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
}

/// Starts a server with `executor`, measures it and stops it.
fn measure_executor(executor: &str) -> Result<Outcome, String> {
    let state = tempfile::Builder::new()
        .prefix(&format!("poseidon-lite-bench-{executor}-"))
        .tempdir()
        .map_err(|err| format!("cannot create a state directory: {err}"))?;
    eprintln!(
        "[{executor}] starting the server (state in {})",
        state.path().display()
    );
    let mut server = match ServerProcess::start(binary(), &server_args(executor, state.path())) {
        Ok(server) => server,
        Err(StartError::Exited(reason)) => {
            eprintln!("[{executor}] not measured: the server refused to start: {reason}");
            return Ok(Outcome::NotMeasured(reason));
        }
        Err(StartError::Other(reason)) => return Err(reason),
    };
    let client = Client::new(&server.api, server.websocket);
    let mut bench = Bench {
        executor,
        server: &mut server,
        client,
    };
    let measured = bench.run();
    let mut figures = measured.map_err(|err| format!("{err}\n{}", server.tail(30)))?;
    figures.record_write = Some(record_writes(state.path())?);
    figures.server_errors = server.errors();
    eprint!("[{executor}] stopping the server (SIGTERM)… ");
    let stop = server.stop()?;
    eprintln!("done in {:.2} s", stop.as_secs_f64());
    figures.stop_s = Some(stop.as_secs_f64());
    figures.claim_synced = Some(claim_with_state_sync(executor)?);
    for line in &figures.server_errors {
        eprintln!("[{executor}] the server logged an error: {line}");
    }
    Ok(Outcome::Measured(Box::new(figures)))
}

/// Writes 200 files the size of a runner record the way the server does (temporary file,
/// write, rename) in `dir`'s file system, one after another.
fn record_writes(dir: &Path) -> Result<report::Percentiles, String> {
    let dir = dir.join("bench-records");
    fs::create_dir_all(&dir).map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    let record = br#"{"id":"2-6f1c0c1e-8f8e-4c4b-9a57-3c2b8b0e6c11","inactivity_timeout":60}"#;
    let mut times = Vec::with_capacity(200);
    for n in 0..200 {
        let path = dir.join(format!("{n}.json"));
        let temporary = path.with_extension("tmp");
        let started = Instant::now();
        fs::write(&temporary, record)
            .and_then(|()| fs::rename(&temporary, &path))
            .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
        times.push(started.elapsed());
    }
    let _ = fs::remove_dir_all(&dir);
    Ok(report::Percentiles::of(&mut times))
}

/// Claim latency of a second server that flushes every runner record to the disk before
/// answering (`--state-sync true`), on a state directory of the same file system.
fn claim_with_state_sync(executor: &str) -> Result<report::Percentiles, String> {
    let state = tempfile::Builder::new()
        .prefix(&format!("poseidon-lite-bench-{executor}-sync-"))
        .tempdir()
        .map_err(|err| format!("cannot create a state directory: {err}"))?;
    let mut args = server_args(executor, state.path());
    args.extend(["--state-sync".to_owned(), "true".to_owned()]);
    let mut server = ServerProcess::start(binary(), &args).map_err(|err| match err {
        StartError::Exited(reason) | StartError::Other(reason) => reason,
    })?;
    let client = Client::new(&server.api, server.websocket);
    let mut bench = Bench {
        executor,
        server: &mut server,
        client,
    };
    let claim = bench.step(
        "claim latency with state.sync",
        Bench::claim_latency,
        report::Percentiles::show,
    );
    server.stop()?;
    claim
}

/// The release server binary Cargo built for this bench.
fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_poseidon-lite"))
}

fn server_args(executor: &str, state: &Path) -> Vec<String> {
    let args = [
        "--port",
        "0",
        "--websocket-port",
        "0",
        "--executor",
        executor,
        "--log-level",
        "info",
        "--capacity",
        "5000",
        // The sandbox resolves CodeOcean's image name to the built-in host image.
        "--image",
        "openhpi/co_execenv_python:3.8=host",
        "--state-dir",
    ];
    let mut args: Vec<String> = args.into_iter().map(str::to_owned).collect();
    args.push(state.display().to_string());
    args
}

/// `target/bench/results.json` of this workspace (`CARGO_TARGET_DIR` respected).
fn results_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench").join("results.json")
}

/// The 1, 5 and 15 minute load averages: other work on the host skews the figures.
fn load_average() -> String {
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the figures were measured on.
fn host(load_average: serde_json::Value) -> serde_json::Value {
    let read = |path: &str| {
        fs::read_to_string(path)
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let memory = read("/proc/meminfo")
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    json!({"cpus": cpus, "kernel": read("/proc/sys/kernel/osrelease"), "memory": memory,
        "load_average": load_average, "server": binary().display().to_string()})
}
