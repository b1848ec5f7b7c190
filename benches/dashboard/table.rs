//! DESIGN.md's performance targets checked against the figures, the table printed on stdout
//! and the JSON document written next to it.

use serde_json::{Value, json};

use super::report::{Figures, Output, Percentiles, mib, secs};

/// Growth of the server's peak RSS over its RSS before that still counts as "memory flat".
const FLAT_KIB: u64 = 16 << 10;

/// One executor's result.
#[derive(Debug)]
pub enum Outcome {
    /// Measured.
    Measured(Box<Figures>),
    /// The server refused to start with this executor.
    NotMeasured(String),
}

/// Results of the executors, in order.
pub type Results<'a> = [(&'a str, Outcome)];

/// A verdict on one target for one executor; `met` is `None` when it cannot be assessed.
struct Verdict {
    value: String,
    met: Option<bool>,
}

/// One row of DESIGN.md's "Performance targets".
struct Target {
    measure: &'static str,
    target: &'static str,
    sandbox_only: bool,
    check: fn(&Figures) -> Verdict,
}

const TARGETS: &[Target] = &[
    Target {
        measure: "claim a prewarmed runner (POST /runners), p50",
        target: "<= 0.5 ms",
        sandbox_only: false,
        check: |f| verdict(format!("{:.3} ms", f.claim.p50_ms), f.claim.p50_ms <= 0.5),
    },
    Target {
        measure: "execute round trip, p50",
        target: "<= 3 ms and <= 5x bare fork+exec",
        sandbox_only: true,
        check: |f| {
            let e = &f.executions;
            let (p50, ratio) = (e.execute.p50_ms, e.execute_ratio_to_fork_exec);
            verdict(
                format!("{p50:.3} ms = {ratio:.1}x"),
                p50 <= 3.0 && ratio <= 5.0,
            )
        },
    },
    Target {
        measure: "sustained executions/s (best concurrency)",
        target: ">= 300/s",
        sandbox_only: true,
        check: |f| {
            let rates = f.executions.rates.iter().map(|r| r.per_second);
            let best = rates.fold(0.0, f64::max);
            verdict(format!("{best:.0}/s"), best >= 300.0)
        },
    },
    Target {
        measure: "prewarm 100 runners",
        target: "<= 2 s",
        sandbox_only: true,
        check: |f| verdict(secs(f.prewarm_100_s), f.prewarm_100_s <= 2.0),
    },
    Target {
        measure: "server RSS idle",
        target: "<= 20 MiB",
        sandbox_only: false,
        check: |f| verdict(mib(f.rss_idle_kib), f.rss_idle_kib <= 20 << 10),
    },
    Target {
        measure: "server RSS with 1,000 idle runners",
        target: "<= 100 MiB",
        sandbox_only: false,
        check: |f| {
            let value = format!("{} ({} idle)", mib(f.many.rss_kib), f.many.idle);
            let met = (f.many.idle >= f.many.requested).then_some(f.many.rss_kib <= 100 << 10);
            Verdict { value, met }
        },
    },
    Target {
        measure: "output of one execution (yes | head -c 100M)",
        target: ">= 100 MB/s, memory flat (+16 MiB)",
        sandbox_only: false,
        check: |f| {
            let output = &f.executions.outputs[1];
            let grew = output.peak_rss_kib.saturating_sub(output.rss_before_kib);
            // The kernel's terminal is shown beside it: the target cannot beat it.
            let value = format!(
                "{:.0} MB/s (bare pty {:.0}), +{}",
                output.mb_per_s,
                output.bare_pty_mb_per_s,
                mib(grew)
            );
            verdict(value, output.mb_per_s >= 100.0 && grew <= FLAT_KIB)
        },
    },
];

fn verdict(value: String, met: bool) -> Verdict {
    Verdict {
        value,
        met: Some(met),
    }
}

/// The JSON document: figures with units in their names, the baselines, targets and verdicts.
pub fn to_json(results: &Results<'_>, host: Value) -> Value {
    let mut executors = serde_json::Map::new();
    for (name, outcome) in results {
        let value = match outcome {
            Outcome::Measured(figures) => {
                let mut value = serde_json::to_value(figures).expect("figures serialize");
                value["measured"] = json!(true);
                value
            }
            Outcome::NotMeasured(reason) => json!({"measured": false, "reason": reason}),
        };
        executors.insert((*name).to_owned(), value);
    }
    let targets: Vec<Value> = TARGETS
        .iter()
        .map(|target| target_json(target, results))
        .collect();
    json!({"host": host, "executors": executors, "targets": targets,
        "notes": "MB = 10^6 bytes; met = null: not assessed (not measured, or fewer idle \
                  runners than asked for); sandbox-only targets are checked for process too, \
                  as a reference"})
}

fn target_json(target: &Target, results: &Results<'_>) -> Value {
    let applies = if target.sandbox_only {
        "sandbox"
    } else {
        "every executor"
    };
    let mut row =
        json!({"measure": target.measure, "target": target.target, "applies_to": applies});
    for (name, outcome) in results {
        row[*name] = match outcome {
            Outcome::Measured(figures) => {
                let verdict = (target.check)(figures);
                json!({"value": verdict.value, "met": verdict.met})
            }
            Outcome::NotMeasured(_) => json!({"value": null, "met": null}),
        };
    }
    row
}

/// The table printed on stdout: figures, then targets.
pub fn table(results: &Results<'_>) -> String {
    let names = || results.iter().map(|(name, _)| (*name).to_owned());
    let mut out = String::from("\nposeidon-lite performance dashboard\n\n");
    out += &row("measure", names());
    for (label, show) in FIGURE_ROWS {
        out += &row(label, cells(results, |_, figures| show(figures)));
    }
    out += "\nDESIGN.md performance targets (sandbox-only targets: process shown as a reference)\n";
    out += &row("target", names());
    for target in TARGETS {
        let label = format!("{}: {}", target.measure, target.target);
        out += &row(
            &label,
            cells(results, |name, figures| target_cell(target, name, figures)),
        );
    }
    for (name, outcome) in results {
        match outcome {
            Outcome::NotMeasured(reason) => out += &format!("\n{name}: not measured ({reason})"),
            Outcome::Measured(figures) => {
                if let Some(limit) = &figures.many.limit {
                    out += &format!("\n{name}: only {} idle runners: {limit}", figures.many.idle);
                }
            }
        }
    }
    out + "\n"
}

fn cells<'r>(
    results: &'r Results<'_>,
    show: impl Fn(&str, &Figures) -> String + 'r,
) -> impl Iterator<Item = String> + 'r {
    results.iter().map(move |(name, outcome)| match outcome {
        Outcome::Measured(figures) => show(name, figures),
        Outcome::NotMeasured(_) => "not measured".to_owned(),
    })
}

fn target_cell(target: &Target, name: &str, figures: &Figures) -> String {
    let verdict = (target.check)(figures);
    let reference = target.sandbox_only && name != "sandbox";
    let met = match (verdict.met, reference) {
        (None, _) => "n/a",
        (Some(true), false) => "MET",
        (Some(false), false) => "MISSED",
        (Some(true), true) => "(ref: met)",
        (Some(false), true) => "(ref: missed)",
    };
    format!("{} {met}", verdict.value)
}

fn row(label: &str, cells: impl Iterator<Item = String>) -> String {
    let mut line = format!("{label:<58}");
    for cell in cells {
        line += &format!(" | {cell:<40}");
    }
    line.trim_end().to_owned() + "\n"
}

type Show = fn(&Figures) -> String;

const FIGURE_ROWS: &[(&str, Show)] = &[
    ("server RSS idle", |f| mib(f.rss_idle_kib)),
    ("prewarm 100 runners", |f| secs(f.prewarm_100_s)),
    ("idle runners reached (asked for 1,000)", |f| {
        let many = &f.many;
        format!(
            "{} in {:.1} s (+{} MiB)",
            many.idle,
            many.seconds,
            many_growth(f)
        )
    }),
    ("server RSS with those idle runners", |f| {
        mib(f.many.rss_kib)
    }),
    ("claim latency POST /runners (p50 / p99)", |f| {
        ms_pair(&f.claim)
    }),
    (
        "  reference: bare record write, create+write+rename (p50 / p99)",
        |f| {
            f.record_write
                .as_ref()
                .map_or_else(|| "not measured".to_owned(), ms_pair)
        },
    ),
    (
        "  with state.sync: record flushed to disk (p50 / p99)",
        |f| {
            f.claim_synced
                .as_ref()
                .map_or_else(|| "not measured".to_owned(), ms_pair)
        },
    ),
    ("  reference: HTTP floor GET /version (p50 / p99)", |f| {
        ms_pair(&f.http_floor)
    }),
    ("bare fork+exec /bin/true, same run (p50 / p99)", |f| {
        ms_pair(&f.executions.fork_exec)
    }),
    ("  reference: bare bash -c true (p50 / p99)", |f| {
        ms_pair(&f.executions.fork_exec_bash)
    }),
    ("execute round trip (p50 / p99)", |f| {
        ms_pair(&f.executions.execute)
    }),
    ("  p50 stages: POST + handshake + start + exit (ms)", |f| {
        let s = &f.executions.execute_stages;
        format!(
            "{:.2} + {:.2} + {:.2} + {:.2}",
            s.post_ms, s.handshake_ms, s.start_ms, s.exit_ms
        )
    }),
    ("  ratio to bare fork+exec (p50)", |f| {
        format!("{:.1}x", f.executions.execute_ratio_to_fork_exec)
    }),
    ("executions/s at concurrency 1", |f| rate(f, 0)),
    ("executions/s at concurrency 2", |f| rate(f, 1)),
    ("executions/s at concurrency 4", |f| rate(f, 2)),
    ("executions/s at concurrency 8", |f| rate(f, 3)),
    ("file copy 1 MiB (PATCH): throughput, RSS -> peak", |f| {
        f.executions.copies[0].show()
    }),
    ("file copy 10 MiB (PATCH): throughput, RSS -> peak", |f| {
        f.executions.copies[1].show()
    }),
    (
        "output head -c 100M /dev/zero: throughput, RSS -> peak",
        |f| f.executions.outputs[0].show(),
    ),
    ("  CPU during it: server (+ program), client", |f| {
        cpu(&f.executions.outputs[0])
    }),
    ("output yes | head -c 100M: throughput, RSS -> peak", |f| {
        f.executions.outputs[1].show()
    }),
    ("  CPU during it: server (+ program), client", |f| {
        cpu(&f.executions.outputs[1])
    }),
    ("shutdown after SIGTERM", |f| {
        f.stop_s.map_or("-".into(), secs)
    }),
];

fn many_growth(f: &Figures) -> String {
    let grew = f.many.rss_kib.saturating_sub(f.many.rss_before_kib);
    format!("{:.1}", grew as f64 / 1024.0)
}

fn ms_pair(p: &Percentiles) -> String {
    format!("{:.3} / {:.3} ms", p.p50_ms, p.p99_ms)
}

fn cpu(output: &Output) -> String {
    format!("{:.2} s, {:.2} s", output.server_cpu_s, output.client_cpu_s)
}

fn rate(f: &Figures, index: usize) -> String {
    let rate = f.executions.rates.get(index);
    rate.map_or("-".into(), |r| {
        format!("{:.0}/s ({} runs)", r.per_second, r.executions)
    })
}
