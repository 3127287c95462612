//! Control requests (`dom0::control`): the daemon reads one line from a client and parses and
//! checks it with `parse_request`. What it accepts is serialised and parsed again: the same
//! request, and the same text the second time.
#![no_main]

use dom0::control::{PROTOCOL_VERSION, RequestError, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let env = match parse_request(data) {
        Ok(env) => env,
        Err(RequestError::Version(v)) => {
            assert_ne!(v, PROTOCOL_VERSION);
            return;
        }
        Err(_) => return,
    };
    assert_eq!(env.v, PROTOCOL_VERSION);
    let text = serde_json::to_string(&env).unwrap();
    let back = parse_request(text.as_bytes()).expect("what was accepted serialises acceptably");
    assert_eq!(back.v, env.v);
    assert_eq!(back.req, env.req);
    assert_eq!(serde_json::to_string(&back).unwrap(), text);
});
