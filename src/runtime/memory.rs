//! The C allocator that ONNX Runtime and the tokenizer allocate through. glibc's malloc gives
//! each thread that allocates an arena of its own (up to eight per CPU) and keeps freed memory
//! there. Session runs and tokenization happen on whichever pool thread is free, so under a
//! steady mixed load the server grew by about 190 MiB a minute with glibc's defaults, and stayed
//! flat with one arena per CPU (the soak benchmark). Large inputs are also followed by a trim
//! that hands their memory back.

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

/// Returns memory freed after a large tokenization to the system.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
