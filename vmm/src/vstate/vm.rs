//! A KVM VM: its memory slots, in-kernel irqchip and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestRam;

/// Where KVM keeps the TSS it needs on Intel (three pages below the BIOS).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Creates a VM with an irqchip and PIT, and registers `ram` as its memory.
pub fn create(kvm: &Kvm, ram: &GuestRam) -> Result<VmFd, kvm_ioctls::Error> {
    let vm = kvm.create_vm()?;
    vm.set_tss_address(KVM_TSS_ADDRESS)?;
    vm.create_irq_chip()?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })?;
    for (slot, region) in ram.memory().iter().enumerate() {
        let mem_region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `ram`, which the
        // caller keeps alive for as long as the VM exists.
        unsafe { vm.set_user_memory_region(mem_region)? };
    }
    Ok(vm)
}
