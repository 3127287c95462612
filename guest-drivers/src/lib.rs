//! The guest side of Splitvisor.
//!
//! The Rust guest kernel lives in `kernel/` (package `splitvisor-guest`, a freestanding `no_std`
//! binary); this crate's build script builds it and embeds the image, so the hypervisor and the
//! tests can boot it without knowing where cargo put it.
#![deny(missing_docs)]

/// The guest kernel ELF image, the default kernel of every domain.
pub const GUEST_KERNEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/splitvisor-guest"));

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_kernel_is_a_static_x86_64_elf_entered_at_2_mib() {
        let k = super::GUEST_KERNEL;
        assert_eq!(&k[..4], b"\x7fELF");
        assert_eq!(k[4], 2, "64-bit");
        assert_eq!(u16::from_le_bytes([k[16], k[17]]), 2, "ET_EXEC");
        assert_eq!(u16::from_le_bytes([k[18], k[19]]), 62, "x86-64");
        let entry = u64::from_le_bytes(k[24..32].try_into().unwrap());
        assert_eq!(entry, 0x20_0000);
    }
}
