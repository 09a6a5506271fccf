//! The process's own metrics, under the names and types Prometheus client libraries use: CPU
//! time (a counter), memory, open files, threads and start time, read from /proc at each scrape
//! (Linux only; elsewhere they are simply absent).
//!
//! They are rendered here rather than recorded through the `metrics` crate, whose counters hold
//! whole numbers: CPU time is counted in fractions of a second.

use std::fmt::Write;

/// One metric of the process, as one exposition-format family with one sample.
struct Sample {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: f64,
}

/// The process's metrics in Prometheus text format, read from /proc now; empty where /proc
/// cannot be read.
pub fn render() -> String {
    let mut text = String::new();
    for sample in read() {
        let Sample {
            name,
            kind,
            help,
            value,
        } = sample;
        let _ = writeln!(
            text,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    text
}

fn read() -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut add = |name, kind, help, value: Option<f64>| {
        if let Some(value) = value {
            samples.push(Sample {
                name,
                kind,
                help,
                value,
            });
        }
    };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) may hold spaces; the fields after its closing ')' do not.
    let rest = stat.rfind(')').and_then(|end| stat.get(end + 2..));
    let fields: Vec<&str> = rest.unwrap_or_default().split_whitespace().collect();
    // Numbered from field 3 (state) in proc(5): utime 14, stime 15, threads 20, starttime 22,
    // vsize 23, rss 24.
    let field = |number: usize| -> Option<f64> { fields.get(number - 3)?.parse().ok() };
    // SAFETY: sysconf reads constants of the running system.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let (ticks, page) = (ticks.max(1) as f64, page.max(1) as f64);
    add(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time used by the process, in seconds.",
        field(14)
            .zip(field(15))
            .map(|(user, system)| (user + system) / ticks),
    );
    add(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory of the process, in bytes.",
        field(24).map(|pages| pages * page),
    );
    add(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory of the process, in bytes.",
        field(23),
    );
    add(
        "process_open_fds",
        "gauge",
        "Open file descriptors (sockets included).",
        std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|entries| entries.count() as f64),
    );
    add(
        "process_max_fds",
        "gauge",
        "The limit on open file descriptors.",
        max_open_files(),
    );
    add(
        "process_threads",
        "gauge",
        "Threads of the process.",
        field(20),
    );
    add(
        "process_start_time_seconds",
        "gauge",
        "When the process started, in seconds since the Unix epoch.",
        field(22)
            .zip(boot_time())
            .map(|(started, boot)| boot + started / ticks),
    );
    samples
}

/// Seconds since the epoch at boot (`btime` in /proc/stat).
fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

fn max_open_files() -> Option<f64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    ok.then_some(limit.rlim_cur as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn cpu_time_is_a_counter_and_every_family_has_its_type() {
        let text = render();
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total "),
            "{text}"
        );
        let families = text.matches("# TYPE ").count();
        assert_eq!(families, 7, "{text}");
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            if line.is_empty() {
                continue;
            }
            let (name, value) = line.split_once(' ').unwrap();
            assert!(name.starts_with("process_"), "{line}");
            assert!(value.parse::<f64>().unwrap() >= 0.0, "{line}");
        }
    }
}
