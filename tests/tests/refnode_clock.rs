//! The reference node stamps its writer's pauses with its own copy of the daemon's clock (it
//! may not call the engine): the two must read the same clock, or a pause ticket's
//! `paused_at_ns` handed to `migration.fence` would be measured against another clock.
#![allow(clippy::panic)]

#[test]
fn the_reference_node_and_the_engine_read_one_clock() {
    for _ in 0..10_000 {
        let before = ferry_engine::clock::monotonic_ns();
        let refnode = ferry_refnode::monotonic_ns();
        let after = ferry_engine::clock::monotonic_ns();
        assert!(
            before <= refnode && refnode <= after,
            "the reference node's clock ({refnode}) is not between two engine reads ({before}, {after})"
        );
    }
}
