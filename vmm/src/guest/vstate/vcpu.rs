//! One vCPU: its initial state, and the loop its thread runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use kvm_bindings::{kvm_fpu, kvm_mp_state, CpuId, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::control::{Pass, VcpuGate};
use crate::guest::boot::long_mode;
use crate::guest::boot::BootInfo;
use crate::guest::devices::{Action, Devices};
use crate::outcome::GuestEnd;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;
const CPUID_HYPERVISOR_BIT: u32 = 1 << 31;
/// CPUID.1:ECX.VMX and CPUID.80000001h:ECX.SVM.
const CPUID_VMX_BIT: u32 = 1 << 5;
const CPUID_SVM_BIT: u32 = 1 << 2;

/// Sets up vCPU `index`: CPUID with its APIC ID, FPU, the LAPIC's legacy
/// interrupt lines, and, for the vCPUs that start at the entry point, long
/// mode and the boot registers. Other vCPUs wait for INIT/SIPI (Linux APs).
///
/// With `hide_virtualization` the guest is not offered VMX or SVM: nested
/// virtualization makes KVM map guest pages (the virtual-APIC page, the
/// posted-interrupt descriptor) with `kvm_vcpu_map` and keep them across
/// `KVM_RUN`, outside the MMU notifier that page sharing relies on
/// (docs/dedup.md). (On KVM-on-PVM hosts CPUID cannot be masked, but there
/// is no nested virtualization to offer either.)
pub fn configure(
    fd: &VcpuFd,
    index: u8,
    supported_cpuid: &CpuId,
    boot: &BootInfo,
    hide_virtualization: bool,
) -> Result<(), kvm_ioctls::Error> {
    set_cpuid(fd, index, supported_cpuid, hide_virtualization)?;
    fd.set_fpu(&kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() })?;

    let mut lapic = fd.get_lapic()?;
    set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    fd.set_lapic(&lapic)?;

    if index == 0 || boot.all_vcpus_at_entry {
        let mut sregs = fd.get_sregs()?;
        long_mode::configure_sregs(&mut sregs);
        fd.set_sregs(&sregs)?;
        fd.set_regs(&long_mode::boot_regs(boot.entry, index))?;
        if index != 0 {
            fd.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE })?;
        }
    }
    Ok(())
}

/// Gives vCPU `index` the CPUID it sees (a restored vCPU gets it too,
/// before its saved state).
pub fn set_cpuid(
    fd: &VcpuFd,
    index: u8,
    supported_cpuid: &CpuId,
    hide_virtualization: bool,
) -> Result<(), kvm_ioctls::Error> {
    fd.set_cpuid2(&guest_cpuid(supported_cpuid, index, hide_virtualization))
}

/// The CPUID vCPU `index` sees: KVM's, with its APIC ID, the hypervisor
/// bit, and VMX/SVM hidden if asked.
fn guest_cpuid(supported: &CpuId, index: u8, hide_virtualization: bool) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(index) << 24);
                entry.ecx |= CPUID_HYPERVISOR_BIT;
                if hide_virtualization {
                    entry.ecx &= !CPUID_VMX_BIT;
                }
            }
            0x8000_0001 if hide_virtualization => entry.ecx &= !CPUID_SVM_BIT,
            0xb | 0x1f => entry.edx = u32::from(index),
            _ => {}
        }
    }
    cpuid
}

/// Sets the delivery mode (bits 8-10) of a LAPIC local vector table entry.
fn set_lvt_mode(regs: &mut [libc::c_char; 1024], offset: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as libc::c_char;
    }
}

/// When a vCPU of this process first entered the guest (the host's
/// monotonic clock, ns; 0: none yet): a restore's "first instruction".
static FIRST_ENTRY_NS: AtomicU64 = AtomicU64::new(0);

pub fn first_entry_ns() -> u64 {
    FIRST_ENTRY_NS.load(Ordering::Relaxed)
}

/// Runs vCPU `index` until the gate stops it, its work is done, or it ends
/// the guest. Returns the reason when it is this vCPU that ends the guest,
/// and whether it was the guest's last vCPU to leave.
///
/// The vCPU's descriptor is locked only around `KVM_RUN` and the exit's
/// handling, so while the vCPU is parked a snapshot can read its state.
pub fn run(fd: &Mutex<VcpuFd>, index: u8, gate: &VcpuGate, devices: &Devices) -> (Option<GuestEnd>, bool) {
    let immediate_exit: *mut u8 = &mut fd.lock().unwrap().get_kvm_run().immediate_exit;
    gate.register(index as usize, immediate_exit);
    let mut io_pending = false;
    let end = loop {
        match gate.pass(io_pending) {
            Pass::Run => {}
            Pass::Stop => break None,
            // SAFETY: it points into this vCPU's kvm_run page, mapped while `fd` lives.
            Pass::FinishIo => unsafe { super::control::set_immediate_exit(immediate_exit) },
        }
        if FIRST_ENTRY_NS.load(Ordering::Relaxed) == 0 {
            let _ =
                FIRST_ENTRY_NS.compare_exchange(0, crate::proc::monotonic_ns(), Ordering::Relaxed, Ordering::Relaxed);
        }
        let (action, io) = handle_exit(&mut fd.lock().unwrap(), index, devices, immediate_exit);
        io_pending = io;
        match action {
            Action::Continue => {}
            Action::Idle(time) => gate.idle(time),
            Action::WaitForDevice(time) => gate.wait_for_device(time),
            Action::VcpuFinished => break None,
            Action::EndGuest(end) => break Some(end),
        }
    };
    (end, gate.leave(index as usize))
}

/// Enters the guest and handles its exit; also says whether that exit was
/// port or MMIO I/O, which KVM completes on the next entry.
fn handle_exit(fd: &mut VcpuFd, index: u8, devices: &Devices, immediate_exit: *mut u8) -> (Action, bool) {
    let result = fd.run();
    let io = matches!(
        result,
        Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..) | VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..))
    );
    let action = match result {
        Ok(exit) => match exit {
            VcpuExit::IoIn(port, data) => {
                devices.pio_read(port, data);
                Action::Continue
            }
            VcpuExit::IoOut(port, data) => devices.pio_write(port, data),
            VcpuExit::MmioRead(addr, data) => {
                devices.mmio_read(index, addr, data);
                Action::Continue
            }
            VcpuExit::MmioWrite(addr, data) => devices.mmio_write(index, addr, data),
            // With the in-kernel irqchip HLT stays in the kernel; an exit is harmless.
            VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => Action::Continue,
            VcpuExit::Shutdown => Action::EndGuest(GuestEnd::TripleFault),
            VcpuExit::SystemEvent(..) => Action::EndGuest(GuestEnd::Reset),
            VcpuExit::FailEntry(reason, _) => Action::EndGuest(GuestEnd::FailEntry { reason }),
            VcpuExit::InternalError => match skip_unemulated_fwait(fd) {
                true => Action::Continue,
                false => Action::EndGuest(internal_error(fd)),
            },
            other => Action::EndGuest(GuestEnd::VmmError(format!("vCPU {index}: unexpected KVM exit {other:?}"))),
        },
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            // Kicked: clear the flag and go back to the gate.
            // SAFETY: it points into this vCPU's kvm_run page, mapped while `fd` lives.
            unsafe { super::control::clear_immediate_exit(immediate_exit) };
            Action::Continue
        }
        Err(e) => Action::EndGuest(GuestEnd::VmmError(format!("vCPU {index}: KVM_RUN failed: {e}"))),
    };
    (action, io)
}

/// `fwait`'s opcode.
const FWAIT: u8 = 0x9b;

/// Steps over an `fwait` KVM failed to emulate, and says whether it did.
///
/// On PVM hosts the guest kernel's instructions are emulated, and now and
/// then an `fwait` is not (docs/host-quirks.md): Linux's `fpu__drop` ends
/// a task with one, and a clone of a guest booting ended there about once
/// in ten runs. `fwait` only waits for x87 work to finish and raises an x87
/// exception left pending, which `fpu__drop` is there to discard; so the
/// vCPU goes on after it, as if it had run. Only an emulation failure whose
/// instruction bytes KVM reports, and that start with `fwait`, is skipped.
fn skip_unemulated_fwait(fd: &mut VcpuFd) -> bool {
    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `emulation_failure` member
    // of the exit union is the one KVM filled in for emulation failures;
    // its suberror says which, and is read first.
    let failure = unsafe { fd.get_kvm_run().__bindgen_anon_1.emulation_failure };
    let with_bytes = kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES as u64;
    if failure.suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION || failure.flags & with_bytes == 0 {
        return false;
    }
    // SAFETY: the flag says KVM wrote the instruction's bytes there.
    let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
    if insn.insn_size == 0 || insn.insn_bytes[0] != FWAIT {
        return false;
    }
    let Ok(mut regs) = fd.get_regs() else { return false };
    regs.rip += 1;
    if fd.set_regs(&regs).is_err() {
        return false;
    }
    log::info!("stepped over an fwait at {:#x} the host could not emulate", regs.rip - 1);
    true
}

fn internal_error(fd: &mut VcpuFd) -> GuestEnd {
    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the
    // exit union is the one KVM filled in.
    let suberror = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
    let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
    GuestEnd::InternalError { suberror, rip }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtualization_is_hidden_when_asked() {
        let mut supported = CpuId::new(2).unwrap();
        supported.as_mut_slice()[0] =
            kvm_bindings::kvm_cpuid_entry2 { function: 1, ecx: CPUID_VMX_BIT, ..Default::default() };
        supported.as_mut_slice()[1] =
            kvm_bindings::kvm_cpuid_entry2 { function: 0x8000_0001, ecx: CPUID_SVM_BIT | 1, ..Default::default() };
        let hidden = guest_cpuid(&supported, 3, true);
        assert_eq!(hidden.as_slice()[0].ecx & CPUID_VMX_BIT, 0);
        assert_eq!(hidden.as_slice()[0].ebx >> 24, 3);
        assert_eq!(hidden.as_slice()[1].ecx, 1, "SVM hidden, the rest kept");
        let shown = guest_cpuid(&supported, 0, false);
        assert_ne!(shown.as_slice()[0].ecx & CPUID_VMX_BIT, 0);
        assert_ne!(shown.as_slice()[1].ecx & CPUID_SVM_BIT, 0);
    }

    #[test]
    fn lvt_mode_keeps_other_bits() {
        let mut regs = [0 as libc::c_char; 1024];
        regs[APIC_LVT0] = 0x30;
        regs[APIC_LVT0 + 2] = 0x01; // masked bit 16
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x30);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2] as u8, 0x01);
    }
}
