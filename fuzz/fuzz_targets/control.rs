//! Control requests (`dom0::control`): the daemon reads one line from a client and parses it into
//! an `Envelope` with serde_json. What parses is serialised and parsed again: the same request,
//! and the same text the second time.
#![no_main]

use dom0::control::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // TODO: call `dom0::control::parse_request(data)` (the daemon's validating parser) once it
    // exists, and check what it accepts within bounds.
    let Ok(env) = serde_json::from_slice::<Envelope>(data) else {
        return;
    };
    let text = serde_json::to_string(&env).unwrap();
    let back: Envelope = serde_json::from_str(&text).unwrap();
    assert_eq!(back.v, env.v);
    assert_eq!(back.req, env.req);
    assert_eq!(serde_json::to_string(&back).unwrap(), text);
});
