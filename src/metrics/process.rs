//! Figures of the server process itself, read from `/proc/self` when asked for.

use std::fs;

/// Resource use of this process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessFigures {
    /// Resident memory in bytes.
    pub resident_bytes: u64,
    /// Threads.
    pub threads: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// CPU time used (user + system) in seconds.
    pub cpu_seconds: f64,
}

/// Reads the figures; what cannot be read stays 0.
pub fn figures() -> ProcessFigures {
    let mut figures = ProcessFigures::default();
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        for line in status.lines() {
            if let Some(rest) = line.strip_prefix("VmRSS:") {
                figures.resident_bytes = first_number(rest) * 1024;
            } else if let Some(rest) = line.strip_prefix("Threads:") {
                figures.threads = first_number(rest);
            }
        }
    }
    figures.open_fds = fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count() as u64);
    if let Ok(stat) = fs::read_to_string("/proc/self/stat") {
        figures.cpu_seconds = cpu_seconds(&stat);
    }
    figures
}

fn first_number(text: &str) -> u64 {
    text.split_whitespace()
        .next()
        .and_then(|number| number.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a `/proc/<pid>/stat` line (fields 14 and 15, counted after the command
/// name, which may contain spaces and parentheses).
fn cpu_seconds(stat: &str) -> f64 {
    let Some((_, after_name)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name come field 3 (state) onwards: utime is field 14, stime field 15.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|index| fields.get(*index)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / rustix::param::clock_ticks_per_second() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_threads_and_descriptors() {
        let figures = figures();
        assert!(figures.resident_bytes > 0);
        assert!(figures.threads >= 1);
        assert!(figures.open_fds >= 3);
    }

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        let stat = "12 (a) b) S 1 2 3 4 5 6 7 8 9 10 250 150 0 0";
        let expected = 400.0 / rustix::param::clock_ticks_per_second() as f64;
        assert!((cpu_seconds(stat) - expected).abs() < 1e-9);
    }
}
