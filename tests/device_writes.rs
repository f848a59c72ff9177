//! A merge never loses a device write: the virtio disk reads blocks into a
//! guest's pages (through its queue, its I/O gate and vm-memory, as in a
//! running guest) while the page-sharing engine merges those same pages
//! with another guest's as fast as it can, under write-protection and
//! under the freeze. Every page must end with exactly what the device last
//! put there, and the other guest's pages must never change. And pages the
//! device fills are seen by the scanner, so they merge. The same for frames
//! the network device receives from a TAP. No KVM needed: the engine, its
//! agents and the devices work on memfd RAM in this process (the network
//! test needs root, for its TAP).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dedup::{Agent, DirtyTracker, Engine, Freezer, GuestMemory, ProtectMode};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm::guest::devices::bus::BusDevice;
use vmm::guest::devices::io_gate::IoGate;
use vmm::guest::devices::virtio::block::Block;
use vmm::guest::devices::virtio::net::{self, Net};
use vmm::guest::devices::virtio::{Irq, Queues, VirtioDevice, VirtioSlot};
use vmm::guest::disk::Disk;
use vmm::guest::vstate::control::VcpuGate;
use vmm::image::BaseImage;
use vmm::memory::{guest_memfd, GuestMemoryMmap, GuestRam};
use vmm::tap::Tap;
use vmm_sys_util::eventfd::EventFd;

const PAGES: u64 = 64;
const FIRST_PAGE: u64 = 0x10_0000;
const QUEUE: u64 = 0x1000;
const HEADER: u64 = 0x8000;
const STATUS: u64 = 0x9000;
const WRITE: u16 = 2;
const ROUNDS: u64 = 50_000;

/// The content of block `b` of the disk: page p's two versions are blocks
/// p (the one the other guest holds too) and PAGES + p.
fn block(b: u64) -> Vec<u8> {
    (0..4096u64).map(|i| (b.wrapping_mul(0x9e37_79b9) ^ (i * 31)) as u8).collect()
}

struct GateFreezer(Arc<IoGate>);

impl Freezer for GateFreezer {
    fn freeze(&self) -> usize {
        self.0.freeze();
        1
    }
    fn thaw(&self) {
        self.0.thaw();
    }
}

fn reg(dev: &VirtioSlot, offset: u64, value: u32) {
    dev.write(0, offset, &value.to_le_bytes());
}

/// A virtio disk on `image`, read-only, writing into `mem`.
fn disk(image: &std::path::Path, gate: &Arc<IoGate>, mem: &GuestMemoryMmap) -> VirtioSlot {
    let block = Block::new(Disk::read_only(BaseImage::open(image).unwrap()));
    VirtioSlot::new(
        0,
        Box::new(block),
        Irq::Line(EventFd::new(0).unwrap()),
        gate.clone(),
        Arc::new(VcpuGate::new(1)),
        mem.clone(),
    )
    .unwrap()
}

/// Sets the device up as a driver would, with its queue where `vq` lies.
fn set_up_queue(dev: &VirtioSlot, vq: &MockSplitQueue<GuestMemoryMmap>) {
    reg(dev, 0x070, 0); // reset
    reg(dev, 0x070, 1 | 2);
    reg(dev, 0x024, 1);
    reg(dev, 0x020, 1); // VIRTIO_F_VERSION_1
    reg(dev, 0x070, 1 | 2 | 8);
    reg(dev, 0x038, 16);
    for (offset, addr) in [(0x080, vq.desc_table_addr()), (0x090, vq.avail_addr()), (0x0a0, vq.used_addr())] {
        reg(dev, offset, addr.0 as u32);
        reg(dev, offset + 4, (addr.0 >> 32) as u32);
    }
    reg(dev, 0x044, 1);
    reg(dev, 0x070, 1 | 2 | 8 | 4);
}

fn ram(name: &str) -> GuestRam {
    GuestRam::new(4 << 20, Some(guest_memfd(name, 4 << 20).unwrap())).unwrap()
}

/// Shares `ram`'s pages with the engine, through an agent in this process.
fn share(
    e: &mut Engine,
    ram: &GuestRam,
    mode: ProtectMode,
    freezer: Arc<dyn Freezer>,
    dirty: Option<Arc<dyn DirtyTracker>>,
) {
    let memfd = ram.memfd().unwrap();
    let agent =
        Agent::new(ram.regions(), memfd.try_clone().unwrap(), e.store_file(0).unwrap(), mode, freezer, dirty).unwrap();
    let mem = GuestMemory {
        memfd: memfd.try_clone().unwrap(),
        regions: ram.regions(),
        group: 0,
        pid: std::process::id(),
        agent: Box::new(agent),
    };
    e.add_guest(mem).unwrap();
}

fn disk_image(dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let image = dir.join("disk.img");
    std::fs::write(&image, (0..2 * PAGES).flat_map(block).collect::<Vec<u8>>()).unwrap();
    image
}

/// An engine merging guests a (whose device writes go through `gate`) and
/// b as fast as it can, on a thread of its own until stopped.
struct Scanner {
    engine: Arc<Mutex<Engine>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Scanner {
    fn start(a: &GuestRam, b: &GuestRam, mode: ProtectMode, gate: &Arc<IoGate>) -> Scanner {
        let config = dedup::Config { pages_to_scan: 1 << 20, batch: 8, ..Default::default() };
        let engine = Arc::new(Mutex::new(Engine::new(config)));
        {
            let mut e = engine.lock().unwrap();
            share(&mut e, a, mode, Arc::new(GateFreezer(gate.clone())), None);
            share(&mut e, b, mode, Arc::new(GateFreezer(Arc::new(IoGate::default()))), None);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (engine, stop) = (engine.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    engine.lock().unwrap().scan();
                }
            })
        };
        Scanner { engine, stop, thread }
    }

    /// Stops it; returns its stats.
    fn stop(self) -> dedup::Stats {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
        self.engine.lock().unwrap().stats()
    }
}

#[test]
fn device_writes_survive_concurrent_merges() {
    for mode in [ProtectMode::Freeze, ProtectMode::WriteProtect] {
        race_device_against_merges(mode);
    }
}

fn race_device_against_merges(mode: ProtectMode) {
    let dir = std::env::temp_dir().join(format!("vmm-device-writes-{}-{mode:?}", std::process::id()));
    let image = disk_image(&dir);
    let a = ram("a");
    let b = ram("b");
    let page = |p: u64| GuestAddress(FIRST_PAGE + p * 4096);
    for p in 0..PAGES {
        b.memory().write_slice(&block(p), page(p)).unwrap();
        a.memory().write_slice(&block(PAGES + p), page(p)).unwrap();
    }
    let gate = Arc::new(IoGate::default());
    let dev = disk(&image, &gate, a.memory());

    let scanner = Scanner::start(&a, &b, mode, &gate);

    let mut last: Vec<u64> = (0..PAGES).map(|p| PAGES + p).collect();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut now = vec![0u8; 4096];
    for round in 0..ROUNDS {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // A run of pages, read in one request: a long device write, so that
        // merges of its pages often overlap it.
        let first = rng % PAGES;
        let count = 1 + (rng >> 8) % (PAGES - first);
        // Mostly the version guest b holds (so the pages merge), sometimes
        // the other (so a write lost to a merge shows).
        let version = if (rng >> 32).is_multiple_of(4) { PAGES } else { 0 };
        // This thread plays the driver too, and a driver's writes are a
        // vCPU's: the real freeze parks vCPUs first, so here they are made
        // inside the same gate (else a merge of the queue page, all zero for
        // a moment, could drop them, as it would a running vCPU's). Under
        // write-protection the kernel holds them off like any write.
        let driver = gate.enter();
        // A fresh queue each round (the mock does not wrap its ring).
        a.memory().write_slice(&[0u8; 1024], GuestAddress(QUEUE)).unwrap();
        let vq = MockSplitQueue::create(a.memory(), GuestAddress(QUEUE), 16);
        let mut header = [0u8; 16];
        header[8..16].copy_from_slice(&((version + first) * 8).to_le_bytes());
        a.memory().write_slice(&header, GuestAddress(HEADER)).unwrap();
        set_up_queue(&dev, &vq);
        vq.build_desc_chain(&[
            RawDescriptor::from(Descriptor::new(HEADER, 16, 0, 0)),
            RawDescriptor::from(Descriptor::new(page(first).0, (count * 4096) as u32, WRITE, 0)),
            RawDescriptor::from(Descriptor::new(STATUS, 1, WRITE, 0)),
        ])
        .unwrap();
        drop(driver);
        reg(&dev, 0x050, 0); // kick: served on this thread, inside the gate
        let used: u16 = a.memory().read_obj(GuestAddress(vq.used_addr().0 + 2)).unwrap();
        assert_eq!(used, 1, "round {round}: the device did not answer the request");
        assert_eq!(a.memory().read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0, "round {round}: request failed");
        for p in first..first + count {
            last[p as usize] = version + p;
            a.memory().read_slice(&mut now, page(p)).unwrap();
            assert!(now == block(version + p), "round {round}: the device's write to page {p} is not there");
        }
    }
    let stats = scanner.stop();
    // Merges happened, and device writes landed on merged pages.
    let merges = stats.merges_frozen + stats.merges_write_protected;
    assert!(stats.cow_breaks > 0 && merges > 0, "{mode:?}: nothing merged, so nothing was tested: {stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
    for p in 0..PAGES {
        let mut got = vec![0u8; 4096];
        a.memory().read_slice(&mut got, page(p)).unwrap();
        assert!(got == block(last[p as usize]), "{mode:?}: page {p} of guest a lost a device write");
        b.memory().read_slice(&mut got, page(p)).unwrap();
        assert!(got == block(p), "{mode:?}: page {p} of guest b changed");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The dirty log the guest process gives page sharing, minus KVM (no vCPU
/// runs here): the pages the VMM itself wrote, or, to show what the test
/// catches, nothing at all.
struct DeviceWrites(Option<GuestMemoryMmap>);

impl DirtyTracker for DeviceWrites {
    /// Device writes are taken as they are read: nothing to watch again.
    fn watch(&self, _pages: &[u64]) -> std::io::Result<()> {
        Ok(())
    }

    fn take_dirty(&self) -> std::io::Result<Vec<u64>> {
        Ok(self.0.as_ref().map(vmm::memory::take_device_writes).unwrap_or_default())
    }
}

/// Fills 64 pages of two guests with the same disk blocks through their
/// virtio disks, after the scanner has hashed those pages with other
/// contents; returns the pages shared before and after.
fn fill_from_disk_after_scanning(name: &str, log_device_writes: bool) -> (u64, u64) {
    let dir = std::env::temp_dir().join(format!("vmm-device-fills-{}-{name}", std::process::id()));
    let image = disk_image(&dir);
    let (a, b) = (ram(&format!("{name}a")), ram(&format!("{name}b")));
    let page = |p: u64| GuestAddress(FIRST_PAGE + p * 4096);
    // Distinct contents first (no block of one guest equals one of the
    // other's), hashed and remembered by the scanner.
    for p in 0..PAGES {
        a.memory().write_slice(&block(1000 + p), page(p)).unwrap();
        b.memory().write_slice(&block(1100 + p), page(p)).unwrap();
    }
    let mut e = Engine::new(dedup::Config { pages_to_scan: 1 << 20, ..Default::default() });
    let gate = Arc::new(IoGate::default());
    for r in [&a, &b] {
        let dirty = Arc::new(DeviceWrites(log_device_writes.then(|| r.memory().clone())));
        share(&mut e, r, ProtectMode::Freeze, Arc::new(GateFreezer(gate.clone())), Some(dirty));
    }
    let passes = |e: &mut Engine, n: u64| {
        let start = e.stats().full_scans;
        while e.stats().full_scans < start + n {
            e.scan();
        }
    };
    passes(&mut e, 3);
    let before = e.stats().pages_sharing;
    // A minute later (pages written twice within seconds are held back as
    // churning: dedup/src/churn.rs), both guests' disks read the same 64
    // blocks into those pages.
    e.advance_clock(std::time::Duration::from_secs(60));
    for r in [&a, &b] {
        let dev = disk(&image, &gate, r.memory());
        r.memory().write_slice(&[0u8; 1024], GuestAddress(QUEUE)).unwrap();
        let vq = MockSplitQueue::create(r.memory(), GuestAddress(QUEUE), 16);
        r.memory().write_slice(&[0u8; 16], GuestAddress(HEADER)).unwrap();
        set_up_queue(&dev, &vq);
        vq.build_desc_chain(&[
            RawDescriptor::from(Descriptor::new(HEADER, 16, 0, 0)),
            RawDescriptor::from(Descriptor::new(page(0).0, (PAGES * 4096) as u32, WRITE, 0)),
            RawDescriptor::from(Descriptor::new(STATUS, 1, WRITE, 0)),
        ])
        .unwrap();
        reg(&dev, 0x050, 0);
        assert_eq!(r.memory().read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    }
    passes(&mut e, 3);
    std::fs::remove_dir_all(dir).unwrap();
    (before, e.stats().pages_sharing)
}

/// Pages the device fills after the scanner has hashed them (the guest's
/// page cache filling from a shared disk) still merge: the VMM's writes
/// reach the dirty log, so remembered hashes are not trusted for them.
#[test]
fn pages_the_device_fills_are_merged() {
    let (before, after) = fill_from_disk_after_scanning("logged", true);
    assert_eq!(before, 0, "the pages were meant to differ at first");
    assert!(after >= PAGES, "only {after} of the {PAGES} pages the device filled merged");
    // A dirty log blind to device writes keeps the stale hashes: the test
    // would see that.
    let (_, blind) = fill_from_disk_after_scanning("blind", false);
    assert!(blind < PAGES / 2, "{blind} pages merged without device writes in the log: the test shows nothing");
}

#[test]
fn received_frames_survive_concurrent_merges() {
    for (k, mode) in [ProtectMode::Freeze, ProtectMode::WriteProtect].into_iter().enumerate() {
        race_frames_against_merges(mode, k as u8);
    }
}

fn sh(cmd: &str) {
    let out = std::process::Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Guest a's network device receives UDP datagrams from the host into
/// pages that the engine keeps merging with guest b's identical pages; a
/// received frame must land in a's page whole (never in the shared frame,
/// never lost to a merge), and b's pages never change. After each check the
/// driver puts the page back as it was, so it merges again.
fn race_frames_against_merges(mode: ProtectMode, k: u8) {
    const FRAMES: u64 = 4_000;
    let id = std::process::id();
    let name = format!("vmmw{}{k}", id % 10_000);
    let tap = Tap::open(&name).unwrap_or_else(|e| panic!("this test needs root and /dev/net/tun: TAP {name}: {e}"));
    let net3 = 100 + 2 * (id % 50) as u8 + k;
    let mac = vmm::config::mac_for_guest(42);
    let mac_text: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    sh(&format!(
        "ip addr add 198.18.{net3}.1/24 dev {name} && ip link set {name} up && \
         ip link set {name} mtu 65000 && ip neigh replace 198.18.{net3}.2 lladdr {} dev {name} nud permanent",
        mac_text.join(":")
    ));
    let socket = std::net::UdpSocket::bind(format!("198.18.{net3}.1:0")).unwrap();
    let guest = format!("198.18.{net3}.2:9999");
    let mut device = Net::new(tap, mac);
    device.activate(1 << 32 | net::VIRTIO_NET_F_MRG_RXBUF);
    let tap_fd = device.host_fds()[0];

    let (a, b) = (ram(&format!("net-a-{mode:?}")), ram(&format!("net-b-{mode:?}")));
    let page = |p: u64| GuestAddress(FIRST_PAGE + p * 4096);
    for p in 0..PAGES {
        a.memory().write_slice(&block(p), page(p)).unwrap();
        b.memory().write_slice(&block(p), page(p)).unwrap();
    }
    let gate = Arc::new(IoGate::default());
    let scanner = Scanner::start(&a, &b, mode, &gate);

    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut now = vec![0u8; 4096];
    for round in 0..FRAMES {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Frames of up to 16 pages, so that merges of their pages often
        // overlap the device's copy.
        let payload: Vec<u8> = (0..64 + (rng >> 20) % 64_000).map(|i| (rng >> (i % 56)) as u8 ^ i as u8).collect();
        let pages_spanned = (payload.len() as u64 + 2048 + 54).div_ceil(4096);
        let p = rng % (PAGES - pages_spanned);
        let offset = (rng >> 8) % 2048;
        // The driver's part (a vCPU's writes: inside the gate, see above):
        // one receive buffer, from `offset` in page p to the end of page
        // p + pages_spanned - 1.
        let driver = gate.enter();
        a.memory().write_slice(&[0u8; 1024], GuestAddress(QUEUE)).unwrap();
        let vq = MockSplitQueue::create(a.memory(), GuestAddress(QUEUE), 16);
        let buffer = Descriptor::new(page(p).0 + offset, (pages_spanned * 4096 - offset) as u32, WRITE, 0);
        vq.add_desc_chains(&[RawDescriptor::from(buffer)], 0).unwrap();
        let mut queues = vec![vq.create_queue().unwrap(), virtio_queue::Queue::new(16).unwrap()];
        drop(driver);
        socket.send_to(&payload, &guest).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let mut q = Queues { mem: a.memory(), queues: &mut queues, gate: &gate };
            device.process_host(tap_fd, &mut q).unwrap();
            if a.memory().read_obj::<u16>(GuestAddress(vq.used_addr().0 + 2)).unwrap() == 1 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "round {round}: no frame in 5 s: {:?}", device.counters);
            std::thread::yield_now();
        }
        let frame_len = 12 + 14 + 20 + 8 + payload.len();
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len() as usize, frame_len, "round {round}: not our datagram");
        let span = (pages_spanned * 4096) as usize;
        let mut got = vec![0u8; span];
        a.memory().read_slice(&mut got, page(p)).unwrap();
        let original: Vec<u8> = (p..p + pages_spanned).flat_map(block).collect();
        let at = offset as usize;
        assert!(got[..at] == original[..at], "round {round}: page {p} changed before the buffer");
        let data = at + frame_len - payload.len()..at + frame_len;
        assert!(got[data] == payload[..], "round {round}: pages from {p} lost part of the frame");
        assert!(got[at + frame_len..] == original[at + frame_len..], "round {round}: a page changed after the frame");
        b.memory().read_slice(&mut got, page(p)).unwrap();
        assert!(got == original, "round {round}: a frame for guest a reached guest b's pages from {p}");
        let driver = gate.enter();
        a.memory().write_slice(&original, page(p)).unwrap();
        drop(driver);
    }
    let stats = scanner.stop();
    let merges = stats.merges_frozen + stats.merges_write_protected;
    assert!(stats.cow_breaks > 0 && merges > 0, "{mode:?}: nothing merged, so nothing was tested: {stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
    assert_eq!((device.counters.rx_frames, device.counters.rx_dropped), (FRAMES, 0));
    for p in 0..PAGES {
        for (r, who) in [(&a, "a"), (&b, "b")] {
            r.memory().read_slice(&mut now, page(p)).unwrap();
            assert!(now == block(p), "{mode:?}: page {p} of guest {who} is not what it was put back to");
        }
    }
}
