//! The hypercall request block a guest writes into its hypercall page, and the argument structs
//! the dispatcher (`hypervisor::hypercall`) then copies from guest memory and parses.
//!
//! Input: 128 bytes of `HypercallRequest`, then the bytes at the argument address. The dispatcher
//! itself needs a KVM domain; this target runs every parser it calls, in the order it calls them,
//! and checks what the dispatcher relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_protocol::evtchn::EvtchnCommand;
use pv_protocol::memory::{MAX_EXTENTS, MemoryCmd, MemoryReservation, Reservation};
use pv_protocol::hypercall::{
    ConsoleIoCmd, Errno, Hypercall, HypercallRequest, MAX_CONSOLE_IO, MAX_POLL_PORTS,
    MAX_TIMER_NS, Poll, SchedCmd, SchedPoll, SchedShutdown, Shutdown, SingleshotTimer,
    VcpuOpCmd, VcpuSetSingleshotTimer, encode_result,
};
use zerocopy::FromBytes;

fuzz_target!(|data: &[u8]| {
    let Ok((req, arg)) = HypercallRequest::read_from_prefix(data) else {
        return;
    };
    match Hypercall::parse(&req) {
        Ok(call) => {
            // Canonical form: building the request again and parsing it gives the same call.
            let again = call.to_request();
            assert_eq!(Hypercall::parse(&again), Ok(call));
            assert_eq!(again.nr, req.nr);
            match call {
                Hypercall::ConsoleIo(
                    ConsoleIoCmd::Write { len, .. } | ConsoleIoCmd::Read { len, .. },
                ) => {
                    // The dispatcher allocates `len` bytes: it must be bounded.
                    assert!(len <= MAX_CONSOLE_IO);
                }
                Hypercall::SchedOp(SchedCmd::Shutdown { .. }) => {
                    if let Ok((raw, _)) = SchedShutdown::read_from_prefix(arg) {
                        if let Ok(s) = Shutdown::parse(&raw) {
                            assert_eq!(Shutdown::parse(&s.to_raw()), Ok(s));
                            assert_eq!(s.exit_code, raw.exit_code);
                        }
                    }
                }
                Hypercall::SchedOp(SchedCmd::Poll { .. }) => {
                    if let Ok((raw, _)) = SchedPoll::read_from_prefix(arg) {
                        if let Ok(p) = Poll::parse(&raw) {
                            // The dispatcher allocates `nr_ports * 4` bytes for the port array.
                            assert!(p.nr_ports <= MAX_POLL_PORTS);
                            assert_eq!(Poll::parse(&p.to_raw()), Ok(p));
                            assert_eq!(p.timeout_ns.is_none(), raw.timeout_ns == 0);
                        }
                    }
                }
                Hypercall::VcpuOp(VcpuOpCmd::SetSingleshotTimer { .. }) => {
                    if let Ok((raw, _)) = VcpuSetSingleshotTimer::read_from_prefix(arg) {
                        match SingleshotTimer::parse(&raw) {
                            Ok(t) => {
                                // The dispatcher adds the timeout to the clock: it is bounded.
                                assert!(t.timeout_ns <= MAX_TIMER_NS);
                                assert_eq!(SingleshotTimer::parse(&t.to_raw()), Ok(t));
                            }
                            Err(e) => assert_eq!(e.errno(), Errno::EINVAL),
                        }
                    }
                }
                Hypercall::EventChannelOp { op, .. } => {
                    // The dispatcher copies exactly `arg_size` bytes and parses them.
                    let n = op.arg_size();
                    if let Some(bytes) = arg.get(..n) {
                        if let Ok(cmd) = EvtchnCommand::parse(op, bytes) {
                            assert_eq!(cmd.op(), op);
                            let mut buf = vec![0u8; n];
                            assert_eq!(cmd.write_to(&mut buf), Ok(n));
                            assert_eq!(EvtchnCommand::parse(op, &buf), Ok(cmd));
                        }
                    } else {
                        // A short argument is refused, never read past.
                        assert!(EvtchnCommand::parse(op, arg).is_err());
                    }
                }
                Hypercall::MemoryOp(
                    MemoryCmd::DecreaseReservation { .. } | MemoryCmd::PopulatePhysmap { .. },
                ) => {
                    if let Ok((raw, _)) = MemoryReservation::read_from_prefix(arg) {
                        match Reservation::parse(&raw) {
                            Ok(r) => {
                                // The dispatcher allocates `count * 8` bytes for the frame list.
                                assert!(r.count <= MAX_EXTENTS);
                                assert_eq!(u64::from(r.count), raw.nr_extents);
                                assert_eq!(Reservation::parse(&r.to_raw()), Ok(r));
                            }
                            Err(e) => assert!(e.errno().as_i64() < 0),
                        }
                    }
                }
                _ => {}
            }
        }
        Err(e) => {
            // Every refusal is a defined negative errno the guest can decode.
            let errno = e.errno();
            let r = encode_result(Err(errno));
            assert!(r < 0);
            assert_eq!(Errno::from_i64(r), Some(errno));
        }
    }
});
