//! Arbitrary settings JSON and environment into the settings parser: a
//! valid configuration, or an error that names a key it knows.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use worker_iot_core::config::{KEYS, Settings};

#[derive(Arbitrary, Debug)]
struct Input {
    file: Option<String>,
    env: Vec<(u8, String)>,
}

fuzz_target!(|input: Input| {
    let env: Vec<(&str, String)> = input
        .env
        .into_iter()
        .map(|(k, v)| (KEYS[usize::from(k) % KEYS.len()], v))
        .collect();
    let lookup = |key: &str| env.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
    match Settings::from_sources(input.file.as_deref().map(|text| ("settings.json", text)), lookup) {
        Ok((settings, _)) => {
            assert!(settings.prefetch_count >= 1);
            assert!(!settings.queue.is_empty() && settings.queue.len() <= 200);
            assert!(settings.max_message_bytes >= 1024);
            assert!(settings.pool_size() >= 1);
            let _ = settings.to_string();
        }
        Err(e) => {
            let key = e.key();
            assert!(key == "SETTINGS_FILE" || KEYS.contains(&key), "unknown key {key}");
            assert!(e.to_string().contains(key), "the message names the key: {e}");
        }
    }
});
