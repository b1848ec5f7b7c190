//! The status page's HTML: one small server-rendered document that refreshes itself every few
//! seconds (a `<meta>` refresh, no JavaScript), and the login form shown without the token.
//! Every text that comes from outside (image names, error texts) is escaped.

use std::{fmt::Write, time::SystemTime};

use crate::{
    dto::{Environment, EnvironmentStatistics},
    metrics::{Ended, Notice, PullInProgress, RunningExecution, process::ProcessFigures},
};

/// Seconds between refreshes.
const REFRESH_SECS: u32 = 5;

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330;background:#f6f7f9}\
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}\
table{border-collapse:collapse;background:#fff;min-width:480px}\
th,td{border:1px solid #d5d9e0;padding:4px 10px;text-align:left}th{background:#e9ecf1}\
td.n{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#69707d}\
.low{background:#fde2e1}.oom{color:#a11}.error{color:#a50}\
.facts span{display:inline-block;margin-right:18px}";

/// What the page shows.
#[derive(Debug)]
pub struct Snapshot {
    /// The release.
    pub release: String,
    /// The executor's name.
    pub executor: &'static str,
    /// Seconds since the start.
    pub uptime_secs: u64,
    /// The server process.
    pub process: ProcessFigures,
    /// Environments with their pools, by id.
    pub environments: Vec<(Environment, EnvironmentStatistics)>,
    /// Running executions, oldest first, with their age in seconds.
    pub running: Vec<(RunningExecution, u64)>,
    /// Image pulls in progress, with their age in seconds.
    pub pulling: Vec<(PullInProgress, u64)>,
    /// Recent errors and out-of-memory kills, newest first.
    pub recent: Vec<Notice>,
    /// Executions started, and ended per outcome.
    pub started: u64,
    /// Executions ended, per outcome.
    pub ended: Vec<(Ended, u64)>,
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn document(title: &str, refresh: bool, body: &str) -> String {
    let refresh = match refresh {
        true => format!("<meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">"),
        false => String::new(),
    };
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">{refresh}\
         <meta name=\"viewport\" content=\"width=device-width\"><title>{title}</title>\
         <style>{STYLE}</style></head><body>{body}</body></html>\n"
    )
}

/// The form asking for the token; nothing about the server is on it.
pub fn login(failed: bool) -> String {
    let message = match failed {
        true => "<p class=\"error\" id=\"failed\">That token is not right.</p>",
        false => "",
    };
    let body = format!(
        "<h1>poseidon-lite</h1><p>The status page needs the server's token \
         (or send it in the <code>Poseidon-Token</code> header).</p>{message}\
         <form method=\"post\" action=\"/\"><label>Token \
         <input type=\"password\" name=\"token\" autocomplete=\"current-password\" autofocus>\
         </label> <button type=\"submit\">Show status</button></form>"
    );
    document("poseidon-lite: log in", false, &body)
}

/// `1d 2h`, `3h 4m`, `5m 6s`, `7s`.
pub fn age(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// Seconds since the epoch as `YYYY-MM-DD hh:mm:ss` UTC.
fn utc(at: SystemTime) -> String {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rest / 3600, rest / 60 % 60, rest % 60);
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}")
}

/// The status page.
pub fn status(snapshot: &Snapshot) -> String {
    let mut body = String::new();
    let p = &snapshot.process;
    let _ = write!(
        body,
        "<h1>poseidon-lite</h1><p class=\"facts\"><span>version <b id=\"version\">{}</b></span>\
         <span>executor <b>{}</b></span><span>up <b id=\"uptime\">{}</b></span>\
         <span>memory <b>{:.1} MiB</b></span><span>threads <b>{}</b></span>\
         <span>open files <b>{}</b></span><span>CPU <b>{:.1} s</b></span></p>",
        escape(&snapshot.release),
        snapshot.executor,
        age(snapshot.uptime_secs),
        p.resident_bytes as f64 / 1048576.0,
        p.threads,
        p.open_fds,
        p.cpu_seconds,
    );
    environments(&mut body, &snapshot.environments);
    executions(&mut body, snapshot);
    pulls(&mut body, &snapshot.pulling);
    recent(&mut body, &snapshot.recent);
    let _ = write!(
        body,
        "<p class=\"muted\">Refreshes every {REFRESH_SECS} s. Metrics for Prometheus: \
         <code>/api/v1/metrics</code>.</p>"
    );
    document("poseidon-lite status", true, &body)
}

fn environments(body: &mut String, environments: &[(Environment, EnvironmentStatistics)]) {
    body.push_str("<h2>Environments</h2>");
    if environments.is_empty() {
        body.push_str("<p class=\"muted\">No environments.</p>");
        return;
    }
    body.push_str(
        "<table id=\"environments\"><tr><th>id</th><th>image</th><th>idle</th><th>used</th>\
         <th>target</th><th>CPU (MHz)</th><th>memory (MB)</th><th>network</th></tr>",
    );
    for (environment, pool) in environments {
        let low = pool.idle_runners < pool.prewarming_pool_size as usize;
        let _ = write!(
            body,
            "<tr id=\"environment-{}\"{}><td class=\"n\">{}</td><td>{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td>{}</td></tr>",
            environment.id,
            if low { " class=\"low\"" } else { "" },
            environment.id,
            escape(&environment.image),
            pool.idle_runners,
            pool.used_runners,
            pool.prewarming_pool_size,
            environment.cpu_limit,
            environment.memory_limit,
            if environment.network_access {
                "yes"
            } else {
                "no"
            },
        );
    }
    body.push_str("</table>");
}

fn executions(body: &mut String, snapshot: &Snapshot) {
    let ended: Vec<String> = snapshot
        .ended
        .iter()
        .map(|(outcome, count)| format!("{} {count}", outcome.as_str()))
        .collect();
    let _ = write!(
        body,
        "<h2>Running executions ({})</h2><p class=\"muted\">{} started; ended: {}.</p>",
        snapshot.running.len(),
        snapshot.started,
        ended.join(", ")
    );
    if snapshot.running.is_empty() {
        return;
    }
    body.push_str("<table id=\"executions\"><tr><th>runner</th><th>running for</th></tr>");
    for (execution, secs) in &snapshot.running {
        let _ = write!(
            body,
            "<tr><td><code>{}</code></td><td class=\"n\">{}</td></tr>",
            escape(&execution.runner),
            age(*secs)
        );
    }
    body.push_str("</table>");
}

fn pulls(body: &mut String, pulling: &[(PullInProgress, u64)]) {
    if pulling.is_empty() {
        return;
    }
    body.push_str("<h2>Image pulls</h2><table id=\"pulls\"><tr><th>image</th><th>for</th></tr>");
    for (pull, secs) in pulling {
        let _ = write!(
            body,
            "<tr><td>{}</td><td class=\"n\">{}</td></tr>",
            escape(&pull.image),
            age(*secs)
        );
    }
    body.push_str("</table>");
}

fn recent(body: &mut String, recent: &[Notice]) {
    body.push_str("<h2>Recent errors and OOM kills</h2>");
    if recent.is_empty() {
        body.push_str("<p class=\"muted\">None since the start.</p>");
        return;
    }
    body.push_str("<table id=\"recent\"><tr><th>when (UTC)</th><th>kind</th><th>what</th></tr>");
    for notice in recent {
        let _ = write!(
            body,
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td></tr>",
            notice.kind,
            utc(notice.at),
            notice.kind,
            escape(&notice.text)
        );
    }
    body.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape("<script>\"a\" & 'b'</script>"),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn ages_and_times_read_well() {
        assert_eq!(age(7), "7s");
        assert_eq!(age(366), "6m 6s");
        assert_eq!(age(3 * 3600 + 240), "3h 4m");
        assert_eq!(age(90000), "1d 1h");
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_936_000);
        assert_eq!(utc(at), "2025-12-05 12:00:00");
        assert_eq!(utc(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00");
    }
}
