//! virtio-balloon (virtio 1.x 5.5): the guest gives memory back to the
//! host, and takes it again.
//!
//! - **Inflate** (queue 0): the host sets a target (`num_pages` in the
//!   configuration, and a configuration interrupt); the guest's driver
//!   takes pages from its allocator and sends their frame numbers here.
//!   Each page is freed on the host before the buffer is returned
//!   ([`GiveBack`]): the guest reads zeroes there when it takes it back.
//! - **Deflate** (queue 1): the guest takes pages back (the host lowered
//!   the target, or, with `DEFLATE_ON_OOM`, the guest ran short). Nothing
//!   to do on the host: the next touch allocates a fresh page.
//! - **Statistics** (queue 2, with `STATS_VQ`): the guest's driver posts
//!   one buffer of (tag, value) pairs; the device keeps it and returns it
//!   when it wants fresh numbers ([`BalloonControl::want_stats`]).
//! - **Free page reporting** (the last queue, with `REPORTING`): the
//!   guest reports free blocks (4 MiB on Linux) as ranges; each is freed
//!   on the host before the buffer is returned, after which the guest may
//!   allocate from them again.
//!
//! Queues a driver leaves out (no statistics) shift the later ones down,
//! as Linux numbers them: with reporting but no statistics, reporting is
//! queue 2.
//!
//! A page is freed only before its buffer goes back to the guest: a page
//! returned first could be written by the guest and then thrown away. A
//! frame number outside the guest's RAM is hostile input: skipped,
//! counted, never acted on.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vm_memory::Bytes;
use vmm_sys_util::timerfd::TimerFd;

use super::device::{self, read_config_bytes, Persist, Queues, Used, VirtioDevice};
use super::VIRTIO_F_VERSION_1;
use crate::snapshot::SnapshotFiles;

/// How snapshots name it.
pub const NAME: &str = "virtio-balloon";
const VIRTIO_ID_BALLOON: u32 = 5;
/// Feature bits (virtio 1.x 5.5.3).
pub const F_STATS_VQ: u64 = 1 << 1;
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
pub const F_REPORTING: u64 = 1 << 5;
/// Inflate, deflate, statistics, reporting (renumbered by the features
/// the driver took, see [`Role`]).
const QUEUE_SIZES: &[u16] = &[256, 256, 256, 256];
/// Where statistics go when the driver takes them.
const STATS_QUEUE: usize = 2;
pub use crate::protocol::{BalloonStatus, BALLOON_PAGE as PAGE};
/// Most frame numbers taken from one inflate or deflate buffer (Linux
/// sends 256); the rest is ignored.
const MAX_PFNS_PER_BUFFER: usize = 4096;
/// Most statistics taken from one buffer (Linux sends 10 or 11).
const MAX_STATS: usize = 32;
/// Statistics tags (virtio 1.x 5.5.6.3), as the API names them.
const STAT_NAMES: &[&str] = &[
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kills",
];

/// Frees guest memory on the host: pages the guest gave up.
pub trait GiveBack: Send + Sync {
    /// Frees `len` bytes of guest RAM from guest-physical `gpa` (whole
    /// pages); the guest reads zeroes there afterwards. Fails, freeing
    /// nothing, for a range that is not all RAM.
    fn discard(&self, gpa: u64, len: u64) -> io::Result<()>;
}

/// What the guest's process asks of the balloon and reads from it,
/// shared with the device (which runs on the I/O thread).
#[derive(Default)]
pub struct BalloonControl {
    status: Mutex<BalloonStatus>,
    /// Return the statistics buffer at the next pass (the I/O thread is
    /// kicked after this is set).
    stats_wanted: AtomicBool,
}

impl BalloonControl {
    pub fn status(&self) -> BalloonStatus {
        self.status.lock().unwrap().clone()
    }

    /// Sets the target; the caller raises the configuration interrupt.
    /// Refused (with why) while no driver runs the device: nobody would
    /// act on it.
    pub fn set_target(&self, pages: u32) -> Result<(), String> {
        let mut status = self.status.lock().unwrap();
        if !status.driver_ready {
            return Err(
                "the guest's balloon driver has not started (no virtio-balloon driver, or not loaded yet)".into()
            );
        }
        status.target_pages = pages;
        Ok(())
    }

    /// Asks for fresh statistics, if the guest sends them: the queue
    /// that carries them, for the caller to kick.
    pub fn want_stats(&self) -> Option<usize> {
        let on = self.status.lock().unwrap().stats_queue;
        if on {
            self.stats_wanted.store(true, Ordering::SeqCst);
        }
        on.then_some(STATS_QUEUE)
    }

    fn update(&self, f: impl FnOnce(&mut BalloonStatus)) {
        f(&mut self.status.lock().unwrap())
    }
}

/// What each queue does, given the features the driver took.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
    Unused,
}

fn role(index: usize, features: u64) -> Role {
    let roles = [
        Some(Role::Inflate),
        Some(Role::Deflate),
        (features & F_STATS_VQ != 0).then_some(Role::Stats),
        (features & F_REPORTING != 0).then_some(Role::Reporting),
    ];
    roles.into_iter().flatten().nth(index).unwrap_or(Role::Unused)
}

pub struct Balloon {
    features: u64,
    /// What the driver took.
    driver_features: u64,
    control: Arc<BalloonControl>,
    give_back: Arc<dyn GiveBack>,
    /// The statistics buffer the device holds (its head), to return when
    /// it wants fresh numbers.
    stats_head: Option<u16>,
    /// Buffers whose pages could not all be freed yet (page sharing was
    /// merging the guest under the freeze): kept, and tried again when
    /// `retry` fires, so a buffer still goes back only once its pages are
    /// freed.
    waiting: VecDeque<Waiting>,
    retry: TimerFd,
}

/// A buffer waiting for its pages to be freed.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Waiting {
    queue: usize,
    head: u16,
    /// Inflated (else reported) pages.
    inflated: bool,
    /// (guest-physical address, bytes) still to free.
    ranges: Vec<(u64, u64)>,
}

/// What a snapshot keeps of it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BalloonState {
    features: u64,
    driver_features: u64,
    status: BalloonStatus,
    stats_head: Option<u16>,
    #[serde(default)]
    waiting: Vec<Waiting>,
}

/// How soon a buffer waiting for a merge is tried again.
const RETRY: std::time::Duration = std::time::Duration::from_millis(5);

impl Balloon {
    /// A balloon offering statistics and, as asked, deflate on OOM and
    /// free page reporting.
    pub fn new(
        deflate_on_oom: bool,
        reporting: bool,
        control: Arc<BalloonControl>,
        give_back: Arc<dyn GiveBack>,
    ) -> io::Result<Balloon> {
        let mut features = VIRTIO_F_VERSION_1 | F_STATS_VQ;
        if deflate_on_oom {
            features |= F_DEFLATE_ON_OOM;
        }
        if reporting {
            features |= F_REPORTING;
        }
        Balloon::with_state(features, control, give_back)
    }

    fn with_state(features: u64, control: Arc<BalloonControl>, give_back: Arc<dyn GiveBack>) -> io::Result<Balloon> {
        let retry = TimerFd::new()?;
        Ok(Balloon {
            features,
            driver_features: 0,
            control,
            give_back,
            stats_head: None,
            waiting: VecDeque::new(),
            retry,
        })
    }

    /// Has the I/O thread try the waiting buffers again soon.
    fn arm_retry(&mut self) {
        if let Err(e) = self.retry.reset(RETRY, None) {
            log::warn!("{NAME}: cannot arm the retry timer: {e}");
        }
    }

    /// Frees what `waiting` still holds, range by range, counting the
    /// pages; true once all are freed (or skipped: not RAM), false if
    /// page sharing was merging the guest (the rest is kept for later).
    fn free(&self, waiting: &mut Waiting) -> bool {
        let (mut freed, mut bad) = (0, 0);
        let mut done = 0;
        for &(gpa, len) in &waiting.ranges {
            match self.give_back.discard(gpa, len) {
                Ok(()) => freed += len.div_ceil(PAGE),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("{NAME}: {len:#x} bytes at {gpa:#x} not given back: {e}");
                    bad += len.div_ceil(PAGE);
                }
            }
            done += 1;
        }
        waiting.ranges.drain(..done);
        let inflated = waiting.inflated;
        self.control.update(|s| {
            *if inflated { &mut s.inflated_pages } else { &mut s.reported_pages } += freed;
            s.bad_pages += bad;
        });
        waiting.ranges.is_empty()
    }

    /// Frees a buffer's pages and returns it, or keeps it for later.
    fn finish(&mut self, mut waiting: Waiting, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        if self.waiting.is_empty() && self.free(&mut waiting) {
            return return_buffer(q, waiting.queue, waiting.head);
        }
        // Behind others waiting, or waiting itself: in order, later.
        self.waiting.push_back(waiting);
        self.arm_retry();
        Ok(0)
    }

    /// Tries the waiting buffers again, in order.
    fn retry_waiting(&mut self, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        let mut used = 0;
        while let Some(mut waiting) = self.waiting.pop_front() {
            if !self.free(&mut waiting) {
                self.waiting.push_front(waiting);
                self.arm_retry();
                break;
            }
            used |= return_buffer(q, waiting.queue, waiting.head)?;
        }
        Ok(used)
    }

    /// Serves the inflate or deflate queue: frame numbers, 4 bytes each.
    fn serve_pfns(&mut self, index: usize, inflate: bool, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        let mut used = 0;
        while let Some(chain) = q.queues[index].pop_descriptor_chain(q.mem) {
            let head = chain.head_index();
            let mut pfns = Vec::new();
            for d in chain.filter(|d| !d.is_write_only()) {
                let room = MAX_PFNS_PER_BUFFER - pfns.len();
                let mut bytes = vec![0u8; (d.len() as usize / 4).min(room) * 4];
                if q.mem.read_slice(&mut bytes, d.addr()).is_err() {
                    log::debug!("{NAME}: a buffer outside guest memory ignored");
                    continue;
                }
                pfns.extend(bytes.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())));
            }
            if !inflate {
                self.control.update(|s| s.deflated_pages += pfns.len() as u64);
                used |= return_buffer(q, index, head)?;
                continue;
            }
            // Runs of consecutive frames, each freed in one go.
            let mut ranges = Vec::new();
            let mut i = 0;
            while i < pfns.len() {
                let n = 1 + pfns[i + 1..].iter().zip(&pfns[i..]).take_while(|(b, a)| **b == a.wrapping_add(1)).count();
                ranges.push((u64::from(pfns[i]) * PAGE, n as u64 * PAGE));
                i += n;
            }
            used |= self.finish(Waiting { queue: index, head, inflated: true, ranges }, q)?;
        }
        Ok(used)
    }

    /// Serves free page reports: each descriptor a range of free pages.
    fn serve_reports(&mut self, index: usize, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        let mut used = 0;
        while let Some(chain) = q.queues[index].pop_descriptor_chain(q.mem) {
            let head = chain.head_index();
            let ranges = chain.map(|d| (d.addr().0, u64::from(d.len()))).collect();
            used |= self.finish(Waiting { queue: index, head, inflated: false, ranges }, q)?;
        }
        Ok(used)
    }

    /// Takes a statistics buffer and keeps it; returns the one held when
    /// fresh numbers are wanted (the driver then sends them again).
    fn serve_stats(&mut self, index: usize, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        let mut used = 0;
        while let Some(chain) = q.queues[index].pop_descriptor_chain(q.mem) {
            let mut raw = Vec::new();
            for d in chain.clone().filter(|d| !d.is_write_only()) {
                let mut bytes = vec![0u8; (d.len() as usize).min(MAX_STATS * 10 - raw.len())];
                if q.mem.read_slice(&mut bytes, d.addr()).is_ok() {
                    raw.extend(bytes);
                }
            }
            let stats: BTreeMap<String, u64> = raw
                .chunks_exact(10)
                .filter_map(|s| {
                    let tag = u16::from_le_bytes([s[0], s[1]]) as usize;
                    let value = u64::from_le_bytes(s[2..10].try_into().unwrap());
                    STAT_NAMES.get(tag).map(|name| (name.to_string(), value))
                })
                .collect();
            self.control.update(|s| s.stats = stats);
            // A driver that sends a second buffer gets the first back.
            if let Some(old) = self.stats_head.replace(chain.head_index()) {
                used |= return_buffer(q, index, old)?;
            }
        }
        if self.control.stats_wanted.swap(false, Ordering::SeqCst) {
            if let Some(head) = self.stats_head.take() {
                used |= return_buffer(q, index, head)?;
            }
        }
        Ok(used)
    }
}

/// Hands buffer `head` of queue `index` back to the driver (a write into
/// guest memory: inside the I/O gate).
fn return_buffer(q: &mut Queues, index: usize, head: u16) -> Result<Used, virtio_queue::Error> {
    let _inside = q.gate.enter();
    q.queues[index].add_used(q.mem, head, 0)?;
    Ok(1 << index)
}

impl VirtioDevice for Balloon {
    fn name(&self) -> &'static str {
        NAME
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.features
    }

    /// `struct virtio_balloon_config`: num_pages, actual (and the free
    /// page hint and poison fields, which we do not offer: zero).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let status = self.control.status.lock().unwrap();
        let mut config = [0u8; 16];
        config[0..4].copy_from_slice(&status.target_pages.to_le_bytes());
        config[4..8].copy_from_slice(&status.actual_pages.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    /// Only `actual` is the driver's to write.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.len() == 4 {
            let actual = u32::from_le_bytes(data.try_into().unwrap());
            self.control.update(|s| s.actual_pages = actual);
        } else {
            log::debug!("{NAME}: write of {} bytes at config offset {offset} ignored", data.len());
        }
    }

    fn activate(&mut self, features: u64) {
        self.driver_features = features;
        self.control.update(|s| {
            s.driver_ready = true;
            s.reporting = features & F_REPORTING != 0;
            s.stats_queue = features & F_STATS_VQ != 0;
            s.deflate_on_oom = features & F_DEFLATE_ON_OOM != 0;
        });
    }

    fn reset(&mut self) {
        // The guest's balloon is empty again: everything it held is its
        // own once more (as free memory it never wrote).
        self.driver_features = 0;
        self.stats_head = None;
        self.waiting.clear();
        self.control.update(|s| {
            s.driver_ready = false;
            s.actual_pages = 0;
        });
    }

    fn process_queue(&mut self, index: usize, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        let retried = self.retry_waiting(q)?;
        let served = match role(index, self.driver_features) {
            Role::Inflate => self.serve_pfns(index, true, q),
            Role::Deflate => self.serve_pfns(index, false, q),
            Role::Stats => self.serve_stats(index, q),
            Role::Reporting => self.serve_reports(index, q),
            Role::Unused => Ok(0),
        }?;
        Ok(retried | served)
    }

    fn host_fds(&self) -> Vec<RawFd> {
        vec![self.retry.as_raw_fd()]
    }

    /// The retry timer fired: the waiting buffers are tried again.
    fn process_host(&mut self, _fd: RawFd, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        let _ = self.retry.wait();
        self.retry_waiting(q)
    }

    fn save(&self, files: &SnapshotFiles) -> io::Result<serde_json::Value> {
        device::to_value(self, files)
    }
}

impl Persist for Balloon {
    type State = BalloonState;
    type Args = (Arc<BalloonControl>, Arc<dyn GiveBack>);

    fn save_state(&self, _files: &SnapshotFiles) -> io::Result<BalloonState> {
        Ok(BalloonState {
            features: self.features,
            driver_features: self.driver_features,
            status: self.control.status(),
            stats_head: self.stats_head,
            waiting: self.waiting.iter().cloned().collect(),
        })
    }

    fn restore((control, give_back): Self::Args, state: &BalloonState, _dir: &Path) -> Result<Balloon, String> {
        let offered = VIRTIO_F_VERSION_1 | F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING;
        if state.features & !offered != 0 || state.driver_features & !state.features != 0 {
            return Err(format!("features {:#x} / {:#x} are not a balloon's", state.features, state.driver_features));
        }
        if state.stats_head.is_some_and(|h| h >= QUEUE_SIZES[STATS_QUEUE]) {
            return Err("its statistics buffer is outside its queue".into());
        }
        let outside = |w: &Waiting| w.queue >= QUEUE_SIZES.len() || w.head >= QUEUE_SIZES[w.queue];
        if state.waiting.iter().any(outside)
            || state.waiting.len() > QUEUE_SIZES.iter().map(|&n| n as usize).sum::<usize>()
        {
            return Err("a buffer it holds is outside its queues".into());
        }
        *control.status.lock().unwrap() = state.status.clone();
        let mut balloon =
            Balloon::with_state(state.features, control, give_back).map_err(|e| format!("timerfd: {e}"))?;
        balloon.driver_features = state.driver_features;
        balloon.stats_head = state.stats_head;
        balloon.waiting = state.waiting.iter().cloned().collect();
        if !balloon.waiting.is_empty() {
            balloon.arm_retry();
        }
        Ok(balloon)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::devices::io_gate::IoGate;
    use crate::memory::GuestMemoryMmap;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;

    /// Records what it was asked to free; refuses what is past 1 MiB.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, u64)>>);

    impl GiveBack for Recorder {
        fn discard(&self, gpa: u64, len: u64) -> io::Result<()> {
            if gpa + len > 1 << 20 {
                return Err(io::Error::other("not RAM"));
            }
            self.0.lock().unwrap().push((gpa, len));
            Ok(())
        }
    }

    fn queue(mem: &GuestMemoryMmap, at: u64) -> (MockSplitQueue<'_, GuestMemoryMmap>, Queue) {
        let vq = MockSplitQueue::create(mem, GuestAddress(at), 16);
        let q = vq.create_queue().unwrap();
        (vq, q)
    }

    /// Inflated frame numbers are freed in runs before the buffer is
    /// used; hostile ones are counted and skipped; free page reports free
    /// their ranges; the statistics buffer is kept until fresh numbers
    /// are wanted.
    #[test]
    fn inflations_and_reports_free_pages_and_stats_come_back_when_wanted() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let control = Arc::new(BalloonControl::default());
        let recorder = Arc::new(Recorder::default());
        let mut balloon = Balloon::new(true, true, control.clone(), recorder.clone()).unwrap();
        assert!(control.set_target(10).is_err(), "a target before the driver runs");
        let features = balloon.features();
        assert_eq!(
            features & (F_STATS_VQ | F_REPORTING | F_DEFLATE_ON_OOM),
            F_STATS_VQ | F_REPORTING | F_DEFLATE_ON_OOM
        );
        balloon.activate(features);
        control.set_target(10).unwrap();
        let mut config = [0u8; 8];
        balloon.read_config(0, &mut config);
        assert_eq!(config, [10, 0, 0, 0, 0, 0, 0, 0]);
        balloon.write_config(4, &7u32.to_le_bytes());
        assert_eq!(control.status().actual_pages, 7);

        let gate = IoGate::default();
        let (vq0, q0) = queue(&mem, 0x1_0000);
        let (_vq1, q1) = queue(&mem, 0x2_0000);
        let (vq2, q2) = queue(&mem, 0x3_0000);
        let (vq3, q3) = queue(&mem, 0x4_0000);
        let mut queues = vec![q0, q1, q2, q3];
        // Inflate: pages 0x10, 0x11, 0x12, 0x40 and one far past RAM.
        let pfns: Vec<u8> = [0x10u32, 0x11, 0x12, 0x40, 0x10_0000].iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&pfns, GuestAddress(0x8000)).unwrap();
        vq0.build_desc_chain(&[RawDescriptor::from(Descriptor::new(0x8000, pfns.len() as u32, 0, 0))]).unwrap();
        let mut q = Queues { mem: &mem, queues: &mut queues, gate: &gate };
        assert_eq!(balloon.process_queue(0, &mut q).unwrap(), 1);
        assert_eq!(*recorder.0.lock().unwrap(), [(0x10_000, 3 * PAGE), (0x40_000, PAGE)]);
        let s = control.status();
        assert_eq!((s.inflated_pages, s.bad_pages), (4, 1));
        assert_eq!(vq0.used().idx().load(), 1, "the buffer went back");

        // A report of two ranges (device-writable, as Linux sends them).
        recorder.0.lock().unwrap().clear();
        vq3.build_desc_chain(&[
            RawDescriptor::from(Descriptor::new(0x8_0000, 0x4_0000, 2, 0)),
            RawDescriptor::from(Descriptor::new(0xc_0000, 0x1000, 2, 0)),
        ])
        .unwrap();
        let mut q = Queues { mem: &mem, queues: &mut queues, gate: &gate };
        assert_eq!(balloon.process_queue(3, &mut q).unwrap(), 1 << 3);
        assert_eq!(*recorder.0.lock().unwrap(), [(0x8_0000, 0x4_0000), (0xc_0000, 0x1000)]);
        assert_eq!(control.status().reported_pages, 0x41);

        // Statistics: free memory 123, and a tag nobody knows.
        let mut stats = Vec::new();
        for (tag, value) in [(4u16, 123u64), (99, 5)] {
            stats.extend(tag.to_le_bytes());
            stats.extend(value.to_le_bytes());
        }
        mem.write_slice(&stats, GuestAddress(0x9000)).unwrap();
        vq2.build_desc_chain(&[RawDescriptor::from(Descriptor::new(0x9000, stats.len() as u32, 0, 0))]).unwrap();
        let mut q = Queues { mem: &mem, queues: &mut queues, gate: &gate };
        assert_eq!(balloon.process_queue(2, &mut q).unwrap(), 0, "the buffer is kept");
        assert_eq!(control.status().stats, BTreeMap::from([("free_memory".to_string(), 123)]));
        assert_eq!(control.want_stats(), Some(STATS_QUEUE));
        let mut q = Queues { mem: &mem, queues: &mut queues, gate: &gate };
        assert_eq!(balloon.process_queue(2, &mut q).unwrap(), 1 << 2, "returned when wanted");
        assert_eq!(vq2.used().idx().load(), 1);

        // Without statistics, reporting is queue 2.
        assert_eq!(role(2, F_REPORTING), Role::Reporting);
        assert_eq!(role(3, F_REPORTING), Role::Unused);
        balloon.reset();
        assert!(!control.status().driver_ready);
    }

    /// Refuses (WouldBlock) while `busy`, as a frozen merge makes it.
    struct Busy(std::sync::atomic::AtomicBool, Recorder);

    impl GiveBack for Busy {
        fn discard(&self, gpa: u64, len: u64) -> io::Result<()> {
            if self.0.load(Ordering::SeqCst) {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "merging"));
            }
            self.1.discard(gpa, len)
        }
    }

    /// A buffer whose pages cannot be freed yet is kept, not returned, and
    /// the ones after it wait behind it; once freeing works again, the
    /// retry timer's pass frees them and returns them, in order, and a
    /// snapshot taken meanwhile keeps them for the clone.
    #[test]
    fn a_buffer_waits_until_its_pages_are_freed() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let control = Arc::new(BalloonControl::default());
        let busy = Arc::new(Busy(true.into(), Recorder::default()));
        let mut balloon = Balloon::new(true, true, control.clone(), busy.clone()).unwrap();
        balloon.activate(balloon.features());
        let gate = IoGate::default();
        let (vq0, q0) = queue(&mem, 0x1_0000);
        let (vq3, q3) = queue(&mem, 0x4_0000);
        let (_vq1, q1) = queue(&mem, 0x2_0000);
        let (_vq2, q2) = queue(&mem, 0x3_0000);
        let mut queues = vec![q0, q1, q2, q3];
        mem.write_slice(&0x10u32.to_le_bytes(), GuestAddress(0x8000)).unwrap();
        vq0.build_desc_chain(&[RawDescriptor::from(Descriptor::new(0x8000, 4, 0, 0))]).unwrap();
        vq3.build_desc_chain(&[RawDescriptor::from(Descriptor::new(0x8_0000, 0x1000, 2, 0))]).unwrap();
        let mut q = Queues { mem: &mem, queues: &mut queues, gate: &gate };
        assert_eq!(balloon.process_queue(0, &mut q).unwrap(), 0, "returned before its page was freed");
        assert_eq!(balloon.process_queue(3, &mut q).unwrap(), 0, "returned before the one ahead of it");
        assert_eq!((vq0.used().idx().load(), vq3.used().idx().load()), (0, 0));
        assert_eq!(balloon.host_fds(), vec![balloon.retry.as_raw_fd()]);
        assert!(balloon.retry.is_armed().unwrap(), "no retry armed");
        let files_dir = std::env::temp_dir().join(format!("vmm-balloon-waiting-{}", std::process::id()));
        std::fs::create_dir_all(&files_dir).unwrap();
        let state = balloon.save_state(&SnapshotFiles::create(&files_dir, true).unwrap()).unwrap();
        assert_eq!(state.waiting.len(), 2, "the snapshot keeps the waiting buffers");
        std::fs::remove_dir_all(files_dir).unwrap();
        busy.0.store(false, Ordering::SeqCst);
        std::thread::sleep(RETRY);
        let mut q = Queues { mem: &mem, queues: &mut queues, gate: &gate };
        let fd = balloon.retry.as_raw_fd();
        assert_eq!(balloon.process_host(fd, &mut q).unwrap(), 1 | 1 << 3);
        assert_eq!((vq0.used().idx().load(), vq3.used().idx().load()), (1, 1));
        assert_eq!(*busy.1 .0.lock().unwrap(), [(0x10_000, PAGE), (0x8_0000, 0x1000)], "in order");
        let s = control.status();
        assert_eq!((s.inflated_pages, s.reported_pages), (1, 1));
    }

    /// A clone's balloon comes back with its template's target, counts
    /// and held statistics buffer; a damaged state is refused.
    #[test]
    fn a_saved_balloon_comes_back() {
        let dir = std::env::temp_dir().join(format!("vmm-balloon-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = SnapshotFiles::create(&dir, true).unwrap();
        let control = Arc::new(BalloonControl::default());
        let mut balloon = Balloon::new(false, true, control.clone(), Arc::new(Recorder::default())).unwrap();
        balloon.activate(balloon.features());
        control.set_target(300).unwrap();
        control.update(|s| s.inflated_pages = 42);
        balloon.stats_head = Some(3);
        let state = balloon.save_state(&files).unwrap();
        let value = serde_json::to_value(&state).unwrap();
        let back_control = Arc::new(BalloonControl::default());
        let args = || (back_control.clone(), Arc::new(Recorder::default()) as Arc<dyn GiveBack>);
        let back = Balloon::restore(args(), &device::from_value::<Balloon>(&value).unwrap(), &dir).unwrap();
        assert_eq!(back_control.status(), control.status());
        assert_eq!(
            (back.stats_head, back.features, back.driver_features),
            (Some(3), balloon.features, balloon.features)
        );
        assert_eq!(back.features & F_DEFLATE_ON_OOM, 0);
        let mut bad = state.clone();
        bad.driver_features |= 1 << 40;
        assert!(Balloon::restore(args(), &bad, &dir).is_err(), "features it never offered");
        let mut bad = state;
        bad.stats_head = Some(999);
        assert!(Balloon::restore(args(), &bad, &dir).is_err(), "a buffer outside its queue");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A guest controls every byte of its queues: random descriptors and
    /// rings on every queue never panic the device, and nothing outside
    /// RAM is ever freed.
    #[test]
    fn fuzzed_queues_never_break_the_balloon() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let control = Arc::new(BalloonControl::default());
        let recorder = Arc::new(Recorder::default());
        let mut balloon = Balloon::new(true, true, control.clone(), recorder.clone()).unwrap();
        balloon.activate(balloon.features());
        let gate = IoGate::default();
        let mut rng = crate::guest::devices::XorShift(0x9e37_79b9_7f4a_7c15);
        for round in 0..200 {
            let index = round % 4;
            let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
            let mut queues: Vec<Queue> = (0..4).map(|_| vq.create_queue().unwrap()).collect();
            let garbage: Vec<u8> = (0..16 * 16 + 4 + 2 * 16).map(|_| rng.next_u64() as u8).collect();
            let (desc, avail) = garbage.split_at(16 * 16);
            mem.write_slice(desc, vq.desc_table_addr()).unwrap();
            mem.write_slice(avail, vq.avail_addr()).unwrap();
            let mut q = Queues { mem: &mem, queues: &mut queues, gate: &gate };
            let _ = balloon.process_queue(index, &mut q);
            control.want_stats();
        }
        assert!(recorder.0.lock().unwrap().iter().all(|&(gpa, len)| gpa + len <= 1 << 20));
    }
}
