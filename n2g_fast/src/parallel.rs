//! The crate's thread pool, safe across `fork()`.
//!
//! A child made by `fork()` has only the forking thread: rayon's worker threads are gone, but a
//! global pool would still hand them jobs and wait forever (`multiprocessing` with the fork
//! start method after any batch call). So the crate never uses rayon's global pool: it runs work
//! in its own pool, kept behind an atomic pointer, and a `pthread_atfork` child handler clears
//! that pointer. The next call in the child builds a fresh pool with live threads. The stale
//! pool is leaked on purpose: dropping it would signal threads that do not exist in the child.
//! The handler only stores to an atomic, which is async-signal-safe as a fork handler must be.
//!
//! Pool size follows rayon's rules (`RAYON_NUM_THREADS`, else the number of CPUs).

use rayon::{ThreadPool, ThreadPoolBuilder};
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Once;

static POOL: AtomicPtr<ThreadPool> = AtomicPtr::new(ptr::null_mut());
static FORKS_SEEN: AtomicU64 = AtomicU64::new(0);
static REGISTER: Once = Once::new();

#[cfg(unix)]
extern "C" fn in_child_after_fork() {
    POOL.store(ptr::null_mut(), Ordering::SeqCst);
    FORKS_SEEN.fetch_add(1, Ordering::SeqCst);
}

/// Registers the fork handler (once per process; called from module init and before any pool
/// is built).
pub fn register_fork_handler() {
    REGISTER.call_once(|| {
        #[cfg(unix)]
        // SAFETY: the handler only touches atomics.
        unsafe {
            libc::pthread_atfork(None, None, Some(in_child_after_fork));
        }
    });
}

/// How many times this process has been the child side of a fork (for tests).
pub fn forks_seen() -> u64 {
    FORKS_SEEN.load(Ordering::SeqCst)
}

fn pool() -> Option<&'static ThreadPool> {
    register_fork_handler();
    let p = POOL.load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: pools are leaked, never freed, so the pointer stays valid.
        return Some(unsafe { &*p });
    }
    let built = ThreadPoolBuilder::new()
        .thread_name(|i| format!("n2g-fast-{i}"))
        .build()
        .or_else(|_| ThreadPoolBuilder::new().num_threads(1).build())
        .ok()?;
    let fresh = Box::into_raw(Box::new(built));
    match POOL.compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
        // SAFETY: as above; `fresh` was just leaked.
        Ok(_) => Some(unsafe { &*fresh }),
        Err(winner) => {
            // Another thread installed a pool first; ours was never used.
            drop(unsafe { Box::from_raw(fresh) });
            Some(unsafe { &*winner })
        }
    }
}

/// Runs `f` inside the crate's pool, so rayon parallel iterators in `f` use it. Should no
/// thread at all be creatable, `f` runs on the caller's thread (rayon then uses its own pool)
/// rather than panicking.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match pool() {
        Some(p) => p.install(f),
        None => f(),
    }
}
