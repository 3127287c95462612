//! blockback against a mock front end (pv-protocol test-utils) and mock grants, on real image
//! files with real io_uring I/O.

use std::cell::UnsafeCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::Arc;

use dom0::blkback::{BlkBack, BlkBackError};
use dom0::disk::Disk;
use dom0::grants::{GrantFailure, GrantMapper, MappedPage};
use pv_protocol::BackRing;
use pv_protocol::blkif::{
    BlkRequest, BlkRing, BlkSegment, BlkStatus, BlkifRequestRaw, DirectSegments, IndirectGrefs,
    IndirectOp, write_indirect_page,
};
use pv_protocol::grant::GrantRef;
use pv_protocol::test_utils::{MockFrontEnd, RingMemory};

#[repr(C, align(4096))]
struct PageBuf(UnsafeCell<[u8; 4096]>);
// SAFETY: test pages are touched by the test thread and by the kernel during synchronous I/O
// that the test waits for; never concurrently.
unsafe impl Sync for PageBuf {}
// SAFETY: as above.
unsafe impl Send for PageBuf {}

#[derive(Default)]
struct MemGrants {
    pages: HashMap<u32, (Arc<PageBuf>, bool)>,
}

impl MemGrants {
    fn grant(&mut self, gref: u32, readonly: bool) -> Arc<PageBuf> {
        let p = Arc::new(PageBuf(UnsafeCell::new([0; 4096])));
        self.pages.insert(gref, (Arc::clone(&p), readonly));
        p
    }
}

fn with_page<R>(p: &PageBuf, f: impl FnOnce(&mut [u8; 4096]) -> R) -> R {
    // SAFETY: see PageBuf: no I/O is in flight while the test looks, and the reference does not
    // outlive this call.
    f(unsafe { &mut *p.0.get() })
}

fn snapshot(p: &PageBuf) -> [u8; 4096] {
    with_page(p, |pg| *pg)
}

impl GrantMapper for MemGrants {
    fn map(&self, gref: GrantRef, device_writes: bool) -> Result<MappedPage, GrantFailure> {
        let fail = |why: &str| GrantFailure {
            gref: gref.0,
            reason: why.into(),
        };
        let (p, ro) = self.pages.get(&gref.0).ok_or_else(|| fail("not granted"))?;
        if *ro && device_writes {
            return Err(fail("read-only"));
        }
        let ptr = NonNull::new(p.0.get().cast::<u8>()).unwrap();
        // SAFETY: the Arc keeps the page alive as long as the MappedPage.
        Ok(unsafe { MappedPage::new(ptr, Box::new(Arc::clone(p))) })
    }
}

struct Fixture {
    dir: PathBuf,
    img: PathBuf,
}

impl Fixture {
    fn new(name: &str, mib: u64) -> Self {
        let dir = std::env::temp_dir().join(format!("sv-blk-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        Disk::create_sparse(&img, mib << 20).unwrap();
        Self { dir, img }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn seg(gref: u32, first: u8, last: u8) -> BlkSegment {
    BlkSegment {
        gref: GrantRef(gref),
        first_sect: first,
        last_sect: last,
    }
}

fn rw(write: bool, id: u64, sector: u64, segs: &[BlkSegment]) -> BlkifRequestRaw {
    BlkRequest::data(
        write,
        id,
        0,
        sector,
        DirectSegments::from_slice(segs).unwrap(),
    )
    .to_raw()
}

#[test]
fn writes_land_in_the_file_and_reads_come_back_into_the_granted_pages() {
    let fx = Fixture::new("rw", 4);
    let mut grants = MemGrants::default();
    let a = grants.grant(1, true);
    let b = grants.grant(2, true);
    let c = grants.grant(3, false);
    let d = grants.grant(4, false);
    with_page(&a, |pg| {
        for (i, x) in pg.iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }
    });
    with_page(&b, |pg| {
        for (i, x) in pg.iter_mut().enumerate() {
            *x = (i % 13) as u8 + 100;
        }
    });
    let mut mem = RingMemory::new(1);
    let region = mem.region();
    let mut front = MockFrontEnd::<BlkRing>::new(region, 1).unwrap();
    let ring = BackRing::attach(region, 1).unwrap();
    let disk = Disk::open(&fx.img, false).unwrap();
    let mut back = BlkBack::new(2, ring, disk, grants).unwrap();

    // 8 sectors from page a, then sectors 2..=5 of page b, at sector 8.
    front
        .submit(&[rw(true, 1, 8, &[seg(1, 0, 7), seg(2, 2, 5)])])
        .unwrap();
    back.process().unwrap();
    assert_eq!(front.blk_statuses(), [(1, BlkStatus::Okay)]);
    let file = std::fs::read(&fx.img).unwrap();
    assert_eq!(&file[8 * 512..16 * 512], &snapshot(&a)[..]);
    assert_eq!(&file[16 * 512..20 * 512], &snapshot(&b)[2 * 512..6 * 512]);
    assert!(file[..8 * 512].iter().all(|&x| x == 0));

    front
        .submit(&[rw(false, 2, 8, &[seg(3, 0, 7), seg(4, 4, 7)])])
        .unwrap();
    back.process().unwrap();
    assert_eq!(front.blk_statuses(), [(2, BlkStatus::Okay)]);
    assert_eq!(&snapshot(&c)[..], &snapshot(&a)[..]);
    assert_eq!(&snapshot(&d)[4 * 512..], &snapshot(&b)[2 * 512..6 * 512]);
    assert_eq!(back.stats().written_bytes, 12 * 512);
    assert_eq!(back.stats().read_bytes, 12 * 512);
}

#[test]
fn flush_discard_and_indirect_requests_work() {
    let fx = Fixture::new("misc", 4);
    let mut grants = MemGrants::default();
    let data: Vec<_> = (10..30).map(|g| grants.grant(g, false)).collect();
    for (n, p) in data.iter().enumerate() {
        with_page(p, |pg| pg.fill(n as u8 + 1));
    }
    // One indirect page describing 20 full-page segments.
    let ind = grants.grant(99, true);
    let segs: Vec<BlkSegment> = (10..30).map(|g| seg(g, 0, 7)).collect();
    with_page(&ind, |pg| write_indirect_page(&segs, pg)).unwrap();
    let mut mem = RingMemory::new(1);
    let region = mem.region();
    let mut front = MockFrontEnd::<BlkRing>::new(region, 1).unwrap();
    let ring = BackRing::attach(region, 1).unwrap();
    let mut back = BlkBack::new(2, ring, Disk::open(&fx.img, false).unwrap(), grants).unwrap();

    let indirect = |id, op| {
        BlkRequest::Indirect {
            id,
            handle: 0,
            op,
            sector: 64,
            nr_segments: 20,
            pages: IndirectGrefs::from_slice(&[GrantRef(99)]).unwrap(),
        }
        .to_raw()
    };
    let flush = BlkRequest::Flush {
        id: 2,
        handle: 0,
        sector: 0,
        segments: DirectSegments::new(),
    }
    .to_raw();
    front
        .submit(&[indirect(1, IndirectOp::Write), flush])
        .unwrap();
    back.process().unwrap();
    assert_eq!(
        front.blk_statuses(),
        [(1, BlkStatus::Okay), (2, BlkStatus::Okay)]
    );
    let file = std::fs::read(&fx.img).unwrap();
    for n in 0..20 {
        let at = (64 + n * 8) * 512;
        assert!(
            file[at..at + 4096].iter().all(|&x| x == n as u8 + 1),
            "segment {n}"
        );
    }

    // Discard the first 10 pages' worth, then read all 20 back through the indirect page.
    let discard = BlkRequest::Discard {
        id: 3,
        handle: 0,
        sector: 64,
        nr_sectors: 80,
        secure: false,
    }
    .to_raw();
    front.submit(&[discard]).unwrap();
    back.process().unwrap();
    assert_eq!(front.blk_statuses(), [(3, BlkStatus::Okay)]);
    front.submit(&[indirect(4, IndirectOp::Read)]).unwrap();
    back.process().unwrap();
    assert_eq!(front.blk_statuses(), [(4, BlkStatus::Okay)]);
    // The pages now hold what was read: zeros where discarded, the data elsewhere.
    for (n, p) in data.iter().enumerate() {
        let want = if n < 10 { 0 } else { n as u8 + 1 };
        assert!(snapshot(p).iter().all(|&x| x == want), "page {n}");
    }
}

#[test]
fn bad_requests_get_errors_and_the_ring_keeps_serving() {
    let fx = Fixture::new("bad", 1);
    let mut grants = MemGrants::default();
    grants.grant(1, false);
    grants.grant(2, true); // read-only grant
    let mut mem = RingMemory::new(1);
    let region = mem.region();
    let mut front = MockFrontEnd::<BlkRing>::new(region, 1).unwrap();
    let ring = BackRing::attach(region, 1).unwrap();
    let mut back = BlkBack::new(7, ring, Disk::open(&fx.img, false).unwrap(), grants).unwrap();

    let mut unknown = rw(false, 1, 0, &[seg(1, 0, 7)]);
    unknown.operation = 42;
    let past_end = rw(false, 2, 2048 - 4, &[seg(1, 0, 7)]);
    let wrapping = rw(false, 3, u64::MAX - 2, &[seg(1, 0, 7)]);
    let not_granted = rw(false, 4, 0, &[seg(77, 0, 7)]);
    let into_readonly = rw(false, 5, 0, &[seg(2, 0, 7)]);
    let mut bad_seg = rw(false, 6, 0, &[seg(1, 0, 7)]);
    bad_seg.seg[0].first_sect = 6;
    bad_seg.seg[0].last_sect = 3;
    let mut zero_segs = rw(false, 7, 0, &[seg(1, 0, 7)]);
    zero_segs.nr_segments = 0;
    let empty_discard = BlkRequest::Discard {
        id: 9,
        handle: 0,
        sector: 0,
        nr_sectors: 0,
        secure: false,
    }
    .to_raw();
    let good = rw(true, 8, 0, &[seg(2, 0, 7)]);
    front
        .submit(&[
            unknown,
            past_end,
            wrapping,
            not_granted,
            into_readonly,
            bad_seg,
            zero_segs,
            empty_discard,
            good,
        ])
        .unwrap();
    back.process().unwrap();
    assert_eq!(
        front.blk_statuses(),
        [
            (1, BlkStatus::NotSupported),
            (2, BlkStatus::Error),
            (3, BlkStatus::Error),
            (4, BlkStatus::Error),
            (5, BlkStatus::Error),
            (6, BlkStatus::Error),
            (7, BlkStatus::Error),
            (8, BlkStatus::Okay),
            (9, BlkStatus::Error),
        ]
    );
    assert_eq!(back.stats().errors, 7);

    // Hostile indices kill this ring only, with an error, not a panic.
    front.scribble_req_prod(0x7fff_0000);
    assert!(matches!(back.process(), Err(BlkBackError::Ring(_))));
}

#[test]
fn a_read_only_disk_refuses_writes_flushes_and_discards() {
    let fx = Fixture::new("ro", 1);
    let mut grants = MemGrants::default();
    grants.grant(1, false);
    let mut mem = RingMemory::new(1);
    let region = mem.region();
    let mut front = MockFrontEnd::<BlkRing>::new(region, 1).unwrap();
    let ring = BackRing::attach(region, 1).unwrap();
    let mut back = BlkBack::new(3, ring, Disk::open(&fx.img, true).unwrap(), grants).unwrap();
    let discard = BlkRequest::Discard {
        id: 3,
        handle: 0,
        sector: 0,
        nr_sectors: 8,
        secure: false,
    }
    .to_raw();
    let flush = BlkRequest::Flush {
        id: 4,
        handle: 0,
        sector: 0,
        segments: DirectSegments::new(),
    }
    .to_raw();
    front
        .submit(&[
            rw(true, 1, 0, &[seg(1, 0, 7)]),
            rw(false, 2, 0, &[seg(1, 0, 7)]),
            discard,
            flush,
        ])
        .unwrap();
    back.process().unwrap();
    assert_eq!(
        front.blk_statuses(),
        [
            (1, BlkStatus::Error),
            (2, BlkStatus::Okay),
            (3, BlkStatus::Error),
            (4, BlkStatus::Error)
        ]
    );
    assert!(std::fs::read(&fx.img).unwrap().iter().all(|&x| x == 0));
}

#[test]
fn a_hostile_ring_dies_alone_while_a_good_one_keeps_being_served() {
    let fx = Fixture::new("two", 1);
    let fx2 = Fixture::new("two-b", 1);
    let mut good_grants = MemGrants::default();
    let page_a = good_grants.grant(1, false);
    with_page(&page_a, |pg| pg.fill(0x42));
    let mut bad_grants = MemGrants::default();
    bad_grants.grant(1, false);
    let (mut good_mem, mut bad_mem) = (RingMemory::new(1), RingMemory::new(1));
    let (good_region, bad_region) = (good_mem.region(), bad_mem.region());
    let mut good_front = MockFrontEnd::<BlkRing>::new(good_region, 1).unwrap();
    let bad_front = MockFrontEnd::<BlkRing>::new(bad_region, 1).unwrap();
    let mut good = BlkBack::new(
        2,
        BackRing::attach(good_region, 1).unwrap(),
        Disk::open(&fx.img, false).unwrap(),
        good_grants,
    )
    .unwrap();
    let mut bad = BlkBack::new(
        3,
        BackRing::attach(bad_region, 1).unwrap(),
        Disk::open(&fx2.img, false).unwrap(),
        bad_grants,
    )
    .unwrap();
    // The hostile front end publishes garbage requests and then a runaway index.
    let mut garbage = rw(true, 1, 0, &[seg(1, 0, 7)]);
    garbage.operation = 0xff;
    bad_front.scribble_slot(0, zerocopy::IntoBytes::as_bytes(&garbage));
    bad_front.scribble_req_prod(1000);
    assert!(matches!(bad.process(), Err(BlkBackError::Ring(_))));
    // The good one is untouched.
    good_front
        .submit(&[rw(true, 9, 16, &[seg(1, 0, 7)])])
        .unwrap();
    good.process().unwrap();
    assert_eq!(good_front.blk_statuses(), [(9, BlkStatus::Okay)]);
    let file = std::fs::read(&fx.img).unwrap();
    assert!(file[16 * 512..24 * 512].iter().all(|&x| x == 0x42));
    assert!(
        std::fs::read(&fx2.img).unwrap().iter().all(|&x| x == 0),
        "nothing written for the hostile one"
    );
}

/// Guest memory standing in for a domain's RAM: one page-aligned range.
struct Ram {
    base: NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: plain heap memory owned by this value; the test reads it only while no I/O is in
// flight, and the kernel writes it only during I/O the test waits for.
unsafe impl Send for Ram {}
// SAFETY: as above.
unsafe impl Sync for Ram {}

impl Ram {
    fn new(pages: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(pages * 4096, 4096).unwrap();
        // SAFETY: a non-zero size.
        let base = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).unwrap();
        Self { base, layout }
    }

    fn pages(&self) -> usize {
        self.layout.size() / 4096
    }

    #[allow(clippy::mut_from_ref)]
    fn page(&self, i: usize) -> &mut [u8; 4096] {
        assert!(i < self.pages());
        // SAFETY: inside the allocation; see the type: no I/O is in flight while the test looks,
        // and the test holds one such reference at a time.
        unsafe { &mut *self.base.as_ptr().add(i * 4096).cast::<[u8; 4096]>() }
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.base.as_ptr(), self.layout) };
    }
}

/// Grants of [`Ram`]: ref `n` is page `n`. The mapper offers the whole range as its
/// `io_region`, so the back end registers it with io_uring and uses fixed reads and writes (one
/// per contiguous run of segments), as it does for a real domain. It counts the pages mapped at
/// this moment and the most ever mapped at once.
#[derive(Clone)]
struct FixedRam {
    ram: Arc<Ram>,
    live: Arc<std::sync::atomic::AtomicUsize>,
    peak: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts one mapped page while it lives, and keeps its memory.
struct Live(
    Arc<std::sync::atomic::AtomicUsize>,
    #[allow(dead_code)] Arc<Ram>,
);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl FixedRam {
    fn new(pages: usize) -> Self {
        Self {
            ram: Arc::new(Ram::new(pages)),
            live: Arc::default(),
            peak: Arc::default(),
        }
    }
}

impl GrantMapper for FixedRam {
    fn map(&self, gref: GrantRef, _device_writes: bool) -> Result<MappedPage, GrantFailure> {
        let i = gref.0 as usize;
        if i >= self.ram.pages() {
            return Err(GrantFailure {
                gref: gref.0,
                reason: "not granted".into(),
            });
        }
        let now = self.live.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        self.peak
            .fetch_max(now, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: inside the allocation.
        let ptr = unsafe { NonNull::new_unchecked(self.ram.base.as_ptr().add(i * 4096)) };
        let hold = Live(Arc::clone(&self.live), Arc::clone(&self.ram));
        // SAFETY: the hold keeps the allocation alive as long as the MappedPage.
        Ok(unsafe { MappedPage::new(ptr, Box::new(hold)) })
    }

    fn io_region(&self) -> Option<(NonNull<u8>, usize)> {
        // The whole allocation, alive as long as this mapper (it holds an Arc).
        Some((self.ram.base, self.ram.layout.size()))
    }
}
/// The event channel: an eventfd standing for the guest's doorbell.
struct Chan(vmm_sys_util::eventfd::EventFd);

impl dom0::notify::Notify for Chan {
    fn notify(&self) {}
    fn wait_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.0)
    }
    fn clear(&self) {
        let _ = self.0.read();
    }
}

/// Byte `j` of sector `s` of the test image.
fn pattern(s: u64, j: usize) -> u8 {
    (s.wrapping_mul(131) as usize + j * 7 + (s >> 8) as usize) as u8
}

#[test]
fn a_full_ring_of_unmergeable_indirect_requests_completes_with_nothing_lost() {
    use std::sync::atomic::Ordering::SeqCst;
    const REQS: usize = 32;
    const SEGS: usize = 256;
    let fx = Fixture::new("cq", (REQS * SEGS * 4096) as u64 >> 20);
    // Pages 0..REQS*SEGS are data; the indirect pages follow.
    let grants = FixedRam::new(REQS * SEGS + REQS);
    let (live, peak) = (Arc::clone(&grants.live), Arc::clone(&grants.peak));
    let ram = Arc::clone(&grants.ram);
    let data_page = |r: usize, i: usize| r * SEGS + (SEGS - 1 - i);
    // Segment i of request r is page r*SEGS + 255 - i: each segment's page lies just below the
    // previous one's, so no two segments merge into one fixed read: one entry each.
    for r in 0..REQS {
        let segs: Vec<BlkSegment> = (0..SEGS)
            .map(|i| seg(data_page(r, i) as u32, 0, 7))
            .collect();
        write_indirect_page(&segs, ram.page(REQS * SEGS + r)).unwrap();
    }
    let indirect = |id: u64, op, r: usize| {
        BlkRequest::Indirect {
            id,
            handle: 0,
            op,
            sector: (r * SEGS * 8) as u64,
            nr_segments: SEGS as u16,
            pages: IndirectGrefs::from_slice(&[GrantRef((REQS * SEGS + r) as u32)]).unwrap(),
        }
        .to_raw()
    };
    // What page i of request r holds when its sectors carry the pattern.
    let expected = |r: usize, i: usize| -> Vec<u8> {
        let first = ((r * SEGS + i) * 8) as u64;
        (0..4096)
            .map(|b| pattern(first + (b / 512) as u64, b % 512))
            .collect()
    };

    let mut mem = RingMemory::new(1);
    let region = mem.region();
    let mut front = MockFrontEnd::<BlkRing>::new(region, 1).unwrap();
    let ring = BackRing::attach(region, 1).unwrap();
    assert_eq!(front.ring().size() as usize, REQS);
    let mut back = BlkBack::new(5, ring, Disk::open(&fx.img, false).unwrap(), grants).unwrap();

    // Writes: every page of every request carries its sectors' pattern.
    for r in 0..REQS {
        for i in 0..SEGS {
            ram.page(data_page(r, i)).copy_from_slice(&expected(r, i));
        }
    }
    let writes: Vec<_> = (0..REQS)
        .map(|r| indirect(r as u64, IndirectOp::Write, r))
        .collect();
    front.submit(&writes).unwrap();
    back.process().unwrap();
    let want: Vec<_> = (0..REQS as u64).map(|id| (id, BlkStatus::Okay)).collect();
    assert_eq!(front.blk_statuses(), want);
    let file = std::fs::read(&fx.img).unwrap();
    for (s, sector) in file.chunks(512).enumerate() {
        assert!(
            sector
                .iter()
                .enumerate()
                .all(|(j, &b)| b == pattern(s as u64, j)),
            "sector {s} not written"
        );
    }

    // Reads into zeroed pages come back with the data.
    for p in 0..REQS * SEGS {
        ram.page(p).fill(0);
    }
    let reads: Vec<_> = (0..REQS)
        .map(|r| indirect(100 + r as u64, IndirectOp::Read, r))
        .collect();
    front.submit(&reads).unwrap();
    back.process().unwrap();
    let want: Vec<_> = (0..REQS as u64)
        .map(|id| (100 + id, BlkStatus::Okay))
        .collect();
    assert_eq!(front.blk_statuses(), want);
    for r in 0..REQS {
        for i in 0..SEGS {
            assert_eq!(
                &ram.page(data_page(r, i))[..],
                &expected(r, i)[..],
                "request {r} segment {i}"
            );
        }
    }

    // Flushes carrying 11 unmergeable segments each (11 writes and a linked fsync apiece).
    let flushes: Vec<_> = (0..REQS)
        .map(|r| {
            let segs: Vec<BlkSegment> =
                (0..11).map(|i| seg(data_page(r, i) as u32, 0, 7)).collect();
            BlkRequest::Flush {
                id: 200 + r as u64,
                handle: 0,
                sector: (r * SEGS * 8) as u64,
                segments: DirectSegments::from_slice(&segs).unwrap(),
            }
            .to_raw()
        })
        .collect();
    front.submit(&flushes).unwrap();
    back.process().unwrap();
    let want: Vec<_> = (0..REQS as u64)
        .map(|id| (200 + id, BlkStatus::Okay))
        .collect();
    assert_eq!(front.blk_statuses(), want);

    // The same load through `serve`, the back end's own loop (which must sleep on completions,
    // not spin or wait for a doorbell, while requests wait on the ring for room).
    for p in 0..REQS * SEGS {
        ram.page(p).fill(0);
    }
    let chan =
        Chan(vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let wake = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    let reads: Vec<_> = (0..REQS)
        .map(|r| indirect(300 + r as u64, IndirectOp::Read, r))
        .collect();
    let got = std::thread::scope(|s| {
        let server = s.spawn(|| back.serve(&chan, &wake, &mut || stop.load(SeqCst)));
        if front.submit(&reads).unwrap() {
            chan.0.write(1).unwrap();
        }
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while got.len() < REQS && std::time::Instant::now() < deadline {
            got.extend(front.blk_statuses());
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        stop.store(true, SeqCst);
        wake.write(1).unwrap();
        server.join().unwrap().unwrap();
        got.sort_by_key(|x| x.0);
        got
    });
    let want: Vec<_> = (0..REQS as u64)
        .map(|id| (300 + id, BlkStatus::Okay))
        .collect();
    assert_eq!(got, want);
    for r in 0..REQS {
        for i in 0..SEGS {
            assert_eq!(
                &ram.page(data_page(r, i))[..],
                &expected(r, i)[..],
                "request {r} segment {i} (serve)"
            );
        }
    }

    // Nothing was left mapped, and never more pages were in flight than the completion queue
    // has entries (one completion per unmergeable segment): it could not overflow.
    let limit = back.completion_limit();
    assert!(limit < REQS * SEGS && limit <= dom0::blkback::COMPLETION_QUEUE as usize);
    drop(back);
    assert_eq!(live.load(SeqCst), 0);
    let peak = peak.load(SeqCst);
    assert!(
        peak <= limit,
        "{peak} pages in flight at once, more than the completion queue holds"
    );
}
