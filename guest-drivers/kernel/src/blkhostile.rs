//! `blkhostile [N]`: a hostile block front end for soak tests. Against a real attached disk it
//! runs until the toolstack asks it to shut down, and each pass goes through the attacks a
//! block back end must survive without hurting the host or its other guests:
//!
//! 1. **Completion flood**: keeps the ring full of indirect requests of 256 segments, none of
//!    which continues the previous one in memory (every segment is its own I/O on the host),
//!    two rings' worth, reads and writes mixed. All must succeed.
//! 2. **Malformed requests**: unknown and unsupported operations, segments past their page,
//!    empty and oversized segment lists, sector ranges past the disk or wrapping, references
//!    never granted or outside the table, a disk read into a read-only grant, indirect requests
//!    with too many segments, a bad inner operation, an ungranted indirect page, bad segments in
//!    the indirect page, discards of nothing or past the end. Each must get its defined error
//!    status, and good requests between them must still succeed.
//! 3. **Grant churn**: uses [`CHURN_GRANTS`] distinct grants (more than a back end keeps
//!    mapped persistently) one after the other, then revokes them all: at least the surplus over
//!    the back end's bound must be revocable (the back end let go of the least recently used),
//!    and a request naming a revoked grant must fail. Revoked grants are granted again for the
//!    next pass.
//! 4. **Verified I/O**: writes a pattern, reads it back into other pages and compares.
//!
//! Every answer is checked against what it must be; a missing answer (none within
//! [`ANSWER_TIMEOUT_MS`]) counts as unexpected too. Every `N` passes (default 10) it prints
//! `blkhostile: pass P, R requests, E refused as expected, U unexpected`.

use pv_protocol::blkif::{
    BlkOp, BlkRequest, BlkSegment, BlkStatus, BlkifRequestRaw, DirectSegments, IndirectGrefs,
    IndirectOp, verify_pattern, write_indirect_page,
};
use pv_protocol::grant::GrantRef;
use pv_protocol::{PAGE_SIZE, SECTOR_SIZE};

use core::sync::atomic::{AtomicUsize, Ordering};

use crate::blkfront::{BlkFront, DATA_GREF, DATA_PAGES, data_page};
use crate::console::LineInput;
use crate::control;
use crate::hcall::Cpu;
use crate::kprintln;
use crate::text::parse_u32;

/// Indirect pages: one per request in flight (a ring has at most 128 slots here).
const IND_PAGES: usize = 128;
/// Grant ref of indirect page 0 (read-only grants: the back end only reads them).
const IND_GREF: u32 = 9000;
/// First grant ref of the churned grants.
const CHURN_GREF: u32 = 10_000;
/// Distinct grants churned per pass: more than a back end's persistent bound.
const CHURN_GRANTS: u32 = 1500;
/// The persistent grants a back end keeps per ring at most (Linux blkback's default, which
/// dom0's back end follows): at least `CHURN_GRANTS` minus this must be revocable after a churn.
const BACKEND_PERSISTENT_BOUND: u32 = 1056;
/// Pages the churned grants point at (several grants per page).
const CHURN_PAGES: usize = 8;
/// A reference inside the table that is never granted.
const UNGRANTED: u32 = 15_000;
/// A reference beyond the grant table.
const OUTSIDE_TABLE: u32 = 1 << 20;
/// How long one answer may take before it counts as missing.
const ANSWER_TIMEOUT_MS: u64 = 10_000;

const _: () = assert!(CHURN_GREF + CHURN_GRANTS <= UNGRANTED);
const _: () = assert!(IND_GREF + IND_PAGES as u32 <= CHURN_GREF);

/// The indirect pages and the churned pages: heap pages allocated when the job starts.
static IND: AtomicUsize = AtomicUsize::new(0);
static CHURN: AtomicUsize = AtomicUsize::new(0);

fn ind_page(i: usize) -> *mut [u8; PAGE_SIZE] {
    // Relaxed: set once by this job (vCPU 0) before any use.
    (IND.load(Ordering::Relaxed) + i.min(IND_PAGES - 1) * PAGE_SIZE) as *mut [u8; PAGE_SIZE]
}

fn churn_page(i: usize) -> u64 {
    // Relaxed: as in `ind_page`.
    (CHURN.load(Ordering::Relaxed) + i % CHURN_PAGES * PAGE_SIZE) as u64
}

/// What an answer must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Okay,
    Error,
    NotSupported,
}

impl Expect {
    fn matches(self, s: BlkStatus) -> bool {
        matches!(
            (self, s),
            (Expect::Okay, BlkStatus::Okay)
                | (Expect::Error, BlkStatus::Error)
                | (Expect::NotSupported, BlkStatus::NotSupported)
        )
    }
}

/// Counts of the whole run.
#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    refused: u64,
    unexpected: u64,
}

/// The requests in flight, by tag (the low 8 bits of the id; also the indirect page a request
/// may use).
struct Hostile<'a> {
    cpu: &'a Cpu,
    disk: BlkFront,
    /// Tags usable at once: the ring's slots, at most [`IND_PAGES`].
    tags: usize,
    ids: [u64; IND_PAGES],
    expect: [Option<Expect>; IND_PAGES],
    outstanding: usize,
    seq: u64,
    t: Tally,
    input: LineInput,
    /// Unexpected results reported on the console so far (the first few are).
    reported: u32,
}

/// How many unexpected results are described on the console (all are counted).
const REPORT_LIMIT: u32 = 20;

fn seg(gref: u32, first: u8, last: u8) -> BlkSegment {
    BlkSegment {
        gref: GrantRef(gref),
        first_sect: first,
        last_sect: last,
    }
}

fn direct(write: bool, sector: u64, segs: &[BlkSegment]) -> BlkifRequestRaw {
    let mut d = DirectSegments::new();
    for &s in segs {
        let _ = d.try_push(s);
    }
    BlkRequest::data(write, 0, 0, sector, d).to_raw()
}

fn indirect(write: bool, sector: u64, nr_segments: u16, page_gref: u32) -> BlkifRequestRaw {
    let mut pages = IndirectGrefs::new();
    let _ = pages.try_push(GrantRef(page_gref));
    BlkRequest::Indirect {
        id: 0,
        handle: 0,
        op: if write {
            IndirectOp::Write
        } else {
            IndirectOp::Read
        },
        sector,
        nr_segments,
        pages,
    }
    .to_raw()
}

impl Hostile<'_> {
    fn unexpected(&mut self, what: core::fmt::Arguments<'_>) {
        self.t.unexpected += 1;
        if self.reported < REPORT_LIMIT {
            self.reported += 1;
            kprintln!(self.cpu, "blkhostile: unexpected: {what}");
        }
    }

    /// A free tag, waiting for an answer if every one is in use.
    fn tag(&mut self) -> Option<usize> {
        loop {
            if let Some(t) = (0..self.tags).find(|&t| self.expect[t].is_none()) {
                return Some(t);
            }
            if !self.collect() {
                return None;
            }
        }
    }

    /// Publishes `raw` (its id set here) under `tag`, whose answer must be `expect`.
    fn issue(&mut self, tag: usize, mut raw: BlkifRequestRaw, expect: Expect) {
        self.seq += 1;
        let id = (self.seq << 8) | tag as u64;
        raw.id = id;
        if !self.disk.push_raw(0, &raw) {
            let n = self.outstanding;
            self.unexpected(format_args!("ring full with {n} in flight"));
            return;
        }
        self.disk.kick(0);
        self.ids[tag] = id;
        self.expect[tag] = Some(expect);
        self.outstanding += 1;
        self.t.requests += 1;
    }

    /// Takes one answer and checks it; `false` if none came in time (then every request still
    /// in flight is given up as unexpected).
    fn collect(&mut self) -> bool {
        if self.outstanding == 0 {
            return true;
        }
        self.input.pump(self.cpu);
        control::poll(self.cpu);
        let deadline = control::rdtsc() + control::ticks(ANSWER_TIMEOUT_MS);
        let got = self.disk.wait_until(self.cpu, 0, deadline);
        let (id, status) = match got {
            Some(Ok(a)) => a,
            Some(Err(id)) => {
                self.unexpected(format_args!("an answer to {id:#x} that does not parse"));
                self.release(id);
                return true;
            }
            None => {
                let n = self.outstanding;
                self.unexpected(format_args!("{n} requests unanswered"));
                self.t.unexpected += n as u64 - 1;
                self.expect = [None; IND_PAGES];
                self.outstanding = 0;
                return false;
            }
        };
        let tag = (id & 0xff) as usize;
        match self.release(id) {
            Some(e) if e.matches(status) => {
                if e != Expect::Okay {
                    self.t.refused += 1;
                }
            }
            Some(e) => self.unexpected(format_args!("request {id:#x}: {status:?}, not {e:?}")),
            None => self.unexpected(format_args!("an answer to {id:#x} (tag {tag}), not asked")),
        }
        true
    }

    /// Frees the tag of `id` if `id` is in flight under it; what it was expected to answer.
    fn release(&mut self, id: u64) -> Option<Expect> {
        let tag = (id & 0xff) as usize;
        if tag >= IND_PAGES || self.ids[tag] != id {
            return None;
        }
        let e = self.expect[tag].take()?;
        self.outstanding -= 1;
        Some(e)
    }

    fn drain(&mut self) {
        while self.outstanding > 0 && self.collect() {}
    }

    /// One request (a tag is waited for if needed).
    fn one(&mut self, raw: BlkifRequestRaw, expect: Expect) {
        if let Some(t) = self.tag() {
            self.issue(t, raw, expect);
        }
    }

    /// 1. Two rings' worth of 1 MiB indirect requests, the ring kept full.
    fn flood(&mut self) {
        // Segment i of every request is data page 255 - i: each page lies just below the
        // previous one, so the back end cannot merge two segments into one I/O.
        let mut segs = [BlkSegment::default(); DATA_PAGES];
        for (i, s) in segs.iter_mut().enumerate() {
            *s = seg(DATA_GREF + (DATA_PAGES - 1 - i) as u32, 0, 7);
        }
        for p in 0..self.tags {
            // SAFETY: no request is in flight (the previous phase drained), so the back end
            // reads none of these pages now; the reference ends with the statement.
            let page = unsafe { &mut *ind_page(p) };
            let _ = write_indirect_page(&segs, page);
        }
        let span = (self.disk.sectors / 2048).max(1);
        let total = 2 * self.tags as u64;
        for n in 0..total {
            let Some(t) = self.tag() else { return };
            // The tag's indirect page holds the segments above (rewritten by no other phase
            // while this one runs).
            let raw = indirect(n % 2 == 1, (n % span) * 2048, 256, IND_GREF + t as u32);
            self.issue(t, raw, Expect::Okay);
        }
        self.drain();
    }

    /// 2. Malformed requests, each with its defined answer, and good ones between them.
    fn malformed(&mut self) {
        let sectors = self.disk.sectors;
        let good = direct(false, 8, &[seg(DATA_GREF, 0, 7)]);
        let mut unknown = good;
        unknown.operation = 42;
        let mut barrier = good;
        barrier.operation = BlkOp::WriteBarrier as u8;
        let mut zero_segs = good;
        zero_segs.nr_segments = 0;
        let mut twelve = direct(false, 0, &[seg(DATA_GREF, 0, 7); 11]);
        twelve.nr_segments = 12;
        let discard = |sector, nr_sectors| {
            BlkRequest::Discard {
                id: 0,
                handle: 0,
                sector,
                nr_sectors,
                secure: false,
            }
            .to_raw()
        };
        let list: [(BlkifRequestRaw, Expect); 14] = [
            (unknown, Expect::NotSupported),
            (barrier, Expect::NotSupported),
            (direct(false, 0, &[seg(DATA_GREF, 0, 8)]), Expect::Error),
            (direct(false, 0, &[seg(DATA_GREF, 6, 3)]), Expect::Error),
            (zero_segs, Expect::Error),
            (twelve, Expect::Error),
            (
                direct(false, sectors.saturating_sub(4), &[seg(DATA_GREF, 0, 7)]),
                Expect::Error,
            ),
            (
                direct(true, u64::MAX - 2, &[seg(DATA_GREF, 0, 7)]),
                Expect::Error,
            ),
            (direct(false, 0, &[seg(UNGRANTED, 0, 7)]), Expect::Error),
            (direct(false, 0, &[seg(OUTSIDE_TABLE, 0, 7)]), Expect::Error),
            // The disk would write into a page granted read-only.
            (direct(false, 0, &[seg(IND_GREF, 0, 7)]), Expect::Error),
            (discard(0, 0), Expect::Error),
            (discard(sectors.saturating_sub(8), 16), Expect::Error),
            (indirect(false, 0, 300, IND_GREF), Expect::Error),
        ];
        for (raw, e) in list {
            self.one(raw, e);
            self.one(good, Expect::Okay);
        }
        // Indirect requests whose page or segments are bad: each gets a tag of its own and its
        // indirect page is written while that request is not in flight.
        let mut bad_op = indirect(false, 0, 1, IND_GREF);
        {
            let mut r = bad_op.as_indirect();
            r.indirect_op = 7;
            bad_op = r.into();
        }
        self.one(bad_op, Expect::Error);
        self.one(indirect(false, 0, 1, UNGRANTED), Expect::Error);
        let cases: [&[BlkSegment]; 3] = [
            &[seg(DATA_GREF, 0, 7), seg(DATA_GREF + 1, 0, 9)],
            &[seg(DATA_GREF, 0, 7), seg(UNGRANTED, 0, 7)],
            &[seg(DATA_GREF, 3, 1)],
        ];
        for segs in cases {
            let Some(t) = self.tag() else { return };
            // SAFETY: tag `t` is free, so no request in flight uses its indirect page.
            let page = unsafe { &mut *ind_page(t) };
            let _ = write_indirect_page(segs, page);
            let raw = indirect(false, 0, segs.len() as u16, IND_GREF + t as u32);
            self.issue(t, raw, Expect::Error);
        }
        self.drain();
    }

    /// 3. Many distinct grants through the back end, then revoked; `revoked` marks which.
    fn churn(&mut self, revoked: &mut [bool; CHURN_GRANTS as usize]) {
        for g in 0..CHURN_GRANTS {
            let sector = u64::from(g) % self.disk.sectors;
            self.one(
                direct(false, sector, &[seg(CHURN_GREF + g, 0, 0)]),
                Expect::Okay,
            );
        }
        self.drain();
        let mut n = 0;
        for (g, r) in revoked.iter_mut().enumerate() {
            *r = crate::grant::end_access(CHURN_GREF + g as u32).is_ok();
            n += u32::from(*r);
        }
        let want = CHURN_GRANTS - BACKEND_PERSISTENT_BOUND;
        if n < want {
            self.unexpected(format_args!(
                "{n} of {CHURN_GRANTS} churned grants revocable, fewer than {want}"
            ));
        }
        // A revoked grant maps no more.
        for g in revoked
            .iter()
            .enumerate()
            .filter(|(_, r)| **r)
            .map(|(g, _)| g)
            .take(8)
        {
            self.one(
                direct(false, 0, &[seg(CHURN_GREF + g as u32, 0, 0)]),
                Expect::Error,
            );
        }
        self.drain();
        for (g, r) in revoked.iter().enumerate() {
            if *r {
                crate::grant::grant(CHURN_GREF + g as u32, 0, churn_page(g), false);
            }
        }
    }

    /// 4. A pattern written and read back into other pages.
    fn verified(&mut self, pass: u64) {
        const N: usize = 8;
        let sector = (pass * 64) % self.disk.sectors.saturating_sub(64).max(1);
        for p in 0..2 * N {
            let Some(base) = data_page(p) else { return };
            for b in 0..PAGE_SIZE {
                let v = if p < N {
                    verify_pattern(sector * SECTOR_SIZE + (p * PAGE_SIZE + b) as u64)
                } else {
                    0xee
                };
                // SAFETY: inside a data page this kernel owns; no request is in flight.
                unsafe { base.add(b).write_volatile(v) };
            }
        }
        let pages = |from: usize| -> [BlkSegment; N] {
            core::array::from_fn(|i| seg(DATA_GREF + (from + i) as u32, 0, 7))
        };
        self.one(direct(true, sector, &pages(0)), Expect::Okay);
        self.drain();
        self.one(direct(false, sector, &pages(N)), Expect::Okay);
        self.drain();
        let mut same = true;
        for p in 0..N {
            let (Some(a), Some(b)) = (data_page(p), data_page(N + p)) else {
                return;
            };
            for i in 0..PAGE_SIZE {
                // SAFETY: inside data pages this kernel owns; the read completed.
                same &= unsafe { a.add(i).read_volatile() == b.add(i).read_volatile() };
            }
        }
        if !same {
            self.unexpected(format_args!("data read back at sector {sector} differs"));
        }
    }
}

/// The job (see the module documentation). Returns if no disk connects, or after `secs=S`
/// seconds (exit code 1 if anything unexpected happened, with a `blkhostile: done, ...` line);
/// otherwise it runs until the toolstack's shutdown request, which exits with code 0.
pub fn blkhostile(cpu: &Cpu, cmdline: &str) -> u32 {
    let every = cmdline
        .split_whitespace()
        .nth(1)
        .and_then(|s| parse_u32(s.as_bytes()))
        .unwrap_or(10)
        .max(1);
    let disk = match BlkFront::connect(cpu, 500, 2, 1) {
        Ok(d) => d,
        Err(e) => {
            kprintln!(cpu, "FAIL blk-connect: {e}");
            return 1;
        }
    };
    if crate::heap::area(&IND, IND_PAGES).is_none()
        || crate::heap::area(&CHURN, CHURN_PAGES).is_none()
    {
        kprintln!(cpu, "FAIL blkhostile: out of memory for its pages");
        return 1;
    }
    for p in 0..IND_PAGES {
        crate::grant::grant(IND_GREF + p as u32, 0, ind_page(p) as u64, true);
    }
    for g in 0..CHURN_GRANTS {
        crate::grant::grant(CHURN_GREF + g, 0, churn_page(g as usize), false);
    }
    let mut h = Hostile {
        cpu,
        tags: 0,
        ids: [0; IND_PAGES],
        expect: [None; IND_PAGES],
        outstanding: 0,
        seq: 0,
        t: Tally::default(),
        input: LineInput::new(),
        reported: 0,
        disk,
    };
    h.tags = (h.disk.ring_size(0) as usize).min(IND_PAGES);
    kprintln!(
        cpu,
        "blkhostile: disk of {} sectors, {} ring slots",
        h.disk.sectors,
        h.tags
    );
    let mut revoked = [false; CHURN_GRANTS as usize];
    let deadline = crate::control::secs_deadline(cmdline);
    let mut pass = 0u64;
    loop {
        if deadline.is_some_and(crate::control::past) {
            kprintln!(
                cpu,
                "blkhostile: done, pass {pass}, {} requests, {} refused as expected, {} unexpected",
                h.t.requests,
                h.t.refused,
                h.t.unexpected
            );
            return u32::from(h.t.unexpected != 0);
        }
        pass += 1;
        h.flood();
        h.malformed();
        h.churn(&mut revoked);
        h.verified(pass);
        if pass.is_multiple_of(u64::from(every)) {
            kprintln!(
                cpu,
                "blkhostile: pass {pass}, {} requests, {} refused as expected, {} unexpected",
                h.t.requests,
                h.t.refused,
                h.t.unexpected
            );
        }
    }
}
