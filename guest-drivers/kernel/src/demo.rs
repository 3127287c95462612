//! `demo`: the README's main job. Runs the selftest (every hypervisor service), `blkverify` on
//! the first disk, and a network check on the first vif (handshake, then frames accepted by
//! dom0's netback), and exits with the number of failed checks.

use pv_protocol::netif::NetTxFlags;
use pv_protocol::start_info::StartInfo;

use crate::hcall::Cpu;
use crate::kprintln;
use crate::net::{Link, Stack, parse_ip};
use crate::netfront::NetFront;

struct Wire<'a>(&'a mut NetFront);

impl Link for Wire<'_> {
    fn send(&mut self, frame: &[u8], csum_blank: bool) -> bool {
        let flags = if csum_blank {
            NetTxFlags::CSUM_BLANK
        } else {
            NetTxFlags::empty()
        };
        self.0.send(frame, flags)
    }
}

/// Connects vif 0 and sends ARP probes; every frame must be accepted (TX response OKAY).
fn net_check(cpu: &Cpu, si: &StartInfo, cmdline: &str) -> u32 {
    let ip = crate::text::arg(cmdline, "ip")
        .and_then(parse_ip)
        .unwrap_or([10, 0, 0, 2]);
    let mut nf = match NetFront::connect(cpu, 0, 500) {
        Ok(nf) => nf,
        Err(e) => {
            kprintln!(cpu, "FAIL net-connect: {e}");
            return 1;
        }
    };
    kprintln!(cpu, "PASS net-connect vif{}", nf.devid);
    let mut st = Stack::new(nf.mac, ip);
    let target = [ip[0], ip[1], ip[2], if ip[3] == 1 { 2 } else { 1 }];
    let mut queued = 0;
    for _ in 0..8 {
        queued += u32::from(st.send_arp_request(&mut Wire(&mut nf), target));
    }
    nf.flush();
    let khz = si.tsc_khz.max(1);
    // SAFETY: rdtsc has no preconditions.
    let start = unsafe { core::arch::x86_64::_rdtsc() };
    // SAFETY: as above.
    while nf.tx_in_flight() > 0 && unsafe { core::arch::x86_64::_rdtsc() } - start < 1000 * khz {
        nf.reclaim();
        core::hint::spin_loop();
    }
    let s = nf.stats;
    let ok = queued == 8 && nf.tx_in_flight() == 0 && s.tx_errors == 0 && s.tx_bad == 0;
    kprintln!(
        cpu,
        "{} net-tx {queued} frames queued, {} in flight, {} errors",
        if ok { "PASS" } else { "FAIL" },
        nf.tx_in_flight(),
        s.tx_errors + s.tx_bad
    );
    u32::from(!ok)
}

/// The demo job; exit code = failed checks.
pub fn demo(cpu: &Cpu, si: &StartInfo, cmdline: &str) -> u32 {
    kprintln!(cpu, "demo: hypervisor services");
    let mut failed = crate::jobs::selftest(cpu, si);
    kprintln!(cpu, "demo: block device");
    failed += crate::jobs::blkverify(cpu);
    kprintln!(cpu, "demo: network");
    failed += net_check(cpu, si, cmdline);
    if failed == 0 {
        kprintln!(cpu, "demo: all checks passed");
    } else {
        kprintln!(cpu, "demo: {failed} check(s) failed");
    }
    failed
}
