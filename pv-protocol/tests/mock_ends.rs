//! The test-utils mock ends drive a real protocol: a (partly hostile) block front end against a
//! minimal back end that parses every request it copies out, as blockback will.

use pv_protocol::blkif::{
    BlkRequest, BlkResponse, BlkRing, BlkSegment, BlkStatus, BlkifRequestRaw, DirectSegments,
};
use pv_protocol::grant::GrantRef;
use pv_protocol::ring::RingError;
use pv_protocol::test_utils::{MockBackEnd, MockFrontEnd, RingMemory};
use pv_protocol::{BackRing, FrontRing};

/// Answers every request: OK for reads of at most 8 sectors, the parser's status otherwise.
fn serve(back: &mut BackRing<'_, BlkRing>) -> Result<usize, RingError> {
    let mut n = 0;
    while let Some(raw) = back.take_request()? {
        let rsp = match BlkRequest::parse(&raw) {
            Ok(req) => BlkResponse {
                id: req.id(),
                operation: req.op() as u8,
                status: BlkStatus::Okay,
            },
            Err(e) => BlkResponse {
                id: raw.id(),
                operation: raw.operation,
                status: e.response_status(),
            },
        };
        back.push_response(&rsp.to_raw())?;
        n += 1;
    }
    back.commit_responses();
    Ok(n)
}

fn read(id: u64, sector: u64) -> BlkifRequestRaw {
    let seg = BlkSegment {
        gref: GrantRef(7),
        first_sect: 0,
        last_sect: 7,
    };
    BlkRequest::Read {
        id,
        handle: 0,
        sector,
        segments: DirectSegments::from_slice(&[seg]).unwrap(),
    }
    .to_raw()
}

#[test]
fn malformed_block_requests_get_error_responses_and_good_ones_still_succeed() {
    let mut mem = RingMemory::new(1);
    let region = mem.region();
    let mut front = MockFrontEnd::<BlkRing>::new(region, 1).unwrap();
    let mut back = BackRing::<BlkRing>::attach(region, 1).unwrap();

    let mut unknown_op = read(2, 0);
    unknown_op.operation = 99;
    let mut bad_segment = read(3, 0);
    bad_segment.seg[0].first_sect = 5;
    bad_segment.seg[0].last_sect = 2;
    let mut too_many = read(4, 0);
    too_many.nr_segments = 12;
    let mut barrier = read(5, 0);
    barrier.operation = 2;
    front
        .submit(&[
            read(1, 0),
            unknown_op,
            bad_segment,
            too_many,
            barrier,
            read(6, 8),
        ])
        .unwrap();
    assert_eq!(serve(&mut back).unwrap(), 6);

    let got = front.blk_statuses();
    assert_eq!(
        got,
        [
            (1, BlkStatus::Okay),
            (2, BlkStatus::NotSupported),
            (3, BlkStatus::Error),
            (4, BlkStatus::Error),
            (5, BlkStatus::NotSupported),
            (6, BlkStatus::Okay),
        ]
    );
}

#[test]
fn hostile_producer_index_breaks_only_that_ring() {
    let mut hostile_mem = RingMemory::new(1);
    let mut good_mem = RingMemory::new(1);
    let (hostile_region, good_region) = (hostile_mem.region(), good_mem.region());
    let hostile = MockFrontEnd::<BlkRing>::new(hostile_region, 1).unwrap();
    let mut good = MockFrontEnd::<BlkRing>::new(good_region, 1).unwrap();
    let mut hostile_back = BackRing::<BlkRing>::attach(hostile_region, 1).unwrap();
    let mut good_back = BackRing::<BlkRing>::attach(good_region, 1).unwrap();

    hostile.scribble_req_prod(0x8000_0000);
    assert!(matches!(
        serve(&mut hostile_back),
        Err(RingError::ProducerOverrun {
            which: "req_prod",
            prod: 0x8000_0000,
            ..
        })
    ));
    good.submit(&[read(10, 0)]).unwrap();
    assert_eq!(serve(&mut good_back).unwrap(), 1);
    assert_eq!(good.responses().unwrap().len(), 1);
}

#[test]
fn front_end_under_test_rejects_responses_to_unsent_requests() {
    let mut mem = RingMemory::new(1);
    let region = mem.region();
    let mut front = FrontRing::<BlkRing>::new(region, 1).unwrap();
    let mut back = MockBackEnd::<BlkRing>::attach(region, 1).unwrap();
    front.push_request(&read(1, 0)).unwrap();
    front.commit_requests();
    let (n, _) = back
        .serve(|r| {
            BlkResponse {
                id: r.id(),
                operation: r.operation,
                status: BlkStatus::Okay,
            }
            .to_raw()
        })
        .unwrap();
    assert_eq!(n, 1);
    back.scribble_rsp_prod(5);
    assert!(matches!(
        front.take_response(),
        Err(RingError::ProducerOverrun {
            which: "rsp_prod",
            ..
        })
    ));
}
