//! The platform interface for guests that boot their own way: how a Linux guest (or any guest
//! that does not enter at the Splitvisor entry point with `rdi` = start-info) detects Splitvisor,
//! finds its start-info page, learns which vCPU it runs on, and asks for event upcalls.
//!
//! # Detection: CPUID leaves
//!
//! KVM owns `0x4000_0000..=0x4000_00ff` (the `KVMKVMKVM` signature a Linux guest uses for
//! kvmclock and KVM's PV features). Splitvisor's leaves sit in the next block, at
//! [`CPUID_BASE`] `= 0x4000_0100`, the way Xen moves its leaves up by `0x100` when another
//! hypervisor interface occupies `0x4000_0000`. A guest scans `0x4000_0000..0x4001_0000` in steps
//! of `0x100` for the signature and uses the first block that has it.
//!
//! | leaf | `eax` | `ebx` | `ecx` | `edx` |
//! |---|---|---|---|---|
//! | `base + 0` ([`LEAF_SIGNATURE`]) | largest Splitvisor leaf | `"Spli"` | `"tvis"` | `"orPV"` |
//! | `base + 1` ([`LEAF_VERSION`]) | ABI `major << 16 \| minor` | [`PlatformFeatures`] | upcall GSI (with [`PlatformFeatures::UPCALL_GSI`]) | 0 |
//! | `base + 2` ([`LEAF_START_INFO`]) | start-info GPA, bits 0..32 | start-info GPA, bits 32..64 | hypercall I/O port | first doorbell I/O port |
//! | `base + 3` ([`LEAF_VCPU`]) | index of the vCPU executing `cpuid` | number of vCPUs | 0 | 0 |
//!
//! Leaf `base + 3` differs per vCPU: it is how a guest that numbers its CPUs its own way (Linux
//! numbers them in ACPI MADT order) finds the hypercall page of the CPU it runs on
//! ([`crate::start_info::hypercall_page`]).
//!
//! # Memory the guest must leave alone
//!
//! The start-info page names every other fixed page (shared info, console and store rings,
//! hypercall pages, grant-table frames). They lie in guest RAM below 2 MiB, at the addresses in
//! [`crate::start_info`]. A VMM that boots a Linux guest must describe `0x10_0000..0x20_0000`
//! (`START_INFO_GPA` up to `KERNEL_MIN_LOAD`) as reserved in the guest's memory map (E820), so
//! that the guest kernel never allocates those pages, and the guest's drivers map them with
//! `memremap(MEMREMAP_WB)`. The start-info page is read-only by convention.
//!
//! # Hypercall argument scratch space
//!
//! The hypervisor reads and writes only the [`crate::hypercall::HypercallRequest`] block at the
//! start of each hypercall page. The rest of the page, from [`HYPERCALL_SCRATCH_OFFSET`], belongs
//! to the guest: a guest may put argument structs there and pass their guest-physical address,
//! which spares a guest kernel with virtually mapped stacks from translating addresses.
//!
//! # Upcalls (event delivery as an interrupt)
//!
//! Xen's `HVMOP_set_param(HVM_PARAM_CALLBACK_IRQ)`: the guest issues hypercall [`HVM_OP`] with
//! `args[0] =` [`HVMOP_SET_PARAM`] and `args[1] =` the address of an [`HvmParam`] whose `index` is
//! [`HVM_PARAM_CALLBACK_IRQ`] and whose `value` is a [`callback_via`]: an ISA interrupt line (GSI
//! below 16, taken by the guest with an ordinary `request_irq`) or an IDT vector. From then on the
//! hypervisor raises that interrupt whenever it sets a vCPU's `upcall_pending`; the guest's
//! handler scans the 2-level bitmaps (Xen's `evtchn_do_upcall`).
//!
//! The hypervisor advertises what it delivers in [`PlatformFeatures`] (leaf `base + 1`, `ebx`).
//! **This hypervisor sets neither upcall bit**: it has no interrupt injection, and `HVM_OP` is not
//! a hypercall it knows, so the call fails with `-ENOSYS` (the rule for every unknown hypercall
//! number). A guest without upcalls polls the pending bitmap (Linux `pvbus`: a periodic timer) or
//! blocks in `SCHED_OP(block/poll)`.

use core::mem::{offset_of, size_of};

use bitflags::bitflags;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::hypercall::HypercallRequest;

/// First Splitvisor CPUID leaf.
pub const CPUID_BASE: u32 = 0x4000_0100;
/// Offset of the signature leaf from the base.
pub const LEAF_SIGNATURE: u32 = 0;
/// Offset of the version and features leaf.
pub const LEAF_VERSION: u32 = 1;
/// Offset of the start-info and I/O ports leaf.
pub const LEAF_START_INFO: u32 = 2;
/// Offset of the per-vCPU leaf.
pub const LEAF_VCPU: u32 = 3;
/// Largest leaf offset this ABI defines (reported in `eax` of the signature leaf as a leaf number).
pub const LEAF_MAX: u32 = LEAF_VCPU;
/// Where a guest starts looking for the signature.
pub const CPUID_SCAN_FIRST: u32 = 0x4000_0000;
/// Where a guest stops looking (exclusive).
pub const CPUID_SCAN_END: u32 = 0x4001_0000;
/// The scan step.
pub const CPUID_SCAN_STEP: u32 = 0x100;

/// The signature as it appears in `ebx`, `ecx`, `edx` of the signature leaf.
pub const SIGNATURE: [u8; 12] = *b"SplitvisorPV";

/// `ebx` of the signature leaf.
pub const SIGNATURE_EBX: u32 = u32::from_le_bytes([b'S', b'p', b'l', b'i']);
/// `ecx` of the signature leaf.
pub const SIGNATURE_ECX: u32 = u32::from_le_bytes([b't', b'v', b'i', b's']);
/// `edx` of the signature leaf.
pub const SIGNATURE_EDX: u32 = u32::from_le_bytes([b'o', b'r', b'P', b'V']);

/// Offset in each hypercall page where guest-owned scratch space begins.
pub const HYPERCALL_SCRATCH_OFFSET: usize = size_of::<HypercallRequest>();

bitflags! {
    /// Platform features (`ebx` of leaf `base + 1`). Guests ignore unknown bits.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct PlatformFeatures: u32 {
        /// Leaf `base + 2` holds the start-info address and the I/O ports (always set).
        const START_INFO = 1 << 0;
        /// Leaf `base + 3` holds the vCPU index (always set).
        const VCPU_INDEX = 1 << 1;
        /// `HVM_OP(SET_PARAM, CALLBACK_IRQ)` accepts a GSI; `ecx` of leaf `base + 1` is the ISA
        /// interrupt line the guest should name. Not offered by this hypervisor yet.
        const UPCALL_GSI = 1 << 2;
        /// `HVM_OP(SET_PARAM, CALLBACK_IRQ)` accepts an IDT vector. Not offered by this
        /// hypervisor yet.
        const UPCALL_VECTOR = 1 << 3;
    }
}

/// Hypercall number of `hvm_op` (Xen's `__HYPERVISOR_hvm_op`).
pub const HVM_OP: u64 = 34;
/// `hvm_op` sub-op: set a parameter ([`HvmParam`] at `args[1]`).
pub const HVMOP_SET_PARAM: u64 = 0;
/// `hvm_op` sub-op: get a parameter.
pub const HVMOP_GET_PARAM: u64 = 1;
/// Parameter: how event upcalls are delivered (a [`callback_via`] value; 0 disables them).
pub const HVM_PARAM_CALLBACK_IRQ: u32 = 0;

/// Encoding of `HVM_PARAM_CALLBACK_IRQ` values (Xen's `HVM_PARAM_CALLBACK_TYPE_*`).
pub mod callback_via {
    /// The type lives in bits 56..64.
    pub const TYPE_SHIFT: u32 = 56;
    /// Type: bits 0..32 are a GSI (Splitvisor accepts ISA lines, below 16).
    pub const TYPE_GSI: u64 = 0;
    /// Type: bits 0..8 are an IDT vector.
    pub const TYPE_VECTOR: u64 = 2;

    /// The value naming GSI `gsi`.
    pub const fn gsi(gsi: u32) -> u64 {
        (TYPE_GSI << TYPE_SHIFT) | gsi as u64
    }

    /// The value naming IDT vector `vector`.
    pub const fn vector(vector: u8) -> u64 {
        (TYPE_VECTOR << TYPE_SHIFT) | vector as u64
    }
}

/// `HVMOP_set_param` / `HVMOP_get_param` argument (Xen's `xen_hvm_param`).
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct HvmParam {
    /// Domain (normally [`crate::grant::DomId::SELF`]).
    pub domid: u16,
    /// Zero.
    pub _pad: u16,
    /// Parameter index ([`HVM_PARAM_CALLBACK_IRQ`]).
    pub index: u32,
    /// Value.
    pub value: u64,
}

const _: () = assert!(size_of::<HvmParam>() == 16);
const _: () = assert!(offset_of!(HvmParam, domid) == 0);
const _: () = assert!(offset_of!(HvmParam, _pad) == 2);
const _: () = assert!(offset_of!(HvmParam, index) == 4);
const _: () = assert!(offset_of!(HvmParam, value) == 8);
const _: () = assert!(HYPERCALL_SCRATCH_OFFSET == 128);

/// The values of one CPUID leaf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidLeaf {
    /// Leaf number (`eax` in).
    pub function: u32,
    /// `eax` out.
    pub eax: u32,
    /// `ebx` out.
    pub ebx: u32,
    /// `ecx` out.
    pub ecx: u32,
    /// `edx` out.
    pub edx: u32,
}

/// What a hypervisor tells vCPU `vcpu` of a domain with `nr_vcpus` vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlatformInfo {
    /// Guest-physical address of the start-info page.
    pub start_info_gpa: u64,
    /// Features offered.
    pub features: PlatformFeatures,
    /// ISA interrupt line for upcalls (meaningful with [`PlatformFeatures::UPCALL_GSI`]).
    pub upcall_gsi: u32,
    /// This vCPU's index.
    pub vcpu: u32,
    /// vCPUs in the domain.
    pub nr_vcpus: u32,
}

impl PlatformInfo {
    /// The Splitvisor CPUID leaves, `CPUID_BASE ..= CPUID_BASE + LEAF_MAX`.
    pub fn leaves(&self) -> [CpuidLeaf; LEAF_MAX as usize + 1] {
        let version = (u32::from(crate::hypercall::ABI_VERSION_MAJOR) << 16)
            | u32::from(crate::hypercall::ABI_VERSION_MINOR);
        [
            CpuidLeaf {
                function: CPUID_BASE + LEAF_SIGNATURE,
                eax: CPUID_BASE + LEAF_MAX,
                ebx: SIGNATURE_EBX,
                ecx: SIGNATURE_ECX,
                edx: SIGNATURE_EDX,
            },
            CpuidLeaf {
                function: CPUID_BASE + LEAF_VERSION,
                eax: version,
                ebx: self.features.bits(),
                ecx: self.upcall_gsi,
                edx: 0,
            },
            CpuidLeaf {
                function: CPUID_BASE + LEAF_START_INFO,
                eax: self.start_info_gpa as u32,
                ebx: (self.start_info_gpa >> 32) as u32,
                ecx: u32::from(crate::hypercall::HYPERCALL_PORT),
                edx: u32::from(crate::evtchn::DOORBELL_BASE),
            },
            CpuidLeaf {
                function: CPUID_BASE + LEAF_VCPU,
                eax: self.vcpu,
                ebx: self.nr_vcpus,
                ecx: 0,
                edx: 0,
            },
        ]
    }

    /// Decodes the four leaves a guest read (guest side; tests). `None` without the signature or
    /// with a leaf missing.
    pub fn from_leaves(leaves: &[CpuidLeaf]) -> Option<PlatformInfo> {
        let [sig, ver, si, cpu, ..] = leaves else {
            return None;
        };
        if (sig.ebx, sig.ecx, sig.edx) != (SIGNATURE_EBX, SIGNATURE_ECX, SIGNATURE_EDX)
            || sig.eax < sig.function + LEAF_MAX
        {
            return None;
        }
        Some(PlatformInfo {
            start_info_gpa: u64::from(si.eax) | (u64::from(si.ebx) << 32),
            features: PlatformFeatures::from_bits_truncate(ver.ebx),
            upcall_gsi: ver.ecx,
            vcpu: cpu.eax,
            nr_vcpus: cpu.ebx,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypercall::{Errno, Hypercall};

    #[test]
    fn signature_registers_spell_the_signature() {
        let mut b = [0u8; 12];
        b[0..4].copy_from_slice(&SIGNATURE_EBX.to_le_bytes());
        b[4..8].copy_from_slice(&SIGNATURE_ECX.to_le_bytes());
        b[8..12].copy_from_slice(&SIGNATURE_EDX.to_le_bytes());
        assert_eq!(&b, &SIGNATURE);
    }

    #[test]
    fn leaves_round_trip_and_sit_above_kvm() {
        let info = PlatformInfo {
            start_info_gpa: 0x1_2345_6000,
            features: PlatformFeatures::START_INFO | PlatformFeatures::VCPU_INDEX,
            upcall_gsi: 0,
            vcpu: 3,
            nr_vcpus: 4,
        };
        let leaves = info.leaves();
        assert_eq!(leaves[0].function, 0x4000_0100);
        assert!(leaves.iter().all(|l| l.function > 0x4000_00ff));
        assert_eq!(PlatformInfo::from_leaves(&leaves), Some(info));
        let mut bad = leaves;
        bad[0].edx = 0;
        assert_eq!(PlatformInfo::from_leaves(&bad), None);
    }

    #[test]
    fn hvm_op_is_unknown_to_this_hypervisor_and_fails_with_enosys() {
        // The defined answer to a guest asking for upcalls: HVM_OP is not a hypercall this
        // hypervisor decodes, so it is -ENOSYS. Implementing upcalls changes this test.
        let req = HypercallRequest {
            nr: HVM_OP,
            args: [HVMOP_SET_PARAM, 0x10_4080, 0, 0, 0, 0],
            ..Default::default()
        };
        let e = Hypercall::parse(&req).unwrap_err();
        assert_eq!(e.errno(), Errno::ENOSYS);
    }

    #[test]
    fn callback_via_encodes_type_in_the_top_byte() {
        assert_eq!(callback_via::gsi(5), 5);
        assert_eq!(callback_via::vector(0xf3), 0x0200_0000_0000_00f3);
    }
}
