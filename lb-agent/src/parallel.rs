//! Work spread over the cores when there is a lot of it: a cold start or a resync handles every
//! Service at once, and the agent has a couple of cores to do it in. One event's few changes stay
//! on the calling thread, where handing them to another would cost more than the work.
//!
//! Scoped threads that end with the work, not a pool that outlives it: glibc gives each thread an
//! arena of its own, and the free space at the top of a live thread's arena is never handed back
//! (`malloc_trim` trims only the main one), which kept some 14 MiB of a cold start's garbage.

use std::{num::NonZeroUsize, thread};

/// Items below which [`map`] stays on the calling thread.
pub const MIN_ITEMS: usize = 1024;

/// `items.iter().map(f).collect()`, on every core when there are many items: each thread maps an
/// equal run of them (the items of one call cost about the same). The results keep the items'
/// order.
pub fn map<'a, T: Sync, U: Send>(items: &'a [T], f: impl Fn(&'a T) -> U + Sync) -> Vec<U> {
    let threads = thread::available_parallelism().map_or(1, NonZeroUsize::get);
    if items.len() < MIN_ITEMS || threads < 2 {
        return items.iter().map(f).collect();
    }
    let run = items.len().div_ceil(threads);
    // The results go straight to their place in one vector: each thread fills its own part of
    // its spare capacity (no per-thread vector to allocate in the thread's arena, then copy).
    let mut out: Vec<U> = Vec::with_capacity(items.len());
    let f = &f;
    thread::scope(|scope| {
        let mut parts = items
            .chunks(run)
            .zip(out.spare_capacity_mut().chunks_mut(run));
        let (first, first_out) = parts.next().unwrap_or_default();
        let others: Vec<_> = parts
            .map(|(items, out)| scope.spawn(move || fill(items, out, f)))
            .collect();
        fill(first, first_out, f);
        for other in others {
            other.join().expect("a worker thread panicked");
        }
    });
    // SAFETY: the runs of `items` and of the spare capacity pair up one to one and cover
    // `items.len()` elements, and every thread has returned having written each element of its
    // run (a panic would have ended this function above, leaking what was written, not exposing
    // it).
    unsafe { out.set_len(items.len()) };
    out
}

fn fill<'a, T, U>(
    items: &'a [T],
    out: &mut [std::mem::MaybeUninit<U>],
    f: &(impl Fn(&'a T) -> U + Sync),
) {
    for (item, slot) in items.iter().zip(out) {
        slot.write(f(item));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn results_keep_the_order_of_the_items_small_or_large() {
        for n in [0, 3, super::MIN_ITEMS, 10 * super::MIN_ITEMS + 7] {
            let items: Vec<usize> = (0..n).collect();
            let doubled = super::map(&items, |i| 2 * i);
            assert_eq!(doubled, items.iter().map(|i| 2 * i).collect::<Vec<_>>());
        }
    }
}
