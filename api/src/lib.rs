//! Splitvisor's API: what a client of the dom0 daemon needs and nothing more (serde, no
//! hypervisor). The control protocol with one reply type per op ([`control`]), the `xl.cfg`
//! domain-file parser ([`xlcfg`]), the peer-credential and runtime-directory trust checks both
//! sides make ([`peer`]), and Ethernet addresses ([`mac`]).
#![deny(missing_docs)]

pub mod control;
pub mod mac;
pub mod peer;
pub mod xlcfg;
