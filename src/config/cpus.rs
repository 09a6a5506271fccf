//! `runtime.decode_cpus`: a CPU list as Linux writes it, parsed and checked where the config is read.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// CPUs an affinity mask can name (1024 with glibc); a higher id cannot be pinned to, and
/// refusing it while parsing keeps a typo like "0-4000000000" from allocating gigabytes.
#[cfg(target_os = "linux")]
pub const MAX_CPUS: usize = 8 * std::mem::size_of::<libc::cpu_set_t>();
#[cfg(not(target_os = "linux"))]
pub const MAX_CPUS: usize = 1024;

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

    pub fn from_ids(mut ids: Vec<usize>) -> Self {
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
