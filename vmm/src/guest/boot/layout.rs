//! Where the VMM puts boot structures in guest-physical memory (all below 1 MiB,
//! the same places other VMMs and bootloaders use).

/// GDT used to enter long mode.
pub const GDT_START: u64 = 0x500;
/// An empty IDT: Linux installs its own before enabling interrupts.
pub const IDT_START: u64 = 0x520;
/// The Linux "zero page" (struct boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Long-mode page tables: PML4, PDPT, then `PD_COUNT` page directories.
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Page directories of 2 MiB pages: identity-map the first 4 GiB.
pub const PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// The last KiB of base memory: the MP table lives here, outside e820 RAM.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels load at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// The initrd goes no lower than this (above any kernel we expect).
pub const INITRD_MIN_ADDR: u64 = 0x40_0000;
/// Local and IO APIC addresses (fixed by the x86 platform).
pub const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
pub const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
