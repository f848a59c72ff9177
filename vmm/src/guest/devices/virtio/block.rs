//! virtio-blk request handling: read, write, flush and get-id against a
//! [`Disk`]. A malformed request fails with an error status (or, without
//! even a status byte, is returned unused); it never fails the VMM.
//!
//! A request is served in two steps: first everything that only reads
//! guest memory and does disk I/O, into a bounce buffer; then, inside the
//! guest's I/O gate, the writes into guest memory (read data, status, id,
//! the used ring) through the virtio-queue `Writer`. Those writes are what
//! a merge freeze must hold off (docs/dedup.md), and the gate is held for
//! them alone.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemory;

use super::device::{self, read_config_bytes, Persist, Queues, Used, VirtioDevice};
use super::VIRTIO_F_VERSION_1;
use crate::guest::devices::io_gate::IoGate;
use crate::guest::devices::rate_limiter::RateLimiter;
use crate::guest::disk::{Disk, DiskState};
use crate::image::{BaseImage, SECTOR_SIZE};
use crate::snapshot::{SnapshotFiles, OVERLAY_FILE};

/// How snapshots name it.
pub const NAME: &str = "virtio-blk";
const VIRTIO_ID_BLOCK: u32 = 2;
const QUEUE_SIZES: &[u16] = &[256];

pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Largest data part of one request we accept (Linux sends at most 1 MiB
/// by default); larger is answered with an error, not an allocation.
const MAX_REQUEST_BYTES: usize = 16 << 20;

/// Why a request failed, for the status byte and the log.
#[derive(Debug)]
enum Failure {
    Unsupported(u32),
    Bad(String),
}

pub struct Block {
    disk: Disk,
    limiter: Option<RateLimiter>,
}

impl Block {
    pub fn new(disk: Disk) -> Block {
        Block { disk, limiter: None }
    }

    /// Requests go no faster than `limiter` allows (a request's bytes are
    /// its whole chain's).
    pub fn with_limiter(mut self, limiter: RateLimiter) -> Block {
        self.limiter = Some(limiter);
        self
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    pub fn features(&self) -> u64 {
        let ro = if self.disk.is_read_only() { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | ro
    }

    /// `struct virtio_blk_config` up to what we offer: the capacity in sectors.
    pub fn config_space(&self) -> [u8; 8] {
        (self.disk.size() / SECTOR_SIZE).to_le_bytes()
    }

    /// Serves every request the driver has made available; returns whether
    /// any was completed (the caller then asks the queue whether to notify).
    /// Disk I/O happens outside `gate`; only the writes into guest memory
    /// (data, status, the used ring) happen inside it, so a merge freeze
    /// waits for one copy at most, never for a disk.
    pub fn serve_requests<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        gate: &IoGate,
    ) -> Result<bool, virtio_queue::Error> {
        let mut completed = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            if let Some(limiter) = &mut self.limiter {
                let bytes = chain.clone().map(|d| u64::from(d.len())).sum();
                if !limiter.consume(bytes) {
                    // Left on the queue until the limiter's timer fires.
                    queue.go_to_previous_position();
                    break;
                }
            }
            let head = chain.head_index();
            let reply = self.execute(mem, chain.clone());
            let _inside = gate.enter();
            let written = reply.deliver(mem, chain);
            queue.add_used(mem, head, written)?;
            completed = true;
        }
        Ok(completed)
    }

    /// One request, up to what must be written back to the guest.
    fn execute<M: GuestMemory>(&mut self, mem: &M, chain: DescriptorChain<&M>) -> Reply {
        let (mut reader, writer) = match (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) {
            (Ok(r), Ok(w)) => (r, w),
            (Err(e), _) | (_, Err(e)) => {
                log::warn!("virtio-blk: unusable descriptor chain: {e}");
                return Reply::Unusable;
            }
        };
        let Some(room) = writer.available_bytes().checked_sub(1) else {
            log::warn!("virtio-blk: request without room for a status byte");
            return Reply::Unusable;
        };
        let mut data = Vec::new();
        let status = match self.request(&mut reader, room, &mut data) {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(Failure::Unsupported(t)) => {
                log::debug!("virtio-blk: unsupported request type {t}");
                VIRTIO_BLK_S_UNSUPP
            }
            Err(Failure::Bad(why)) => {
                log::warn!("virtio-blk: request failed: {why}");
                data.clear();
                VIRTIO_BLK_S_IOERR
            }
        };
        Reply::Status { data, status }
    }

    /// Serves a request whose device-writable part has `room` bytes before
    /// the status byte, putting what goes to the guest in `data`.
    fn request<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        reader: &mut Reader<'_, B>,
        room: usize,
        data: &mut Vec<u8>,
    ) -> Result<(), Failure> {
        let mut header = [0u8; 16];
        reader.read_exact(&mut header).map_err(|_| Failure::Bad("request header shorter than 16 bytes".into()))?;
        let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let offset =
            || sector.checked_mul(SECTOR_SIZE).ok_or_else(|| Failure::Bad(format!("sector {sector} is out of range")));
        let io = |what: &str, e: std::io::Error| Failure::Bad(format!("{what} at sector {sector}: {e}"));
        match kind {
            VIRTIO_BLK_T_IN => {
                data.resize(checked_len(room)?, 0);
                self.disk.read_at(data, offset()?).map_err(|e| io("read", e))
            }
            VIRTIO_BLK_T_OUT => {
                let mut buf = vec![0u8; checked_len(reader.available_bytes())?];
                reader.read_exact(&mut buf).map_err(|e| io("copy from guest", e))?;
                self.disk.write_at(&buf, offset()?).map_err(|e| io("write", e))
            }
            VIRTIO_BLK_T_FLUSH => self.disk.flush().map_err(|e| io("flush", e)),
            VIRTIO_BLK_T_GET_ID => {
                let id = self.disk.id();
                data.extend_from_slice(&id[..id.len().min(room)]);
                Ok(())
            }
            other => Err(Failure::Unsupported(other)),
        }
    }
}

impl VirtioDevice for Block {
    fn name(&self) -> &'static str {
        NAME
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        Block::features(self)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn process_queue(&mut self, index: usize, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        Ok(u32::from(self.serve_requests(q.mem, &mut q.queues[index], q.gate)?))
    }

    fn host_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.limiter.iter().map(RateLimiter::timer_fd).collect()
    }

    /// The limiter's timer: serve what it held back.
    fn process_host(&mut self, _fd: std::os::fd::RawFd, q: &mut Queues) -> Result<Used, virtio_queue::Error> {
        if let Some(limiter) = &mut self.limiter {
            limiter.timer_fired();
        }
        self.process_queue(0, q)
    }

    fn save(&self, files: &SnapshotFiles) -> std::io::Result<serde_json::Value> {
        device::to_value(self, files)
    }
}

/// A disk's state is where its overlay's clusters are; they go to the
/// snapshot's [`OVERLAY_FILE`].
impl Persist for Block {
    type State = DiskState;
    /// The base image, and where the guest's own overlay goes (none: a
    /// read-only disk, whose saved state is nothing but its base).
    type Args = (Arc<BaseImage>, Option<PathBuf>);

    fn save_state(&self, files: &SnapshotFiles) -> std::io::Result<DiskState> {
        self.disk.save(files.overlay.as_ref())
    }

    fn restore((base, overlay): Self::Args, state: &DiskState, dir: &Path) -> Result<Block, String> {
        let disk = match overlay {
            Some(overlay) => Disk::restore(base, state, &dir.join(OVERLAY_FILE), &overlay),
            None => Ok(Disk::read_only(base)),
        };
        disk.map(Block::new).map_err(|e| e.to_string())
    }
}

/// Checks a snapshot's disk state against the base image the guest names
/// (`path`), before anything is built from it.
pub fn check_saved(path: &Path, saved: &serde_json::Value, dir: &Path) -> Result<(), String> {
    let state = device::from_value::<Block>(saved)?;
    let base = BaseImage::open(path).map_err(|e| e.to_string())?;
    if !state.matches(&base) {
        return Err(crate::image::DiskError::Changed(path.to_path_buf()).to_string());
    }
    if state.has_overlay() {
        crate::snapshot::open_file(&dir.join(OVERLAY_FILE))
            .map_err(|e| format!("no usable {OVERLAY_FILE} file for its disk: {e}"))?;
    }
    Ok(())
}

/// What a request puts back into guest memory.
enum Reply {
    /// The chain is unusable (no room for a status, outside memory): it is
    /// returned with nothing written.
    Unusable,
    /// Data for the device-writable buffers, then the status byte.
    Status { data: Vec<u8>, status: u8 },
}

impl Reply {
    /// Writes the reply into the chain's device-writable buffers; returns
    /// the bytes written.
    fn deliver<M: GuestMemory>(self, mem: &M, chain: DescriptorChain<&M>) -> u32 {
        let Reply::Status { data, status } = self else { return 0 };
        let Ok(mut writer) = Writer::new(mem, chain) else { return 0 };
        let Some(room) = writer.available_bytes().checked_sub(1) else { return 0 };
        let Ok(mut status_part) = writer.split_at(room) else { return 0 };
        if let Err(e) = writer.write_all(&data) {
            log::warn!("virtio-blk: copy to guest: {e}");
        }
        if status_part.write_all(&[status]).is_err() {
            return writer.bytes_written() as u32;
        }
        (writer.bytes_written() + 1) as u32
    }
}

/// Data parts must be whole sectors and of a sane size.
fn checked_len(len: usize) -> Result<usize, Failure> {
    if !(len as u64).is_multiple_of(SECTOR_SIZE) {
        return Err(Failure::Bad(format!("{len} data bytes are not whole sectors")));
    }
    if len > MAX_REQUEST_BYTES {
        return Err(Failure::Bad(format!("{len} data bytes in one request is more than {MAX_REQUEST_BYTES}")));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::BaseImage;
    use crate::memory::GuestMemoryMmap;
    use std::path::PathBuf;
    use std::sync::Arc;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const WRITE: u16 = 2; // VRING_DESC_F_WRITE
    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-blk-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn base(dir: &std::path::Path, sectors: usize) -> Arc<BaseImage> {
        let path = dir.join("base.img");
        std::fs::write(&path, (0..sectors * 512).map(|i| (i % 253) as u8).collect::<Vec<u8>>()).unwrap();
        BaseImage::open(&path).unwrap()
    }

    /// Puts one request on a fresh queue: a header (kind, sector), then
    /// `data` bytes (device-writable if `to_guest`), then a status byte if
    /// `status`. Returns (status byte, used length).
    fn submit(
        block: &mut Block,
        mem: &GuestMemoryMmap,
        kind: u32,
        sector: u64,
        data: &[u8],
        to_guest: bool,
    ) -> (u8, u32) {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        mem.write_slice(data, GuestAddress(DATA)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut descs = vec![RawDescriptor::from(SplitDescriptor::new(HEADER, 16, 0, 0))];
        if !data.is_empty() {
            let flags = if to_guest { WRITE } else { 0 };
            descs.push(RawDescriptor::from(SplitDescriptor::new(DATA, data.len() as u32, flags, 0)));
        }
        descs.push(RawDescriptor::from(SplitDescriptor::new(STATUS, 1, WRITE, 0)));
        run_chain(block, mem, &descs)
    }

    fn run_chain(block: &mut Block, mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (u8, u32) {
        let vq = MockSplitQueue::new(mem, 16);
        vq.build_desc_chain(descs).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        assert!(block.serve_requests(mem, &mut queue, &IoGate::default()).unwrap());
        assert_eq!(vq.used().idx().load(), 1, "the request was not returned");
        let used = vq.used().ring().ref_at(0).unwrap().load();
        (mem.read_obj(GuestAddress(STATUS)).unwrap(), used.len())
    }

    fn read_back(mem: &GuestMemoryMmap, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(DATA)).unwrap();
        v
    }

    #[test]
    fn read_write_flush_and_id_round_trip() {
        let dir = scratch("rw");
        let mem = memory();
        let mut blk = Block::new(Disk::with_overlay(base(&dir, 64), &dir.join("o")).unwrap());
        assert_eq!(blk.config_space(), 64u64.to_le_bytes());
        assert_eq!(blk.features() & VIRTIO_BLK_F_RO, 0);

        let payload: Vec<u8> = (0..8192).map(|i| (i * 13 % 256) as u8).collect();
        assert_eq!(submit(&mut blk, &mem, VIRTIO_BLK_T_OUT, 3, &payload, false), (VIRTIO_BLK_S_OK, 1));
        assert_eq!(submit(&mut blk, &mem, VIRTIO_BLK_T_IN, 3, &[0; 8192], true), (VIRTIO_BLK_S_OK, 8193));
        assert_eq!(read_back(&mem, 8192), payload);
        assert_eq!(submit(&mut blk, &mem, VIRTIO_BLK_T_FLUSH, 0, &[], false).0, VIRTIO_BLK_S_OK);
        assert_eq!(submit(&mut blk, &mem, VIRTIO_BLK_T_GET_ID, 0, &[0; 20], true), (VIRTIO_BLK_S_OK, 21));
        assert_eq!(&read_back(&mem, 8), b"base.img");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn two_devices_on_one_base_never_see_each_others_writes() {
        let dir = scratch("iso");
        let mem = memory();
        let base = base(&dir, 16);
        let before = std::fs::read(base.path()).unwrap();
        let mut a = Block::new(Disk::with_overlay(base.clone(), &dir.join("a")).unwrap());
        let mut b = Block::new(Disk::with_overlay(base.clone(), &dir.join("b")).unwrap());
        assert_eq!(submit(&mut a, &mem, VIRTIO_BLK_T_OUT, 0, &[0xAA; 512], false).0, VIRTIO_BLK_S_OK);
        assert_eq!(submit(&mut b, &mem, VIRTIO_BLK_T_IN, 0, &[0; 512], true).0, VIRTIO_BLK_S_OK);
        assert_eq!(read_back(&mem, 512), before[..512], "b sees a's write");
        assert_eq!(submit(&mut a, &mem, VIRTIO_BLK_T_IN, 0, &[0; 512], true).0, VIRTIO_BLK_S_OK);
        assert_eq!(read_back(&mem, 512), [0xAA; 512]);
        assert_eq!(std::fs::read(base.path()).unwrap(), before, "the base changed");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A freeze waits for copies into guest memory, never for the disk: a
    /// request's disk I/O goes on while the gate is closed, and only its
    /// writes into guest memory wait for the thaw.
    #[test]
    fn disk_io_goes_on_during_a_freeze() {
        let dir = scratch("freeze");
        let mem = memory();
        let mut blk = Block::new(Disk::with_overlay(base(&dir, 64), &dir.join("o")).unwrap());
        let gate = std::sync::Arc::new(IoGate::default());
        gate.freeze();
        let payload = vec![0x77u8; 4096];
        mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        header[8..16].copy_from_slice(&8u64.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[
            RawDescriptor::from(SplitDescriptor::new(HEADER, 16, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 4096, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, WRITE, 0)),
        ])
        .unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        std::thread::scope(|s| {
            let device = s.spawn(|| blk.serve_requests(&mem, &mut queue, &gate).unwrap());
            // The write reaches the disk during the freeze...
            let overlay = dir.join("o");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let mut on_disk = vec![0u8; 4096];
            loop {
                use std::os::unix::fs::FileExt;
                std::fs::File::open(&overlay).unwrap().read_exact_at(&mut on_disk, 8 * 512).unwrap();
                if on_disk == payload || std::time::Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            assert_eq!(on_disk, payload, "the disk write waited for the freeze");
            // ...but nothing lands in guest memory until the thaw.
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xff, "wrote guest memory while frozen");
            assert_eq!(vq.used().idx().load(), 0);
            gate.thaw();
            assert!(device.join().unwrap());
        });
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), VIRTIO_BLK_S_OK);
        assert_eq!(vq.used().idx().load(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Two requests a second at most: the third waits on the queue until
    /// the limiter's timer says it may go.
    #[test]
    fn a_rate_limit_holds_requests_back_until_its_timer() {
        use crate::config::RateLimit;
        use crate::guest::devices::rate_limiter::RateLimiter;
        let dir = scratch("limit");
        let mem = memory();
        let limit = RateLimit { ops_per_s: Some(2), ..Default::default() };
        let limiter = RateLimiter::new(&limit).unwrap();
        let mut blk = Block::new(Disk::read_only(base(&dir, 8))).with_limiter(limiter);
        let fds = VirtioDevice::host_fds(&blk);
        assert_eq!(fds.len(), 1, "the timer is not watched");
        let vq = MockSplitQueue::new(&mem, 16);
        let mut descs = Vec::new();
        for i in 0..3u64 {
            mem.write_slice(&[0u8; 16], GuestAddress(HEADER + i * 16)).unwrap();
            descs.push(RawDescriptor::from(SplitDescriptor::new(HEADER + i * 16, 16, 1, 3 * i as u16 + 1)));
            descs.push(RawDescriptor::from(SplitDescriptor::new(DATA + i * 512, 512, WRITE | 1, 3 * i as u16 + 2)));
            descs.push(RawDescriptor::from(SplitDescriptor::new(STATUS + i, 1, WRITE, 0)));
        }
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let gate = IoGate::default();
        assert!(blk.serve_requests(&mem, &mut queue, &gate).unwrap());
        assert_eq!(vq.used().idx().load(), 2, "the limit let a third request through");
        let mut fd = libc::pollfd { fd: fds[0], events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut fd, 1, 2000) }, 1, "the limiter's timer never fired");
        let mut queues = [queue];
        let mut q = Queues { mem: &mem, queues: &mut queues, gate: &gate };
        assert_eq!(VirtioDevice::process_host(&mut blk, fds[0], &mut q).unwrap(), 1);
        assert_eq!(vq.used().idx().load(), 3);
        assert_eq!(blk.limiter.as_ref().unwrap().throttled, 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn malformed_requests_get_an_error_status() {
        let dir = scratch("bad");
        let mem = memory();
        let mut blk = Block::new(Disk::with_overlay(base(&dir, 8), &dir.join("o")).unwrap());
        let io = VIRTIO_BLK_S_IOERR;
        assert_eq!(submit(&mut blk, &mem, VIRTIO_BLK_T_IN, 8, &[0; 512], true).0, io, "past the end");
        assert_eq!(submit(&mut blk, &mem, VIRTIO_BLK_T_IN, u64::MAX, &[0; 512], true).0, io, "sector overflow");
        assert_eq!(submit(&mut blk, &mem, VIRTIO_BLK_T_OUT, 0, &[0; 100], false).0, io, "partial sector");
        assert_eq!(submit(&mut blk, &mem, 99, 0, &[], false).0, VIRTIO_BLK_S_UNSUPP);
        // A header of 8 bytes instead of 16.
        let short = [
            RawDescriptor::from(SplitDescriptor::new(HEADER, 8, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, WRITE, 0)),
        ];
        assert_eq!(run_chain(&mut blk, &mem, &short).0, io);
        // No writable descriptor at all: nowhere to put a status; returned unused.
        let no_status = [RawDescriptor::from(SplitDescriptor::new(HEADER, 16, 0, 0))];
        assert_eq!(run_chain(&mut blk, &mem, &no_status).1, 0);
        // A buffer outside guest memory.
        let outside = [
            RawDescriptor::from(SplitDescriptor::new(HEADER, 16, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x1000_0000, 512, WRITE, 0)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, WRITE, 0)),
        ];
        assert_eq!(run_chain(&mut blk, &mem, &outside).1, 0);
        // Writes to a read-only disk fail; reads work.
        let mut ro = Block::new(Disk::read_only(base(&dir, 8)));
        assert_ne!(ro.features() & VIRTIO_BLK_F_RO, 0);
        assert_eq!(submit(&mut ro, &mem, VIRTIO_BLK_T_OUT, 0, &[1; 512], false).0, io);
        assert_eq!(submit(&mut ro, &mem, VIRTIO_BLK_T_IN, 0, &[0; 512], true).0, VIRTIO_BLK_S_OK);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
