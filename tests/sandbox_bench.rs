//! Measurements of the sandbox executor (ignored by default; never assert on timings):
//! runner creation, the execute round trip of `true` next to spawning `/bin/true` in the same
//! run, executions per second, and prewarming 100 runners.
//!
//! `cargo test --release --test sandbox_bench -- --ignored --nocapture --test-threads 1`

mod support;

use std::{
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use poseidon_lite::executor::{Command, Outcome, Runner};
use support::sandbox::*;

/// Runs `true` and waits for its exit; returns the round trip.
fn round_trip(runner: &dyn Runner) -> Duration {
    let command = Command {
        command: "true".into(),
        environment: vec![],
        privileged: false,
    };
    let started = Instant::now();
    let mut process = runner.execute(&command).unwrap();
    let outcome = loop {
        assert!(wait_readable(process.exit.fd(), TIMEOUT));
        if let Some(outcome) = process.exit.outcome().unwrap() {
            break outcome;
        }
    };
    let elapsed = started.elapsed();
    assert_eq!(outcome, Outcome::Exited(0));
    elapsed
}

fn spawn_and_wait(program: &str, args: &[&str]) -> Duration {
    let started = Instant::now();
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .unwrap();
    assert!(status.success());
    started.elapsed()
}

/// `p50 / p99` in milliseconds.
fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!("p50 {:.3} ms, p99 {:.3} ms", ms(at(0.5)), ms(at(0.99)))
}

#[test]
#[ignore = "measurement"]
fn measure_create_and_execute() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let creations: Vec<Duration> = (0..30)
        .map(|_| {
            let started = Instant::now();
            let runner = test.runner();
            let elapsed = started.elapsed();
            runner.destroy();
            elapsed
        })
        .collect();
    println!("create runner:               {}", percentiles(creations));
    let runner = test.runner();
    for _ in 0..30 {
        round_trip(&*runner);
        spawn_and_wait("/bin/true", &[]);
    }
    let (mut sandbox, mut bare, mut bash) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..300 {
        sandbox.push(round_trip(&*runner));
        bare.push(spawn_and_wait("/bin/true", &[]));
        bash.push(spawn_and_wait("/bin/bash", &["-c", "true"]));
    }
    println!("execute `true` round trip:   {}", percentiles(sandbox));
    println!("spawn+wait /bin/true (host): {}", percentiles(bare));
    println!("spawn+wait bash -c true:     {}", percentiles(bash));
}

#[test]
#[ignore = "measurement"]
fn measure_throughput() {
    let Some(test) = TestExecutor::new() else {
        return;
    };
    let runners: Vec<Arc<dyn Runner>> = (0..2).map(|_| test.runner()).collect();
    let started = Instant::now();
    let per_thread = 500;
    thread::scope(|scope| {
        for runner in &runners {
            scope.spawn(move || {
                (0..per_thread).for_each(|_| {
                    round_trip(&**runner);
                })
            });
        }
    });
    let rate = (2 * per_thread) as f64 / started.elapsed().as_secs_f64();
    println!("executions of `true` per second (2 threads, 2 runners): {rate:.0}");
}

#[test]
#[ignore = "measurement"]
fn measure_prewarm_100() {
    for threads in [2, 4] {
        let Some(test) = TestExecutor::with(|config| config.runner.capacity = 100) else {
            return;
        };
        let started = Instant::now();
        let runners: Vec<Arc<dyn Runner>> = thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        (0..100 / threads)
                            .map(|_| test.runner())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|worker| worker.join().unwrap())
                .collect()
        });
        let created = started.elapsed();
        assert_eq!(runners.len(), 100);
        round_trip(&*runners[99]);
        let started = Instant::now();
        runners.iter().for_each(|runner| runner.destroy());
        println!(
            "prewarm 100 runners with {threads} threads: {:.0} ms (destroying them: {:.0} ms)",
            created.as_secs_f64() * 1000.0,
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
}
