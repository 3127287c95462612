//! Domain configuration files (`dom0::xlcfg`): `parse_settings` on any text, then
//! `DomainSpec::from_settings`, as `xl create` does before it sends the spec to the daemon.
//!
//! Checks: settings written back in canonical syntax parse to the same settings; a spec that is
//! accepted holds only values within the documented bounds, names devices uniquely, and survives
//! the JSON trip to the daemon unchanged; errors name a line of the file.
#![no_main]

use std::path::Path;

use dom0::xlcfg::{
    DomainSpec, MAX_CPU, MAX_IMAGE_BYTES, MAX_VIFS, MEMORY_MIB, Setting, VCPUS, Value,
    parse_settings,
};
use libfuzzer_sys::fuzz_target;

fn quote(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '\\' => q.push_str("\\\\"),
            '"' => q.push_str("\\\""),
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

fn write_back(settings: &[Setting]) -> String {
    let mut text = String::new();
    for s in settings {
        let v = match &s.value {
            Value::Str(v) => quote(v),
            Value::Int(i) => i.to_string(),
            Value::List(l) => {
                format!(
                    "[ {} ]",
                    l.iter().map(|x| quote(x)).collect::<Vec<_>>().join(", ")
                )
            }
        };
        text.push_str(&format!("{} = {v}\n", s.key));
    }
    text
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let file = Path::new("fuzz.cfg");
    let lines = text.split('\n').count();
    let settings = match parse_settings(&text, file) {
        Ok(s) => s,
        Err(e) => {
            assert!(
                (1..=lines).contains(&e.line),
                "error at line {} of {lines}",
                e.line
            );
            return;
        }
    };
    for s in &settings {
        assert!((1..=lines).contains(&s.line));
        assert!(!s.key.is_empty());
    }
    // Canonical syntax round trip.
    let again = parse_settings(&write_back(&settings), file).expect("canonical text parses");
    assert_eq!(again.len(), settings.len());
    for (i, (a, b)) in again.iter().zip(&settings).enumerate() {
        assert_eq!((&a.key, &a.value, a.line), (&b.key, &b.value, i + 1));
    }
    let base = Some(Path::new("/etc/splitvisor"));
    let spec = match DomainSpec::from_settings(&settings, file, base) {
        Ok(s) => s,
        Err(e) => {
            assert!((1..=lines).contains(&e.line));
            return;
        }
    };
    assert_eq!(
        DomainSpec::from_settings(&again, file, base),
        Ok(spec.clone())
    );
    // Bounds the daemon relies on.
    let name = spec.name.as_str();
    assert!(!name.is_empty() && name.len() <= 64);
    assert!(
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    );
    assert!(MEMORY_MIB.contains(&spec.memory));
    assert!(VCPUS.contains(&u64::from(spec.vcpus)));
    if let Some(cpus) = &spec.cpus {
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]));
        assert!(cpus.iter().all(|c| *c < MAX_CPU));
    }
    assert!(spec.vifs.len() <= MAX_VIFS);
    let mut devids = std::collections::HashSet::new();
    for d in &spec.disks {
        assert!(d.vdev.to_string().starts_with("xvd"));
        assert!(
            devids.insert(d.devid()),
            "two disks share device id {}",
            d.devid()
        );
        assert!(d.target.is_absolute(), "{:?} not made absolute", d.target);
        if let Some(size) = d.size {
            assert!(size > 0 && size % 512 == 0 && size <= MAX_IMAGE_BYTES);
        }
    }
    if let Some(k) = &spec.kernel {
        assert!(k.is_absolute());
    }
    for v in &spec.vifs {
        assert!(!v.bridge.as_str().is_empty() && v.bridge.as_str().len() < 32);
        if let Some(t) = &v.uplink_tap {
            assert!(!t.as_str().is_empty() && t.as_str().len() < 16);
        }
    }
    // The spec travels to the daemon as JSON.
    let json = serde_json::to_string(&spec).unwrap();
    assert_eq!(serde_json::from_str::<DomainSpec>(&json).unwrap(), spec);
});
