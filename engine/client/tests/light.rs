//! The crate stays light: its normal dependency tree (what a coordinator links) holds none of
//! the data plane's crates. A change that pulls quinn, rustls, ring or io-uring into
//! ferry-client, even through ferry-wire, fails here.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::process::Command;

/// Crates a coordinator must not have to build or link (by name, and names starting so:
/// `quinn-proto`, `rustls-webpki`, ...).
const DATA_PLANE_CRATES: [&str; 4] = ["quinn", "rustls", "ring", "io-uring"];

#[test]
fn normal_dependency_tree_has_no_data_plane_crates() {
    let output = Command::new(env!("CARGO"))
        .args(["tree", "-p", "ferry-client", "-e", "normal", "--prefix", "none", "--format", "{p}"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&output.stderr));
    // "name vX.Y.Z (path) (*)": the name is the first word.
    let names: Vec<&str> = stdout.lines().filter_map(|line| line.split_whitespace().next()).collect();
    // The tree really is this crate's (an empty or wrong output would pass the check below).
    for expected in ["ferry-client", "ferry-wire", "tokio", "serde_json"] {
        assert!(names.contains(&expected), "{expected} missing from the tree:\n{stdout}");
    }
    let heavy: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| DATA_PLANE_CRATES.iter().any(|banned| name == banned || name.starts_with(&format!("{banned}-"))))
        .collect();
    assert!(heavy.is_empty(), "ferry-client pulls in {heavy:?}:\n{stdout}");
}
