//! The ACPI tables a Linux guest gets (`guest::boot::acpi`) pass Intel's
//! own tools: every table disassembles with `iasl` (Debian's
//! acpica-tools) and the DSDT compiles back, with no error, warning or
//! remark, for a guest of 1, 2 and 32 vCPUs, with and without PCI. (The RSDP is no table to
//! iasl; its checksums and pointer are checked by the unit tests.)

use std::path::Path;
use std::process::Command;

mod common;

fn iasl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("iasl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("iasl (Debian's acpica-tools) is needed: apt-get install acpica-tools");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "iasl {args:?} failed:\n{text}");
    text
}

#[test]
fn every_table_disassembles_and_the_dsdt_compiles_back_cleanly() {
    for (vcpus, pci) in [(1u8, false), (2, true), (32, true)] {
        let dir = common::scratch_dir(&format!("acpi-{vcpus}"));
        let tables = vmm::guest::boot::acpi::tables(vcpus, pci);
        let mut names = Vec::new();
        for (_, bytes) in &tables {
            let signature = match &bytes[..8] {
                b"RSD PTR " => "rsdp".to_string(),
                _ => String::from_utf8_lossy(&bytes[..4]).to_lowercase(),
            };
            std::fs::write(dir.join(format!("{signature}.dat")), bytes).unwrap();
            names.push(signature);
        }
        let expected: &[&str] = if pci {
            &["rsdp", "xsdt", "facp", "apic", "mcfg", "dsdt"]
        } else {
            &["rsdp", "xsdt", "facp", "apic", "dsdt"]
        };
        assert_eq!(names, expected);
        for name in &names[1..] {
            let text = iasl(&dir, &["-d", &format!("{name}.dat")]);
            let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
            for bad in ["Error", "Warning", "**** "] {
                assert!(!text.contains(bad) && !dsl.contains(bad), "{name} ({vcpus} vCPUs): {bad}\n{text}\n{dsl}");
            }
        }
        let madt = std::fs::read_to_string(dir.join("apic.dsl")).unwrap();
        assert_eq!(madt.matches("Subtable Type : 00 [Processor Local APIC]").count(), vcpus as usize, "{madt}");
        let dsdt = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        assert!(dsdt.contains("PNP0501") && dsdt.contains("_S5_"), "{dsdt}");
        assert_eq!(dsdt.contains("PNP0A08"), pci, "{dsdt}");
        if pci {
            let mcfg = std::fs::read_to_string(dir.join("mcfg.dsl")).unwrap();
            assert!(mcfg.contains("Base Address : 00000000E0000000"), "{mcfg}");
        }
        let compiled = iasl(&dir, &["-oa", "-vr", "-p", "recompiled", "dsdt.dsl"]);
        assert!(
            compiled.contains("0 Errors, 0 Warnings, 0 Remarks"),
            "the DSDT does not compile back cleanly:\n{compiled}"
        );
        let original = &tables.iter().find(|(_, t)| &t[..4] == b"DSDT").unwrap().1;
        let again = std::fs::read(dir.join("recompiled.aml")).unwrap();
        assert_eq!(again[36..], original[36..], "the DSDT's AML does not round-trip");
    }
}
