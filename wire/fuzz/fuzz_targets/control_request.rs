//! Fuzz target `control_request`: its body is `ferry_wire::fuzzing::formats::control_request`, which the normal test run
//! also calls on every file of `corpus/control_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_wire::fuzzing::formats::control_request(data));
