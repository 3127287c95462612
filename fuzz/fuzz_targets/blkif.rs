//! Block requests as a front end writes them into a ring slot, including the indirect pages an
//! indirect request names, and the response slot a front end reads back.
//!
//! Input: the 112-byte request slot, then the contents of its indirect pages (page `i` is the
//! `i`-th 4096-byte chunk of the rest, zero-padded); the first 16 bytes of the rest also serve
//! as a response slot.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_protocol::blkif::{
    BlkOp, BlkRequest, BlkResponse, BlkifError, BlkifRequestRaw, BlkifResponseRaw,
    MAX_INDIRECT_SEGMENTS, MAX_SEGMENTS_PER_REQUEST, SECTORS_PER_PAGE, SEGMENTS_PER_INDIRECT_PAGE,
    indirect_page_count, parse_indirect_page, segments_byte_len, write_indirect_page,
};
use pv_protocol::{PAGE_SIZE, SECTOR_SIZE};
use zerocopy::FromBytes;

fn check_segments(segs: &[pv_protocol::blkif::BlkSegment]) -> u64 {
    for s in segs {
        assert!(s.first_sect <= s.last_sect && s.last_sect < SECTORS_PER_PAGE);
        assert!((1..=8).contains(&s.nr_sectors()));
        // The back end maps exactly this byte range of the granted page.
        assert!(s.byte_offset() + s.byte_len() <= PAGE_SIZE);
    }
    let bytes = segments_byte_len(segs);
    assert_eq!(bytes % SECTOR_SIZE, 0);
    bytes / SECTOR_SIZE
}

fuzz_target!(|data: &[u8]| {
    let Ok((raw, rest)) = BlkifRequestRaw::read_from_prefix(data) else {
        return;
    };
    if let Ok((rsp, _)) = BlkifResponseRaw::read_from_prefix(rest) {
        if let Ok(r) = BlkResponse::parse(&rsp) {
            assert_eq!(BlkResponse::parse(&r.to_raw()), Ok(r));
        }
    }
    let req = match BlkRequest::parse(&raw) {
        Ok(r) => r,
        Err(e) => {
            // Every refusal has a status to answer the front end with, under the slot's id.
            let unsupported = matches!(e, BlkifError::Unsupported(_) | BlkifError::UnknownOp(_));
            assert_eq!(
                e.response_status() == pv_protocol::blkif::BlkStatus::NotSupported,
                unsupported
            );
            if unsupported {
                assert!(
                    BlkOp::try_from(raw.operation).is_err()
                        || matches!(e, BlkifError::Unsupported(op) if op == raw.operation)
                );
            }
            return;
        }
    };
    assert_eq!(req.id(), raw.id());
    assert_eq!(req.op() as u8, raw.operation);
    // Serialise and parse again: the same request.
    assert_eq!(BlkRequest::parse(&req.to_raw()), Ok(req));
    match req {
        BlkRequest::Read {
            sector, segments, ..
        }
        | BlkRequest::Write {
            sector, segments, ..
        } => {
            assert!((1..=MAX_SEGMENTS_PER_REQUEST).contains(&segments.len()));
            let sectors = check_segments(&segments);
            assert!(sector.checked_add(sectors).is_some());
        }
        BlkRequest::Flush {
            sector, segments, ..
        } => {
            assert!(segments.len() <= MAX_SEGMENTS_PER_REQUEST);
            let sectors = check_segments(&segments);
            assert!(sector.checked_add(sectors).is_some());
        }
        BlkRequest::Discard {
            sector, nr_sectors, ..
        } => {
            assert_eq!(raw.operation, BlkOp::Discard as u8);
            assert!(sector.checked_add(nr_sectors).is_some());
        }
        BlkRequest::Indirect {
            nr_segments,
            pages,
            sector,
            ..
        } => {
            let n = usize::from(nr_segments);
            assert!((1..=MAX_INDIRECT_SEGMENTS).contains(&n));
            assert_eq!(pages.len(), n.div_ceil(SEGMENTS_PER_INDIRECT_PAGE));
            // The back end's walk over the indirect pages: each page holds its count of
            // segments, they add up to nr_segments, and each page parses or is refused.
            let mut total = 0usize;
            let mut sectors = 0u64;
            for i in 0..pages.len() {
                let count = indirect_page_count(nr_segments, i);
                assert!((1..=SEGMENTS_PER_INDIRECT_PAGE).contains(&count));
                total += count;
                let mut page = [0u8; PAGE_SIZE];
                let chunk = rest.get(i * PAGE_SIZE..).unwrap_or(&[]);
                let m = chunk.len().min(PAGE_SIZE);
                page[..m].copy_from_slice(&chunk[..m]);
                if let Ok(segs) = parse_indirect_page(&page, count) {
                    assert_eq!(segs.len(), count);
                    sectors += check_segments(&segs);
                    // A front end writing the parsed segments produces a page that parses the
                    // same.
                    let mut again = [0xffu8; PAGE_SIZE];
                    write_indirect_page(&segs, &mut again).unwrap();
                    assert_eq!(parse_indirect_page(&again, count).unwrap(), segs);
                }
            }
            assert_eq!(total, n);
            assert_eq!(indirect_page_count(nr_segments, pages.len()), 0);
            // Even the largest indirect request cannot overflow a sector count (4096 * 8),
            // though `sector + sectors` may: the back end checks that against the disk.
            assert!(sectors <= (MAX_INDIRECT_SEGMENTS * 8) as u64);
            let _ = sector.checked_add(sectors);
        }
    }
});
