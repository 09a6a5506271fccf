//! The process's own metrics, under the names Prometheus client libraries use: CPU time,
//! memory, open files, threads and start time, read from /proc at each scrape (Linux only;
//! elsewhere they are simply absent).

use metrics::{Unit, describe_gauge, gauge};

pub const CPU_SECONDS: &str = "process_cpu_seconds_total";
pub const RESIDENT_BYTES: &str = "process_resident_memory_bytes";
pub const VIRTUAL_BYTES: &str = "process_virtual_memory_bytes";
pub const OPEN_FDS: &str = "process_open_fds";
pub const MAX_FDS: &str = "process_max_fds";
pub const THREADS: &str = "process_threads";
pub const START_TIME_SECONDS: &str = "process_start_time_seconds";

pub fn describe() {
    describe_gauge!(
        CPU_SECONDS,
        Unit::Seconds,
        "User and system CPU time used by the process (only grows)."
    );
    describe_gauge!(
        RESIDENT_BYTES,
        Unit::Bytes,
        "Resident memory of the process."
    );
    describe_gauge!(VIRTUAL_BYTES, Unit::Bytes, "Virtual memory of the process.");
    describe_gauge!(
        OPEN_FDS,
        Unit::Count,
        "Open file descriptors (sockets included)."
    );
    describe_gauge!(MAX_FDS, Unit::Count, "The limit on open file descriptors.");
    describe_gauge!(THREADS, Unit::Count, "Threads of the process.");
    describe_gauge!(
        START_TIME_SECONDS,
        Unit::Seconds,
        "When the process started, in seconds since the Unix epoch."
    );
}

/// Reads /proc/self and sets the gauges; called before each scrape renders.
pub fn record() {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // The command name (field 2) may hold spaces; the fields after its closing ')' do not.
    let Some(rest) = stat.rfind(')').map(|end| &stat[end + 2..]) else {
        return;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
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
    if let (Some(user), Some(system)) = (field(14), field(15)) {
        gauge!(CPU_SECONDS).set((user + system) / ticks);
    }
    if let Some(threads) = field(20) {
        gauge!(THREADS).set(threads);
    }
    if let Some(started) = field(22)
        && let Some(boot) = boot_time()
    {
        gauge!(START_TIME_SECONDS).set(boot + started / ticks);
    }
    if let Some(bytes) = field(23) {
        gauge!(VIRTUAL_BYTES).set(bytes);
    }
    if let Some(pages) = field(24) {
        gauge!(RESIDENT_BYTES).set(pages * page);
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        gauge!(OPEN_FDS).set(entries.count() as f64);
    }
    if let Some(limit) = max_open_files() {
        gauge!(MAX_FDS).set(limit);
    }
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
