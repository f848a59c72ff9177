//! A KVM VM: its memory slots, in-kernel irqchip and PIT, and its dirty log.

use std::io;
use std::sync::Arc;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, kvm_msi, kvm_pit_config, kvm_userspace_memory_region, KVMIO,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::guest::devices::pci::msix::{MsiMessage, MsiSink};
use crate::memory::{GuestRam, PAGE_SIZE};

/// Where KVM keeps the TSS it needs on Intel (three pages below the BIOS).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Creates a VM with an irqchip and PIT and no memory yet: what every
/// guest needs whatever it runs, so a guest process makes it before it
/// knows its guest (while it waits in the supervisor's pool).
pub fn new(kvm: &Kvm) -> Result<VmFd, kvm_ioctls::Error> {
    let vm = kvm.create_vm()?;
    vm.set_tss_address(KVM_TSS_ADDRESS)?;
    vm.create_irq_chip()?;
    vm.create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() })?;
    Ok(vm)
}

/// Registers `ram` as the memory of `vm` (made by [`new`]), with dirty
/// logging when `dirty_log` (page sharing reads it).
pub fn attach_memory(vm: &VmFd, ram: &GuestRam, dirty_log: bool) -> Result<(), kvm_ioctls::Error> {
    if dirty_log && has_manual_clear(vm) {
        // Reading the log then leaves pages writable until we clear them
        // ourselves, instead of write-protecting all memory on every read.
        let mut cap = kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, ..Default::default() };
        cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
        vm.enable_cap(&cap)?;
    }
    for (slot, region) in ram.memory().iter().enumerate() {
        let mem_region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if dirty_log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `ram`, which the
        // caller keeps alive for as long as the VM exists.
        unsafe { vm.set_user_memory_region(mem_region)? };
    }
    Ok(())
}

fn has_manual_clear(vm: &VmFd) -> bool {
    vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) > 0
}

/// KVM's dirty log of one guest, read and cleared once per scan pass.
pub struct DirtyLog {
    vm: Arc<VmFd>,
    /// (slot, bytes) of each memslot, in guest-address order.
    slots: Vec<(u32, usize)>,
    manual_clear: bool,
}

impl DirtyLog {
    pub fn new(vm: Arc<VmFd>, ram: &GuestRam) -> Self {
        let slots = ram.memory().iter().enumerate().map(|(i, r)| (i as u32, r.len() as usize)).collect();
        let manual_clear = has_manual_clear(&vm);
        DirtyLog { vm, slots, manual_clear }
    }

    fn clear(&self, slot: u32, bitmap: &mut [u64]) -> io::Result<()> {
        let mut clear =
            kvm_clear_dirty_log { slot, num_pages: (bitmap.len() * 64) as u32, first_page: 0, ..Default::default() };
        clear.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
        // SAFETY: the bitmap covers `num_pages` bits and outlives the call.
        let ret = unsafe { ioctl_with_ref(self.vm.as_ref(), KVM_CLEAR_DIRTY_LOG(), &clear) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl DirtyLog {
    /// Pages the vCPUs wrote since each was last watched (one bitmap over
    /// every slot in order). With manual clearing KVM keeps a page dirty,
    /// and writable for the guest, until `watch` clears it; without it, KVM
    /// clears and write-protects everything it reports.
    pub fn take_dirty(&self) -> io::Result<Vec<u64>> {
        let mut all = Vec::new();
        for &(slot, bytes) in &self.slots {
            all.extend(self.vm.get_dirty_log(slot, bytes).map_err(io::Error::other)?);
            // Slots are whole MiBs, so each ends on a word boundary.
            debug_assert_eq!(bytes / PAGE_SIZE as usize % 64, 0);
        }
        Ok(all)
    }

    /// Clears the dirty bits of `pages` (one bitmap over every slot): KVM
    /// write-protects them, and logs the guest's next write to each.
    pub fn watch(&self, pages: &[u64]) -> io::Result<()> {
        if !self.manual_clear {
            return Ok(());
        }
        let mut first = 0;
        for &(slot, bytes) in &self.slots {
            let words = bytes / PAGE_SIZE as usize / 64;
            let mut bits: Vec<u64> =
                pages.iter().copied().skip(first).chain(std::iter::repeat(0)).take(words).collect();
            if bits.iter().any(|&w| w != 0) {
                self.clear(slot, &mut bits)?;
            }
            first += words;
        }
        Ok(())
    }
}

/// MSI messages into the VM through KVM_SIGNAL_MSI: the in-kernel LAPICs
/// take them as a write to their window, no routing table needed.
pub struct KvmMsi(pub Arc<VmFd>);

impl MsiSink for KvmMsi {
    fn signal(&self, message: MsiMessage) {
        let msi = kvm_msi {
            address_lo: message.address as u32,
            address_hi: (message.address >> 32) as u32,
            data: message.data,
            ..Default::default()
        };
        if let Err(e) = self.0.signal_msi(msi) {
            log::warn!("cannot deliver an MSI ({:#x}, {:#x}): {e}", message.address, message.data);
        }
    }
}
