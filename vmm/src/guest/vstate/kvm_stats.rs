//! KVM's own counters for a VM or a vCPU (`KVM_GET_STATS_FD`, Linux 5.14):
//! what the guest paid in the kernel, for reports. Page sharing costs a
//! guest faults (each remapped page is faulted in again, each
//! copy-on-write break is one) and TLB flushes; these count them where they
//! happen, on hardware KVM and on PVM alike.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use crate::protocol::KvmCounters;
use kvm_bindings::{kvm_stats_header, KVMIO};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

/// One vCPU's (or VM's) statistics file and where the counters we read
/// lie in it.
pub struct KvmStats {
    file: File,
    /// File offsets of `pf_taken`, `tlb_flush` and `exits` (None: this
    /// kernel has no such counter).
    offsets: [Option<u64>; 3],
}

const NAMES: [&str; 3] = ["pf_taken", "tlb_flush", "exits"];

/// Sizes a header claims that no kernel uses: refused rather than read.
const MAX_DESCRIPTORS: u32 = 4096;
const MAX_NAME: u32 = 256;

impl KvmStats {
    /// Opens the statistics of a vCPU or VM descriptor.
    pub fn open(fd: &impl AsRawFd) -> io::Result<KvmStats> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new
        // descriptor, or -1.
        let ret = unsafe { ioctl(fd, KVM_GET_STATS_FD()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(ret) };
        let mut raw = [0u8; std::mem::size_of::<kvm_stats_header>()];
        file.read_exact_at(&mut raw, 0)?;
        let word = |i: usize| u32::from_ne_bytes(raw[i * 4..i * 4 + 4].try_into().unwrap());
        let (name_size, num_desc, desc_offset, data_offset) = (word(1), word(2), word(4), word(5));
        if num_desc > MAX_DESCRIPTORS || name_size > MAX_NAME {
            return Err(io::Error::other(format!("odd KVM statistics header: {num_desc} of {name_size}")));
        }
        // Each descriptor: flags u32, exponent i16, size u16, offset u32,
        // bucket_size u32, then the name.
        let desc_len = 16 + name_size as usize;
        let mut descs = vec![0u8; desc_len * num_desc as usize];
        file.read_exact_at(&mut descs, u64::from(desc_offset))?;
        let mut offsets = [None; 3];
        for d in descs.chunks_exact(desc_len) {
            let name = &d[16..];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if let Some(i) = NAMES.iter().position(|n| n.as_bytes() == name) {
                let offset = u32::from_ne_bytes(d[8..12].try_into().unwrap());
                offsets[i] = Some(u64::from(data_offset) + u64::from(offset));
            }
        }
        Ok(KvmStats { file, offsets })
    }

    /// The counters now (0 for those this kernel lacks).
    pub fn read(&self) -> KvmCounters {
        let value = |i: usize| {
            let mut v = [0u8; 8];
            self.offsets[i]
                .and_then(|at| self.file.read_exact_at(&mut v, at).ok())
                .map_or(0, |()| u64::from_ne_bytes(v))
        };
        KvmCounters { page_faults: value(0), tlb_flushes: value(1), exits: value(2) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpu_has_the_counters_and_they_start_at_zero() {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let stats = KvmStats::open(&vcpu).expect("KVM_GET_STATS_FD (Linux 5.14 or later)");
        assert!(stats.offsets.iter().all(Option::is_some), "{:?}", stats.offsets);
        assert_eq!(stats.read(), KvmCounters::default());
    }
}
