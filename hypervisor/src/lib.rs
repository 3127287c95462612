//! Splitvisor's hypervisor: KVM domains that run the Splitvisor guest ABI.
//!
//! [`Hypervisor`] owns `/dev/kvm` and hands out [`Domain`]s. A domain is a KVM VM with memfd-backed
//! memory ([`memory`]), booted straight into its ELF kernel's 64-bit entry point ([`boot`]), with
//! one thread per vCPU ([`vcpu`]) that services hypercalls ([`hypercall`]) and keeps a console
//! ([`console`]). On PVM hosts (a software hypervisor behind `/dev/kvm`, see HOST-KVM.md) each vCPU
//! also gets its VIF page; on VMX/SVM hosts that step is skipped.
#![deny(missing_docs)]

pub mod boot;
pub mod console;
pub mod cpuid;
pub mod domain;
pub mod domid;
pub mod evtchn;
pub mod grant;
pub mod hypercall;
pub mod memory;
pub mod pvdev;
pub mod reservation;
pub mod store;
mod timer;
pub mod vcpu;

use std::sync::Arc;

use kvm_bindings::{Msrs, kvm_msr_entry, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd};
use std::mem::offset_of;

use pv_protocol::start_info::{
    MAX_GRANT_FRAMES, MAX_VCPUS, START_INFO_GPA, StartFlags, StartInfo, vif_page,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub use console::Console;
pub use domain::{
    Domain, DomainShared, DomainState, LifecycleError, VcpuError, VcpuInfo, VcpuState,
};

const MSR_PVM_VIF: u32 = 0x4b56_4d10;
const MSR_PVM_ID: u32 = 0x4b56_4d11;
const PVM_ID: u64 = 0x4d_5650; // "PVM"

/// Errors from the hypervisor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm (is KVM available to this user?)")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A KVM call failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Bad domain configuration.
    #[error("bad domain configuration: {0}")]
    Config(String),
    /// Guest memory.
    #[error("guest memory")]
    Memory(#[from] memory::MemoryError),
    /// Boot structures.
    #[error("boot")]
    Boot(#[from] boot::BootError),
    /// Spawning a vCPU thread.
    #[error("cannot spawn a vCPU thread")]
    Thread(#[source] std::io::Error),
    /// No domain id to give.
    #[error("domain id")]
    Domid(#[from] domid::DomidError),
    /// Less memory than the kernel needs ([`boot::min_mem_bytes`]).
    #[error("{mem_mib} MiB of memory is too little: the kernel needs at least {need_mib} MiB")]
    MemoryTooSmall {
        /// What was asked for.
        mem_mib: u64,
        /// The least that runs the kernel with this many vCPUs.
        need_mib: u64,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Most memory a domain may have, MiB (1 TiB): `mem_mib << 20` stays far inside a `u64`.
pub const MAX_MEM_MIB: u64 = 1 << 20;

/// What kind of KVM this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmFlavour {
    /// A PVM software hypervisor: the native-speed recipe applies.
    Pvm,
    /// Hardware virtualization (VMX/SVM).
    Hardware,
}

/// How to build a domain.
#[derive(Debug, Clone)]
pub struct DomainConfig {
    /// Name.
    pub name: String,
    /// Memory in MiB the domain holds at boot.
    pub mem_mib: u64,
    /// Size of its physical map in MiB (xl.cfg's `maxmem`), at least `mem_mib`: it may populate
    /// frames up to here ([`reservation`]). `None`: `mem_mib`.
    pub max_mem_mib: Option<u64>,
    /// vCPUs.
    pub vcpus: u32,
    /// ELF64 kernel image (default: the one the [`Hypervisor`] was opened with).
    pub kernel: Option<Vec<u8>>,
    /// Command line for the guest.
    pub cmdline: String,
    /// Create paused.
    pub start_paused: bool,
    /// Event-channel ports (1..=4096).
    pub max_ports: u32,
    /// Grant-table frames of 512 entries (1..=64).
    pub grant_frames: u32,
    /// Echo console output to this process's stderr as it arrives.
    pub echo_console: bool,
    /// Host CPUs every vCPU may run on (`None`: all), as xl.cfg's `cpus`.
    pub cpus: Option<Vec<u32>>,
}

impl Default for DomainConfig {
    fn default() -> Self {
        Self {
            name: "domain".into(),
            mem_mib: 64,
            max_mem_mib: None,
            vcpus: 1,
            kernel: None,
            cmdline: "selftest".into(),
            start_paused: false,
            echo_console: false,
            max_ports: evtchn::DEFAULT_MAX_PORTS,
            grant_frames: grant::DEFAULT_GRANT_FRAMES,
            cpus: None,
        }
    }
}

/// The hypervisor: `/dev/kvm` and the domain ids it hands out.
#[derive(Debug)]
pub struct Hypervisor {
    kvm: Kvm,
    flavour: KvmFlavour,
    domids: Arc<domid::DomidPool>,
    registry: Arc<evtchn::Registry>,
    store: Arc<store::Store>,
    timers: timer::Timers,
    /// The kernel a domain boots when its configuration names none: the toolstack's choice.
    default_kernel: &'static [u8],
}

impl Hypervisor {
    /// Opens `/dev/kvm` and detects the flavour; domain ids come from all of
    /// [`domid::RANGE`], reused [`domid::REUSE_AFTER`] after their domain is gone. A domain
    /// whose configuration names no kernel boots `default_kernel` (an ELF64 image).
    pub fn new(default_kernel: &'static [u8]) -> Result<Self> {
        Self::with_domids(default_kernel, domid::DomidPool::standard())
    }

    /// As [`new`](Self::new), with domain ids from `domids` (a small range or a short reuse
    /// delay, for tests).
    pub fn with_domids(
        default_kernel: &'static [u8],
        domids: Arc<domid::DomidPool>,
    ) -> Result<Self> {
        let kvm = Kvm::new().map_err(Error::NoKvm)?;
        vcpu::init_kick();
        let flavour = detect_flavour(&kvm);
        tracing::info!(?flavour, "KVM opened");
        Ok(Self {
            kvm,
            flavour,
            domids,
            registry: Arc::default(),
            store: Arc::default(),
            timers: timer::Timers::default(),
            default_kernel,
        })
    }

    /// Where domain ids come from.
    pub fn domids(&self) -> &Arc<domid::DomidPool> {
        &self.domids
    }

    /// PVM or hardware.
    pub fn flavour(&self) -> KvmFlavour {
        self.flavour
    }

    /// The config store (dom0's in-process API: call it with domid 0).
    pub fn store(&self) -> &Arc<store::Store> {
        &self.store
    }

    /// The live domain `id`.
    pub fn domain(&self, id: u32) -> Option<Arc<DomainShared>> {
        self.registry.get(id)
    }

    /// Creates and (unless asked to start paused) starts a domain.
    pub fn create_domain(&self, cfg: DomainConfig) -> Result<Domain> {
        if !(1..=pv_protocol::evtchn::MAX_PORTS_2L).contains(&cfg.max_ports) {
            return Err(Error::Config(format!(
                "max_ports = {} (1..={})",
                cfg.max_ports,
                pv_protocol::evtchn::MAX_PORTS_2L
            )));
        }
        if cfg.grant_frames == 0 || cfg.grant_frames as usize > MAX_GRANT_FRAMES {
            return Err(Error::Config(format!(
                "grant_frames = {} (1..={MAX_GRANT_FRAMES})",
                cfg.grant_frames
            )));
        }
        if cfg.vcpus == 0 || cfg.vcpus as usize > MAX_VCPUS {
            return Err(Error::Config(format!(
                "vcpus = {} (1..={MAX_VCPUS})",
                cfg.vcpus
            )));
        }
        if let Some(c) = &cfg.cpus {
            domain::check_cpus(c).map_err(|e| Error::Config(format!("cpus: {e}")))?;
        }
        if cfg.mem_mib == 0 || cfg.mem_mib > MAX_MEM_MIB {
            return Err(Error::Config(format!(
                "mem_mib = {} (1..={MAX_MEM_MIB})",
                cfg.mem_mib
            )));
        }
        let max_mem_mib = cfg.max_mem_mib.unwrap_or(cfg.mem_mib);
        if !(cfg.mem_mib..=MAX_MEM_MIB).contains(&max_mem_mib) {
            return Err(Error::Config(format!(
                "max_mem_mib = {max_mem_mib} ({}..={MAX_MEM_MIB})",
                cfg.mem_mib
            )));
        }
        let kernel = cfg.kernel.as_deref().unwrap_or(self.default_kernel);
        // A kernel must fit the memory the domain holds at boot, with the room the boot ABI
        // promises it: a guest running outside its memory would only crash (see `vcpu`), or with
        // maxmem use frames it does not hold, so it is refused before anything is built.
        let need = boot::min_mem_bytes(kernel, cfg.vcpus)?;
        if cfg.mem_mib << 20 < need {
            return Err(Error::MemoryTooSmall {
                mem_mib: cfg.mem_mib,
                need_mib: need >> 20,
            });
        }
        // Held by the DomainShared (its last field): the id is free again only once everything
        // of this domain is gone, and is then reused only after the pool's delay.
        let lease = self.domids.allocate()?;
        let id = lease.id();
        let ram = memory::GuestRam::new(max_mem_mib << 20)?;
        // With maxmem, frames above `mem_mib` are absent: the image must lie below them (it
        // does: `need` above counts it; loading checks again).
        let (entry, _) = boot::load_kernel_below(&ram, kernel, cfg.mem_mib << 20)?;
        let mapped = boot::write_tables(&ram)?;

        let vm = self
            .kvm
            .create_vm()
            .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.host_base(),
        };
        // SAFETY: the region is `ram`'s live mapping; `ram` lives in the DomainShared that the
        // vCPU threads hold, and the VmFd (kept by the Domain) is dropped only after they exit.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;

        let mut vcpus = Vec::new();
        for i in 0..cfg.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(i))
                .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
            self.setup_vcpu(&vcpu, i, cfg.vcpus, entry)?;
            vcpus.push(vcpu);
        }
        let tsc_khz = vcpus[0]
            .get_tsc_khz()
            .map(u64::from)
            .unwrap_or_else(|_| host_tsc_khz());
        let mut flags = StartFlags::empty();
        if self.flavour == KvmFlavour::Pvm {
            flags |= StartFlags::PVM_HOST;
        }
        boot::write_start_info(
            &ram,
            &boot::StartParams {
                domid: id,
                vcpus: cfg.vcpus,
                mem_bytes: cfg.mem_mib << 20,
                mapped,
                tsc_khz,
                features: hypercall::features(),
                flags,
                cmdline: &cfg.cmdline,
                max_ports: cfg.max_ports,
                grant_frames: cfg.grant_frames,
            },
        )?;

        let echo: Option<console::Echo> = cfg.echo_console.then(|| {
            Box::new(|b: &[u8]| {
                use std::io::Write;
                let _ = std::io::stderr().write_all(b);
            }) as console::Echo
        });
        let pvdev_stop = Arc::new(
            EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Thread(std::io::Error::other(e)))?,
        );
        let shared = Arc::new(DomainShared::new(
            vm,
            Arc::clone(&self.registry),
            Arc::clone(&self.store),
            pvdev_stop,
            self.timers.clone(),
            lease,
            &cfg,
            ram,
            Console::new(echo),
        ));
        // Ports other domains offered to this id while nobody had it are not this domain's to
        // bind (Xen refuses such offers; here they are dropped before the domain can run).
        evtchn::forget_domain(&self.registry, id);
        self.registry.insert(&shared);
        // From here a failure tears down what was built (store home, ports, threads started).
        let mut dom = Domain {
            shared,
            threads: Vec::new(),
            pvdev: None,
            torn_down: false,
        };
        dom.pvdev = Some(self.start_pv_devices(&dom.shared)?);
        if cfg.start_paused {
            let mut g = dom.shared.lock();
            g.state = DomainState::Paused;
            g.pause_requested = true;
        }
        for (i, vcpu) in vcpus.into_iter().enumerate() {
            let shared = Arc::clone(&dom.shared);
            let t = std::thread::Builder::new()
                .name(format!("dom{id}-vcpu{i}"))
                .spawn(move || vcpu::run_loop(shared, vcpu, i as u32))
                .map_err(Error::Thread)?;
            dom.threads.push(t);
        }
        tracing::info!(domid = id, name = %cfg.name, vcpus = cfg.vcpus, mem_mib = cfg.mem_mib,
            "domain created");
        Ok(dom)
    }

    /// Offers the store and console rings' ports to dom0, binds them, tells the guest their
    /// numbers (start-info), introduces the domain to the store and starts their service thread.
    fn start_pv_devices(&self, d: &Arc<DomainShared>) -> Result<std::thread::JoinHandle<()>> {
        let port = |what| {
            let p = evtchn::alloc_unbound(d, evtchn::DOM0)
                .map_err(|e| Error::Config(format!("{what} port: {e:?}")))?;
            let hp = evtchn::HostPort::bind(d, p)
                .map_err(|e| Error::Config(format!("{what} port: {e:?}")))?;
            Ok::<_, Error>((p, hp))
        };
        let (sp, store_port) = port("store")?;
        let (cp, console_port) = port("console")?;
        d.ram.write_obj(
            START_INFO_GPA + offset_of!(StartInfo, store_evtchn) as u64,
            &sp,
        )?;
        d.ram.write_obj(
            START_INFO_GPA + offset_of!(StartInfo, console_evtchn) as u64,
            &cp,
        )?;
        let wake = Arc::new(
            EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Thread(std::io::Error::other(e)))?,
        );
        let input_waker = Arc::clone(&wake);
        d.console.set_input_waker(Box::new(move || {
            let _ = input_waker.write(1);
        }));
        let waker = Arc::clone(&wake);
        self.store.introduce(
            d.id,
            &d.name,
            Box::new(move || {
                let _ = waker.write(1);
            }),
        );
        let devs = pvdev::PvDevs {
            store_port,
            console_port,
            wake,
            stop: Arc::clone(&d.pvdev_stop),
        };
        let (dom, store) = (Arc::clone(d), Arc::clone(&self.store));
        std::thread::Builder::new()
            .name(format!("dom{}-pvdev", d.id))
            .spawn(move || pvdev::run(dom, store, devs))
            .map_err(Error::Thread)
    }

    fn setup_vcpu(&self, vcpu: &VcpuFd, index: u32, nr_vcpus: u32, entry: u64) -> Result<()> {
        cpuid::setup(vcpu, index, nr_vcpus)?;
        if self.flavour == KvmFlavour::Pvm {
            // PVM: register the vCPU's VIF page, or supervisor code is emulated.
            let msrs = Msrs::from_entries(&[kvm_msr_entry {
                index: MSR_PVM_VIF,
                data: vif_page(index) | 1,
                ..Default::default()
            }])
            .map_err(|_| Error::Config("MSR list".into()))?;
            let n = vcpu
                .set_msrs(&msrs)
                .map_err(|e| Error::Kvm("KVM_SET_MSRS (PVM VIF page)", e))?;
            if n != 1 {
                return Err(Error::Config("PVM VIF MSR rejected".into()));
            }
        }
        let sregs = vcpu
            .get_sregs()
            .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
        vcpu.set_sregs(&boot::long_mode_sregs(sregs))
            .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
        vcpu.set_regs(&boot::entry_regs(entry, index))
            .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
        Ok(())
    }
}

/// PVM iff the module is loaded and a probe vCPU reports the PVM id MSR.
fn detect_flavour(kvm: &Kvm) -> KvmFlavour {
    if !std::path::Path::new("/sys/module/kvm_pvm").exists() {
        return KvmFlavour::Hardware;
    }
    let probe = || -> Option<u64> {
        let vm = kvm.create_vm().ok()?;
        let vcpu = vm.create_vcpu(0).ok()?;
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_PVM_ID,
            ..Default::default()
        }])
        .ok()?;
        (vcpu.get_msrs(&mut msrs).ok()? == 1).then(|| msrs.as_slice()[0].data)
    };
    if probe() == Some(PVM_ID) {
        KvmFlavour::Pvm
    } else {
        KvmFlavour::Hardware
    }
}

/// TSC frequency measured against the monotonic clock (when KVM does not report it).
fn host_tsc_khz() -> u64 {
    // SAFETY: rdtsc has no preconditions.
    let t0 = unsafe { core::arch::x86_64::_rdtsc() };
    let s = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_millis(20));
    // SAFETY: as above.
    let t1 = unsafe { core::arch::x86_64::_rdtsc() };
    ((t1 - t0) as f64 / s.elapsed().as_secs_f64() / 1000.0) as u64
}
