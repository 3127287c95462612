//! Ethernet addresses, as domain files and the control protocol spell them
//! (`xx:xx:xx:xx:xx:xx`).

use std::fmt;
use std::str::FromStr;

/// An Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The broadcast address.
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// Group (multicast or broadcast) address.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// A locally administered unicast address for vif `devid` of domain `domid`: `02:53` ("S"),
    /// one random byte (so two hosts' guests on one wire differ), the domain id, the device id.
    pub fn generated(domid: u32, devid: u32, random: u8) -> Mac {
        let d = (domid as u16).to_be_bytes();
        Mac([0x02, 0x53, random, d[0], d[1], devid as u8])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A MAC address that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (xx:xx:xx:xx:xx:xx)")]
pub struct BadMac(pub String);

impl FromStr for Mac {
    type Err = BadMac;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadMac(s.to_owned());
        let mut m = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut m {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print() {
        let m: Mac = "02:53:0a:00:01:ff".parse().unwrap();
        assert_eq!(m.0, [2, 0x53, 0xa, 0, 1, 0xff]);
        assert_eq!(m.to_string(), "02:53:0a:00:01:ff");
        for bad in [
            "",
            "02:53:0a:00:01",
            "02:53:0a:00:01:ff:00",
            "2:53:0a:00:01:ff",
            "zz:53:0a:00:01:ff",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        let g = Mac::generated(300, 2, 0x77);
        assert!(!g.is_multicast());
        assert_eq!(g.0[0] & 2, 2, "locally administered");
        assert_eq!(g.to_string(), "02:53:77:01:2c:02");
    }
}
