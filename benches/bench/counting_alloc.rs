//! The counting global allocator (scenario 6, also used by chat and memory):
//! per-thread counters always, process-wide ones while `GLOBAL_ON` is set.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

struct CountingAlloc;

pub(crate) static GLOBAL_ON: AtomicBool = AtomicBool::new(false);
pub(crate) static GLOBAL_ALLOCS: AtomicU64 = AtomicU64::new(0);
pub(crate) static GLOBAL_BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static THREAD_ALLOCS: Cell<u64> = const { Cell::new(0) };
    static THREAD_BYTES: Cell<u64> = const { Cell::new(0) };
}

#[inline]
fn count_alloc(size: usize) {
    let _ = THREAD_ALLOCS.try_with(|c| c.set(c.get() + 1));
    let _ = THREAD_BYTES.try_with(|c| c.set(c.get() + size as u64));
    if GLOBAL_ON.load(Relaxed) {
        GLOBAL_ALLOCS.fetch_add(1, Relaxed);
        GLOBAL_BYTES.fetch_add(size as u64, Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to `System`. Counting touches
// only const-initialised thread-locals without destructors and atomics,
// none of which allocates, so there is no re-entrance.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_alloc(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_alloc(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_alloc(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Allocations (calls to alloc, alloc_zeroed, realloc) and bytes requested
/// so far by the calling thread.
pub(crate) fn thread_allocs() -> (u64, u64) {
    (THREAD_ALLOCS.with(Cell::get), THREAD_BYTES.with(Cell::get))
}

pub(crate) fn delta(before: (u64, u64)) -> (u64, u64) {
    let now = thread_allocs();
    (now.0 - before.0, now.1 - before.1)
}
