//! Boot ABI: how the hypervisor lays out a new domain and what it tells the guest at entry.
//!
//! The VMM loads the guest's ELF64 kernel at its physical load addresses, builds identity-mapped
//! page tables (every level user-accessible, as PVM hosts require), and enters the kernel's 64-bit
//! entry point on every vCPU with `rdi` = guest address of the [`StartInfo`] page and `rsi` = the
//! vCPU index. Guest virtual addresses equal guest physical addresses below the mapped limit.
//!
//! The fixed guest-physical layout below 2 MiB (the kernel itself loads at or above
//! [`KERNEL_MIN_LOAD`]):
//!
//! | GPA | what |
//! |---|---|
//! | `0x1000` | GDT |
//! | `0x3000` | TSS |
//! | `0x10000..` | page tables (PML4 first; bit 12 of CR3 stays clear) |
//! | [`START_INFO_GPA`] | start-info page (read-only by convention) |
//! | [`SHARED_INFO_GPA`] | shared-info page: event pending/mask bitmaps, per-vCPU flags |
//! | [`CONSOLE_GPA`] | console ring page |
//! | [`STORE_GPA`] | store ring page |
//! | [`HYPERCALL_GPA`] | one hypercall page per vCPU |
//! | [`VIF_GPA`] | one PVM "VIF" page per vCPU (PVM hosts only) |
//! | [`GRANT_TABLE_GPA`] | grant table frames |

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::PAGE_SIZE;

/// Magic at the start of [`StartInfo`].
pub const START_INFO_MAGIC: [u8; 16] = *b"splitvisor-abi\0\0";
/// Maximum vCPUs per domain (bounded by the per-vCPU page arrays below).
pub const MAX_VCPUS: usize = 32;
/// Maximum grant-table frames per domain.
pub const MAX_GRANT_FRAMES: usize = 64;
/// Maximum command-line length, including the terminating NUL.
pub const CMDLINE_MAX: usize = 1024;

/// Guest address of the start-info page.
pub const START_INFO_GPA: u64 = 0x10_0000;
/// Guest address of the shared-info page.
pub const SHARED_INFO_GPA: u64 = 0x10_1000;
/// Guest address of the console ring page.
pub const CONSOLE_GPA: u64 = 0x10_2000;
/// Guest address of the store ring page.
pub const STORE_GPA: u64 = 0x10_3000;
/// Guest address of vCPU 0's hypercall page; vCPU `i`'s is `i` pages further.
pub const HYPERCALL_GPA: u64 = 0x10_4000;
/// Guest address of vCPU 0's PVM VIF page; vCPU `i`'s is `i` pages further.
pub const VIF_GPA: u64 = HYPERCALL_GPA + (MAX_VCPUS * PAGE_SIZE) as u64;
/// Guest address of the first grant-table frame.
pub const GRANT_TABLE_GPA: u64 = VIF_GPA + (MAX_VCPUS * PAGE_SIZE) as u64;
/// Lowest address a kernel segment may load at.
pub const KERNEL_MIN_LOAD: u64 = 0x20_0000;

/// Memory a domain must have free above its kernel's highest loaded address (page-aligned), on
/// top of [`KERNEL_FREE_PER_VCPU`] per vCPU: as Xen guarantees a PV kernel free space beyond its
/// boot structures, the hypervisor refuses a domain whose memory cannot leave this much. The
/// Splitvisor guest kernel lays out its boot stacks there (one [`KERNEL_FREE_PER_VCPU`] each),
/// then its heap, which holds every device page it grants (a disk takes 1.1 MiB, a network
/// interface 1.6 MiB): 4 MiB run any one of its jobs, the hotplug job with two vifs included.
pub const KERNEL_FREE_MIN: u64 = 4 << 20;
/// Memory a domain must have free above its kernel per vCPU (the guest kernel's boot stack).
pub const KERNEL_FREE_PER_VCPU: u64 = 64 << 10;
/// The smallest domain, in MiB, whatever its vCPU count: the Splitvisor guest kernel, its
/// [`MAX_VCPUS`] stacks and [`KERNEL_FREE_MIN`] fit (the hypervisor's tests check it against the
/// built image). The toolstack refuses less; the hypervisor also checks each kernel image.
pub const MIN_MEM_MIB: u64 = 9;

const _: () = assert!(GRANT_TABLE_GPA + (MAX_GRANT_FRAMES * PAGE_SIZE) as u64 <= KERNEL_MIN_LOAD);

/// Guest address of vCPU `vcpu`'s hypercall page.
pub const fn hypercall_page(vcpu: u32) -> u64 {
    HYPERCALL_GPA + vcpu as u64 * PAGE_SIZE as u64
}

/// Guest address of vCPU `vcpu`'s VIF page.
pub const fn vif_page(vcpu: u32) -> u64 {
    VIF_GPA + vcpu as u64 * PAGE_SIZE as u64
}

/// What the guest learns at boot (Xen's `start_info`), at [`START_INFO_GPA`].
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct StartInfo {
    /// [`START_INFO_MAGIC`].
    pub magic: [u8; 16],
    /// [`crate::hypercall::ABI_VERSION_MAJOR`].
    pub abi_major: u32,
    /// [`crate::hypercall::ABI_VERSION_MINOR`].
    pub abi_minor: u32,
    /// This domain's id.
    pub domid: u32,
    /// Number of vCPUs (each enters the kernel with its index in `rsi`).
    pub nr_vcpus: u32,
    /// Bytes of guest memory the domain holds at boot, from address 0.
    pub mem_bytes: u64,
    /// Guest addresses below this are identity-mapped.
    pub mapped_bytes: u64,
    /// TSC frequency in kHz (the time source).
    pub tsc_khz: u64,
    /// [`crate::hypercall::Features`] bits.
    pub features: u64,
    /// Shared-info page.
    pub shared_info: u64,
    /// vCPU 0's hypercall page; vCPU `i` at `+ i * PAGE_SIZE`.
    pub hypercall_pages: u64,
    /// First grant-table frame (the guest writes its grant entries there).
    pub grant_table: u64,
    /// Grant-table frames (512 entries each).
    pub grant_frames: u32,
    /// Event-channel port of the store ring.
    pub store_evtchn: u32,
    /// Store ring page.
    pub store_ring: u64,
    /// Console ring page.
    pub console_ring: u64,
    /// Event-channel port of the console ring.
    pub console_evtchn: u32,
    /// Number of event-channel ports this domain may use.
    pub max_ports: u32,
    /// Flags ([`StartFlags`] bits).
    pub flags: u64,
    /// Size of the domain's physical map (xl.cfg's `maxmem`), at least `mem_bytes`: frames
    /// from `mem_bytes` up to here exist but hold no memory until populated
    /// ([`crate::memory`]). Zero from hypervisors before ABI 0.2: then `mem_bytes`.
    pub max_mem_bytes: u64,
    /// Reserved for later extension; zero.
    pub _reserved: [u64; 15],
    /// NUL-terminated command line.
    pub cmdline: [u8; CMDLINE_MAX],
}

const _: () = assert!(size_of::<StartInfo>() == 1280);
const _: () = assert!(offset_of!(StartInfo, abi_major) == 16);
const _: () = assert!(offset_of!(StartInfo, domid) == 24);
const _: () = assert!(offset_of!(StartInfo, mem_bytes) == 32);
const _: () = assert!(offset_of!(StartInfo, mapped_bytes) == 40);
const _: () = assert!(offset_of!(StartInfo, tsc_khz) == 48);
const _: () = assert!(offset_of!(StartInfo, features) == 56);
const _: () = assert!(offset_of!(StartInfo, shared_info) == 64);
const _: () = assert!(offset_of!(StartInfo, hypercall_pages) == 72);
const _: () = assert!(offset_of!(StartInfo, grant_table) == 80);
const _: () = assert!(offset_of!(StartInfo, grant_frames) == 88);
const _: () = assert!(offset_of!(StartInfo, store_evtchn) == 92);
const _: () = assert!(offset_of!(StartInfo, store_ring) == 96);
const _: () = assert!(offset_of!(StartInfo, console_ring) == 104);
const _: () = assert!(offset_of!(StartInfo, console_evtchn) == 112);
const _: () = assert!(offset_of!(StartInfo, max_ports) == 116);
const _: () = assert!(offset_of!(StartInfo, flags) == 120);
const _: () = assert!(offset_of!(StartInfo, max_mem_bytes) == 128);
const _: () = assert!(offset_of!(StartInfo, _reserved) == 136);
const _: () = assert!(offset_of!(StartInfo, cmdline) == 256);
const _: () = assert!(size_of::<StartInfo>() <= PAGE_SIZE);

bitflags::bitflags! {
    /// [`StartInfo::flags`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct StartFlags: u64 {
        /// The host is a PVM software hypervisor (the guest must use the VIF page, not `sti`).
        const PVM_HOST = 1 << 0;
        /// This is the control domain.
        const PRIVILEGED = 1 << 1;
    }
}

impl StartInfo {
    /// The command line up to its NUL (empty if it is not valid UTF-8).
    pub fn cmdline(&self) -> &str {
        let end = self
            .cmdline
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(CMDLINE_MAX);
        core::str::from_utf8(&self.cmdline[..end]).unwrap_or("")
    }

    /// Bytes of the physical map: [`max_mem_bytes`](Self::max_mem_bytes), or `mem_bytes` when a
    /// hypervisor does not say.
    pub fn physmap_bytes(&self) -> u64 {
        self.max_mem_bytes.max(self.mem_bytes)
    }

    /// Whether the magic and major ABI version match this crate's.
    pub fn is_compatible(&self) -> bool {
        self.magic == START_INFO_MAGIC
            && self.abi_major == u32::from(crate::hypercall::ABI_VERSION_MAJOR)
    }
}

/// Per-vCPU part of the shared-info page.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct VcpuInfo {
    /// Set by the host when an unmasked event became pending for this vCPU; the guest clears it.
    pub upcall_pending: u8,
    /// Set by the guest to ask for no upcalls (events are still marked pending).
    pub upcall_mask: u8,
    /// Padding.
    pub _pad: [u8; 6],
    /// Selector: bit `w` set means word `w` of the pending bitmap may have bits set.
    pub pending_sel: u64,
}

const _: () = assert!(size_of::<VcpuInfo>() == 16);

/// The shared-info page (Xen's `shared_info`): 2-level event-channel bitmaps, at
/// [`SHARED_INFO_GPA`]. The host sets pending bits; the guest clears them and owns the mask.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct SharedInfo {
    /// Per-vCPU flags.
    pub vcpu_info: [VcpuInfo; MAX_VCPUS],
    /// Pending bitmap, one bit per port ([`crate::evtchn::MAX_PORTS_2L`] ports).
    pub evtchn_pending: [u64; 64],
    /// Mask bitmap, one bit per port.
    pub evtchn_mask: [u64; 64],
}

const _: () = assert!(size_of::<SharedInfo>() == 512 + 512 + 512);
const _: () = assert!(offset_of!(SharedInfo, evtchn_pending) == 512);
const _: () = assert!(offset_of!(SharedInfo, evtchn_mask) == 1024);
const _: () = assert!(size_of::<SharedInfo>() <= PAGE_SIZE);
