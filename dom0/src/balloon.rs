//! The toolstack's side of ballooning, after libxl's `libxl_set_memory_target`: a domain's
//! memory target goes into its store home (`memory/target`, KiB, which its balloon follows) and
//! the hypervisor caps what the domain may hold at it (`xl mem-set` enforces the target, as xl
//! does), up to the domain's `maxmem`. The guest may read both keys, not change them; what its
//! balloon holds it reports itself in `memory/current`.

use hypervisor::DomainShared;
use hypervisor::reservation::{self, ReservationError};
use hypervisor::store::Store;
use pv_protocol::grant::DomId;
use pv_protocol::memory::{STATIC_MAX_KEY, TARGET_KEY};
use pv_protocol::store::{Perm, PermKind, StoreErrno};

/// Why a target cannot be set.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// Above the domain's `maxmem`.
    #[error("{target} MiB is more than domain {domid} may have (maxmem {max} MiB)")]
    AboveMax {
        /// The domain.
        domid: u32,
        /// Asked for.
        target: u64,
        /// Its maximum.
        max: u64,
    },
    /// The hypervisor refused the maximum.
    #[error("hypervisor")]
    Reservation(#[from] ReservationError),
    /// The store refused a key.
    #[error("store: {1:?} writing {0}")]
    Store(String, StoreErrno),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, BalloonError>;

const PAGES_PER_MIB: u64 = (1 << 20) / pv_protocol::PAGE_SIZE as u64;

fn write_ro(store: &Store, domid: u32, key: &str, kib: u64) -> Result<()> {
    let path = format!("/local/domain/{domid}/{key}");
    let fail = |e| BalloonError::Store(path.clone(), e);
    store
        .write(0, 0, &path, kib.to_string().as_bytes())
        .map_err(fail)?;
    let ro = [
        Perm {
            kind: PermKind::None,
            domid: DomId(0),
        },
        Perm {
            kind: PermKind::Read,
            domid: DomId(domid as u16),
        },
    ];
    store.set_perms(0, 0, &path, &ro).map_err(fail)
}

/// Writes a new domain's `memory/static-max` (`maxmem_mib`) and `memory/target`
/// (`memory_mib`), as libxl does at creation.
pub fn publish(store: &Store, dom: &DomainShared, memory_mib: u64, maxmem_mib: u64) -> Result<()> {
    write_ro(store, dom.id, STATIC_MAX_KEY, maxmem_mib * 1024)?;
    write_ro(store, dom.id, TARGET_KEY, memory_mib * 1024)
}

/// Sets `dom`'s target to `target_mib`: the most it may hold from now on, and what its balloon
/// is asked to reach. The maximum goes first, so that a balloon growing to a higher target is
/// not refused on the way.
pub fn set_target(store: &Store, dom: &DomainShared, target_mib: u64) -> Result<()> {
    let physmap = dom.reservation.physmap_pages();
    let pages = target_mib.saturating_mul(PAGES_PER_MIB);
    if pages > physmap {
        return Err(BalloonError::AboveMax {
            domid: dom.id,
            target: target_mib,
            max: physmap / PAGES_PER_MIB,
        });
    }
    reservation::set_max_pages(dom, pages)?;
    write_ro(store, dom.id, TARGET_KEY, target_mib * 1024)?;
    tracing::info!(domid = dom.id, target_mib, "memory target set");
    Ok(())
}
