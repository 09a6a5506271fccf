//! A BPE tokenizer that the server loads leaves nothing behind in the threads that used it once
//! it is dropped, as happens to the old version at every reload. tokenizers 0.23 caches a BPE
//! model's tokenized words in each thread, keyed by the model instance, and frees none of them
//! when the instance goes (`registry::loader::without_word_cache`).
//!
//! Counted with an allocator that tracks the bytes each thread holds, so other tests running
//! on other threads of this binary do not disturb the count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

use lmserve::registry::loader;
use lmserve::registry::manifest::Manifest;
use tokenizers::Tokenizer;

struct PerThread;

thread_local! {
    /// Bytes allocated and not yet freed by this thread (frees of memory another thread
    /// allocated count here too; this test's thread frees only its own).
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn count(bytes: isize) {
    // `try_with`: during a thread's teardown the counter may be gone; nothing to count then.
    let _ = LIVE.try_with(|live| live.set(live.get() + bytes));
}

// SAFETY: every call goes to the system allocator unchanged; the counter allocates nothing.
unsafe impl GlobalAlloc for PerThread {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            count(layout.size() as isize);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        unsafe { System.dealloc(pointer, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: PerThread = PerThread;

fn live() -> isize {
    LIVE.with(Cell::get)
}

/// Bytes this thread still holds after loading a tokenizer five times, encoding 3,000 distinct
/// words with each and dropping it, as five reloads of a model under traffic would.
fn held_after_reloads(load: impl Fn() -> Tokenizer) -> isize {
    let text: String = (0..3000).map(|i| format!(" word{i}x")).collect();
    // One round first, so what tokenizers sets up once per process or thread is not counted.
    load().encode(text.as_str(), false).unwrap();
    let before = live();
    for _ in 0..5 {
        let tokenizer = load();
        let encoding = tokenizer.encode(text.as_str(), false).unwrap();
        assert!(encoding.len() >= 3000);
    }
    live() - before
}

#[test]
fn a_dropped_bpe_tokenizer_leaves_no_cached_words_in_its_threads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/repository/tiny-gpt2/1");
    let manifest = Manifest::read(&dir).unwrap();
    let file = dir.join(&manifest.tokenizer);

    // tokenizers as it comes: each dropped instance leaves its words in this thread. Should a
    // release stop doing so, this fails, and the server's workaround can go.
    let plain = held_after_reloads(|| Tokenizer::from_file(&file).unwrap());
    assert!(
        plain > 1 << 20,
        "a plain tokenizer left {plain} bytes behind; tokenizers may free its cache now"
    );

    let files = lmserve::registry::hf::HfFiles::default();
    let served = held_after_reloads(|| loader::read_tokenizer(&dir, &manifest, &files).unwrap());
    assert!(
        served < 16 << 10,
        "the server's tokenizer left {served} bytes behind after five reloads (a plain one: {plain})"
    );
}
