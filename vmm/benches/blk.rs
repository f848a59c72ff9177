//! Sequential read throughput of the virtio-blk device, at the device level:
//! requests of 128 KiB (Linux's default max for one request is larger; 128
//! KiB is what readahead issues) put on a virtqueue in guest memory and
//! served by `Block::serve_requests`, 32 per kick, over a 256 MiB image in
//! the host page cache. Reported for the base image and for a guest's
//! overlay after it rewrote the whole disk.
//!
//! Run with `cargo bench -p vmm --bench blk`.

use std::time::Instant;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm::guest::devices::io_gate::IoGate;
use vmm::guest::devices::virtio::block::Block;
use vmm::guest::disk::Disk;
use vmm::image::BaseImage;
use vmm::memory::GuestMemoryMmap;

const IMAGE: usize = 256 << 20;
const REQUEST: u32 = 128 << 10;
const PER_KICK: u16 = 32;
const WRITE: u16 = 2;
const OUT: u32 = 1;

/// Serves the whole image in `kind` requests; returns MB/s.
fn sweep(block: &mut Block, mem: &GuestMemoryMmap, kind: u32) -> f64 {
    let started = Instant::now();
    let mut sector = 0u64;
    while (sector * 512) < IMAGE as u64 {
        let vq = MockSplitQueue::new(mem, 128);
        let mut descs = Vec::new();
        for i in 0..PER_KICK as u64 {
            let header = 0x10_0000 + i * 16;
            let data = 0x100_0000 + i * REQUEST as u64;
            let status = 0x20_0000 + i;
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&(sector + i * (REQUEST as u64 / 512)).to_le_bytes());
            mem.write_slice(&h, GuestAddress(header)).unwrap();
            let data_flags = if kind == OUT { 0 } else { WRITE };
            let n = descs.len() as u16;
            descs.push(RawDescriptor::from(Descriptor::new(header, 16, 1, n + 1)));
            descs.push(RawDescriptor::from(Descriptor::new(data, REQUEST, data_flags | 1, n + 2)));
            descs.push(RawDescriptor::from(Descriptor::new(status, 1, WRITE, 0)));
        }
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        block.serve_requests(mem, &mut queue, &IoGate::default()).unwrap();
        assert_eq!(vq.used().idx().load(), PER_KICK);
        sector += PER_KICK as u64 * (REQUEST as u64 / 512);
    }
    IMAGE as f64 / started.elapsed().as_secs_f64() / 1e6
}

fn main() {
    let dir = std::env::temp_dir().join(format!("vmm-blk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("base.img");
    std::fs::write(&path, (0..IMAGE).map(|i| (i % 251) as u8).collect::<Vec<u8>>()).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap();
    let base = BaseImage::open(&path).unwrap();

    let mut ro = Block::new(Disk::read_only(base.clone()));
    sweep(&mut ro, &mem, 0); // warm the page cache
    let base_reads: Vec<f64> = (0..5).map(|_| sweep(&mut ro, &mem, 0)).collect();

    let mut rw = Block::new(Disk::with_overlay(base, &dir.join("guest.overlay")).unwrap());
    let writes = sweep(&mut rw, &mem, OUT);
    let overlay_reads: Vec<f64> = (0..5).map(|_| sweep(&mut rw, &mem, 0)).collect();

    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    println!("virtio-blk sequential, 128 KiB requests, {PER_KICK} per kick, 256 MiB image in page cache:");
    println!("  read from the base image:      {:7.0} MB/s (median of 5)", median(base_reads));
    println!("  write into a fresh overlay:    {writes:7.0} MB/s (one pass)");
    println!("  read back from the overlay:    {:7.0} MB/s (median of 5)", median(overlay_reads));
    std::fs::remove_dir_all(dir).unwrap();
}
