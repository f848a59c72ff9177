//! What the supervisor sets up once so that making a guest does not wait
//! on a lock of the whole process.
//!
//! A guest is made ahead of the guests' vCPUs (`Manager::create`), but
//! some system calls take locks that any thread of the supervisor may hold,
//! and a thread that holds one while it waits behind the vCPUs holds up the
//! real-time one too (measured here with 50 clones running: 30 to 150 ms
//! for a clone, against 5-7 ms):
//! - growing the heap (brk, mmap) takes the address space's lock for
//!   writing, which waits for every page fault in progress in any thread;
//! - growing the descriptor table waits for an RCU grace period.
//!
//! So the heap grows in large steps and never shrinks, and the descriptor
//! table is grown once, here, to about what the guests will need.

/// Heap grown by at least this much at a time.
const HEAP_STEP: usize = 64 << 20;
/// Freed heap at the top kept up to this much (glibc's default: 128 KiB).
const HEAP_KEPT: usize = 256 << 20;
/// Blocks this big and over are mapped on their own (glibc's default
/// starts at 128 KiB): below it, a guest's books come from the heap.
const OWN_MAPPING_FROM: usize = 32 << 20;
/// Descriptors the table is grown to hold, at most: each guest costs the
/// supervisor a handful (memory, channels, pidfd, stderr, console).
const DESCRIPTORS: i32 = 16 << 10;

pub fn make() {
    pad_heap();
    grow_descriptor_table();
}

fn pad_heap() {
    let settings =
        [(libc::M_TOP_PAD, HEAP_STEP), (libc::M_TRIM_THRESHOLD, HEAP_KEPT), (libc::M_MMAP_THRESHOLD, OWN_MAPPING_FROM)];
    for (param, value) in settings {
        // SAFETY: mallopt only changes glibc's allocator settings; it
        // returns 0 for a setting it refuses, which leaves the default.
        if unsafe { libc::mallopt(param, value as libc::c_int) } == 0 {
            log::info!("the allocator refused setting {param} to {value}: making a guest may wait for the heap");
        }
    }
}

/// Opens a descriptor at the top of what the table will need and closes
/// it: the table does not shrink.
fn grow_descriptor_table() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let top = (limit.rlim_cur.min(DESCRIPTORS as u64) as i32) - 1;
    // SAFETY: F_DUPFD duplicates stderr onto the lowest free descriptor
    // at or above `top`, which nothing else knows of and is closed at once.
    unsafe {
        let fd = libc::fcntl(libc::STDERR_FILENO, libc::F_DUPFD_CLOEXEC, top);
        if fd >= 0 {
            libc::close(fd);
        }
    }
}

#[cfg(test)]
mod tests {
    /// The table holds the high descriptor afterwards (a later open of a
    /// descriptor that high does not grow it: only shown by the number).
    #[test]
    fn the_descriptor_table_is_grown() {
        super::grow_descriptor_table();
        let size = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:").map(|v| v.trim().parse::<u64>().unwrap()))
            .unwrap();
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: as in the code under test.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        assert!(size >= limit.rlim_cur.min(super::DESCRIPTORS as u64), "FDSize {size}");
    }
}
