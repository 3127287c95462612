//! The Splitvisor CPUID leaves (`pv_protocol::platform`): how a guest that boots its own way (a
//! Linux guest with the `pvbus` module) detects Splitvisor, finds its start-info page and learns
//! which vCPU it runs on.
//!
//! Every vCPU gets the four leaves at `CPUID_BASE` through `KVM_SET_CPUID2`; leaf `base + 3`
//! carries the vCPU's own index, so each vCPU has its own table. The Splitvisor guest kernel
//! needs no other leaf, so the table holds only these four and every standard leaf reads as zero,
//! exactly as before the table existed. A VMM that boots a general-purpose kernel starts from
//! `KVM_GET_SUPPORTED_CPUID` instead and passes that table to [`apply`], which adds the leaves to
//! it.
//!
//! A guest's `cpuid` reaches KVM only where the host can intercept it: always under VMX/SVM, but
//! under PVM only when the CPU offers CPUID faulting (the guest kernel runs in ring 3, where
//! `cpuid` is not privileged). On a PVM host without it (seen on AMD EPYC hosts) the guest reads
//! the host's own leaves and the table installed here is never consulted; the Splitvisor guest
//! kernel does not care (it finds start-info in `rdi`), a Linux guest would not find Splitvisor
//! ([`leaves_reach_guest`]).

use kvm_bindings::{CpuId, kvm_cpuid_entry2};
use kvm_ioctls::VcpuFd;
use pv_protocol::platform::{CpuidLeaf, PlatformFeatures, PlatformInfo};
use pv_protocol::start_info::START_INFO_GPA;

/// What this hypervisor tells vCPU `vcpu` of a domain with `nr_vcpus` vCPUs.
pub fn platform_info(vcpu: u32, nr_vcpus: u32) -> PlatformInfo {
    PlatformInfo {
        start_info_gpa: START_INFO_GPA,
        // No interrupt injection yet: neither upcall bit, so HVM_OP is -ENOSYS (see
        // pv_protocol::platform).
        features: PlatformFeatures::START_INFO | PlatformFeatures::VCPU_INDEX,
        upcall_gsi: 0,
        vcpu,
        nr_vcpus,
    }
}

fn entry(l: &CpuidLeaf) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: l.function,
        index: 0,
        flags: 0,
        eax: l.eax,
        ebx: l.ebx,
        ecx: l.ecx,
        edx: l.edx,
        ..Default::default()
    }
}

/// Replaces any entries of `cpuid` in the Splitvisor leaf range with `info`'s leaves.
pub fn apply(cpuid: &CpuId, info: &PlatformInfo) -> Result<CpuId, vmm_sys_util::fam::Error> {
    let leaves = info.leaves();
    let mut entries: Vec<kvm_cpuid_entry2> = cpuid
        .as_slice()
        .iter()
        .filter(|e| !leaves.iter().any(|l| l.function == e.function))
        .copied()
        .collect();
    entries.extend(leaves.iter().map(entry));
    CpuId::from_entries(&entries)
}

/// Whether a guest's `cpuid` is served from the table KVM is given (see the module docs): always
/// on hardware virtualization; on PVM only if the host CPU has CPUID faulting (`cpuid_fault` in
/// `/proc/cpuinfo`).
pub fn leaves_reach_guest(flavour: crate::KvmFlavour) -> bool {
    match flavour {
        crate::KvmFlavour::Hardware => true,
        crate::KvmFlavour::Pvm => std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
            info.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "cpuid_fault"))
        }),
    }
}

/// Installs the leaves on vCPU `index` of a domain with `nr_vcpus` vCPUs.
pub(crate) fn setup(vcpu: &VcpuFd, index: u32, nr_vcpus: u32) -> crate::Result<()> {
    let empty = CpuId::new(0).map_err(|_| crate::Error::Config("CPUID table".into()))?;
    let table = apply(&empty, &platform_info(index, nr_vcpus))
        .map_err(|_| crate::Error::Config("CPUID table".into()))?;
    vcpu.set_cpuid2(&table)
        .map_err(|e| crate::Error::Kvm("KVM_SET_CPUID2", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;
    use pv_protocol::platform::CPUID_BASE;

    #[test]
    fn apply_replaces_stale_leaves_and_keeps_the_others() {
        let stale = kvm_cpuid_entry2 {
            function: CPUID_BASE,
            eax: 1,
            ..Default::default()
        };
        let other = kvm_cpuid_entry2 {
            function: 0x4000_0000,
            ebx: 0x4b4d_564b,
            ..Default::default()
        };
        let t = apply(
            &CpuId::from_entries(&[stale, other]).unwrap(),
            &platform_info(2, 4),
        )
        .unwrap();
        let s = t.as_slice();
        assert_eq!(s.len(), 5);
        assert!(s.contains(&other));
        assert_eq!(s.iter().filter(|e| e.function == CPUID_BASE).count(), 1);
        let vcpu = s.iter().find(|e| e.function == CPUID_BASE + 3).unwrap();
        assert_eq!((vcpu.eax, vcpu.ebx), (2, 4));
    }

    /// KVM keeps a table per vCPU: each vCPU reads back its own index. (The guest-side view is
    /// checked by `tests/cpuid.rs`, which runs `cpuid` inside a domain.)
    #[test]
    fn each_vcpu_holds_its_own_index_leaf() {
        let kvm = Kvm::new().expect("/dev/kvm is required for this test");
        let vm = kvm.create_vm().unwrap();
        for i in 0..2u32 {
            let vcpu = vm.create_vcpu(u64::from(i)).unwrap();
            setup(&vcpu, i, 2).unwrap();
            let back = vcpu.get_cpuid2(8).unwrap();
            let leaf = back
                .as_slice()
                .iter()
                .find(|e| e.function == CPUID_BASE + 3)
                .copied()
                .unwrap();
            assert_eq!((leaf.eax, leaf.ebx), (i, 2));
        }
    }
}
