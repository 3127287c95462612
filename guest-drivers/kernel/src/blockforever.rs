//! The `block-forever` job: connects the first disk and the first network interface the
//! toolstack attached, prints `block-forever: connected` (or what failed), and then sleeps in
//! `sched_op(block)` with every event port masked, so nothing ever wakes it. It never answers a
//! detach or a shutdown request: it is there to measure what the host's side of an idle domain
//! with devices costs (its threads must not wake either), and to stand for a front end that does
//! not answer `Closing`.

use crate::blkfront::BlkFront;
use crate::hcall::Cpu;
use crate::kprintln;
use crate::netfront::NetFront;

/// Runs the job; never returns.
pub fn block_forever(cpu: &Cpu) -> u32 {
    let disk = BlkFront::connect(cpu, 500, 0, 1);
    let net = NetFront::connect(cpu, 0, 500);
    match (&disk, &net) {
        (Ok(_), Ok(_)) => kprintln!(cpu, "block-forever: connected"),
        (Err(e), _) | (_, Err(e)) => kprintln!(cpu, "block-forever: connect FAILED {e}"),
    }
    // Kept connected (never dropped) while the vCPU sleeps.
    let _devices = (disk, net);
    loop {
        cpu.block();
    }
}
