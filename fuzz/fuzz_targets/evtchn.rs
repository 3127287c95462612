//! Event-channel operations: the `cmd` number and the argument struct a guest passes to
//! `EVENT_CHANNEL_OP`, the status answer a guest decodes, doorbell writes and bitmap helpers.
//!
//! Input: 8 bytes of `cmd`, then the argument bytes (any length, so short and long arguments are
//! tried as well as exact ones).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_protocol::evtchn::{
    EvtchnCommand, EvtchnError, EvtchnOp, MAX_PORTS_2L, NR_VIRQS, Port, StatusArg, clear_bit,
    doorbell_of, port_of_doorbell, set_bit, test_bit,
};
use zerocopy::FromBytes;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (cmd, arg) = data.split_at(8);
    let cmd = u64::from_le_bytes(cmd.try_into().unwrap());
    let op = match EvtchnOp::from_u64(cmd) {
        Ok(op) => op,
        Err(e) => {
            assert_eq!(e, EvtchnError::UnknownOp(cmd));
            return;
        }
    };
    assert_eq!(op as u64, cmd);
    let n = op.arg_size();
    match EvtchnCommand::parse(op, arg) {
        Ok(c) => {
            assert_eq!(
                arg.len(),
                n,
                "only an argument of exactly arg_size bytes parses"
            );
            assert_eq!(c.op(), op);
            // Validated values are within their bounds.
            match c {
                EvtchnCommand::BindInterdomain { remote_port: p, .. }
                | EvtchnCommand::BindVcpu { port: p, .. }
                | EvtchnCommand::Close(p)
                | EvtchnCommand::Send(p)
                | EvtchnCommand::Unmask(p)
                | EvtchnCommand::Status { port: p, .. } => {
                    assert!(p.0 < MAX_PORTS_2L);
                    assert_eq!(Port::new(p.0), Ok(p));
                    // The bitmap word and bit the hypervisor indexes with it exist.
                    let mut map = [0u64; (MAX_PORTS_2L / 64) as usize];
                    assert_eq!(set_bit(&mut map, p), Some(false));
                    assert!(test_bit(&map, p));
                    assert_eq!(map.iter().map(|w| w.count_ones()).sum::<u32>(), 1);
                    assert_eq!(clear_bit(&mut map, p), Some(true));
                    assert!(map.iter().all(|w| *w == 0));
                    // Its doorbell names it back.
                    let (io, al) = doorbell_of(p.0);
                    assert_eq!(port_of_doorbell(io, al), Some(p.0));
                }
                EvtchnCommand::BindVirq { virq, .. } => assert!(virq < NR_VIRQS),
                _ => {}
            }
            // Serialise and parse again: the same command.
            let mut buf = vec![0xa5u8; n + 3];
            assert_eq!(c.write_to(&mut buf), Ok(n));
            assert_eq!(EvtchnCommand::parse(op, &buf[..n]), Ok(c));
            assert!(c.write_to(&mut buf[..n - 1]).is_err());
        }
        Err(EvtchnError::BadArgSize { got, expected }) => {
            assert_eq!((got, expected), (arg.len(), n));
            assert_ne!(arg.len(), n);
        }
        Err(EvtchnError::PortOutOfRange(p)) => assert!(p >= MAX_PORTS_2L),
        Err(EvtchnError::VirqOutOfRange(v)) => assert!(v >= NR_VIRQS),
        Err(e) => panic!("unexpected error {e:?} from parse"),
    }
    // A status answer as the guest decodes it: whatever the hypervisor (or anyone) wrote there.
    if let Ok((st, _)) = StatusArg::read_from_prefix(arg) {
        if let Ok((vcpu, state)) = st.result() {
            let mut back = st;
            back.set_result(vcpu, state);
            assert_eq!(back.result(), Ok((vcpu, state)));
        }
    }
    // Any doorbell write names a port in range or none.
    if let [a, b, c, ..] = *arg {
        let io = u16::from_le_bytes([a, b]);
        if let Some(p) = port_of_doorbell(io, c) {
            assert!(p < MAX_PORTS_2L);
            assert_eq!(doorbell_of(p), (io, c));
        }
    }
});
