//! Locking a `std::sync::Mutex` whose holder may have panicked.
//!
//! walrelay's mutexes guard small bookkeeping (positions, lists, counters) that every critical
//! section leaves consistent before it can panic, so a poisoned lock is taken as it is rather
//! than spreading the panic to the thread that delivers acknowledgements or serves metrics.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the data as it is if a previous holder panicked.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
