//! KVM state: the VM (memory slots, irqchip, PIT), its vCPUs, and the gate
//! through which other threads stop or park them.

pub mod control;
pub mod kvm_stats;
pub mod state;
pub mod vcpu;
pub mod vm;
