//! Any file content: the parser answers Ok or an error that names the file,
//! and never panics.
#![no_main]

use std::path::Path;

use balancer::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse(Path::new("fuzz.toml"), text) {
        assert!(e.to_string().starts_with("fuzz.toml"), "{e}");
    }
});
