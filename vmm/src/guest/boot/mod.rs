//! Loading a guest: kernel, initrd and command line into guest memory, and
//! the x86 boot structures Linux expects (boot params with its e820 map, an
//! MP table, long-mode page tables and GDT).
//!
//! Linux is entered through its 64-bit boot protocol: the VMM switches the
//! boot vCPU to long mode itself and jumps to the kernel's 64-bit entry with
//! RSI pointing at the boot params. Our own test guests use the same entry,
//! and may carry an ELF note asking for every vCPU to start there.

pub mod acpi;
mod elf_note;
pub mod layout;
pub mod long_mode;
mod mptable;

pub use mptable::MAX_VCPUS;

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::config::Transport;
use crate::guest::devices::pci::{ECAM_BASE, ECAM_SIZE};
use crate::guest::devices::virtio;
use crate::memory::{ram_ranges, GuestMemoryMmap};
use layout::*;

/// What the vCPU setup needs to know once the guest is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// The 64-bit entry point.
    pub entry: GuestAddress,
    /// Start every vCPU at `entry` (our test guests) instead of only the
    /// first, with the others waiting for INIT/SIPI (Linux).
    pub all_vcpus_at_entry: bool,
    /// Where its virtio devices go.
    pub transport: Transport,
}

#[derive(Debug)]
pub enum BootError {
    OpenKernel(String, io::Error),
    NotAKernel(String),
    LoadKernel(String, loader::Error),
    OpenInitrd(String, io::Error),
    InitrdTooLarge { name: String, size: u64, room: u64 },
    LoadInitrd(String, String),
    Cmdline(String),
    BootStructures(String),
}

impl std::fmt::Display for BootError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            BootError::OpenKernel(p, e) => write!(f, "cannot open kernel {p}: {e}"),
            BootError::NotAKernel(p) => {
                write!(f, "{p} is not a kernel: expected an x86-64 ELF (vmlinux) or a bzImage")
            }
            BootError::LoadKernel(p, e) => write!(f, "cannot load kernel {p}: {e} (does it fit in guest memory?)"),
            BootError::OpenInitrd(p, e) => write!(f, "cannot open initrd {p}: {e}"),
            BootError::InitrdTooLarge { name, size, room } => write!(
                f,
                "initrd {name} is {} MiB, more than the {} MiB of guest memory left for it",
                size >> 20,
                room >> 20
            ),
            BootError::LoadInitrd(p, e) => write!(f, "cannot load initrd {p}: {e}"),
            BootError::Cmdline(e) => write!(f, "bad kernel command line: {e}"),
            BootError::BootStructures(e) => write!(f, "cannot write boot structures: {e}"),
        }
    }
}

impl std::error::Error for BootError {}

/// A kernel or an initrd: its name for errors and its open file (a file
/// the user named, or what a disk image's boot entry names, read into a
/// memfd).
pub struct BootFile {
    name: String,
    file: File,
}

impl BootFile {
    pub fn kernel(path: &Path) -> Result<BootFile, BootError> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|e| BootError::OpenKernel(name.clone(), e))?;
        if file.metadata().is_ok_and(|m| m.is_dir()) {
            return Err(BootError::NotAKernel(name));
        }
        Ok(BootFile { name, file })
    }

    pub fn initrd(path: &Path) -> Result<BootFile, BootError> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|e| BootError::OpenInitrd(name.clone(), e))?;
        if file.metadata().is_ok_and(|m| m.is_dir()) {
            return Err(BootError::OpenInitrd(name, io::Error::other("is a directory")));
        }
        Ok(BootFile { name, file })
    }

    /// `parts` one after the other in a memfd, called `name`.
    pub fn from_bytes(name: String, parts: &[Vec<u8>]) -> io::Result<BootFile> {
        use std::io::Write;
        let mut file = dedup::os::memfd("vmm-boot")?;
        for part in parts {
            file.write_all(part)?;
        }
        Ok(BootFile { name, file })
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

/// What to boot.
pub struct BootSource<'a> {
    pub kernel: BootFile,
    pub initrd: Option<BootFile>,
    /// The user's command line, if any.
    pub cmdline: Option<&'a str>,
    /// Used for a Linux kernel when the user gave no command line.
    pub default_linux_cmdline: &'a str,
    /// Appended to any command line (`ip=` for its network).
    pub device_args: &'a str,
    /// How many virtio devices it has, and on which transport (`None`:
    /// PCI for Linux, MMIO for our own guests, which drive only that).
    pub virtio_slots: usize,
    pub transport: Option<Transport>,
}

/// Loads `source` into `mem` (a guest of `ram_size` bytes with `vcpus` vCPUs)
/// and writes every boot structure except the per-vCPU registers.
pub fn load(mem: &GuestMemoryMmap, ram_size: u64, vcpus: u8, source: &BootSource) -> Result<BootInfo, BootError> {
    let kernel = &source.kernel.name;
    let mut file = source.kernel.file.try_clone().map_err(|e| BootError::OpenKernel(kernel.clone(), e))?;
    let load_err = |e| BootError::LoadKernel(kernel.clone(), e);
    let (entry, setup_header, all_vcpus_at_entry) = match kernel_format(&mut file) {
        Some(KernelFormat::Elf) => {
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            let all = elf_note::starts_all_vcpus(&mut file).unwrap_or(false);
            (r.kernel_load, None, all)
        }
        Some(KernelFormat::BzImage) => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            // The 64-bit entry sits 0x200 bytes into the protected-mode code.
            (r.kernel_load.unchecked_add(0x200), r.setup_header, false)
        }
        None => return Err(BootError::NotAKernel(kernel.clone())),
    };

    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.kernel_alignment = 0x0100_0000;

    let text = match source.cmdline {
        Some(text) => text,
        // Our own guests take no Linux parameters.
        None if all_vcpus_at_entry => "",
        None => source.default_linux_cmdline,
    };
    let transport = source.transport.unwrap_or(if all_vcpus_at_entry { Transport::Mmio } else { Transport::Pci });
    let mut args: Vec<String> = match transport {
        Transport::Mmio => (0..source.virtio_slots).map(virtio::cmdline_arg).collect(),
        Transport::Pci => Vec::new(),
    };
    args.push(source.device_args.trim().to_string());
    let text = format!("{} {}", text.trim(), args.join(" ").trim());
    let cmdline = build_cmdline(&text)?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = text.trim().len() as u32 + 1;

    if let Some(initrd) = &source.initrd {
        let (addr, size) = load_initrd(mem, ram_size, initrd)?;
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    // A Linux kernel with ACPI reads the ACPI tables, one without it the MP
    // table; our own test guests read neither and get neither.
    let pci = transport == Transport::Pci;
    if !all_vcpus_at_entry {
        acpi::write(mem, vcpus, pci).map_err(BootError::BootStructures)?;
        params.acpi_rsdp_addr = acpi::RSDP_START;
    }

    let e820 = e820_map(ram_size, pci);
    params.e820_entries = e820.len() as u8;
    for (slot, entry) in params.e820_table.iter_mut().zip(&e820) {
        *slot = *entry;
    }
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(ZERO_PAGE_START)), mem)
        .map_err(|e| BootError::BootStructures(e.to_string()))?;

    mptable::write(mem, vcpus).map_err(BootError::BootStructures)?;
    long_mode::write_tables(mem).map_err(BootError::BootStructures)?;

    Ok(BootInfo { entry, all_vcpus_at_entry, transport })
}

enum KernelFormat {
    Elf,
    BzImage,
}

fn kernel_format(file: &mut File) -> Option<KernelFormat> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0)).ok()?;
    let n = file.read(&mut head).ok()?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        Some(KernelFormat::Elf)
    } else if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Some(KernelFormat::BzImage)
    } else {
        None
    }
}

fn build_cmdline(text: &str) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    if !text.trim().is_empty() {
        cmdline.insert_str(text.trim()).map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    Ok(cmdline)
}

/// Places the initrd at the top of low RAM, page aligned, as bootloaders do.
fn load_initrd(mem: &GuestMemoryMmap, ram_size: u64, initrd: &BootFile) -> Result<(GuestAddress, u64), BootError> {
    let name = &initrd.name;
    let size = initrd.len().map_err(|e| BootError::OpenInitrd(name.clone(), e))?;
    let low_ram_end = ram_ranges(ram_size)[0].1;
    let room = low_ram_end.saturating_sub(INITRD_MIN_ADDR);
    if size > room {
        return Err(BootError::InitrdTooLarge { name: name.clone(), size, room });
    }
    let addr = GuestAddress((low_ram_end - size) & !(crate::memory::PAGE_SIZE - 1));
    let mut file = initrd.file.try_clone().map_err(|e| BootError::OpenInitrd(name.clone(), e))?;
    file.seek(SeekFrom::Start(0)).map_err(|e| BootError::LoadInitrd(name.clone(), e.to_string()))?;
    mem.read_exact_volatile_from(addr, &mut file, size as usize)
        .map_err(|e| BootError::LoadInitrd(name.clone(), e.to_string()))?;
    Ok((addr, size))
}

/// The e820 map: base memory below the EBDA, then everything from 1 MiB;
/// with PCI, the ECAM window reserved (Linux uses the MCFG's window only
/// if the firmware reserved it).
pub fn e820_map(ram_size: u64, pci: bool) -> Vec<boot_e820_entry> {
    const E820_RAM: u32 = 1;
    const E820_RESERVED: u32 = 2;
    let ram = |addr, size| boot_e820_entry { addr, size, r#type: E820_RAM };
    let mut map = vec![ram(0, EBDA_START)];
    for (base, len) in ram_ranges(ram_size) {
        let start = base.raw_value().max(HIMEM_START);
        let end = base.raw_value() + len;
        if end > start {
            map.push(ram(start, end - start));
        }
    }
    if pci {
        map.push(boot_e820_entry { addr: ECAM_BASE, size: ECAM_SIZE, r#type: E820_RESERVED });
        map.sort_by_key(|e| e.addr);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestRam, MIB, MMIO_HOLE_END, MMIO_HOLE_START};
    use std::path::PathBuf;
    use vm_memory::Bytes;

    fn entries(ram: u64) -> Vec<(u64, u64, u32)> {
        e820_map(ram, false).iter().map(|e| (e.addr, e.size, e.r#type)).collect()
    }

    #[test]
    fn e820_reserves_the_ecam_window_for_pci() {
        let map = e820_map(128 * MIB, true);
        let ecam: Vec<_> = map.iter().filter(|e| e.r#type == 2).map(|e| (e.addr, e.size)).collect();
        assert_eq!(ecam, vec![(ECAM_BASE, ECAM_SIZE)]);
        assert!(map.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr), "sorted, no overlap");
    }

    #[test]
    fn e820_small_guest() {
        assert_eq!(entries(128 * MIB), vec![(0, EBDA_START, 1), (HIMEM_START, 128 * MIB - HIMEM_START, 1)]);
    }

    #[test]
    fn e820_skips_the_mmio_hole() {
        let e = entries(5 * 1024 * MIB);
        assert_eq!(e.len(), 3);
        assert_eq!(e[1].0 + e[1].1, MMIO_HOLE_START);
        assert_eq!(e[2], (MMIO_HOLE_END, 5 * 1024 * MIB - MMIO_HOLE_START, 1));
        let total: u64 = e.iter().map(|x| x.1).sum();
        assert_eq!(total, 5 * 1024 * MIB - (HIMEM_START - EBDA_START));
    }

    fn source<'a>(kernel: &Path, initrd: Option<&Path>, cmdline: Option<&'a str>) -> BootSource<'a> {
        BootSource {
            kernel: BootFile::kernel(kernel).unwrap(),
            initrd: initrd.map(|p| BootFile::initrd(p).unwrap()),
            cmdline,
            default_linux_cmdline: "console=ttyS0 default",
            device_args: "",
            virtio_slots: 0,
            transport: None,
        }
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("vmm-boot-test-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn rejects_a_file_that_is_not_a_kernel() {
        let ram = GuestRam::new(16 * MIB, None).unwrap();
        let path = temp_file("junk", b"#!/bin/sh\necho this is no kernel\n");
        let src = source(&path, None, None);
        let err = load(ram.memory(), 16 * MIB, 1, &src).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel(_)), "{err}");
        assert!(err.to_string().contains("is not a kernel"));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let err = BootFile::kernel(Path::new("/nonexistent/vmlinux")).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }

    /// A minimal ELF with one PT_LOAD at 1 MiB: enough for the loader.
    fn tiny_elf() -> Vec<u8> {
        let mut f = vec![0u8; 0x1000 + 16];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&(HIMEM_START).to_le_bytes()); // e_entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = &mut f[64..120];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
        ph[16..24].copy_from_slice(&HIMEM_START.to_le_bytes()); // p_vaddr
        ph[24..32].copy_from_slice(&HIMEM_START.to_le_bytes()); // p_paddr
        ph[32..40].copy_from_slice(&16u64.to_le_bytes()); // p_filesz
        ph[40..48].copy_from_slice(&16u64.to_le_bytes()); // p_memsz
        f[0x1000..].copy_from_slice(b"0123456789abcdef");
        f
    }

    #[test]
    fn loads_an_elf_and_fills_the_zero_page() {
        let ram = GuestRam::new(32 * MIB, None).unwrap();
        let kernel = temp_file("elf", &tiny_elf());
        let initrd = temp_file("initrd", &[7u8; 5000]);
        let src = source(&kernel, Some(&initrd), Some("console=ttyS0 quiet"));
        let info = load(ram.memory(), 32 * MIB, 2, &src).unwrap();
        let linux = BootInfo { entry: GuestAddress(HIMEM_START), all_vcpus_at_entry: false, transport: Transport::Pci };
        assert_eq!(info, linux, "Linux gets PCI by default");
        let mem = ram.memory();
        let mut code = [0u8; 16];
        mem.read_slice(&mut code, GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(&code, b"0123456789abcdef");

        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let cmd_ptr = params.hdr.cmd_line_ptr;
        assert_eq!(cmd_ptr as u64, CMDLINE_START);
        let mut cmd = [0u8; 20];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&cmd, b"console=ttyS0 quiet\0");
        assert_eq!(params.e820_entries, 3, "RAM twice and the ECAM window");
        let (rd_addr, rd_size) = (params.hdr.ramdisk_image as u64, params.hdr.ramdisk_size);
        assert_eq!(rd_size, 5000);
        assert_eq!(rd_addr % 4096, 0);
        assert!(rd_addr + 5000 <= 32 * MIB && rd_addr >= 31 * MIB);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(rd_addr + 4999)).unwrap(), 7);
        std::fs::remove_file(kernel).unwrap();
        std::fs::remove_file(initrd).unwrap();
    }

    #[test]
    fn initrd_larger_than_memory_is_refused() {
        let ram = GuestRam::new(8 * MIB, None).unwrap();
        let kernel = temp_file("elf2", &tiny_elf());
        let initrd = temp_file("big-initrd", &vec![1u8; 9 << 20]);
        let src = source(&kernel, Some(&initrd), None);
        let err = load(ram.memory(), 8 * MIB, 1, &src).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
        std::fs::remove_file(kernel).unwrap();
        std::fs::remove_file(initrd).unwrap();
    }
}
