//! A virtual network interface attached to a running domain and plugged into a switch: its store
//! entries and handshake (through [`crate::xenbus`]), then a [`VifPort`] served by the switch's
//! thread.
//!
//! A small per-vif thread runs the handshake, hands the connected port to the switch, and then
//! sleeps until the end (the front end's `Closing`, a detach, the domain's end: it is woken for
//! each, never by a timer) to unplug it, which releases the rings, the grants and the channel,
//! and to say `Closed`.

use std::sync::{Arc, OnceLock};

use hypervisor::DomainShared;
use hypervisor::evtchn::HostPort;
use hypervisor::store::Store;
use pv_protocol::netif::{NetRxRing, NetTxRing, keys};
use pv_protocol::ring::BackRing;
use pv_protocol::{PAGE_SIZE, SharedRegion};

use crate::grants::DomainGrants;
use crate::netback::{VifFeatures, VifPort};
use crate::switch::{Mac, Port, PortCounters, Switch};
use crate::xenbus::{DeviceCtx, DeviceDirs, DeviceThread, XenbusError, map_ring, state};

/// Errors attaching a vif.
#[derive(Debug, thiserror::Error)]
pub enum VifError {
    /// The store refused an entry, or the vif thread could not start.
    #[error("device handshake")]
    Xenbus(#[from] XenbusError),
}

/// An attached vif; dropping it unplugs it from the switch and detaches it.
#[derive(Debug)]
pub struct Vif {
    dev: DeviceThread,
    mac: Mac,
    counters: Arc<OnceLock<Arc<PortCounters>>>,
}

impl Vif {
    /// Attaches vif `devid` to `dom` with `mac` (a generated one when `None`), plugged into
    /// `switch` once the guest connects.
    pub fn attach(
        store: &Arc<Store>,
        dom: &Arc<DomainShared>,
        devid: u32,
        mac: Option<Mac>,
        switch: &Arc<Switch>,
    ) -> Result<Self, VifError> {
        let mac = mac.unwrap_or_else(|| Mac::generated(dom.id, devid, random_byte()));
        let dirs = DeviceDirs::new(store, "vif", dom.id, devid);
        dirs.publish(
            &[
                (keys::MAC, mac.to_string()),
                ("handle", devid.to_string()),
                ("bridge", switch.name().to_owned()),
                (keys::FEATURE_RX_COPY, "1".into()),
                (keys::FEATURE_SG, "1".into()),
                ("feature-persistent", "1".into()),
            ],
            &[(keys::MAC, mac.to_string()), ("handle", devid.to_string())],
        )?;
        let counters = Arc::new(OnceLock::new());
        let dev = {
            let (dom, switch, counters) =
                (Arc::clone(dom), Arc::clone(switch), Arc::clone(&counters));
            let name = format!("dom{}-vif{devid}", dom.id);
            DeviceThread::spawn(dirs, &Arc::clone(&dom), name, move |dirs, ctx| {
                serve(dirs, ctx, devid, mac, &switch, &counters);
            })?
        };
        Ok(Self { dev, mac, counters })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> Mac {
        self.mac
    }

    /// The port's counters, once the guest connected (they outlive the port: still readable
    /// after the switch dropped it).
    pub fn counters(&self) -> Option<Arc<PortCounters>> {
        self.counters.get().cloned()
    }

    /// The back end's current XenbusState.
    pub fn backend_state(&self) -> Option<u32> {
        self.dev.dirs().backend_state()
    }

    /// The front end's current XenbusState.
    pub fn frontend_state(&self) -> Option<u32> {
        self.dev.dirs().frontend_state()
    }
}

fn random_byte() -> u8 {
    let mut b = [0u8; 1];
    // SAFETY: getrandom writes at most one byte into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 1, 0) };
    if n == 1 {
        b[0]
    } else {
        std::process::id() as u8
    }
}

fn connect(
    dirs: &DeviceDirs,
    dom: &Arc<DomainShared>,
    devid: u32,
) -> Result<VifPort<DomainGrants, HostPort>, String> {
    let key = |k: &str| dirs.front_u32(k).ok_or_else(|| format!("no {k}"));
    let (tx_ref, rx_ref, port) = (
        key(keys::TX_RING_REF)?,
        key(keys::RX_RING_REF)?,
        key(keys::EVENT_CHANNEL)?,
    );
    if dirs.front_u32(keys::REQUEST_RX_COPY) != Some(1) {
        return Err("the front end must ask for request-rx-copy".into());
    }
    let rings = [map_ring(dom, &[tx_ref])?, map_ring(dom, &[rx_ref])?];
    // SAFETY: `rings` keeps both pages mapped and claimed for as long as it lives; it moves
    // into the port, which drops its ring endpoints before it (field order), so the
    // 'static regions never outlive the pages.
    let (txr, rxr) = unsafe {
        (
            SharedRegion::from_raw(rings[0].host_addr(), PAGE_SIZE),
            SharedRegion::from_raw(rings[1].host_addr(), PAGE_SIZE),
        )
    };
    let (txr, rxr) = (
        txr.map_err(|e| e.to_string())?,
        rxr.map_err(|e| e.to_string())?,
    );
    let tx = BackRing::<NetTxRing>::attach(txr, 1).map_err(|e| format!("tx ring: {e}"))?;
    let rx = BackRing::<NetRxRing>::attach(rxr, 1).map_err(|e| format!("rx ring: {e}"))?;
    let hp = HostPort::bind(dom, port).map_err(|e| format!("event channel {port}: {e:?}"))?;
    let grants = if dirs.front_u32("feature-persistent") == Some(1) {
        DomainGrants::persistent(Arc::clone(dom))
    } else {
        DomainGrants::new(Arc::clone(dom))
    };
    let features = VifFeatures {
        sg: dirs.front_u32(keys::FEATURE_SG) == Some(1),
        no_csum_offload: dirs.front_u32(keys::FEATURE_NO_CSUM_OFFLOAD) == Some(1),
    };
    Ok(VifPort::new(
        format!("vif{}.{devid}", dom.id),
        dom.id,
        tx,
        rx,
        grants,
        hp,
        features,
        Box::new(rings),
    ))
}

/// The vif thread: handshake, plug into the switch, wait for the end, unplug.
fn serve(
    dirs: &DeviceDirs,
    ctx: &DeviceCtx,
    devid: u32,
    mac: Mac,
    switch: &Switch,
    counters: &OnceLock<Arc<PortCounters>>,
) {
    let dom = ctx.dom();
    let waiter = match ctx.waiter() {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(domid = dom.id, "{}: {e}", dirs.frontend);
            dirs.set_state(state::CLOSED);
            return;
        }
    };
    if !ctx.wait_until(&waiter, || {
        dirs.frontend_state() == Some(state::INITIALISED)
    }) {
        dirs.set_state(state::CLOSED);
        return;
    }
    let port = match connect(dirs, dom, devid) {
        Ok(p) => p.with_source_mac(mac),
        Err(why) => {
            dom.guest_fault("vif-handshake", format_args!("{}: {why}", dirs.frontend));
            dirs.set_state(state::CLOSED);
            return;
        }
    };
    let _ = counters.set(Arc::clone(port.counters()));
    let id = match switch.add_port(Box::new(port)) {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(domid = dom.id, "{}: {e}", dirs.frontend);
            dirs.set_state(state::CLOSED);
            return;
        }
    };
    dirs.set_state(state::CONNECTED);
    tracing::info!(
        domid = dom.id,
        "{} connected to switch {}",
        dirs.frontend,
        switch.name()
    );
    // Until the front end closes, the domain stops or the device is detached.
    ctx.wait_until(&waiter, || dirs.front_closing());
    // Unplugging drops the port: its rings, then the channel and the grant mappings.
    let _ = switch.remove_port(id);
    dirs.set_state(state::CLOSED);
}
