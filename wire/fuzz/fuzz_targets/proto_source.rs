//! Fuzz target `proto_source`: its body is `ferry_wire::fuzzing::proto::source`, which the normal test run
//! also calls on every file of `corpus/proto_source`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_wire::fuzzing::proto::source(data));
