//! Building a domain's initial state: kernel image, page tables, segments, start-info.
//!
//! The guest enters its 64-bit entry point directly (no firmware, no real mode): real and 32-bit
//! protected mode are emulated on PVM hosts and slow everywhere else too. Page tables identity-map
//! guest memory with 2 MiB pages and set the U/S bit at every level (PVM requires it; harmless on
//! VMX/SVM); the PML4 sits at 0x10000 so that CR3 bit 12 is clear.

use std::io::Cursor;

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::Elf;
use pv_protocol::hypercall::{ABI_VERSION_MAJOR, ABI_VERSION_MINOR, Features};
use pv_protocol::start_info::{
    CMDLINE_MAX, KERNEL_FREE_MIN, KERNEL_FREE_PER_VCPU, KERNEL_MIN_LOAD, MIN_MEM_MIB,
    START_INFO_GPA, START_INFO_MAGIC, StartFlags, StartInfo,
};
use vm_memory::GuestAddress;

use crate::memory::GuestRam;

const GDT: u64 = 0x1000;
const TSS: u64 = 0x3000;
const PML4: u64 = 0x1_0000;
const PDPT: u64 = 0x1_1000;
const PD: u64 = 0x1_2000;
/// Most memory the boot page tables can map (one page directory per GiB up to the start-info).
pub const MAX_MAPPED: u64 = 64 << 30;
const _: () = assert!(PD + (MAX_MAPPED >> 30) * 0x1000 <= START_INFO_GPA);

/// Errors from building the boot state.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image is not a loadable ELF64 x86-64 executable for this layout.
    #[error("kernel image cannot be loaded")]
    Elf(#[source] linux_loader::loader::Error),
    /// The command line does not fit.
    #[error("command line is {0} bytes, at most {max} fit", max = CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    /// The kernel ends beyond the memory the domain holds at boot.
    #[error("the kernel ends at {end:#x}, beyond the domain's memory ({limit:#x})")]
    KernelTooLarge {
        /// Its end.
        end: u64,
        /// The memory.
        limit: u64,
    },
    /// Memory size outside what the layout supports.
    #[error("memory size {0} MiB is outside 4 MiB..=64 GiB")]
    BadMemorySize(u64),
    /// Writing boot structures into guest memory failed.
    #[error("writing boot structures")]
    Memory(#[from] crate::memory::MemoryError),
    /// The kernel image's headers do not describe a 64-bit ELF whose segments fit the layout.
    #[error("kernel image: {0}")]
    BadImage(&'static str),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, BootError>;

/// The end of `kernel`'s highest loadable segment (`p_paddr + p_memsz` of its `PT_LOAD`
/// headers, zero-filled parts included), page-aligned: the memory the image takes from address 0.
/// Read from the ELF64 headers with checked reads and arithmetic (the image comes from a
/// client); a kernel without loadable segments, or with one ending past 64 GiB, is refused.
pub fn image_end(kernel: &[u8]) -> Result<u64> {
    let u16_at = |at: usize| -> Option<u64> {
        let b = kernel.get(at..at.checked_add(2)?)?;
        Some(u64::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let u32_at = |at: usize| -> Option<u32> {
        let b = kernel.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    };
    let u64_at = |at: usize| -> Option<u64> {
        let b = kernel.get(at..at.checked_add(8)?)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    };
    // e_ident: "\x7fELF", class 2 (64-bit), data 1 (little-endian).
    if kernel.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return Err(BootError::BadImage("not a little-endian ELF64 file"));
    }
    let headers = (|| {
        let phoff = usize::try_from(u64_at(0x20)?).ok()?;
        let phentsize = usize::try_from(u16_at(0x36)?).ok()?;
        let phnum = usize::try_from(u16_at(0x38)?).ok()?;
        Some((phoff, phentsize, phnum))
    })();
    let Some((phoff, phentsize, phnum)) = headers.filter(|h| h.1 >= 0x38) else {
        return Err(BootError::BadImage("no program headers"));
    };
    const PT_LOAD: u32 = 1;
    let mut end = 0u64;
    for i in 0..phnum {
        let ph = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or(BootError::BadImage("program header offset overflows"))?;
        let field = |off: usize| ph.checked_add(off);
        let (Some(ty), Some(paddr), Some(memsz)) = (
            field(0).and_then(u32_at),
            field(0x18).and_then(u64_at),
            field(0x28).and_then(u64_at),
        ) else {
            return Err(BootError::BadImage(
                "program header past the end of the file",
            ));
        };
        if ty != PT_LOAD || memsz == 0 {
            continue;
        }
        let seg_end = paddr
            .checked_add(memsz)
            .filter(|&e| e <= MAX_MAPPED)
            .ok_or(BootError::BadImage("a segment ends past 64 GiB"))?;
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err(BootError::BadImage("no loadable segment"));
    }
    Ok(end.next_multiple_of(4096))
}

/// The least memory, in bytes, a domain with `vcpus` vCPUs needs to run `kernel`: its image
/// ([`image_end`]) and what the boot ABI promises a kernel above it
/// ([`KERNEL_FREE_MIN`] and [`KERNEL_FREE_PER_VCPU`] per vCPU), rounded up to a MiB, and never
/// less than [`MIN_MEM_MIB`].
pub fn min_mem_bytes(kernel: &[u8], vcpus: u32) -> Result<u64> {
    let need = image_end(kernel)? + KERNEL_FREE_MIN + u64::from(vcpus) * KERNEL_FREE_PER_VCPU;
    Ok(need.next_multiple_of(1 << 20).max(MIN_MEM_MIB << 20))
}

/// Loads `kernel` and returns its entry point.
pub fn load_kernel(ram: &GuestRam, kernel: &[u8]) -> Result<u64> {
    load_kernel_below(ram, kernel, u64::MAX).map(|(entry, _)| entry)
}

/// Loads `kernel`, which must end at or below `limit` (the memory the domain holds at boot:
/// frames above it are absent); returns its entry point and end.
pub fn load_kernel_below(ram: &GuestRam, kernel: &[u8], limit: u64) -> Result<(u64, u64)> {
    let loaded = Elf::load(
        ram.inner(),
        None,
        &mut Cursor::new(kernel),
        Some(GuestAddress(KERNEL_MIN_LOAD)),
    )
    .map_err(BootError::Elf)?;
    if loaded.kernel_end > limit {
        return Err(BootError::KernelTooLarge {
            end: loaded.kernel_end,
            limit,
        });
    }
    Ok((loaded.kernel_load.0, loaded.kernel_end))
}

/// Writes the identity-mapping page tables, the GDT and the TSS; returns the mapped size.
pub fn write_tables(ram: &GuestRam) -> Result<u64> {
    let size = ram.size();
    if !(4 << 20..=MAX_MAPPED).contains(&size) {
        return Err(BootError::BadMemorySize(size >> 20));
    }
    let gibs = size.div_ceil(1 << 30);
    const P: u64 = 1;
    const RW: u64 = 2;
    const US: u64 = 4;
    const PS: u64 = 0x80;
    ram.write_obj(PML4, &(PDPT | P | RW | US))?;
    for g in 0..gibs {
        let pd = PD + g * 0x1000;
        ram.write_obj(PDPT + g * 8, &(pd | P | RW | US))?;
        let entries: Vec<u64> = (0..512u64)
            .map(|i| ((g << 30) + (i << 21)) | P | RW | US | PS)
            .collect();
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        ram.write(pd, &bytes)?;
    }
    // GDT: 0x10 64-bit code, 0x18 data, 0x40 TSS (16 bytes).
    ram.write_obj(GDT + 0x10, &0x00af_9b00_0000_ffff_u64)?;
    ram.write_obj(GDT + 0x18, &0x00cf_9300_0000_ffff_u64)?;
    let tss_lo = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x89 << 40) | (((TSS >> 24) & 0xff) << 56);
    ram.write_obj(GDT + 0x40, &tss_lo)?;
    ram.write_obj(GDT + 0x48, &(TSS >> 32))?;
    Ok(gibs << 30)
}

fn segment(selector: u16, type_: u8, long: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(long == 0),
        s: 1,
        l: long,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long-mode special registers for every vCPU (starting from the vCPU's current ones).
pub fn long_mode_sregs(mut s: kvm_sregs) -> kvm_sregs {
    s.cs = segment(0x10, 11, 1);
    s.ds = segment(0x18, 3, 0);
    s.es = s.ds;
    s.fs = s.ds;
    s.gs = s.ds;
    s.ss = s.ds;
    s.gdt = kvm_dtable {
        base: GDT,
        limit: 0x7f,
        padding: [0; 3],
    };
    // No IDT: the guest takes no interrupts (it blocks in sched_op), and an exception becomes a
    // triple fault, which the hypervisor reports as a crash with the registers.
    s.idt = kvm_dtable {
        base: 0,
        limit: 0,
        padding: [0; 3],
    };
    s.tr = kvm_segment {
        base: TSS,
        limit: 0x67,
        selector: 0x40,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    s.cr0 = 0x8005_0033; // PG WP AM NE ET MP PE
    s.cr3 = PML4; // bit 12 clear: PVM takes a CR3 with bit 12 set as a user page table
    s.cr4 = 0x20 | 0x200 | 0x400; // PAE OSFXSR OSXMMEXCPT (the guest uses SSE)
    s.efer = 0xd01; // NX LMA LME SCE
    s
}

/// General registers at entry: `rdi` = start-info, `rsi` = vCPU index.
pub fn entry_regs(entry: u64, vcpu: u32) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rflags: 2,
        rdi: START_INFO_GPA,
        rsi: u64::from(vcpu),
        ..Default::default()
    }
}

/// What the start-info page says.
#[derive(Debug, Clone)]
pub struct StartParams<'a> {
    /// Domain id.
    pub domid: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Bytes of memory the domain holds at boot (from 0; the rest of `ram` is absent).
    pub mem_bytes: u64,
    /// Identity-mapped bytes.
    pub mapped: u64,
    /// TSC frequency.
    pub tsc_khz: u64,
    /// Features advertised.
    pub features: Features,
    /// Flags.
    pub flags: StartFlags,
    /// Command line.
    pub cmdline: &'a str,
    /// Event-channel ports.
    pub max_ports: u32,
    /// Grant-table frames.
    pub grant_frames: u32,
}

/// Writes the start-info page.
pub fn write_start_info(ram: &GuestRam, p: &StartParams<'_>) -> Result<()> {
    let bytes = p.cmdline.as_bytes();
    if bytes.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(bytes.len()));
    }
    let mut si = StartInfo {
        magic: START_INFO_MAGIC,
        abi_major: u32::from(ABI_VERSION_MAJOR),
        abi_minor: u32::from(ABI_VERSION_MINOR),
        domid: p.domid,
        nr_vcpus: p.vcpus,
        mem_bytes: p.mem_bytes.min(ram.size()),
        mapped_bytes: p.mapped,
        tsc_khz: p.tsc_khz,
        features: u64::from(p.features.bits()),
        shared_info: pv_protocol::start_info::SHARED_INFO_GPA,
        hypercall_pages: pv_protocol::start_info::HYPERCALL_GPA,
        grant_table: pv_protocol::start_info::GRANT_TABLE_GPA,
        grant_frames: p.grant_frames,
        store_evtchn: 0,
        store_ring: pv_protocol::start_info::STORE_GPA,
        console_ring: pv_protocol::start_info::CONSOLE_GPA,
        console_evtchn: 0,
        max_ports: p.max_ports,
        flags: p.flags.bits(),
        max_mem_bytes: ram.size(),
        _reserved: [0; 15],
        cmdline: [0; CMDLINE_MAX],
    };
    si.cmdline[..bytes.len()].copy_from_slice(bytes);
    ram.write_obj(START_INFO_GPA, &si)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use pv_protocol::start_info::MAX_VCPUS;

    /// An ELF64 header with `phnum` program headers of 56 bytes right after it.
    fn elf(segments: &[(u32, u64, u64)]) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56 * segments.len()];
        f[..6].copy_from_slice(b"\x7fELF\x02\x01");
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        for (i, &(ty, paddr, memsz)) in segments.iter().enumerate() {
            let ph = 64 + 56 * i;
            f[ph..ph + 4].copy_from_slice(&ty.to_le_bytes());
            f[ph + 0x18..ph + 0x20].copy_from_slice(&paddr.to_le_bytes());
            f[ph + 0x28..ph + 0x30].copy_from_slice(&memsz.to_le_bytes());
        }
        f
    }

    #[test]
    fn the_guest_kernel_with_every_vcpu_fits_the_smallest_domain() {
        let end = image_end(guest_drivers::GUEST_KERNEL).unwrap();
        assert!(end > KERNEL_MIN_LOAD, "{end:#x}");
        assert_eq!(
            min_mem_bytes(guest_drivers::GUEST_KERNEL, MAX_VCPUS as u32).unwrap(),
            MIN_MEM_MIB << 20,
            "MIN_MEM_MIB is not the guest kernel's real minimum (image ends at {end:#x})"
        );
    }

    #[test]
    fn the_image_end_counts_zero_filled_segments_and_skips_others() {
        // A BSS-only segment (no file bytes) is where an image's end hides.
        let f = elf(&[
            (1, 0x20_0000, 0x1000),
            (6, 0x900_0000, 1),
            (1, 0x30_0000, 0x10_0001),
        ]);
        assert_eq!(image_end(&f).unwrap(), 0x40_1000);
        // 64 MiB of BSS needs 64 MiB more memory.
        let big = elf(&[(1, 0x20_0000, 64 << 20)]);
        assert_eq!(
            min_mem_bytes(&big, 1).unwrap(),
            (0x20_0000 + (64 << 20) + KERNEL_FREE_MIN + KERNEL_FREE_PER_VCPU)
                .next_multiple_of(1 << 20)
        );
    }

    #[test]
    fn broken_images_are_refused() {
        for f in [
            b"not elf".to_vec(),
            elf(&[]),
            elf(&[(1, u64::MAX - 4, 16)]),
            elf(&[(1, MAX_MAPPED, 1)]),
            elf(&[(1, 0x20_0000, 0x1000)])[..100].to_vec(),
        ] {
            assert!(
                matches!(image_end(&f), Err(BootError::BadImage(_))),
                "{:?}",
                image_end(&f)
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_images_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), phnum in 0u16..8, phoff in 0u64..300) {
            let mut f = bytes;
            if f.len() >= 0x3a {
                f[..6].copy_from_slice(b"\x7fELF\x02\x01");
                f[0x20..0x28].copy_from_slice(&phoff.to_le_bytes());
                f[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
            }
            if let Ok(end) = image_end(&f) {
                prop_assert!(end <= MAX_MAPPED && end % 4096 == 0);
            }
            let _ = min_mem_bytes(&f, u32::MAX);
        }
    }
}
