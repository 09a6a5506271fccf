//! Which CPUs the decode threads run on, and which the rest of the server uses.
//!
//! When a model's intra-op threads fill every core, each streamed token's gRPC work (and on a
//! small host, the client's) preempts a running thread. The kernel tends to run that work on the
//! core of the thread that woke it, which is the decode thread: the one thread every step waits
//! for. `runtime.decode_cpus` gives the decode threads CPUs of their own and keeps everything
//! else (gRPC, tokenization, encoder sessions, and the intra-op helpers of every session) on the
//! others, so that work lands beside a helper thread instead of on the decode thread.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// CPUs an affinity mask can name (1024 with glibc); a higher id cannot be pinned to, and
/// refusing it while parsing keeps a typo like "0-4000000000" from allocating gigabytes.
#[cfg(target_os = "linux")]
const MAX_CPUS: usize = 8 * std::mem::size_of::<libc::cpu_set_t>();
#[cfg(not(target_os = "linux"))]
const MAX_CPUS: usize = 1024;

/// A set of CPU ids, written as Linux writes them: "0", "0-3", "0,2-3".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WrittenCpuList", into = "String")]
pub struct CpuList(Vec<usize>);

/// A CPU list as a config file or the environment gives it: a lone id arrives as a number.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "expected a CPU list such as \"0\", \"0-3\" or \"0,2-3\""
)]
enum WrittenCpuList {
    Id(usize),
    Text(String),
}

impl CpuList {
    pub fn ids(&self) -> &[usize] {
        &self.0
    }

    fn from_ids(mut ids: Vec<usize>) -> Self {
        ids.sort_unstable();
        ids.dedup();
        Self(ids)
    }
}

impl FromStr for CpuList {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut ids = Vec::new();
        for part in text.split(',').map(str::trim) {
            let parse = |id: &str| {
                let id = id
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| format!("`{part}` in `{text}` is not a CPU id or range"))?;
                if id >= MAX_CPUS {
                    return Err(format!(
                        "CPU {id} in `{text}` is beyond the {MAX_CPUS} CPUs an affinity mask names"
                    ));
                }
                Ok(id)
            };
            match part.split_once('-') {
                Some((first, last)) => {
                    let (first, last) = (parse(first)?, parse(last)?);
                    if first > last {
                        return Err(format!("the range `{part}` in `{text}` runs backwards"));
                    }
                    ids.extend(first..=last);
                }
                None => ids.push(parse(part)?),
            }
        }
        Ok(Self::from_ids(ids))
    }
}

impl TryFrom<WrittenCpuList> for CpuList {
    type Error = String;

    fn try_from(written: WrittenCpuList) -> Result<Self, String> {
        match written {
            WrittenCpuList::Id(id) => id.to_string().parse(),
            WrittenCpuList::Text(text) => text.parse(),
        }
    }
}

impl From<CpuList> for String {
    fn from(list: CpuList) -> Self {
        list.to_string()
    }
}

impl fmt::Display for CpuList {
    /// Ranges where ids run on: "0-2,5".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids = self.0.iter().copied().peekable();
        let mut first = true;
        while let Some(start) = ids.next() {
            let mut end = start;
            while ids.peek() == Some(&(end + 1)) {
                end = ids.next().expect("peeked");
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if end == start {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

/// The CPUs left for everything but the decode threads: `allowed` less `decode`. Fails, naming
/// the setting, when `decode` asks for a CPU this process may not use or leaves none over.
pub fn rest_of(allowed: &CpuList, decode: &CpuList) -> Result<CpuList, String> {
    if decode.0.is_empty() {
        return Err("runtime.decode_cpus is empty".to_owned());
    }
    if let Some(outside) = decode.0.iter().find(|id| !allowed.0.contains(id)) {
        return Err(format!(
            "runtime.decode_cpus = \"{decode}\" names CPU {outside}, but this process may only \
             run on CPUs {allowed}"
        ));
    }
    let rest: Vec<usize> = allowed
        .0
        .iter()
        .copied()
        .filter(|id| !decode.0.contains(id))
        .collect();
    if rest.is_empty() {
        return Err(format!(
            "runtime.decode_cpus = \"{decode}\" takes every CPU this process may run on \
             ({allowed}); leave at least one for the rest of the server"
        ));
    }
    Ok(CpuList(rest))
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
        Ok(CpuList(ids))
    }
}

/// Restricts the calling thread, and the threads it starts from now on, to `cpus`.
#[cfg(target_os = "linux")]
pub fn pin_current_thread(cpus: &CpuList) -> std::io::Result<()> {
    // SAFETY: as above; parsing refused ids beyond the set's size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &id in &cpus.0 {
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
        let first = CpuList(vec![allowed.ids()[0]]);
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
