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
    CMDLINE_MAX, KERNEL_MIN_LOAD, START_INFO_GPA, START_INFO_MAGIC, StartFlags, StartInfo,
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
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, BootError>;

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
