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
//! Should no pool start (not even one worker), [`install`] returns an error and does not run
//! the work: running it on the caller's thread would send its parallel iterators to rayon's
//! global pool, the very fork hazard above.
//!
//! Pool size follows rayon's rules (`RAYON_NUM_THREADS`, else the number of CPUs).

use crate::error::{N2GError, Result};
use rayon::{ThreadPool, ThreadPoolBuildError, ThreadPoolBuilder};
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Once;

/// A pool built on first use and leaked (never freed), so `&'static` references stay valid.
struct PoolSlot(AtomicPtr<ThreadPool>);

static POOL: PoolSlot = PoolSlot(AtomicPtr::new(ptr::null_mut()));
static FORKS_SEEN: AtomicU64 = AtomicU64::new(0);
static REGISTER: Once = Once::new();

/// Prefix of the crate's worker thread names.
pub const THREAD_NAME: &str = "n2g-fast-";

#[cfg(unix)]
extern "C" fn in_child_after_fork() {
    POOL.0.store(ptr::null_mut(), Ordering::SeqCst);
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

/// Builds a pool with `make(n)` (n = 0: rayon's default size), retrying with one worker should
/// the default size not start (e.g. a thread limit).
fn build(make: impl Fn(usize) -> std::result::Result<ThreadPool, ThreadPoolBuildError>) -> Result<ThreadPool> {
    make(0)
        .or_else(|_| make(1))
        .map_err(|e| N2GError::Resource(format!("could not start n2g_fast's thread pool: {e}")))
}

impl PoolSlot {
    fn get_or_build(&self, make: impl Fn(usize) -> std::result::Result<ThreadPool, ThreadPoolBuildError>) -> Result<&'static ThreadPool> {
        let p = self.0.load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: pools are leaked, never freed, so the pointer stays valid.
            return Ok(unsafe { &*p });
        }
        let fresh = Box::into_raw(Box::new(build(make)?));
        match self.0.compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
            // SAFETY: as above; `fresh` was just leaked.
            Ok(_) => Ok(unsafe { &*fresh }),
            Err(winner) => {
                // Another thread installed a pool first; ours was never used.
                drop(unsafe { Box::from_raw(fresh) });
                Ok(unsafe { &*winner })
            }
        }
    }

    /// Runs `f` in this slot's pool, or returns the error without running it.
    fn install<R: Send>(
        &self,
        make: impl Fn(usize) -> std::result::Result<ThreadPool, ThreadPoolBuildError>,
        f: impl FnOnce() -> R + Send,
    ) -> Result<R> {
        Ok(self.get_or_build(make)?.install(f))
    }
}

fn make_crate_pool(n: usize) -> std::result::Result<ThreadPool, ThreadPoolBuildError> {
    ThreadPoolBuilder::new().num_threads(n).thread_name(|i| format!("{THREAD_NAME}{i}")).build()
}

/// Runs `f` inside the crate's pool, so rayon parallel iterators in `f` use it. When no pool
/// can be started, `f` is not run and the error says so (see the module doc).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> Result<R> {
    register_fork_handler();
    POOL.install(make_crate_pool, f)
}

/// Number of workers of the crate's pool (built if need be).
pub fn pool_size() -> Result<usize> {
    register_fork_handler();
    Ok(POOL.get_or_build(make_crate_pool)?.current_num_threads())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn work_runs_on_the_crate_pool() {
        let n = pool_size().unwrap();
        let (threads, names) = install(|| {
            let names: Vec<String> = (0..64).into_par_iter().map(|_| std::thread::current().name().unwrap_or("").to_owned()).collect();
            (rayon::current_num_threads(), names)
        })
        .unwrap();
        assert_eq!(threads, n);
        assert!(names.iter().all(|s| s.starts_with(THREAD_NAME)), "{names:?}");
    }

    #[test]
    fn no_pool_means_an_error_and_the_work_is_not_run() {
        // A slot of its own whose threads can never start (the crate's pool is untouched).
        let slot = PoolSlot(AtomicPtr::new(ptr::null_mut()));
        let refuse = |n: usize| {
            ThreadPoolBuilder::new()
                .num_threads(n)
                .spawn_handler(|_| Err(std::io::Error::other("threads refused by the test")))
                .build()
        };
        let ran = AtomicBool::new(false);
        let err = slot
            .install(refuse, || {
                ran.store(true, Ordering::SeqCst);
                (0..1000u64).into_par_iter().sum::<u64>()
            })
            .unwrap_err();
        assert!(matches!(err, N2GError::Resource(_)), "{err:?}");
        assert!(err.to_string().starts_with("could not start n2g_fast's thread pool: "), "{err}");
        assert!(err.to_string().contains("threads refused by the test"), "{err}");
        assert!(!ran.load(Ordering::SeqCst), "the work ran outside any crate pool");
    }
}
