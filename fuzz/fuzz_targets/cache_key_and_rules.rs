//! Cache keys and rule matching on any host and path: different requests get
//! different keys, the path is recovered from a key, and the rule chosen is
//! the longest matching prefix.
#![no_main]

use balancer::cache::{self, key};
use balancer::config::CacheRule;
use libfuzzer_sys::fuzz_target;
use pingora::cache::key::CacheHashKey;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parts: Vec<&str> = text.splitn(4, '\u{0}').collect();
    let [host_a, path_a, host_b, path_b] = parts[..] else {
        return;
    };
    let (a, b) = (key::cache_key(host_a, path_a), key::cache_key(host_b, path_b));
    let same_request = host_a.eq_ignore_ascii_case(host_b) && path_a == path_b;
    assert_eq!(same_request, a.combined() == b.combined(), "{host_a:?}{path_a:?} vs {host_b:?}{path_b:?}");
    assert_eq!(key::path_of(a.primary_key()), path_a.split('?').next().unwrap_or(""));

    // Rules from the other fields; only valid paths become rules, as in a real config.
    let rules: Vec<cache::Rule> = [host_a, host_b, path_b]
        .iter()
        .filter_map(|p| toml::from_str::<CacheRule>(&format!("path = {p:?}\nttl = \"1s\"\n")).ok())
        .map(|rule| cache::Rule::from(&rule))
        .collect();
    let chosen = cache::rule_for(&rules, path_a);
    let longest = rules
        .iter()
        .filter(|r| path_a.starts_with(r.path.as_str()))
        .map(|r| r.path.len())
        .max();
    assert_eq!(chosen.map(|r| r.path.len()), longest);
});
