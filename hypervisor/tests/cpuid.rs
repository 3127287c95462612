//! A real domain sees the Splitvisor CPUID leaves (pv_protocol::platform) on every vCPU, with its
//! own index in leaf `base + 3`.
//!
//! The guest is a hand-assembled 136-byte kernel (source in the comments below, built with GNU
//! `as --64`): each vCPU runs `cpuid` on the four leaves and stores the registers at
//! `0x300000 + 64 * vcpu`; vCPU 1 then raises a flag and parks, vCPU 0 waits for the flag and shuts
//! the domain down. The host reads the stored registers out of guest memory.
//!
//! On a PVM host without CPUID faulting the guest's `cpuid` never reaches KVM
//! (`hypervisor::cpuid::leaves_reach_guest`): there the test checks that the guest read exactly
//! the host's own leaves, i.e. that the hypervisor's report of the host is true.

use std::time::Duration;

use hypervisor::{DomainConfig, DomainState, Hypervisor};
use pv_protocol::hypercall::ShutdownReason;
use pv_protocol::platform::{CPUID_BASE, CpuidLeaf, PlatformFeatures, PlatformInfo};
use pv_protocol::start_info::{KERNEL_MIN_LOAD, START_INFO_GPA};

const OUT: u64 = 0x30_0000;

#[rustfmt::skip]
const CODE: [u8; 136] = [
    0x89, 0xf7,                               // mov edi, esi          ; vCPU index
    0xc1, 0xe7, 0x06,                         // shl edi, 6
    0x81, 0xc7, 0x00, 0x00, 0x30, 0x00,       // add edi, 0x300000
    0x41, 0xb8, 0x00, 0x01, 0x00, 0x40,       // mov r8d, 0x40000100
    0x44, 0x89, 0xc0,                         // 1: mov eax, r8d
    0x31, 0xc9,                               // xor ecx, ecx
    0x0f, 0xa2,                               // cpuid
    0x89, 0x07,                               // mov [rdi], eax
    0x89, 0x5f, 0x04,                         // mov [rdi+4], ebx
    0x89, 0x4f, 0x08,                         // mov [rdi+8], ecx
    0x89, 0x57, 0x0c,                         // mov [rdi+12], edx
    0x48, 0x83, 0xc7, 0x10,                   // add rdi, 16
    0x41, 0xff, 0xc0,                         // inc r8d
    0x41, 0x81, 0xf8, 0x04, 0x01, 0x00, 0x40, // cmp r8d, 0x40000104
    0x75, 0xde,                               // jne 1b
    0x85, 0xf6,                               // test esi, esi
    0x75, 0x43,                               // jnz 3f
    0xf3, 0x90,                               // 2: pause
    0x83, 0x3c, 0x25, 0x80, 0x00, 0x30, 0x00, 0x01, // cmp dword [0x300080], 1
    0x75, 0xf4,                               // jne 2b
    0xc7, 0x04, 0x25, 0x90, 0x00, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00, // mov dword [0x300090], 0
    0xc7, 0x04, 0x25, 0x94, 0x00, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00, // mov dword [0x300094], 0
    0xbe, 0x00, 0x40, 0x10, 0x00,             // mov esi, 0x104000     ; vCPU 0's hypercall page
    0x48, 0xc7, 0x06, 0x1d, 0x00, 0x00, 0x00, // mov qword [rsi], 29   ; SCHED_OP
    0x48, 0xc7, 0x46, 0x08, 0x02, 0x00, 0x00, 0x00, // mov qword [rsi+8], 2 ; shutdown
    0x48, 0xc7, 0x46, 0x10, 0x90, 0x00, 0x30, 0x00, // mov qword [rsi+16], 0x300090
    0xe6, 0xe8,                               // out 0xe8, al
    0xf4,                                     // 4: hlt
    0xeb, 0xfd,                               // jmp 4b
    0xc7, 0x04, 0x25, 0x80, 0x00, 0x30, 0x00, 0x01, 0x00, 0x00, 0x00, // 3: mov dword [0x300080], 1
    0xf4,                                     // 5: hlt
    0xeb, 0xfd,                               // jmp 5b
];

/// A minimal ELF64 executable: one PT_LOAD segment holding `code`, loaded and entered at
/// `KERNEL_MIN_LOAD + 0x78` (the code follows the two headers in the file).
fn elf(code: &[u8]) -> Vec<u8> {
    const EHDR: u64 = 64;
    const PHDR: u64 = 56;
    let off = EHDR + PHDR;
    let addr = KERNEL_MIN_LOAD + off;
    let mut f = Vec::new();
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]); // 64-bit, LE, version 1
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    f.extend_from_slice(&addr.to_le_bytes()); // e_entry
    f.extend_from_slice(&EHDR.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&(EHDR as u16).to_le_bytes());
    f.extend_from_slice(&(PHDR as u16).to_le_bytes());
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    assert_eq!(f.len() as u64, EHDR);
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    f.extend_from_slice(&off.to_le_bytes()); // p_offset
    f.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&addr.to_le_bytes()); // p_paddr
    f.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    f.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    f.extend_from_slice(&8u64.to_le_bytes()); // p_align
    assert_eq!(f.len() as u64, off);
    f.extend_from_slice(code);
    f
}

#[test]
fn every_vcpu_sees_the_splitvisor_leaves_with_its_own_index() {
    let hv =
        Hypervisor::new(guest_drivers::GUEST_KERNEL).expect("/dev/kvm is required for this test");
    let dom = hv
        .create_domain(DomainConfig {
            name: "cpuid".into(),
            vcpus: 2,
            kernel: Some(elf(&CODE)),
            cmdline: String::new(),
            ..Default::default()
        })
        .unwrap();
    let state = dom.wait(Duration::from_secs(30));
    assert_eq!(
        state,
        DomainState::Shutdown {
            reason: ShutdownReason::Poweroff,
            code: 0
        }
    );
    for vcpu in 0..2u32 {
        let mut raw = [0u8; 64];
        dom.shared()
            .ram
            .read(OUT + u64::from(vcpu) * 64, &mut raw)
            .unwrap();
        let word = |i: usize| u32::from_le_bytes(raw[i * 4..i * 4 + 4].try_into().unwrap());
        let leaves: Vec<CpuidLeaf> = (0..4)
            .map(|l| CpuidLeaf {
                function: CPUID_BASE + l as u32,
                eax: word(l * 4),
                ebx: word(l * 4 + 1),
                ecx: word(l * 4 + 2),
                edx: word(l * 4 + 3),
            })
            .collect();
        if !hypervisor::cpuid::leaves_reach_guest(hv.flavour()) {
            eprintln!(
                "note: this PVM host has no CPUID faulting: guest cpuid runs natively, \
                 checking that the guest saw the host's own leaves"
            );
            for l in &leaves {
                let host = std::arch::x86_64::__cpuid(l.function);
                assert_eq!(
                    (l.eax, l.ebx, l.ecx, l.edx),
                    (host.eax, host.ebx, host.ecx, host.edx),
                    "vCPU {vcpu}: leaf {:#x} differs from the host's",
                    l.function
                );
            }
            assert!(PlatformInfo::from_leaves(&leaves).is_none());
            continue;
        }
        let info = PlatformInfo::from_leaves(&leaves)
            .unwrap_or_else(|| panic!("vCPU {vcpu}: no Splitvisor signature in {leaves:?}"));
        assert_eq!(info.start_info_gpa, START_INFO_GPA);
        assert_eq!((info.vcpu, info.nr_vcpus), (vcpu, 2));
        assert!(
            info.features
                .contains(PlatformFeatures::START_INFO | PlatformFeatures::VCPU_INDEX)
        );
        assert!(
            !info
                .features
                .intersects(PlatformFeatures::UPCALL_GSI | PlatformFeatures::UPCALL_VECTOR)
        );
        assert_eq!(leaves[2].ecx, 0xe8, "hypercall port");
        assert_eq!(leaves[2].edx, 0xc0, "doorbell base");
    }
    dom.destroy();
}
