//! Which CPUs the decode threads run on, and which the rest of the server uses.
//!
//! When a model's intra-op threads fill every core, each streamed token's gRPC work (and on a
//! small host, the client's) preempts a running thread. The kernel tends to run that work on the
//! core of the thread that woke it, which is the decode thread: the one thread every step waits
//! for. `runtime.decode_cpus` gives the decode threads CPUs of their own and keeps everything
//! else (gRPC, tokenization, encoder sessions, and the intra-op helpers of every session) on the
//! others, so that work lands beside a helper thread instead of on the decode thread.

use crate::config::CpuList;
use crate::config::cpus::MAX_CPUS;

/// The CPUs left for everything but the decode threads: `allowed` less `decode`. Fails, naming
/// the setting, when `decode` asks for a CPU this process may not use or leaves none over.
pub fn rest_of(allowed: &CpuList, decode: &CpuList) -> Result<CpuList, String> {
    if decode.ids().is_empty() {
        return Err("runtime.decode_cpus is empty".to_owned());
    }
    if let Some(outside) = decode.ids().iter().find(|id| !allowed.ids().contains(id)) {
        return Err(format!(
            "runtime.decode_cpus = \"{decode}\" names CPU {outside}, but this process may only \
             run on CPUs {allowed}"
        ));
    }
    let rest: Vec<usize> = allowed
        .ids()
        .iter()
        .copied()
        .filter(|id| !decode.ids().contains(id))
        .collect();
    if rest.is_empty() {
        return Err(format!(
            "runtime.decode_cpus = \"{decode}\" takes every CPU this process may run on \
             ({allowed}); leave at least one for the rest of the server"
        ));
    }
    Ok(CpuList::from_ids(rest))
}

/// Moves the calling thread, and every thread it starts from then on, off `decode`, and returns
/// the CPUs left to them. Called at startup before any other thread exists; each decode thread
/// then moves itself onto `decode`.
pub fn reserve_decode_cpus(decode: &CpuList) -> Result<CpuList, String> {
    let allowed =
        allowed_cpus().map_err(|error| format!("cannot read this process's CPUs: {error}"))?;
    let rest = rest_of(&allowed, decode)?;
    pin_current_thread(&rest)
        .map_err(|error| format!("cannot move threads to CPUs {rest}: {error}"))?;
    Ok(rest)
}

/// The CPUs the calling thread may run on.
#[cfg(target_os = "linux")]
pub fn allowed_cpus() -> std::io::Result<CpuList> {
    // SAFETY: `set` is a plain bit set owned here, and the size passed is its own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ids = (0..MAX_CPUS)
            .filter(|&id| libc::CPU_ISSET(id, &set))
            .collect();
        Ok(CpuList::from_ids(ids))
    }
}

/// Restricts the calling thread, and the threads it starts from now on, to `cpus`.
#[cfg(target_os = "linux")]
pub fn pin_current_thread(cpus: &CpuList) -> std::io::Result<()> {
    // SAFETY: as above; parsing refused ids beyond the set's size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &id in cpus.ids() {
            libc::CPU_SET(id, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn allowed_cpus() -> std::io::Result<CpuList> {
    Err(std::io::Error::other(
        "runtime.decode_cpus is only supported on Linux",
    ))
}

#[cfg(not(target_os = "linux"))]
pub fn pin_current_thread(_cpus: &CpuList) -> std::io::Result<()> {
    Err(std::io::Error::other(
        "runtime.decode_cpus is only supported on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(text: &str) -> CpuList {
        text.parse().unwrap()
    }

    #[test]
    fn lists_parse_and_print_as_linux_writes_them() {
        assert_eq!(list("0").ids(), [0]);
        assert_eq!(list("3, 0-1").ids(), [0, 1, 3]);
        assert_eq!(list("0-2,2,5").to_string(), "0-2,5");
        for bad in ["", "a", "1-", "3-1", "0,,1", "-1", "0-4294967295", "1024"] {
            assert!(bad.parse::<CpuList>().is_err(), "{bad:?} parsed");
        }
        let error = "3-1".parse::<CpuList>().unwrap_err();
        assert!(
            error.contains("3-1") && error.contains("backwards"),
            "{error}"
        );
    }

    #[test]
    fn the_rest_is_what_decode_leaves_of_the_allowed_cpus() {
        assert_eq!(rest_of(&list("0-3"), &list("0")).unwrap(), list("1-3"));
        assert_eq!(rest_of(&list("0-3"), &list("1,3")).unwrap(), list("0,2"));

        let outside = rest_of(&list("0-1"), &list("4")).unwrap_err();
        assert!(
            outside.contains("runtime.decode_cpus")
                && outside.contains("CPU 4")
                && outside.contains("0-1"),
            "{outside}"
        );
        let all = rest_of(&list("0-1"), &list("0-1")).unwrap_err();
        assert!(all.contains("leave at least one"), "{all}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_can_be_pinned_to_one_of_its_cpus() {
        let allowed = allowed_cpus().unwrap();
        let first = CpuList::from_ids(vec![allowed.ids()[0]]);
        let (pinned, inherited) = std::thread::spawn(move || {
            pin_current_thread(&first).unwrap();
            // Threads started afterwards inherit the mask: the server relies on it.
            let child = std::thread::spawn(|| allowed_cpus().unwrap())
                .join()
                .unwrap();
            (allowed_cpus().unwrap(), child)
        })
        .join()
        .unwrap();
        assert_eq!(pinned.ids(), [allowed.ids()[0]]);
        assert_eq!(inherited, pinned);
        // Other threads keep their own CPUs.
        assert_eq!(allowed_cpus().unwrap(), allowed);
    }
}
