//! The C allocator that ONNX Runtime and the tokenizer allocate through. glibc's malloc gives
//! each thread that allocates an arena of its own (up to eight per CPU) and keeps freed memory
//! there. Session runs and tokenization happen on whichever pool thread is free, so under a
//! steady mixed load the server grew by about 190 MiB a minute with glibc's defaults, and stayed
//! flat with one arena per CPU (the soak benchmark). Large inputs and model loads are also
//! followed by a trim that hands their memory back, and a load hands back the pages of the
//! weights files ONNX Runtime keeps mapped.

/// Caps glibc's malloc arenas at `arenas`; call before any thread starts. `None`: one per CPU
/// the process may use (at least 2); `Some(0)`: glibc's own default.
pub fn limit_arenas(arenas: Option<usize>) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let arenas = match arenas {
            Some(0) => return,
            Some(arenas) => arenas,
            None => std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
        };
        let arenas = i32::try_from(arenas).unwrap_or(i32::MAX);
        // SAFETY: mallopt takes plain integers; it runs before other threads allocate.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = arenas;
}

/// Returns the heap memory freed since (by a large tokenization, by a model load) to the system.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Asks the kernel to take back this process's resident pages of the files under `folder` that
/// it maps, and returns how many bytes those mappings span.
///
/// ONNX Runtime maps a model's external weights file and prepacks the matrices it multiplies
/// into memory of its own. A tensor that is also read in place keeps its whole mapping
/// resident: SmolLM2's tied embedding table is both the `Gather` of the input and the `Gemm` of
/// the logits, so after prepacking its 108 MiB of file pages stay in the server's resident set
/// next to the packed copy, while a decode step reads only a few of its rows. `MADV_PAGEOUT` is
/// a hint, not a change of contents: a page still as the file holds it is read back from the
/// file when touched, one written since (ONNX Runtime maps the file private and writable) is
/// kept or swapped, and a range that stopped being this mapping in the meantime is at worst
/// paged out too. The kernel leaves alone the pages another process maps as well (a second
/// server on the same files): they stay in both resident sets.
pub fn page_out_files(folder: &std::path::Path) -> u64 {
    #[cfg(target_os = "linux")]
    {
        let Ok(folder) = folder.canonicalize() else {
            return 0;
        };
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
            return 0;
        };
        let mut spanned = 0;
        for mapping in maps.lines().filter_map(FileMapping::parse) {
            if !std::path::Path::new(mapping.path).starts_with(&folder) {
                continue;
            }
            let length = mapping.end - mapping.start;
            // SAFETY: MADV_PAGEOUT never changes what the range holds, only where it lies.
            let advised = unsafe {
                libc::madvise(
                    mapping.start as *mut libc::c_void,
                    length,
                    libc::MADV_PAGEOUT,
                )
            };
            if advised == 0 {
                spanned += length as u64;
            }
        }
        spanned
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = folder;
        0
    }
}

/// One line of `/proc/self/maps` that maps a file.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
#[derive(Debug, PartialEq, Eq)]
struct FileMapping<'a> {
    start: usize,
    end: usize,
    path: &'a str,
}

impl<'a> FileMapping<'a> {
    /// `start-end perms offset dev inode path`; an anonymous or deleted mapping is `None`.
    fn parse(line: &'a str) -> Option<Self> {
        let mut fields = line.splitn(6, ' ');
        let (start, end) = fields.next()?.split_once('-')?;
        let path = fields.nth(4)?.trim_start();
        if !path.starts_with('/') || path.ends_with(" (deleted)") {
            return None;
        }
        Some(Self {
            start: usize::from_str_radix(start, 16).ok()?,
            end: usize::from_str_radix(end, 16).ok()?,
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{FileMapping, page_out_files};

    /// Maps a file the way ONNX Runtime maps external weights (private, writable), pages it out,
    /// and reads it back unchanged.
    #[cfg(target_os = "linux")]
    #[test]
    fn paging_out_a_mapped_file_keeps_its_contents() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("model.onnx_data");
        let contents: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
        std::fs::write(&path, &contents).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let length = contents.len();
        // SAFETY: a fresh private mapping of a file this test owns, unmapped below.
        let mapped = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(mapped, libc::MAP_FAILED);
        // SAFETY: the mapping is `length` bytes long and stays mapped while the slice lives.
        let bytes = unsafe { std::slice::from_raw_parts(mapped as *const u8, length) };
        assert_eq!(
            bytes,
            &contents[..],
            "read through once, as prepacking does"
        );

        let spanned = page_out_files(folder.path());
        assert!(
            spanned >= length as u64,
            "{spanned} bytes advised, of {length}"
        );
        assert_eq!(bytes, &contents[..], "read back from the file");
        // SAFETY: `bytes` is not used past this point.
        unsafe { libc::munmap(mapped, length) };
        assert_eq!(
            page_out_files(folder.path()),
            0,
            "nothing under the folder is mapped"
        );
    }

    #[test]
    fn reads_the_file_mappings_of_proc_maps() {
        let weights = "7f00a000-7f00c000 rw-p 00000000 fd:01 1234    /models/m/1/model.onnx_data";
        assert_eq!(
            FileMapping::parse(weights),
            Some(FileMapping {
                start: 0x7f00_a000,
                end: 0x7f00_c000,
                path: "/models/m/1/model.onnx_data",
            })
        );
        let anonymous = "7f00a000-7f00c000 rw-p 00000000 00:00 0 ";
        let heap = "5600a000-5600c000 rw-p 00000000 00:00 0     [heap]";
        let deleted = "7f00a000-7f00c000 r--p 00000000 fd:01 1234    /models/m/1/old (deleted)";
        for line in [anonymous, heap, deleted] {
            assert_eq!(FileMapping::parse(line), None, "{line}");
        }
    }
}
