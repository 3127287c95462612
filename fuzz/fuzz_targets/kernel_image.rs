//! The kernel image a client names (`xl.cfg`'s `kernel`, up to 64 MiB): before anything is
//! built, `hypervisor::boot` reads its ELF program headers to learn where the image ends and how
//! much memory it needs. Any bytes: an answer, never a panic, and an answer the layout can hold.
#![no_main]

use hypervisor::boot::{MAX_MAPPED, image_end, min_mem_bytes};
use libfuzzer_sys::fuzz_target;
use pv_protocol::start_info::{KERNEL_FREE_MIN, MIN_MEM_MIB};

fuzz_target!(|data: &[u8]| {
    let Ok(end) = image_end(data) else {
        assert!(min_mem_bytes(data, 1).is_err());
        return;
    };
    assert!(end > 0 && end <= MAX_MAPPED && end % 4096 == 0);
    for vcpus in [1, 32, u32::MAX] {
        let need = min_mem_bytes(data, vcpus).unwrap();
        assert!(need >= end + KERNEL_FREE_MIN && need >= MIN_MEM_MIB << 20);
        assert_eq!(need % (1 << 20), 0);
    }
});
